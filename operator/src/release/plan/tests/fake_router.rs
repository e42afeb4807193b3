//! A simulated Gateway API data plane for the planner's tests: routes with one weight,
//! the stable and canary Services, and endpoints that follow the pods' readiness. It
//! records every weight the routes carried and every round in which a weighted backend
//! had no endpoint (a request sent there would fail).

use std::collections::BTreeMap;

use super::Sim;
use crate::release::plan::{Action, PodView, RoutingObserved};

#[derive(Clone, Debug, Default)]
pub(super) struct FakeRouter {
    /// The canary's share the routes carry.
    pub(super) weight: i32,
    pub(super) stable: Option<Option<String>>,
    pub(super) canary: Option<Option<String>>,
    /// Every weight written, in order.
    pub(super) weights: Vec<i32>,
    /// Rounds in which a backend with weight had no ready endpoint.
    pub(super) empty_backends: Vec<String>,
    /// The routes cannot be read: why.
    pub(super) broken: Option<String>,
    /// Points added to the canary's measured share (a data plane that ignores weights).
    pub(super) skew: f64,
    /// Requests per second through the routes.
    pub(super) rps: f64,
    /// The header route the routes carry.
    pub(super) headers: Vec<crate::release::crd::HeaderMatch>,
}

fn endpoint(p: &PodView, selects: &Option<Option<String>>) -> bool {
    let of = match selects {
        None => false,
        Some(None) => true,
        Some(Some(rev)) => &p.revision == rev,
    };
    of && !p.deleting && p.containers_ready && p.serving == Some(true) && p.drain_started.is_none()
}

impl FakeRouter {
    pub(super) fn new() -> Self {
        FakeRouter {
            rps: 100.0,
            ..Default::default()
        }
    }

    fn ready(&self, sim: &Sim, selects: &Option<Option<String>>) -> i32 {
        sim.pods.iter().filter(|p| endpoint(p, selects)).count() as i32
    }

    /// Requests per revision over the last 10 s: as the weight says (plus any skew).
    pub(super) fn split(&self) -> BTreeMap<String, f64> {
        let mut split = BTreeMap::new();
        let share = ((f64::from(self.weight) + self.skew) / 100.0).clamp(0.0, 1.0);
        let total = self.rps * 10.0;
        if let Some(Some(c)) = &self.canary {
            *split.entry(c.clone()).or_insert(0.0) += total * share;
        }
        if let Some(Some(s)) = &self.stable {
            *split.entry(s.clone()).or_insert(0.0) += total * (1.0 - share);
        }
        split
    }

    pub(super) fn observe(&self, sim: &Sim) -> RoutingObserved {
        RoutingObserved {
            canary_weight: match &self.broken {
                Some(why) => Err(why.clone()),
                None => Ok(self.weight),
            },
            canary_ref_missing: self.weights.is_empty(),
            header_route: Some(self.headers.clone()),
            stable_selects: self.stable.clone(),
            canary_selects: self.canary.clone(),
            stable_ready: self.ready(sim, &self.stable),
            canary_ready: self.ready(sim, &self.canary),
            service_problem: None,
        }
    }

    pub(super) fn apply(&mut self, a: &Action) {
        match a {
            Action::ApplyRoutingServices { stable, canary } => {
                self.stable = Some(stable.clone());
                self.canary = Some(canary.clone());
            }
            Action::SetHeaderRoute { headers } => self.headers = headers.clone(),
            Action::SetRouteWeight { canary } => {
                assert!((0..=100).contains(canary), "weight {canary}");
                self.weight = *canary;
                self.weights.push(*canary);
            }
            _ => {}
        }
    }

    /// After the pods moved: a backend the routes weight must have an endpoint.
    pub(super) fn check(&mut self, sim: &Sim) {
        if (self.weight > 0 || !self.headers.is_empty())
            && self.canary.is_some()
            && self.ready(sim, &self.canary) == 0
        {
            self.empty_backends.push(format!(
                "canary at {}% with no endpoint at t={}",
                self.weight, sim.now
            ));
        }
        if self.weight < 100 && self.stable.is_some() && self.ready(sim, &self.stable) == 0 {
            self.empty_backends.push(format!(
                "stable at {}% with no endpoint at t={}",
                100 - self.weight,
                sim.now
            ));
        }
    }
}
