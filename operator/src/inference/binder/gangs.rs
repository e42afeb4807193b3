//! The complete pending gangs of a round, oldest first.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;

use super::objects::{annotation, gang_key, is_pending_for_us};
use crate::inference::crd::{GANG_INDEX_ANNOTATION, GANG_SIZE_ANNOTATION};

/// One gang ready to place: its pods in gang order.
pub(super) struct PendingGang {
    pub key: String,
    pub pods: Vec<Arc<Pod>>,
    pub created: Option<k8s_openapi::jiff::Timestamp>,
}

/// The gangs whose pods all wait for this binder (none of them being bound now, per
/// `binding`), each in gang-index order, oldest gang first.
pub(super) fn pending_gangs(pods: &[Arc<Pod>], binding: impl Fn(&str) -> bool) -> Vec<PendingGang> {
    let mut by: BTreeMap<String, Vec<Arc<Pod>>> = BTreeMap::new();
    let bound_by_us = |p: &Pod| p.metadata.uid.as_deref().is_some_and(&binding);
    for p in pods
        .iter()
        .filter(|p| is_pending_for_us(p) && !bound_by_us(p))
    {
        by.entry(gang_key(p)).or_default().push(p.clone());
    }
    let mut out: Vec<PendingGang> = by
        .into_iter()
        .filter_map(|(key, mut pods)| {
            let size = annotation(&pods[0], GANG_SIZE_ANNOTATION)
                .and_then(|s| s.parse::<usize>().ok())
                .unwrap_or(1);
            if pods.len() != size {
                return None;
            }
            pods.sort_by_key(|p| {
                annotation(p, GANG_INDEX_ANNOTATION)
                    .and_then(|s| s.parse::<i64>().ok())
                    .unwrap_or(0)
            });
            let created = pods
                .iter()
                .filter_map(|p| p.metadata.creation_timestamp.as_ref().map(|t| t.0))
                .max();
            Some(PendingGang { key, pods, created })
        })
        .collect();
    out.sort_by(|a, b| (a.created, &a.key).cmp(&(b.created, &b.key)));
    out
}
