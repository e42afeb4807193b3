//! Traffic by Gateway API weights (`spec.trafficRouting`).
//!
//! Two Services, stable and canary, each select one revision; the routes split traffic
//! between them by weight. The weight follows the step, bounded by the pods that can
//! carry it: the canary never gets a larger share than its ready endpoints make of the
//! replicas, stable never a larger one than its own. Pods leave only while the weight the
//! routes carry leaves them enough (see [`serving_floor`]), and a Service changes the
//! revision it selects only while the routes send it nothing, so no weighted backend is
//! ever left without endpoints. An abort halves the canary's weight every
//! [`ROLLBACK_DWELL`], no faster than stable pods come up: the traffic returns gradually,
//! through the same drain path.

use crate::pod::time::{parse_rfc3339, rfc3339};
use crate::release::crd::{HeaderMatch, TrafficRoutingStatus};

use super::model::{Ctx, Hold, Observed};
use super::weights::{pods_for, step_count, step_header_route, step_weight};

/// The revisions the Services should select: stable its revision; canary the canary's,
/// or stable's when there is none. Being deleted: every pod of the user's Service, so
/// that the routes keep working with the pods handed back to the Deployment.
fn targets(c: &Ctx, o: &Observed) -> (Option<String>, Option<String>) {
    if o.deleting {
        return (None, None);
    }
    let stable = c.status.stable_revision.clone();
    let canary = c.status.canary_revision.clone().or(stable.clone());
    (stable, canary)
}

/// The share (percent) the canary should get this round: the step's, once the canary's
/// Service selects the canary and within what each side's ready endpoints carry.
fn target_weight(c: &Ctx, o: &Observed) -> i32 {
    if o.deleting || c.status.canary_revision.is_none() {
        return 0;
    }
    let cur = c.status.current_step.unwrap_or(0);
    if cur >= step_count(c.s) {
        100
    } else {
        step_weight(c.s, Some(cur))
    }
}

/// How long each weight holds while traffic goes back to stable.
pub const ROLLBACK_DWELL: std::time::Duration = std::time::Duration::from_secs(2);

fn share(ready: i32, n: i32) -> i32 {
    if n <= 0 {
        return 0;
    }
    ((i64::from(ready.max(0)) * 100 / i64::from(n)).min(100)) as i32
}

/// Services and weights for this round. Runs after the revisions are decided and before
/// pods move.
pub(super) fn steer(c: &mut Ctx, o: &Observed, n: i32) {
    let (Some(_), Some(r)) = (&c.s.routing, &o.routing) else {
        return;
    };
    let mut st = c.status.traffic_routing.take().unwrap_or_default();
    st.problem = None;
    measure(c, o, &mut st);
    if let Some(p) = &r.service_problem {
        st.problem = Some(p.clone());
        c.status.traffic_routing = Some(st);
        hold(c, p.clone());
        return;
    }
    let weight = r.canary_weight.as_ref().ok().copied();
    let (want_s, want_c) = targets(c, o);
    // A Service may switch to another revision only while the routes send it nothing
    // (or, being deleted, to every pod: a superset of what it selected).
    let may_switch =
        |cur: &Option<Option<String>>, want: &Option<String>, routed: Option<i32>| match cur {
            None => true,
            Some(now) if now == want => false,
            Some(_) => want.is_none() || routed == Some(0),
        };
    let next_s = if may_switch(&r.stable_selects, &want_s, weight.map(|w| 100 - w)) {
        Some(want_s.clone())
    } else {
        r.stable_selects.clone()
    };
    let next_c = if may_switch(&r.canary_selects, &want_c, weight) {
        Some(want_c.clone())
    } else {
        r.canary_selects.clone()
    };
    if next_s != r.stable_selects || next_c != r.canary_selects {
        c.actions.push(super::Action::ApplyRoutingServices {
            stable: next_s.clone().flatten(),
            canary: next_c.clone().flatten(),
        });
        c.busy = true;
    }
    st.stable_selects = next_s.flatten();
    st.canary_selects = next_c.flatten();

    let w = match &r.canary_weight {
        Ok(w) => *w,
        Err(p) => {
            st.problem = Some(p.clone());
            st.canary_weight = None;
            c.status.traffic_routing = Some(st);
            hold(c, p.clone());
            return;
        }
    };
    st.canary_weight = Some(w);
    let t = target_weight(c, o);
    let at_target = r.stable_selects == Some(want_s.clone()) && r.canary_selects == Some(want_c);
    let desired = if t > w {
        if at_target || o.deleting {
            t.min(share(r.canary_ready, n)).max(w)
        } else {
            w
        }
    } else if t < w {
        if o.deleting {
            t
        } else if r.stable_selects != r.canary_selects {
            // Traffic going back to another revision: half the canary's share at a time,
            // every ROLLBACK_DWELL, so the stable pods take it over gradually.
            let since = st
                .weight_set_at
                .as_deref()
                .and_then(parse_rfc3339)
                .map_or(f64::INFINITY, |at| c.now - at);
            let next = if since < ROLLBACK_DWELL.as_secs_f64() {
                w
            } else if w < 4 {
                t
            } else {
                (w / 2).max(t)
            };
            next.max(100 - share(r.stable_ready, n)).min(w)
        } else {
            // Both Services select the same pods (a completed release): no traffic moves.
            t
        }
    } else {
        w
    };
    if desired != w {
        c.actions
            .push(super::Action::SetRouteWeight { canary: desired });
        c.event(
            false,
            "TrafficShifted",
            format!("routes: canary {w}% → {desired}% (step wants {t}%)"),
        );
        st.weight_set_at = Some(rfc3339(c.now));
        c.busy = true;
    } else if r.canary_ref_missing {
        // Same weights; the patch adds the canary's backendRef (at `w`).
        c.actions.push(super::Action::SetRouteWeight { canary: w });
    }
    if desired != t {
        c.busy = true;
    }
    // Header routes: once the canary Service selects the canary and has an endpoint.
    let headers = active_headers(c, o);
    let ready = headers.is_empty() || (at_target && r.canary_ready > 0);
    if ready && r.header_route.as_ref() != Some(&headers) {
        c.actions.push(super::Action::SetHeaderRoute {
            headers: headers.clone(),
        });
        let what = if headers.is_empty() {
            "routes: header route removed".to_string()
        } else {
            let names: Vec<String> = headers.iter().map(ToString::to_string).collect();
            format!(
                "routes: requests with {} go to the canary",
                names.join(", ")
            )
        };
        c.event(false, "HeaderRouteSet", what);
        c.busy = true;
    } else if !ready {
        c.busy = true;
    }
    st.header_route = r
        .header_route
        .iter()
        .flatten()
        .map(ToString::to_string)
        .collect();
    c.status.traffic_routing = Some(st);
}

/// The header route the routes should carry now: the step's, while a canary runs.
fn active_headers(c: &Ctx, o: &Observed) -> Vec<HeaderMatch> {
    if o.deleting || c.status.canary_revision.is_none() {
        return Vec::new();
    }
    step_header_route(c.s, c.status.current_step).to_vec()
}

/// Whether a `setHeaderRoute` step is in place on the routes.
pub(super) fn header_route_reached(o: &Observed, headers: &[HeaderMatch]) -> bool {
    o.routing
        .as_ref()
        .is_some_and(|r| r.header_route.as_deref() == Some(headers))
}

fn hold(c: &mut Ctx, message: String) {
    c.hold = Some(Hold {
        reason: "RoutingBlocked",
        message: format!("traffic routing: {message}"),
        paused: false,
        degraded: true,
    });
}

/// The canary's share of the requests both sides' agents served over the window.
fn measure(c: &Ctx, o: &Observed, st: &mut TrafficRoutingStatus) {
    let (Some(canary), Some(stable)) = (&c.status.canary_revision, &c.status.stable_revision)
    else {
        st.measured_canary_percent = None;
        st.measured_requests = None;
        return;
    };
    let cr = o.split.get(canary).copied().unwrap_or(0.0);
    let sr = o.split.get(stable).copied().unwrap_or(0.0);
    let total = cr + sr;
    st.measured_requests = Some(total.round() as i64);
    st.measured_canary_percent = (total > 0.0).then(|| (cr * 1000.0 / total).round() / 10.0);
}

/// The fewest serving pods `rev` must keep: as many as the weight the routes send to the
/// Services selecting it needs. `None` without traffic routing; with routes that cannot
/// be read, every serving pod stays.
pub(super) fn serving_floor(c: &Ctx, o: &Observed, n: i32, rev: &str, serving: i32) -> Option<i32> {
    c.s.routing.as_ref()?;
    let r = o.routing.as_ref()?;
    let Ok(w) = r.canary_weight else {
        return Some(serving);
    };
    let selects = |s: &Option<Option<String>>| matches!(s, Some(Some(x)) if x == rev);
    let routed = if selects(&r.stable_selects) {
        100 - w
    } else {
        0
    } + if selects(&r.canary_selects) { w } else { 0 };
    let mut floor = pods_for(n, routed.min(100));
    // A header route on the routes needs the canary's pod too.
    if selects(&r.canary_selects) && r.header_route.as_ref().is_none_or(|h| !h.is_empty()) {
        floor = floor.max(1);
    }
    Some(floor)
}

/// Whether a `setWeight` step's traffic is in place: the routes carry the weight and,
/// with `verify`, the agents measured it. `Err`: what the step waits for.
pub(super) fn step_reached(c: &mut Ctx, o: &Observed, w: i32) -> Result<(), String> {
    let Some(rs) = c.s.routing.clone() else {
        return Ok(());
    };
    let Some(r) = &o.routing else {
        return Err("reading the routes".into());
    };
    if let Some(p) = &r.service_problem {
        return Err(p.clone());
    }
    let on_routes = r.canary_weight.clone()?;
    if on_routes != w {
        return Err(format!(
            "routes give the canary {on_routes}%, moving to {w}% as its pods come up"
        ));
    }
    let Some(v) = &rs.verify else {
        return Ok(());
    };
    let Some(st) = c.status.traffic_routing.as_mut() else {
        return Err("measuring the split".into());
    };
    let window = v.window.as_secs_f64();
    let since = st
        .weight_set_at
        .as_deref()
        .and_then(parse_rfc3339)
        .map(|t| c.now - t)
        .unwrap_or(f64::INFINITY);
    if since < window {
        return Err(format!(
            "measuring the split at {w}%: {:.0}s of the {window:.0}s window",
            since.max(0.0)
        ));
    }
    let total = st.measured_requests.unwrap_or(0);
    let Some(pct) = st
        .measured_canary_percent
        .filter(|_| total >= v.min_requests)
    else {
        return Err(format!(
            "{total} requests in the last {window:.0}s: {} needed to verify the {w}% split",
            v.min_requests
        ));
    };
    if (pct - f64::from(w)).abs() > v.tolerance {
        return Err(format!(
            "the canary served {pct}% of {total} requests, the routes say {w}% (tolerance {} points)",
            v.tolerance
        ));
    }
    if st.verified_weight != Some(w) {
        st.verified_weight = Some(w);
        c.event(
            false,
            "TrafficSplitVerified",
            format!("the canary served {pct}% of {total} requests at weight {w}%"),
        );
    }
    Ok(())
}
