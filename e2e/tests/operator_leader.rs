//! Two operator replicas against the real control plane: exactly one leads; when the
//! leader dies without releasing (SIGKILL), the standby takes over after the lease
//! expires; a clean shutdown hands over at once. With the API server paused (SIGSTOP) the
//! leader stops acting by its renew deadline, before the standby may take over, and a
//! holder's timestamps from a skewed clock neither hand the Lease over early nor keep it
//! forever. A leader whose network to the API server stalls while the standby's does not
//! stops acting before the standby takes over.
mod ground_common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, ObjectMeta, PostParams};
use sluice_e2e::cluster::{ClusterState, TestCluster, free_port, repo_root};

fn operator(kubeconfig: &std::path::Path, ns: &str, identity: &str) -> Child {
    operator_logged(kubeconfig, ns, identity, "sluice-operator", None)
}

/// Lease 4 s, renew deadline 3 s, retry 500 ms; JSON logs to `log` when given. Its
/// controllers watch only `ns` and inject the ground's agent image.
fn operator_logged(
    kubeconfig: &std::path::Path,
    ns: &str,
    identity: &str,
    lease: &str,
    log: Option<&std::path::Path>,
) -> Child {
    let bin = repo_root().join("target/debug/sluice-operator");
    let stderr = match log {
        Some(path) => Stdio::from(std::fs::File::create(path).expect("log file")),
        None => Stdio::null(),
    };
    Command::new(bin)
        .args([
            "run",
            "--lease-duration",
            "4s",
            "--renew-deadline",
            "3s",
            "--retry-period",
            "500ms",
            "--lease-namespace",
            ns,
            "--lease-name",
            lease,
            "--identity",
            identity,
            "--log-format",
            "json",
        ])
        .arg("--admin-addr")
        .arg(format!("127.0.0.1:{}", free_port().expect("free port")))
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .env("RUST_LOG", "sluice_operator=info,warn")
        .env("SLUICE_WATCH_NAMESPACE", ns)
        .env("SLUICE_AGENT_IMAGE", "sluice/agent:dev")
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("sluice-operator is built (cargo build --workspace --bins)")
}

/// The periods in which a replica's controllers ran, from its log: from "leading:
/// starting controllers" to "stopped acting" (or `None`: still acting at the end).
fn acting_periods(log: &std::path::Path) -> Vec<(Timestamp, Option<Timestamp>)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut periods: Vec<(Timestamp, Option<Timestamp>)> = Vec::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(msg), Some(ts)) = (v["message"].as_str(), v["timestamp"].as_str()) else {
            continue;
        };
        let Ok(ts) = ts.parse::<Timestamp>() else {
            continue;
        };
        if msg.starts_with("leading: starting controllers") {
            periods.push((ts, None));
        } else if msg.starts_with("stopped acting")
            && let Some(last) = periods.last_mut()
            && last.1.is_none()
        {
            last.1 = Some(ts);
        }
    }
    periods
}

fn log_has(log: &std::path::Path, needle: &str) -> bool {
    std::fs::read_to_string(log).is_ok_and(|t| t.contains(needle))
}

fn apiserver_pid() -> anyhow::Result<i32> {
    let state = ClusterState::load()?.context("no target/e2e/state.json: is the ground up?")?;
    state
        .daemons
        .iter()
        .find(|d| d.name == "kube-apiserver")
        .map(|d| d.pid)
        .context("no kube-apiserver in the ground's state")
}

/// Resumes a stopped process when dropped, so a failing assertion never leaves the API
/// server stopped.
struct Resume(i32);

impl Drop for Resume {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

fn wait_exit(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

async fn holder(leases: &Api<Lease>) -> Option<String> {
    holder_of(leases, "sluice-operator").await
}

async fn holder_of(leases: &Api<Lease>, name: &str) -> Option<String> {
    leases
        .get_opt(name)
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
}

async fn wait_for_holder(
    leases: &Api<Lease>,
    want: impl Fn(&str) -> bool,
    timeout: Duration,
) -> Option<String> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(h) = holder(leases).await.filter(|h| want(h)) {
            return Some(h);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

#[tokio::test]
async fn one_leader_and_failover() -> anyhow::Result<()> {
    let cluster = TestCluster::get().await?;
    let ns = cluster.namespace("leader").await?;
    let leases: Api<Lease> = Api::namespaced(cluster.client.clone(), &ns.name);
    let mut a = operator(&cluster.kubeconfig, &ns.name, "replica-a");
    let mut b = operator(&cluster.kubeconfig, &ns.name, "replica-b");

    let first = wait_for_holder(&leases, |_| true, Duration::from_secs(30))
        .await
        .expect("someone leads");
    // The holder stays the same while both run (no flapping) over several renewals.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(holder(&leases).await.as_deref(), Some(first.as_str()));
    }

    // SIGKILL the leader: no release, so the standby waits out the lease.
    let (leader, standby, standby_id) = if first == "replica-a" {
        (&mut a, &mut b, "replica-b")
    } else {
        (&mut b, &mut a, "replica-a")
    };
    leader.kill()?;
    leader.wait()?;
    let next = wait_for_holder(&leases, |h| h == standby_id, Duration::from_secs(30)).await;
    assert_eq!(next.as_deref(), Some(standby_id), "the standby took over");

    // A clean shutdown (SIGTERM) releases the Lease.
    unsafe { libc::kill(standby.id() as i32, libc::SIGTERM) };
    standby.wait()?;
    assert_eq!(
        holder(&leases).await,
        None,
        "the Lease was released on SIGTERM"
    );
    Ok(())
}

/// The API server stops answering (SIGSTOP) for 10 s while two replicas run: the leader
/// stops its controllers and exits by its renew deadline (3 s), while the API server is
/// still stopped; the standby takes over only after the API server is back and the Lease
/// has stood still for a lease duration (4 s) by its own clock. The replicas' logs show
/// their acting periods never overlap.
#[tokio::test]
async fn api_server_paused_never_two_leaders() -> anyhow::Result<()> {
    let cluster = TestCluster::get().await?;
    let ns = cluster.namespace("leader-pause").await?;
    let leases: Api<Lease> = Api::namespaced(cluster.client.clone(), &ns.name);
    let dir = ground_common::scratch(&ns.name);
    let logs = [dir.join("replica-a.log"), dir.join("replica-b.log")];
    let ids = ["replica-a", "replica-b"];
    let mut procs = [
        operator_logged(
            &cluster.kubeconfig,
            &ns.name,
            ids[0],
            "sluice-operator",
            Some(&logs[0]),
        ),
        operator_logged(
            &cluster.kubeconfig,
            &ns.name,
            ids[1],
            "sluice-operator",
            Some(&logs[1]),
        ),
    ];
    let first = wait_for_holder(&leases, |_| true, Duration::from_secs(30))
        .await
        .expect("someone leads");
    let (l, s) = if first == ids[0] { (0, 1) } else { (1, 0) };
    let deadline = Instant::now() + Duration::from_secs(15);
    while !log_has(&logs[l], "leading: starting controllers") {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the holder never started its controllers"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let pid = apiserver_pid()?;
    let resume = Resume(pid);
    anyhow::ensure!(
        unsafe { libc::kill(pid, libc::SIGSTOP) } == 0,
        "SIGSTOP failed"
    );
    let paused = Instant::now();
    // Renew deadline 3 s after its last successful renewal started (at most 500 ms
    // before the pause), plus the time to stop the controllers and exit.
    let exited = wait_exit(&mut procs[l], Duration::from_secs(6));
    let stopped_after = paused.elapsed();
    // Keep the API server stopped for 10 s in all, well beyond the lease duration.
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(paused.elapsed())).await;
    let standby_alive = procs[s].try_wait()?.is_none();
    drop(resume);
    let resumed = Instant::now();
    let exited = exited.with_context(|| {
        format!(
            "the leader {} still ran 6 s into the pause: it kept acting",
            ids[l]
        )
    })?;
    eprintln!("leader exited {stopped_after:?} into the pause ({exited})");
    assert!(
        !exited.success(),
        "the leader exits non-zero when it loses the Lease"
    );
    assert!(standby_alive, "the standby kept running through the pause");
    assert!(
        log_has(&logs[l], "could not renew it within the renew deadline"),
        "the leader says why it stopped"
    );

    let next = wait_for_holder(&leases, |h| h == ids[s], Duration::from_secs(30)).await;
    assert_eq!(next.as_deref(), Some(ids[s]), "the standby took over");
    eprintln!(
        "standby holds the Lease {:?} after the resume",
        resumed.elapsed()
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while !log_has(&logs[s], "leading: starting controllers") {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the standby never started its controllers"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    unsafe { libc::kill(procs[s].id() as i32, libc::SIGTERM) };
    procs[s].wait()?;
    let old = acting_periods(&logs[l]);
    let new = acting_periods(&logs[s]);
    eprintln!("acting periods: {}: {old:?}; {}: {new:?}", ids[l], ids[s]);
    assert_eq!(old.len(), 1, "{old:?}");
    assert_eq!(new.len(), 1, "{new:?}");
    let old_end = old[0]
        .1
        .context("the old leader never logged that it stopped acting")?;
    assert!(
        old_end < new[0].0,
        "two leaders acted at once: {} stopped at {old_end}, {} started at {}",
        ids[l],
        ids[s],
        new[0].0
    );
    assert!(
        new[0].1.is_some(),
        "SIGTERM stops the controllers before the Lease goes"
    );
    assert_eq!(holder(&leases).await, None, "released on SIGTERM");
    Ok(())
}

/// A TCP relay to the API server that can stall: while stalled it moves no byte in either
/// direction and closes nothing, which is what a network partition does to established
/// connections; connections opened meanwhile are accepted and left waiting. Stopped
/// relaying when dropped.
struct StallableRelay {
    addr: std::net::SocketAddr,
    stalled: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl StallableRelay {
    async fn start(upstream: std::net::SocketAddr) -> anyhow::Result<Self> {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let stalled = Arc::new(AtomicBool::new(false));
        let flag = stalled.clone();
        async fn wait_unstalled(flag: &AtomicBool) {
            while flag.load(Ordering::Acquire) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        async fn pump(
            mut from: tokio::net::tcp::OwnedReadHalf,
            mut to: tokio::net::tcp::OwnedWriteHalf,
            flag: Arc<AtomicBool>,
        ) {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                wait_unstalled(&flag).await;
                let n = match from.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                // Bytes read just before a stall wait with the rest.
                wait_unstalled(&flag).await;
                if to.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            let _ = to.shutdown().await;
        }
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let flag = flag.clone();
                tokio::spawn(async move {
                    wait_unstalled(&flag).await;
                    let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::spawn(pump(cr, sw, flag.clone()));
                    pump(sr, cw, flag).await;
                });
            }
        });
        Ok(StallableRelay {
            addr,
            stalled,
            task,
        })
    }

    fn stall(&self, on: bool) {
        self.stalled.store(on, std::sync::atomic::Ordering::Release);
    }
}

impl Drop for StallableRelay {
    fn drop(&mut self) {
        self.stall(false);
        self.task.abort();
    }
}

/// A child process killed and reaped when dropped (a failed assertion leaves none behind).
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `kubeconfig` with its server replaced by `https://<addr>` (the API server's certificate
/// names 127.0.0.1), written to `out`; and the API server's own address.
fn kubeconfig_via(
    kubeconfig: &std::path::Path,
    addr: std::net::SocketAddr,
    out: &std::path::Path,
) -> anyhow::Result<std::net::SocketAddr> {
    let mut doc: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(kubeconfig)?)?;
    let server = doc["clusters"][0]["cluster"]["server"]
        .as_str()
        .context("kubeconfig without a server")?
        .to_string();
    let upstream: std::net::SocketAddr = server
        .trim_start_matches("https://")
        .parse()
        .with_context(|| format!("server {server}"))?;
    doc["clusters"][0]["cluster"]["server"] = format!("https://{addr}").into();
    std::fs::write(out, serde_yaml::to_string(&doc)?)?;
    Ok(upstream)
}

/// The leader's network to the API server stalls (a partition: no byte moves, nothing is
/// closed) while the standby's does not, so the standby can take the Lease once it expired:
/// the leader must have stopped acting by then, on its own, by its renew deadline.
#[tokio::test]
async fn a_leader_cut_off_by_a_network_stall_stops_before_the_standby_leads() -> anyhow::Result<()>
{
    let cluster = TestCluster::get().await?;
    let ns = cluster.namespace("leader-stall").await?;
    let leases: Api<Lease> = Api::namespaced(cluster.client.clone(), &ns.name);
    let dir = ground_common::scratch(&ns.name);
    let logs = [dir.join("replica-a.log"), dir.join("replica-b.log")];
    let ids = ["replica-a", "replica-b"];
    // replica-a talks to the API server through the relay; it leads first.
    let relayed = dir.join("relayed.kubeconfig");
    let upstream = kubeconfig_via(&cluster.kubeconfig, "127.0.0.1:9".parse()?, &relayed)?;
    let relay = StallableRelay::start(upstream).await?;
    kubeconfig_via(&cluster.kubeconfig, relay.addr, &relayed)?;
    let mut a = Reaped(operator_logged(
        &relayed,
        &ns.name,
        ids[0],
        "sluice-operator",
        Some(&logs[0]),
    ));
    wait_for_holder(&leases, |h| h == ids[0], Duration::from_secs(30))
        .await
        .context("replica-a leads")?;
    let deadline = Instant::now() + Duration::from_secs(15);
    while !log_has(&logs[0], "leading: starting controllers") {
        anyhow::ensure!(
            Instant::now() < deadline,
            "replica-a never started its controllers"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut b = Reaped(operator_logged(
        &cluster.kubeconfig,
        &ns.name,
        ids[1],
        "sluice-operator",
        Some(&logs[1]),
    ));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        holder(&leases).await.as_deref(),
        Some(ids[0]),
        "no takeover yet"
    );

    relay.stall(true);
    let stalled = Instant::now();
    let exited = wait_exit(&mut a.0, Duration::from_secs(6));
    let stopped_after = stalled.elapsed();
    let next = wait_for_holder(&leases, |h| h == ids[1], Duration::from_secs(20)).await;
    let took_over_after = stalled.elapsed();
    relay.stall(false);
    let exited = exited.with_context(
        || "replica-a still ran 6 s into the stall: it kept acting without its Lease",
    )?;
    eprintln!(
        "leader exited {stopped_after:?} into the stall ({exited}); standby held the Lease {took_over_after:?} into it"
    );
    assert!(
        !exited.success(),
        "the leader exits non-zero when it loses the Lease"
    );
    assert!(
        log_has(&logs[0], "could not renew it within the renew deadline"),
        "the leader says why it stopped"
    );
    assert_eq!(
        next.as_deref(),
        Some(ids[1]),
        "the standby took over during the stall"
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while !log_has(&logs[1], "leading: starting controllers") {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the standby never started its controllers"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    unsafe { libc::kill(b.0.id() as i32, libc::SIGTERM) };
    b.0.wait()?;
    let old = acting_periods(&logs[0]);
    let new = acting_periods(&logs[1]);
    eprintln!("acting periods: {}: {old:?}; {}: {new:?}", ids[0], ids[1]);
    assert_eq!((old.len(), new.len()), (1, 1), "{old:?} {new:?}");
    let old_end = old[0]
        .1
        .context("the old leader never logged that it stopped acting")?;
    assert!(
        old_end < new[0].0,
        "two leaders acted at once: {} stopped at {old_end}, {} started at {}",
        ids[0],
        ids[1],
        new[0].0
    );
    Ok(())
}

/// A holder's timestamps come from another machine's clock. One renewed "an hour ago"
/// (a slow clock) is not taken before the candidate watched it unchanged for the lease
/// duration; one renewed "in an hour" (a fast clock) does not hold the Lease forever.
#[tokio::test]
async fn expiry_is_judged_on_the_candidates_own_clock() -> anyhow::Result<()> {
    let cluster = TestCluster::get().await?;
    let ns = cluster.namespace("leader-skew").await?;
    let leases: Api<Lease> = Api::namespaced(cluster.client.clone(), &ns.name);
    let dir = ground_common::scratch(&ns.name);
    let mut procs = Vec::new();
    for (name, skew) in [("past", -3600), ("future", 3600)] {
        let t = Timestamp::now() + SignedDuration::from_secs(skew);
        leases
            .create(
                &PostParams::default(),
                &Lease {
                    metadata: ObjectMeta {
                        name: Some(name.into()),
                        ..Default::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some("ghost".into()),
                        lease_duration_seconds: Some(4),
                        acquire_time: Some(MicroTime(t)),
                        renew_time: Some(MicroTime(t)),
                        lease_transitions: Some(0),
                        ..Default::default()
                    }),
                },
            )
            .await?;
    }
    let started = Instant::now();
    for name in ["past", "future"] {
        let log = dir.join(format!("{name}.log"));
        procs.push(operator_logged(
            &cluster.kubeconfig,
            &ns.name,
            "candidate",
            name,
            Some(&log),
        ));
    }
    let mut taken = std::collections::BTreeMap::new();
    let deadline = started + Duration::from_secs(30);
    while taken.len() < 2 && Instant::now() < deadline {
        for name in ["past", "future"] {
            if !taken.contains_key(name)
                && holder_of(&leases, name).await.as_deref() == Some("candidate")
            {
                taken.insert(name, started.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for p in &mut procs {
        let _ = p.kill();
        let _ = p.wait();
    }
    eprintln!("taken after: {taken:?}");
    for name in ["past", "future"] {
        let after = taken
            .get(name)
            .with_context(|| format!("the Lease {name:?} was never taken over"))?;
        // The candidate's first read comes after its start: it cannot take the Lease
        // less than the lease duration (4 s) after the process started.
        assert!(
            *after >= Duration::from_secs(4),
            "the Lease {name:?} was taken {after:?} after the start: before the candidate \
             watched it for a lease duration"
        );
    }
    Ok(())
}

/// A release under load with two replicas, and the API server paused (SIGSTOP) for 8 s in
/// the middle of it: the leader stops acting within its renew deadline, the standby
/// finishes the release after the resume, their acting periods never overlap, and no
/// request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_survives_an_api_server_pause_with_two_replicas() -> anyhow::Result<()> {
    use futures::future::BoxFuture;
    use k8s_openapi::api::apps::v1::Deployment;
    use sluice_e2e::scenario::{self, RunContext, Strategy};
    use sluice_e2e::scenario_sluice::{Sluice, apply_crds, wait_settled};

    struct Paused {
        sluice: Sluice,
        kubeconfig: std::path::PathBuf,
        logs: std::sync::Mutex<Vec<std::path::PathBuf>>,
        procs: std::sync::Mutex<Vec<Child>>,
        from: std::sync::Mutex<Option<String>>,
        pause: std::sync::Mutex<Option<(Instant, Instant)>>,
    }
    impl Strategy for Paused {
        fn name(&self) -> String {
            "Sluice-paused".into()
        }
        fn description(&self) -> String {
            "two replicas, API server paused during the release".into()
        }
        fn shape(&self, d: &mut Deployment) {
            self.sluice.shape(d)
        }
        fn prepare<'a>(&'a self, ctx: &'a RunContext) -> BoxFuture<'a, anyhow::Result<()>> {
            Box::pin(async move {
                apply_crds(&ctx.client).await?;
                let dir = ground_common::scratch(&ctx.namespace);
                for id in ["replica-a", "replica-b"] {
                    let log = dir.join(format!("{id}.log"));
                    let child = operator_logged(
                        &self.kubeconfig,
                        &ctx.namespace,
                        id,
                        "sluice-operator",
                        Some(&log),
                    );
                    self.procs.lock().unwrap().push(child);
                    self.logs.lock().unwrap().push(log);
                }
                self.sluice.create_release(ctx, 3).await
            })
        }
        fn release<'a>(&'a self, ctx: &'a RunContext) -> BoxFuture<'a, anyhow::Result<()>> {
            Box::pin(async move {
                let before = sluice_e2e::scenario_sluice::release_state(
                    &ctx.client,
                    &ctx.namespace,
                    &ctx.name,
                )
                .await?;
                *self.from.lock().unwrap() = before.stable;
                ctx.set_image(&ctx.new_image).await?;
                // Into the release: new pods starting, old ones about to drain.
                tokio::time::sleep(Duration::from_secs(3)).await;
                let pid = apiserver_pid()?;
                let resume = Resume(pid);
                anyhow::ensure!(unsafe { libc::kill(pid, libc::SIGSTOP) } == 0, "SIGSTOP");
                let start = Instant::now();
                tokio::time::sleep(Duration::from_secs(8)).await;
                drop(resume);
                *self.pause.lock().unwrap() = Some((start, Instant::now()));
                Ok(())
            })
        }
        fn wait_released<'a>(
            &'a self,
            ctx: &'a RunContext,
            replicas: i32,
            deadline: Instant,
        ) -> BoxFuture<'a, anyhow::Result<()>> {
            Box::pin(async move {
                let from = self.from.lock().unwrap().clone();
                wait_settled(
                    &ctx.client,
                    &ctx.namespace,
                    &ctx.name,
                    replicas,
                    from.as_deref(),
                    false,
                    deadline,
                )
                .await?;
                for p in self.procs.lock().unwrap().iter_mut() {
                    unsafe { libc::kill(p.id() as i32, libc::SIGTERM) };
                    let _ = wait_exit(p, Duration::from_secs(10));
                    let _ = p.kill();
                }
                Ok(())
            })
        }
    }

    let cluster = TestCluster::get().await?;
    ground_common::require_node(&cluster.client).await?;
    let strategy = Paused {
        sluice: Sluice::proxy(),
        kubeconfig: cluster.kubeconfig.clone(),
        logs: Default::default(),
        procs: Default::default(),
        from: Default::default(),
        pause: Default::default(),
    };
    let spec = ground_common::small_run(Duration::from_secs(150));
    let r = scenario::run_one(&cluster.client, &strategy, &spec).await;
    for p in strategy.procs.lock().unwrap().iter_mut() {
        let _ = p.kill();
        let _ = p.wait();
    }
    let r = r.map_err(|e| anyhow::anyhow!("the release did not complete: {e:#}"))?;
    let logs = strategy.logs.lock().unwrap().clone();
    let mut periods: Vec<(Timestamp, Option<Timestamp>, String)> = Vec::new();
    for log in &logs {
        for (start, end) in acting_periods(log) {
            periods.push((start, end, log.display().to_string()));
        }
    }
    periods.sort_by_key(|p| p.0);
    eprintln!(
        "paused release: {} requests, {} failed {:?}, release {:.1} s; acting periods {periods:?}",
        r.requests, r.failed, r.by_outcome, r.release_s
    );
    for w in periods.windows(2) {
        let end = w[0]
            .1
            .context("a replica acted until the end while another started")?;
        assert!(end < w[1].0, "two replicas acted at once: {periods:?}");
    }
    assert!(
        periods.len() >= 2,
        "the pause moved the leadership: {periods:?}"
    );
    assert_eq!(r.failed, 0, "requests failed: {:?}", r.by_outcome);
    Ok(())
}
