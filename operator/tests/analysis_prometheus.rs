//! The analysis library against a real Prometheus (`/usr/bin/prometheus`, Debian's
//! `prometheus` package; `.ci/run` installs it) and real local webhook servers. Prometheus
//! scrapes a tiny exporter run by the test every second; all traffic stays on 127.0.0.1.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use sluice_operator::analysis::{
    self, AnalysisStatus, HookDecision, HookPayload, HookType, MetricCheck, PromError,
    PrometheusClient, PrometheusSource, TemplateContext, Verdict, Webhook, WebhookClient,
};
use tokio::net::TcpListener;
use tokio::sync::Mutex;

/// Kills Prometheus and removes its directory when dropped.
struct PrometheusGuard {
    child: Child,
    dir: PathBuf,
    address: String,
}

impl Drop for PrometheusGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl PrometheusGuard {
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }
}

fn prometheus_binary() -> PathBuf {
    let found = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("prometheus"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/bin/prometheus")])
        .find(|p| p.is_file());
    found.unwrap_or_else(|| {
        panic!(
            "prometheus is not installed (looked in PATH and /usr/bin/prometheus): this test \
             needs a real Prometheus; install it with `apt-get install -y prometheus` \
             (.ci/run does)"
        )
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Starts Prometheus scraping `target` every second and waits until it is ready.
async fn start_prometheus(target: &str) -> PrometheusGuard {
    let binary = prometheus_binary();
    let dir = std::env::temp_dir().join(format!(
        "sluice-analysis-prom-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    std::fs::create_dir_all(dir.join("data")).expect("temp dir");
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n\
         - job_name: app\n  scrape_interval: 1s\n  static_configs:\n  - targets: ['{target}']\n"
    );
    std::fs::write(dir.join("prometheus.yml"), config).expect("config");
    let port = free_port();
    let log = std::fs::File::create(dir.join("prometheus.log")).expect("log file");
    let child = Command::new(&binary)
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--log.level=warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
    let mut guard = PrometheusGuard {
        child,
        dir,
        address: format!("http://127.0.0.1:{port}"),
    };
    let http = analysis::http::HttpClient::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Some(status)) = guard.child.try_wait() {
            panic!("prometheus exited with {status}:\n{}", guard.log());
        }
        let ready = http
            .send(
                hyper::Method::GET,
                &format!("{}/-/ready", guard.address),
                &[],
                None,
                Duration::from_secs(2),
            )
            .await;
        if matches!(ready, Ok((s, _)) if s == StatusCode::OK) {
            return guard;
        }
        assert!(
            Instant::now() < deadline,
            "prometheus not ready in 60 s:\n{}",
            guard.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Serves `/metrics`: request counters growing on every scrape, the stable track with 0.1%
/// errors and the canary with 40%.
async fn start_exporter() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let scrapes = Arc::new(AtomicU64::new(0));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let scrapes = scrapes.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |_req: Request<hyper::body::Incoming>| {
                        let n = scrapes.fetch_add(1, Ordering::Relaxed) + 1;
                        let body = format!(
                            "# TYPE http_requests_total counter\n\
                         http_requests_total{{namespace=\"shop\",track=\"stable\",code=\"200\"}} {}\n\
                         http_requests_total{{namespace=\"shop\",track=\"stable\",code=\"500\"}} {}\n\
                         http_requests_total{{namespace=\"shop\",track=\"canary\",code=\"200\"}} {}\n\
                         http_requests_total{{namespace=\"shop\",track=\"canary\",code=\"500\"}} {}\n",
                            n * 999,
                            n,
                            n * 60,
                            n * 40
                        );
                        async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body)))) }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr.to_string()
}

const TEMPLATE: &str = r#"
apiVersion: argoproj.io/v1alpha1
kind: AnalysisTemplate
metadata: {name: success-rate}
spec:
  args:
  - name: track
  metrics:
  - name: success-rate
    interval: 1s
    count: 3
    successCondition: len(result) > 0 && result[0] >= 0.95
    failureLimit: 1
    provider:
      prometheus:
        address: ADDRESS
        timeout: 5
        query: |
          sum(rate(http_requests_total{namespace="{{args.namespace}}",track="{{args.track}}",code!~"5.."}[5s]))
          /
          sum(rate(http_requests_total{namespace="{{args.namespace}}",track="{{args.track}}"}[5s]))
"#;

/// Runs an analysis to its verdict the way a controller would: a round, then wait until
/// the next measurement is due. Bounded by a deadline.
async fn run_to_verdict(
    checks: &[MetricCheck],
    track: &str,
    prom: &PrometheusClient,
) -> AnalysisStatus {
    let mut ctx = TemplateContext::for_release("web", "shop", "web", "web", "c0ffee", "5ab1e");
    ctx.args.insert("track".into(), track.into());
    let mut status = AnalysisStatus::start(checks, &ctx, chrono::Utc::now()).expect("starts");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let round = analysis::reconcile(checks, &mut status, chrono::Utc::now(), prom).await;
        let Some(wait) = round.requeue_after else {
            return status;
        };
        assert!(Instant::now() < deadline, "no verdict in 30 s: {status:#?}");
        tokio::time::sleep(wait.min(Duration::from_secs(2))).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analysis_against_a_real_prometheus() {
    let started = Instant::now();
    let exporter = start_exporter().await;
    let prom_guard = start_prometheus(&exporter).await;
    println!(
        "prometheus ready at {} after {:?}",
        prom_guard.address,
        started.elapsed()
    );
    let prom = PrometheusClient::new();
    let source = PrometheusSource {
        address: prom_guard.address.clone(),
        timeout: Duration::from_secs(5),
        headers: vec![],
    };

    // Wait until both tracks have enough samples for a 5 s rate.
    let ready_query = "count(rate(http_requests_total{namespace=\"shop\"}[5s]) > 0)";
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(v) = prom.query(&source, ready_query).await
            && v.first() == Some(&4.0)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "series never appeared:\n{}",
            prom_guard.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    println!("series present after {:?}", started.elapsed());

    let doc: serde_json::Value =
        serde_yaml::from_str(&TEMPLATE.replace("ADDRESS", &prom_guard.address)).expect("yaml");
    let checks = analysis::from_argo_analysis_template(&doc).expect("imports");

    let t = Instant::now();
    let good = run_to_verdict(&checks, "stable", &prom).await;
    println!(
        "stable: {:?} in {:?}; measurements {:?}",
        good.verdict,
        t.elapsed(),
        good.metrics[0]
            .measurements
            .iter()
            .map(|m| m.value.clone())
            .collect::<Vec<_>>()
    );
    assert_eq!(good.verdict, Verdict::Successful, "{good:#?}");
    assert_eq!(good.metrics[0].successful, 3);
    assert!(good.metrics[0].query.contains("track=\"stable\""));

    let t = Instant::now();
    let bad = run_to_verdict(&checks, "canary", &prom).await;
    println!(
        "canary: {:?} in {:?}; {}",
        bad.verdict,
        t.elapsed(),
        bad.message.clone().unwrap_or_default()
    );
    assert_eq!(bad.verdict, Verdict::Failed, "{bad:#?}");
    assert_eq!(
        bad.metrics[0].failed, 2,
        "failureLimit 1: the second failure ends it"
    );
    let v: f64 = bad.metrics[0].measurements[0]
        .value
        .as_deref()
        .and_then(|v| v.trim_matches(['[', ']']).parse().ok())
        .expect("a number");
    assert!((0.5..0.7).contains(&v), "canary success rate {v}");

    // Flagger's shape: thresholdRange with {{ namespace }} and {{ interval }}.
    let template = serde_json::json!({
        "apiVersion": "flagger.app/v1beta1", "kind": "MetricTemplate",
        "metadata": {"name": "error-rate"},
        "spec": {"provider": {"type": "prometheus", "address": prom_guard.address},
                 "query": "100 * sum(rate(http_requests_total{namespace=\"{{ namespace }}\",track=\"canary\",code=~\"5..\"}[{{ interval }}])) / sum(rate(http_requests_total{namespace=\"{{ namespace }}\",track=\"canary\"}[{{ interval }}]))"}
    });
    let metric = serde_json::json!({"name": "error-rate", "templateRef": {"name": "error-rate"},
                                    "thresholdRange": {"max": 1}, "interval": "5s"});
    let analysis_cfg = serde_json::json!({"interval": "1s", "iterations": 2, "threshold": 1});
    let flagger =
        analysis::from_flagger_metric(&template, &metric, Some(&analysis_cfg)).expect("imports");
    let t = Instant::now();
    let flagged = run_to_verdict(&[flagger], "canary", &prom).await;
    println!(
        "flagger error-rate (canary, max 1%): {:?} in {:?}",
        flagged.verdict,
        t.elapsed()
    );
    assert_eq!(flagged.verdict, Verdict::Failed, "{flagged:#?}");

    // Prometheus' own errors come back typed.
    match prom
        .query(&source, "sum(rate(http_requests_total[5s]")
        .await
    {
        Err(PromError::Api {
            status: 400,
            error_type,
            ..
        }) => assert_eq!(error_type, "bad_data"),
        other => panic!("expected bad_data, got {other:?}"),
    }
    assert_eq!(
        prom.query(&source, "http_requests_total[5s]").await,
        Err(PromError::ResultType("matrix".into()))
    );
    let nan = prom.query(&source, "0/0").await.expect("scalar");
    assert!(nan.len() == 1 && nan[0].is_nan(), "{nan:?}");
    assert_eq!(prom.query(&source, "absent_metric_xyz").await, Ok(vec![]));
    println!("total {:?}", started.elapsed());
}

/// A webhook receiver: answers with `statuses` in turn (then 200), or never when `silent`;
/// keeps every body it got.
async fn start_receiver(
    statuses: Vec<u16>,
    silent: bool,
) -> (String, Arc<Mutex<Vec<serde_json::Value>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let calls = Arc::new(AtomicUsize::new(0));
    let statuses = Arc::new(statuses);
    let seen = bodies.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            if silent {
                // Keep the connection open and never answer.
                held.push(stream);
                continue;
            }
            let (seen, calls, statuses) = (seen.clone(), calls.clone(), statuses.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let (seen, calls, statuses) = (seen.clone(), calls.clone(), statuses.clone());
                    async move {
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        seen.lock()
                            .await
                            .push(serde_json::from_slice(&body).unwrap_or_default());
                        let n = calls.fetch_add(1, Ordering::Relaxed);
                        let status = statuses.get(n).copied().unwrap_or(200);
                        let mut resp = Response::new(Full::new(Bytes::from_static(b"")));
                        *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (url, bodies)
}

fn hook(name: &str, hook_type: HookType, url: &str, timeout: Duration, retries: u32) -> Webhook {
    let mut metadata = BTreeMap::new();
    metadata.insert("cmd".to_string(), "smoke-test".to_string());
    Webhook {
        name: name.into(),
        hook_type,
        url: url.into(),
        timeout,
        metadata,
        retries,
    }
}

fn payload(phase: &str) -> HookPayload {
    HookPayload {
        name: "web".into(),
        namespace: "shop".into(),
        phase: phase.into(),
        metadata: BTreeMap::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_retry_time_out_and_notify() {
    let client = WebhookClient::new(Duration::from_millis(100), 4);

    let (url, bodies) = start_receiver(vec![500], false).await;
    let gate = hook(
        "gate",
        HookType::PreRollout,
        &url,
        Duration::from_secs(5),
        2,
    );
    let t = Instant::now();
    let outcome = client.call(&gate, &payload("Progressing")).await;
    println!("500 then 200: {:?} in {:?}", outcome.attempts, t.elapsed());
    assert_eq!(outcome.attempts.len(), 2);
    assert_eq!(analysis::decide(&gate, &outcome), HookDecision::Proceed);
    let got = bodies.lock().await.clone();
    assert_eq!(
        got[1],
        serde_json::json!({"name": "web", "namespace": "shop", "phase": "Progressing",
                           "metadata": {"cmd": "smoke-test"}})
    );

    let (url, _) = start_receiver(vec![403], false).await;
    let closed = hook("closed", HookType::Rollout, &url, Duration::from_secs(5), 3);
    let outcome = client.call(&closed, &payload("Progressing")).await;
    assert_eq!(
        outcome.attempts.len(),
        1,
        "a 4xx is a definite no: no retry"
    );
    assert!(matches!(
        analysis::decide(&closed, &outcome),
        HookDecision::Halt(_)
    ));

    let (url, _) = start_receiver(vec![], true).await;
    let silent = hook(
        "silent",
        HookType::PreRollout,
        &url,
        Duration::from_millis(300),
        1,
    );
    let t = Instant::now();
    let outcome = client.call(&silent, &payload("Progressing")).await;
    let took = t.elapsed();
    println!("silent: {:?} in {took:?}", outcome.attempts);
    assert_eq!(outcome.attempts.len(), 2);
    assert!(
        outcome
            .attempts
            .iter()
            .all(|a| matches!(a, analysis::webhook::Attempt::Timeout(_)))
    );
    assert!(took < Duration::from_secs(5), "bounded: {took:?}");
    match analysis::decide(&silent, &outcome) {
        HookDecision::Halt(why) => assert!(why.contains("no answer within"), "{why}"),
        other => panic!("expected a halt, got {other:?}"),
    }

    let (url, _) = start_receiver(vec![], false).await;
    let rollback = hook(
        "rollback",
        HookType::Rollback,
        &url,
        Duration::from_secs(5),
        0,
    );
    let outcome = client.call(&rollback, &payload("Progressing")).await;
    assert!(matches!(
        analysis::decide(&rollback, &outcome),
        HookDecision::RollBack(_)
    ));

    let (url, bodies) = start_receiver(vec![], false).await;
    let events = [
        hook("events", HookType::Event, &url, Duration::from_secs(5), 0),
        hook(
            "not-an-event",
            HookType::Rollout,
            &url,
            Duration::from_secs(5),
            0,
        ),
    ];
    let change = HookPayload::phase_change(
        "web",
        "shop",
        "Succeeded",
        "Release web promoted",
        chrono::Utc::now(),
    );
    assert_eq!(client.notify(&events, &change), 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(b) = bodies.lock().await.first() {
            assert_eq!(b["phase"], "Succeeded");
            assert_eq!(b["metadata"]["eventMessage"], "Release web promoted");
            assert_eq!(b["metadata"]["eventType"], "Normal");
            assert_eq!(b["metadata"]["cmd"], "smoke-test");
            break;
        }
        assert!(Instant::now() < deadline, "the event never arrived");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // At most 4 events in flight: against a silent receiver the fifth is dropped.
    let (url, _) = start_receiver(vec![], true).await;
    let slow: Vec<Webhook> = (0..5)
        .map(|i| {
            hook(
                &format!("e{i}"),
                HookType::Event,
                &url,
                Duration::from_secs(2),
                0,
            )
        })
        .collect();
    assert_eq!(client.notify(&slow, &change), 4);
}
