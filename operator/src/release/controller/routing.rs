//! Traffic routing I/O: read the routes, the two Services and their endpoints; apply the
//! Services and write the routes' weights (the decisions are `plan/routing.rs`'s).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ApiResource, DynamicObject, ListParams, ObjectMeta, Patch, PatchParams};
use kube::core::GroupVersionKind;
use serde_json::Value;

use crate::pod::keys::REVISION_LABEL;
use crate::release::crd::HeaderMatch;
use crate::release::crd::{FIELD_MANAGER, RELEASE_LABEL};
use crate::release::gateway_api::{
    canary_percent, header_patch, header_route_of, rules_of, weight_patch,
};
use crate::release::plan::{PodView, RoutingObserved};
use crate::release::settings::{RouteName, RoutingSettings};

use super::context::{Context, Error};

fn route_api(ctx: &Context, ns: &str, route: &RouteName) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", route.kind.kind());
    let ar = ApiResource::from_gvk_with_plural(&gvk, route.kind.plural());
    Api::namespaced_with(ctx.client.clone(), ns, &ar)
}

/// What the Services select: `None` missing, `Some(None)` every pod of the user's
/// Service, `Some(Some(rev))` one revision.
fn selects(svc: &Option<Service>) -> Option<Option<String>> {
    let svc = svc.as_ref()?;
    Some(
        svc.spec
            .as_ref()
            .and_then(|s| s.selector.as_ref())
            .and_then(|s| s.get(REVISION_LABEL).cloned()),
    )
}

/// Ready endpoints of Service `name` whose pods are of the revision it selects.
async fn ready_endpoints(
    ctx: &Context,
    ns: &str,
    name: &str,
    selected: &Option<Option<String>>,
    pods: &[PodView],
) -> Result<i32, Error> {
    let Some(selected) = selected else {
        return Ok(0);
    };
    let slices: Api<EndpointSlice> = Api::namespaced(ctx.client.clone(), ns);
    let list = slices
        .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={name}")))
        .await?;
    let mut seen = std::collections::BTreeSet::new();
    for slice in &list.items {
        for e in &slice.endpoints {
            // Unknown readiness counts as ready, as the EndpointSlice API says.
            let ready = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            let Some(pod) = e.target_ref.as_ref().and_then(|t| t.name.as_deref()) else {
                continue;
            };
            let of_revision = match selected {
                None => true,
                Some(rev) => pods.iter().any(|p| p.name == pod && &p.revision == rev),
            };
            if ready && of_revision {
                seen.insert(pod.to_string());
            }
        }
    }
    Ok(seen.len() as i32)
}

/// Read everything `plan/routing.rs` decides on.
pub(super) async fn observe(
    ctx: &Context,
    ns: &str,
    r: &RoutingSettings,
    pods: &[PodView],
) -> Result<RoutingObserved, Error> {
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), ns);
    let user = services.get_opt(&r.service).await?;
    let service_problem = match &user {
        None => Some(format!(
            "Service {:?} (trafficRouting.service) not found in the Release's namespace",
            r.service
        )),
        Some(s)
            if s.spec
                .as_ref()
                .and_then(|s| s.selector.as_ref())
                .is_none_or(|m| m.is_empty()) =>
        {
            Some(format!(
                "Service {:?} has no selector: the stable and canary Services copy it",
                r.service
            ))
        }
        _ => None,
    };
    let stable = services.get_opt(&r.stable_service()).await?;
    let canary = services.get_opt(&r.canary_service()).await?;
    let (stable_selects, canary_selects) = (selects(&stable), selects(&canary));
    let stable_ready = ready_endpoints(ctx, ns, &r.stable_service(), &stable_selects, pods).await?;
    let canary_ready = ready_endpoints(ctx, ns, &r.canary_service(), &canary_selects, pods).await?;

    let mut canary_weight: Result<i32, String> = Ok(0);
    let mut first: Option<(String, i32)> = None;
    let mut canary_ref_missing = false;
    let mut header_route: Option<Vec<HeaderMatch>> = None;
    let mut seen_route = false;
    for route in &r.routes {
        let kind = route.kind.kind();
        let found = match route_api(ctx, ns, route).get_opt(&route.name).await {
            Ok(found) => found,
            // No such resource: the Gateway API CRDs are not installed.
            Err(kube::Error::Api(e)) if e.code == 404 => None,
            Err(e) => return Err(e.into()),
        };
        let Some(obj) = found else {
            canary_weight = Err(format!(
                "{kind} {:?} not found in the Release's namespace",
                route.name
            ));
            break;
        };
        let value = serde_json::to_value(&obj)?;
        let headers = header_route_of(&value, &r.stable_service(), &r.canary_service());
        header_route = match (header_route, headers) {
            (None, h) if !seen_route => h,
            (Some(a), Some(b)) if a == b => Some(a),
            _ => None,
        };
        seen_route = true;
        canary_ref_missing |= rules_of(&value, &r.stable_service(), &r.canary_service())
            .iter()
            .any(|rule| rule.canary.is_none());
        match canary_percent(&value, kind, &r.stable_service(), &r.canary_service()) {
            Err(e) => {
                canary_weight = Err(e);
                break;
            }
            Ok(w) => match &first {
                Some((other, fw)) if *fw != w => {
                    canary_weight = Err(format!(
                        "{other} gives the canary {fw}%, {kind} {} {w}%",
                        route.name
                    ));
                    break;
                }
                Some(_) => {}
                None => {
                    first = Some((format!("{kind} {}", route.name), w));
                    canary_weight = Ok(w);
                }
            },
        }
    }
    Ok(RoutingObserved {
        canary_weight,
        canary_ref_missing,
        header_route,
        stable_selects,
        canary_selects,
        stable_ready,
        canary_ready,
        service_problem,
    })
}

/// Server-side apply `<service>-stable` and `<service>-canary`: the user's Service's ports
/// and selector, plus each side's revision. They carry no owner: a deleted Release leaves
/// them selecting every pod of the user's Service, so the routes keep working.
pub(super) async fn apply_services(
    ctx: &Context,
    ns: &str,
    release: &str,
    r: &RoutingSettings,
    stable: &Option<String>,
    canary: &Option<String>,
) -> Result<(), Error> {
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), ns);
    let Some(user) = services.get_opt(&r.service).await? else {
        return Ok(());
    };
    let spec = user.spec.unwrap_or_default();
    let ports: Vec<ServicePort> = spec
        .ports
        .unwrap_or_default()
        .into_iter()
        .map(|p| ServicePort {
            name: p.name,
            port: p.port,
            target_port: p.target_port,
            protocol: p.protocol,
            app_protocol: p.app_protocol,
            ..Default::default()
        })
        .collect();
    for (name, revision) in [(r.stable_service(), stable), (r.canary_service(), canary)] {
        let mut selector = spec.selector.clone().unwrap_or_default();
        if let Some(rev) = revision {
            selector.insert(REVISION_LABEL.to_string(), rev.clone());
        }
        let svc = Service {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(ns.to_string()),
                labels: Some(BTreeMap::from([
                    (RELEASE_LABEL.to_string(), release.to_string()),
                    (
                        "app.kubernetes.io/managed-by".to_string(),
                        "sluice".to_string(),
                    ),
                ])),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                selector: Some(selector),
                ports: Some(ports.clone()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut value = serde_json::to_value(&svc)?;
        value["apiVersion"] = "v1".into();
        value["kind"] = "Service".into();
        services
            .patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&value),
            )
            .await?;
    }
    Ok(())
}

/// Give the canary `percent` in every steered rule of every route.
pub(super) async fn set_weight(
    ctx: &Context,
    ns: &str,
    r: &RoutingSettings,
    percent: i32,
) -> Result<(), Error> {
    let (stable, canary) = (r.stable_service(), r.canary_service());
    patch_routes(ctx, ns, r, |route| {
        weight_patch(route, &stable, &canary, percent)
    })
    .await
}

/// Make every route send requests with `headers` to the canary (none: remove).
pub(super) async fn set_header_route(
    ctx: &Context,
    ns: &str,
    r: &RoutingSettings,
    headers: &[HeaderMatch],
) -> Result<(), Error> {
    let (stable, canary) = (r.stable_service(), r.canary_service());
    patch_routes(ctx, ns, r, |route| {
        header_patch(route, &stable, &canary, headers)
    })
    .await
}

/// Read each route and apply the JSON patch `ops` makes of it (none when empty).
async fn patch_routes(
    ctx: &Context,
    ns: &str,
    r: &RoutingSettings,
    ops: impl Fn(&Value) -> Vec<Value>,
) -> Result<(), Error> {
    for route in &r.routes {
        let api = route_api(ctx, ns, route);
        let Some(obj) = api.get_opt(&route.name).await? else {
            continue;
        };
        let ops = ops(&serde_json::to_value(&obj)?);
        if ops.is_empty() {
            continue;
        }
        api.patch(
            &route.name,
            &PatchParams::default(),
            &Patch::<()>::Json(serde_json::from_value(Value::Array(ops))?),
        )
        .await?;
    }
    Ok(())
}
