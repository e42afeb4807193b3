//! One short baseline run end to end: a rolling update v1 → v2 on the real node under
//! load, through the service proxy with a propagation delay, measured by the scenario
//! runner. B1 (no preStop, the app exits at once) behind a slow load balancer must lose
//! requests — if it does not, the test ground is not realistic.
mod ground_common;

use std::time::Duration;

use ground_common::*;
use sluice_e2e::scenario::{self, RunSpec};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b1_behind_a_slow_load_balancer_loses_requests() -> anyhow::Result<()> {
    let cluster = sluice_e2e::cluster::TestCluster::get().await?;
    require_node(&cluster.client).await?;
    let spec = RunSpec {
        replicas: 3,
        connections: 30,
        rate: 150.0,
        delay: Duration::from_secs(3),
        steady: Duration::from_secs(4),
        tail: Duration::from_secs(2),
        max_release: Duration::from_secs(60),
        ..Default::default()
    };
    let r = scenario::run_one(&cluster.client, &scenario::b1(), &spec).await?;
    eprintln!(
        "B1 short run: {} requests, {} failed {:?}, storm {:.1}, release {:.1} s",
        r.requests, r.failed, r.by_outcome, r.storm.factor, r.release_s
    );
    // The load ran at about the asked rate for the whole run.
    let expected = spec.rate * (spec.steady + spec.delay + spec.tail).as_secs_f64();
    assert!(
        r.requests as f64 >= 0.8 * expected,
        "{} requests, expected at least {expected:.0}",
        r.requests
    );
    assert!(
        r.failed > 0,
        "B1 with a 3 s propagation delay lost nothing: the ground is unrealistic"
    );
    assert_rolled_over(&r, 3);
    assert!(r.release_s > 0.0 && r.release_s < 60.0);
    Ok(())
}
