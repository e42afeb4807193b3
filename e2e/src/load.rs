//! The load generator: an open-loop HTTP client pool that records every request and every
//! connection.
//!
//! Requests are scheduled by the clock (request `i` is due at `i / rate`), not by the
//! previous answer, so a stalled server shows up as latency (measured from the scheduled
//! time) instead of as less load — the coordinated-omission trap closed-loop generators
//! fall into. A pool of `connections` keep-alive connections carries them; a connection the
//! server closed between requests is replaced on the next request, as real client pools do.
//! Every request ends in one [`Outcome`]; every connection records who closed it.
//!
//! Used from the command line (`sluice-e2e load`) and in-process by the scenarios
//! ([`run_load`]).
use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

/// How one request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// A complete response with a status below 500.
    Ok,
    /// The TCP connection could not be opened (RST to the SYN).
    Refused,
    /// The connection was reset or closed by the peer before a response arrived.
    Reset,
    /// No complete answer within the timeout (or the connect timed out).
    Timeout,
    /// A complete response with a 5xx status.
    #[serde(rename = "5xx")]
    Status5xx,
    /// The response head arrived but the body was cut short.
    Truncated,
}

impl Outcome {
    pub const ALL: [Outcome; 6] = [
        Outcome::Ok,
        Outcome::Refused,
        Outcome::Reset,
        Outcome::Timeout,
        Outcome::Status5xx,
        Outcome::Truncated,
    ];

    pub fn is_failure(self) -> bool {
        self != Outcome::Ok
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Refused => "refused",
            Outcome::Reset => "reset",
            Outcome::Timeout => "timeout",
            Outcome::Status5xx => "5xx",
            Outcome::Truncated => "truncated",
        }
    }
}

/// Which phase of a request an error happened in; decides its [`Outcome`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Connect,
    /// Writing the request or waiting for the response head.
    Head,
    /// Reading the response body.
    Body,
}

/// Classifies an I/O error by the phase it happened in. Pure, so it is unit-tested.
pub fn classify_io(phase: Phase, kind: io::ErrorKind) -> Outcome {
    use io::ErrorKind as K;
    match (phase, kind) {
        (_, K::TimedOut) => Outcome::Timeout,
        (Phase::Connect, K::ConnectionReset) => Outcome::Reset,
        (Phase::Connect, _) => Outcome::Refused,
        (Phase::Head, _) => Outcome::Reset,
        (Phase::Body, _) => Outcome::Truncated,
    }
}

/// Classifies a hyper error: the phase decides, an underlying timeout wins.
fn classify_hyper(phase: Phase, err: &hyper::Error) -> Outcome {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(err);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<io::Error>() {
            return classify_io(phase, io.kind());
        }
        source = s.source();
    }
    classify_io(phase, io::ErrorKind::UnexpectedEof)
}

/// Classifies a complete response by its status code.
pub fn classify_status(status: u16) -> Outcome {
    if status >= 500 {
        Outcome::Status5xx
    } else {
        Outcome::Ok
    }
}

/// One request, times in milliseconds since the run's origin.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RequestRecord {
    /// When the open-loop schedule wanted it sent.
    pub scheduled_ms: f64,
    /// When a connection picked it up.
    pub start_ms: f64,
    pub end_ms: f64,
    pub outcome: Outcome,
    /// The pod that answered (`x-pod-name`), when a response arrived.
    pub pod: Option<String>,
    /// The connection that carried it (0 when none could be opened).
    pub conn: u64,
}

impl RequestRecord {
    /// Latency as the client saw it: from the scheduled time to the end.
    pub fn latency_ms(&self) -> f64 {
        self.end_ms - self.scheduled_ms
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClosedBy {
    /// The server closed it between requests (FIN, GOAWAY) or broke it during one.
    Server,
    /// The client gave up on it (timeout) or the run ended.
    Client,
}

/// One connection, times in milliseconds since the run's origin.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ConnRecord {
    pub id: u64,
    pub open_ms: f64,
    pub close_ms: f64,
    pub closed_by: ClosedBy,
    /// The pod behind it, learned from its first response.
    pub pod: Option<String>,
    pub requests: u64,
}

/// What to send, how fast, for how long.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    pub target: SocketAddr,
    /// Request path (and query).
    pub path: String,
    /// Keep-alive connections in the pool (HTTP/1.1: one request in flight on each).
    pub connections: usize,
    /// Requests per second, scheduled open-loop.
    pub rate: f64,
    /// How long to send for (hard upper bound; [`run_load`] may be stopped earlier).
    pub duration: Duration,
    pub http2: bool,
    /// HTTP/2 only: concurrent streams per connection.
    pub streams: usize,
    pub timeout: Duration,
    pub connect_timeout: Duration,
    /// The instant the schedule starts from (now when `None`); scenarios pass theirs so that
    /// their marks and the records share one clock.
    pub origin: Option<Instant>,
}

impl Default for LoadConfig {
    fn default() -> Self {
        LoadConfig {
            target: SocketAddr::from(([127, 0, 0, 1], 8080)),
            path: "/".into(),
            connections: 16,
            rate: 100.0,
            duration: Duration::from_secs(10),
            http2: false,
            streams: 4,
            timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            origin: None,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

/// Nearest-rank percentile of an ascending slice (`q` in 0..=1); 0 for an empty slice.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn percentiles(mut values: Vec<f64>) -> Percentiles {
    values.sort_by(|a, b| a.total_cmp(b));
    Percentiles {
        p50: percentile(&values, 0.50),
        p90: percentile(&values, 0.90),
        p99: percentile(&values, 0.99),
        max: values.last().copied().unwrap_or(0.0),
    }
}

/// One second of the run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Bin {
    /// Start of the bin, seconds since the origin.
    pub t: f64,
    /// Requests that ended in this bin.
    pub requests: u64,
    /// Failed requests that ended in this bin, by outcome.
    pub errors: BTreeMap<Outcome, u64>,
    pub p99_ms: f64,
    /// Connections opened in this bin, by the pod they reached ("?" when none answered).
    pub new_conns: BTreeMap<String, u64>,
    /// Connections open at the end of the bin, by pod.
    pub open_conns: BTreeMap<String, u64>,
    /// Requests answered in this bin, by pod.
    pub by_pod: BTreeMap<String, u64>,
}

impl Bin {
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// Per-second time series of a run. Pure, so it is unit-tested.
pub fn time_series(requests: &[RequestRecord], conns: &[ConnRecord], end_ms: f64) -> Vec<Bin> {
    let n = (end_ms / 1000.0).ceil().max(1.0) as usize;
    let mut bins: Vec<Bin> = (0..n)
        .map(|i| Bin {
            t: i as f64,
            ..Default::default()
        })
        .collect();
    let idx = |ms: f64| ((ms / 1000.0).floor().max(0.0) as usize).min(n - 1);
    let mut lat: Vec<Vec<f64>> = vec![Vec::new(); n];
    for r in requests {
        let b = &mut bins[idx(r.end_ms)];
        b.requests += 1;
        if r.outcome.is_failure() {
            *b.errors.entry(r.outcome).or_default() += 1;
        }
        if let Some(p) = &r.pod {
            *b.by_pod.entry(p.clone()).or_default() += 1;
        }
        lat[idx(r.end_ms)].push(r.latency_ms());
    }
    for (b, l) in bins.iter_mut().zip(lat) {
        b.p99_ms = percentiles(l).p99;
    }
    for c in conns {
        let pod = c.pod.clone().unwrap_or_else(|| "?".into());
        *bins[idx(c.open_ms)]
            .new_conns
            .entry(pod.clone())
            .or_default() += 1;
        // Open at the end of bin i when opened before and closed after that instant.
        for (i, b) in bins.iter_mut().enumerate() {
            let edge = (i as f64 + 1.0) * 1000.0;
            if c.open_ms <= edge && c.close_ms > edge {
                *b.open_conns.entry(pod.clone()).or_default() += 1;
            }
        }
    }
    bins
}

/// Everything a run measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LoadReport {
    /// Wall-clock time of the origin, ms since the Unix epoch.
    pub origin_unix_ms: u64,
    pub target: String,
    pub connections: usize,
    pub rate: f64,
    pub http2: bool,
    pub duration_s: f64,
    pub requests: u64,
    pub by_outcome: BTreeMap<Outcome, u64>,
    pub failed: u64,
    pub achieved_rps: f64,
    pub latency_ms: Percentiles,
    pub connections_opened: u64,
    pub closed_by_server: u64,
    pub closed_by_client: u64,
    pub by_pod: BTreeMap<String, u64>,
    pub series: Vec<Bin>,
    #[serde(skip)]
    pub request_log: Vec<RequestRecord>,
    #[serde(skip)]
    pub conn_log: Vec<ConnRecord>,
}

impl LoadReport {
    fn build(
        cfg: &LoadConfig,
        origin_unix_ms: u64,
        end_ms: f64,
        mut requests: Vec<RequestRecord>,
        mut conns: Vec<ConnRecord>,
    ) -> Self {
        requests.sort_by(|a, b| a.scheduled_ms.total_cmp(&b.scheduled_ms));
        conns.sort_by_key(|c| c.id);
        let mut by_outcome: BTreeMap<Outcome, u64> = Outcome::ALL.iter().map(|o| (*o, 0)).collect();
        let mut by_pod = BTreeMap::new();
        for r in &requests {
            *by_outcome.entry(r.outcome).or_default() += 1;
            if let Some(p) = &r.pod {
                *by_pod.entry(p.clone()).or_default() += 1;
            }
        }
        let failed = requests.iter().filter(|r| r.outcome.is_failure()).count() as u64;
        let ok = requests.len() as u64 - failed;
        let duration_s = end_ms / 1000.0;
        LoadReport {
            origin_unix_ms,
            target: cfg.target.to_string(),
            connections: cfg.connections,
            rate: cfg.rate,
            http2: cfg.http2,
            duration_s,
            requests: requests.len() as u64,
            by_outcome,
            failed,
            achieved_rps: if duration_s > 0.0 {
                ok as f64 / duration_s
            } else {
                0.0
            },
            latency_ms: percentiles(requests.iter().map(|r| r.latency_ms()).collect()),
            connections_opened: conns.len() as u64,
            closed_by_server: conns
                .iter()
                .filter(|c| c.closed_by == ClosedBy::Server)
                .count() as u64,
            closed_by_client: conns
                .iter()
                .filter(|c| c.closed_by == ClosedBy::Client)
                .count() as u64,
            by_pod,
            series: time_series(&requests, &conns, end_ms),
            request_log: requests,
            conn_log: conns,
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

struct Ticket {
    scheduled: Instant,
}

enum Sender {
    H1(http1::SendRequest<Empty<Bytes>>),
    H2(http2::SendRequest<Empty<Bytes>>),
}

impl Sender {
    fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }
}

/// A live connection; for HTTP/2 shared by `streams` workers.
struct Conn {
    id: u64,
    open: Instant,
    sender: Sender,
    pod: Option<String>,
    requests: u64,
    driver: tokio::task::JoinHandle<()>,
}

struct Shared {
    cfg: LoadConfig,
    origin: Instant,
    next_conn: std::sync::atomic::AtomicU64,
    requests: Mutex<Vec<RequestRecord>>,
    conns: Mutex<Vec<ConnRecord>>,
}

impl Shared {
    fn ms(&self, t: Instant) -> f64 {
        t.saturating_duration_since(self.origin).as_secs_f64() * 1000.0
    }

    fn close(&self, conn: Conn, by: ClosedBy) {
        conn.driver.abort();
        let rec = ConnRecord {
            id: conn.id,
            open_ms: self.ms(conn.open),
            close_ms: self.ms(Instant::now()),
            closed_by: by,
            pod: conn.pod,
            requests: conn.requests,
        };
        self.conns.lock().expect("poisoned").push(rec);
    }

    async fn connect(&self) -> Result<Conn, Outcome> {
        let open = Instant::now();
        let stream = match tokio::time::timeout(
            self.cfg.connect_timeout,
            TcpStream::connect(self.cfg.target),
        )
        .await
        {
            Err(_) => return Err(Outcome::Timeout),
            Ok(Err(e)) => return Err(classify_io(Phase::Connect, e.kind())),
            Ok(Ok(s)) => s,
        };
        let _ = stream.set_nodelay(true);
        let io = TokioIo::new(stream);
        let (sender, driver) = if self.cfg.http2 {
            let (s, c) = http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(|e| classify_hyper(Phase::Head, &e))?;
            (
                Sender::H2(s),
                tokio::spawn(async move {
                    let _ = c.await;
                }),
            )
        } else {
            let (s, c) = http1::handshake(io)
                .await
                .map_err(|e| classify_hyper(Phase::Head, &e))?;
            (
                Sender::H1(s),
                tokio::spawn(async move {
                    let _ = c.await;
                }),
            )
        };
        let id = self
            .next_conn
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(Conn {
            id,
            open,
            sender,
            pod: None,
            requests: 0,
            driver,
        })
    }
}

/// Sends one request on `sender`; returns the outcome and the answering pod.
async fn exchange(sender: &mut Sender, path: &str, host: &str) -> (Outcome, Option<String>) {
    let req = Request::get(path)
        .header("host", host)
        .body(Empty::<Bytes>::new())
        .expect("static request parts are valid");
    let resp = match sender {
        Sender::H1(s) => {
            if let Err(e) = s.ready().await {
                return (classify_hyper(Phase::Head, &e), None);
            }
            s.send_request(req).await
        }
        Sender::H2(s) => {
            // HTTP/2 carries scheme and authority as pseudo-headers: give an absolute URI.
            let req = Request::get(format!("http://{host}{path}"))
                .version(hyper::Version::HTTP_2)
                .body(Empty::<Bytes>::new())
                .expect("static request parts are valid");
            s.send_request(req).await
        }
    };
    let resp = match resp {
        Ok(r) => r,
        Err(e) => return (classify_hyper(Phase::Head, &e), None),
    };
    let pod = resp
        .headers()
        .get("x-pod-name")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let status = resp.status().as_u16();
    match resp.into_body().collect().await {
        Ok(_) => (classify_status(status), pod),
        Err(e) => (classify_hyper(Phase::Body, &e), pod),
    }
}

type Slot = Arc<tokio::sync::Mutex<Option<Conn>>>;

async fn worker(
    shared: Arc<Shared>,
    slot: Slot,
    tickets: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Ticket>>>,
    hard_deadline: Instant,
) {
    let host = shared.cfg.target.to_string();
    loop {
        let ticket = {
            let mut rx = tickets.lock().await;
            match rx.recv().await {
                Some(t) => t,
                None => break,
            }
        };
        let start = Instant::now();
        let remaining = hard_deadline.saturating_duration_since(start);
        let budget = shared.cfg.timeout.min(remaining);
        // Take (or open) the connection; the server may have closed it since the last use.
        let mut guard = slot.lock().await;
        if guard
            .as_ref()
            .is_some_and(|c| c.sender.is_closed() || c.driver.is_finished())
        {
            let c = guard.take().expect("checked above");
            shared.close(c, ClosedBy::Server);
        }
        if guard.is_none() {
            match shared.connect().await {
                Ok(c) => *guard = Some(c),
                Err(outcome) => {
                    drop(guard);
                    record(&shared, &ticket, start, outcome, None, 0);
                    continue;
                }
            }
        }
        let conn = guard.as_mut().expect("set above");
        let conn_id = conn.id;
        conn.requests += 1;
        let result = if shared.cfg.http2 {
            // HTTP/2: other streams share the connection; do not hold the slot.
            let Sender::H2(s) = &conn.sender else {
                unreachable!("http2 pool holds http2 senders")
            };
            let mut sender = Sender::H2(s.clone());
            drop(guard);
            let r =
                tokio::time::timeout(budget, exchange(&mut sender, &shared.cfg.path, &host)).await;
            guard = slot.lock().await;
            r
        } else {
            tokio::time::timeout(budget, exchange(&mut conn.sender, &shared.cfg.path, &host)).await
        };
        let (outcome, pod) = result.unwrap_or((Outcome::Timeout, None));
        // The connection may have been replaced meanwhile (HTTP/2); only touch our own.
        if let Some(c) = guard.as_mut().filter(|c| c.id == conn_id) {
            if c.pod.is_none() {
                c.pod = pod.clone();
            }
            match outcome {
                Outcome::Ok | Outcome::Status5xx => {}
                // HTTP/2: one stream failing says nothing about the others; a connection
                // the server closed is noticed (and replaced) on its next use.
                _ if shared.cfg.http2 => {}
                Outcome::Timeout => {
                    let c = guard.take().expect("matched above");
                    shared.close(c, ClosedBy::Client);
                }
                _ => {
                    let c = guard.take().expect("matched above");
                    shared.close(c, ClosedBy::Server);
                }
            }
        }
        drop(guard);
        record(&shared, &ticket, start, outcome, pod, conn_id);
    }
    // The last worker of a slot closes its connection (HTTP/2 streams share it).
    if let Some(c) = Arc::into_inner(slot).and_then(tokio::sync::Mutex::into_inner) {
        let by = if c.sender.is_closed() {
            ClosedBy::Server
        } else {
            ClosedBy::Client
        };
        shared.close(c, by);
    }
}

fn record(
    shared: &Shared,
    ticket: &Ticket,
    start: Instant,
    outcome: Outcome,
    pod: Option<String>,
    conn: u64,
) {
    let rec = RequestRecord {
        scheduled_ms: shared.ms(ticket.scheduled),
        start_ms: shared.ms(start),
        end_ms: shared.ms(Instant::now()),
        outcome,
        pod,
        conn,
    };
    shared.requests.lock().expect("poisoned").push(rec);
}

/// Runs the load until `cfg.duration` has passed or `stop` turns true, then waits for the
/// requests in flight (each bounded by `cfg.timeout`) and reports.
pub async fn run_load(
    cfg: LoadConfig,
    stop: Option<watch::Receiver<bool>>,
) -> anyhow::Result<LoadReport> {
    anyhow::ensure!(cfg.connections > 0, "connections must be at least 1");
    anyhow::ensure!(
        cfg.rate > 0.0 && cfg.rate.is_finite(),
        "rate must be positive"
    );
    anyhow::ensure!(
        cfg.duration <= Duration::from_secs(3600),
        "duration is capped at one hour"
    );
    let origin = cfg.origin.unwrap_or_else(Instant::now);
    let origin_unix_ms = unix_ms().saturating_sub(origin.elapsed().as_millis() as u64);
    let shared = Arc::new(Shared {
        cfg: cfg.clone(),
        origin,
        next_conn: std::sync::atomic::AtomicU64::new(1),
        requests: Mutex::new(Vec::with_capacity(
            (cfg.rate * cfg.duration.as_secs_f64()) as usize + 16,
        )),
        conns: Mutex::new(Vec::new()),
    });
    let (tx, rx) = mpsc::unbounded_channel::<Ticket>();
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let hard_deadline = origin + cfg.duration + cfg.timeout + Duration::from_secs(2);
    let (slots, workers_per_slot) = if cfg.http2 {
        (cfg.connections, cfg.streams.max(1))
    } else {
        (cfg.connections, 1)
    };
    let mut workers = Vec::new();
    for _ in 0..slots {
        let slot: Slot = Arc::new(tokio::sync::Mutex::new(None));
        for _ in 0..workers_per_slot {
            workers.push(tokio::spawn(worker(
                shared.clone(),
                slot.clone(),
                rx.clone(),
                hard_deadline,
            )));
        }
    }
    // The open-loop schedule.
    let interval = Duration::from_secs_f64(1.0 / cfg.rate);
    let end = origin + cfg.duration;
    let mut stop = stop;
    let mut i: u32 = 0;
    loop {
        let due = origin + interval * i;
        if due >= end || stop.as_ref().is_some_and(|s| *s.borrow()) {
            break;
        }
        match stop.as_mut() {
            Some(s) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(due.into()) => {}
                    _ = s.changed() => continue,
                }
            }
            None => tokio::time::sleep_until(due.into()).await,
        }
        if tx.send(Ticket { scheduled: due }).is_err() {
            break;
        }
        i += 1;
    }
    let sent_until = Instant::now();
    drop(tx);
    // Workers drain the queue; anything still queued at the hard deadline counts as a timeout.
    let drain_deadline = sent_until + cfg.timeout + Duration::from_secs(2);
    for w in workers {
        if tokio::time::timeout_at(drain_deadline.into(), w)
            .await
            .is_err()
        {
            tracing::warn!("a load worker outlived its deadline");
        }
    }
    {
        let mut left = rx.lock().await;
        while let Ok(t) = left.try_recv() {
            record(&shared, &t, Instant::now(), Outcome::Timeout, None, 0);
        }
    }
    let end_ms = shared.ms(Instant::now());
    let requests = std::mem::take(&mut *shared.requests.lock().expect("poisoned"));
    let conns = std::mem::take(&mut *shared.conns.lock().expect("poisoned"));
    Ok(LoadReport::build(
        &cfg,
        origin_unix_ms,
        end_ms,
        requests,
        conns,
    ))
}

/// `sluice-e2e load`: run the load generator against a URL or a test-ground Service.
#[derive(clap::Args, Debug)]
pub struct LoadArgs {
    /// Target URL (`http://HOST:PORT/PATH`; HOST an IP address).
    #[arg(long, conflicts_with = "service")]
    pub url: Option<String>,
    /// Target Service as `<namespace>/<service>:<port>`, resolved through --services.
    #[arg(long)]
    pub service: Option<String>,
    /// The service proxy's address map.
    #[arg(long, default_value = "target/e2e/services.json")]
    pub services: PathBuf,
    #[arg(long, short = 'c', default_value_t = 16)]
    pub connections: usize,
    /// Requests per second (open loop).
    #[arg(long, short = 'r', default_value_t = 100.0)]
    pub rate: f64,
    #[arg(long, short = 'd', default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Use HTTP/2 (prior knowledge) instead of HTTP/1.1.
    #[arg(long)]
    pub http2: bool,
    /// HTTP/2: concurrent streams per connection.
    #[arg(long, default_value_t = 4)]
    pub streams: usize,
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Write the JSON summary and time series here (stdout when absent).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write every request and connection here, one JSON object a line.
    #[arg(long)]
    pub records: Option<PathBuf>,
}

/// Resolves `ns/svc:port` through the service proxy's `services.json`.
pub fn resolve_service(services: &std::path::Path, key: &str) -> anyhow::Result<SocketAddr> {
    let text = std::fs::read_to_string(services)
        .with_context(|| format!("reading {}", services.display()))?;
    let map: BTreeMap<String, String> =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", services.display()))?;
    let addr = map.get(key).with_context(|| {
        format!(
            "{key} is not in {} (is the service proxy running?)",
            services.display()
        )
    })?;
    Ok(addr.parse()?)
}

fn parse_url(url: &str) -> anyhow::Result<(SocketAddr, String)> {
    let uri: hyper::Uri = url.parse().with_context(|| format!("bad URL {url}"))?;
    anyhow::ensure!(
        uri.scheme_str() == Some("http"),
        "only http:// URLs are supported"
    );
    let host = uri.host().context("URL without host")?;
    let port = uri.port_u16().unwrap_or(80);
    let ip: std::net::IpAddr = host
        .trim_matches(|c| c == '[' || c == ']')
        .parse()
        .with_context(|| {
            format!("host {host} must be an IP address (the test ground resolves no names)")
        })?;
    let path = uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    Ok((SocketAddr::new(ip, port), path))
}

pub async fn run(args: LoadArgs) -> anyhow::Result<()> {
    let (target, path) = match (&args.url, &args.service) {
        (Some(url), _) => parse_url(url)?,
        (None, Some(key)) => (resolve_service(&args.services, key)?, "/".into()),
        (None, None) => anyhow::bail!("give --url or --service"),
    };
    let cfg = LoadConfig {
        target,
        path,
        connections: args.connections,
        rate: args.rate,
        duration: args.duration,
        http2: args.http2,
        streams: args.streams,
        timeout: args.timeout,
        connect_timeout: args.timeout.min(Duration::from_secs(2)),
        origin: None,
    };
    let report = run_load(cfg, None).await?;
    if let Some(path) = &args.records {
        use std::io::Write as _;
        let mut f = io::BufWriter::new(std::fs::File::create(path)?);
        for r in &report.request_log {
            writeln!(f, "{}", serde_json::json!({"request": r}))?;
        }
        for c in &report.conn_log {
            writeln!(f, "{}", serde_json::json!({"connection": c}))?;
        }
        f.flush()?;
    }
    let json = serde_json::to_string_pretty(&report)?;
    match &args.out {
        Some(p) => std::fs::write(p, json)?,
        None => println!("{json}"),
    }
    eprintln!(
        "{} requests, {} failed {:?}, {:.0} ok/s, p50 {:.1} ms p99 {:.1} ms, {} connections opened",
        report.requests,
        report.failed,
        report
            .by_outcome
            .iter()
            .filter(|(o, n)| **n > 0 && o.is_failure())
            .collect::<Vec<_>>(),
        report.achieved_rps,
        report.latency_ms.p50,
        report.latency_ms.p99,
        report.connections_opened
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_classify_by_phase() {
        use io::ErrorKind as K;
        assert_eq!(
            classify_io(Phase::Connect, K::ConnectionRefused),
            Outcome::Refused
        );
        assert_eq!(classify_io(Phase::Connect, K::TimedOut), Outcome::Timeout);
        assert_eq!(
            classify_io(Phase::Connect, K::ConnectionReset),
            Outcome::Reset
        );
        assert_eq!(classify_io(Phase::Head, K::ConnectionReset), Outcome::Reset);
        assert_eq!(classify_io(Phase::Head, K::UnexpectedEof), Outcome::Reset);
        assert_eq!(
            classify_io(Phase::Body, K::UnexpectedEof),
            Outcome::Truncated
        );
        assert_eq!(classify_io(Phase::Body, K::TimedOut), Outcome::Timeout);
    }

    #[test]
    fn statuses_classify() {
        assert_eq!(classify_status(200), Outcome::Ok);
        assert_eq!(classify_status(404), Outcome::Ok);
        assert_eq!(classify_status(500), Outcome::Status5xx);
        assert_eq!(classify_status(503), Outcome::Status5xx);
    }

    #[test]
    fn outcome_serialises_as_issue_names() {
        assert_eq!(
            serde_json::to_string(&Outcome::Status5xx).unwrap(),
            "\"5xx\""
        );
        assert_eq!(
            serde_json::to_string(&Outcome::Refused).unwrap(),
            "\"refused\""
        );
    }

    #[test]
    fn percentile_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
        assert_eq!(percentile(&[], 0.99), 0.0);
        assert_eq!(percentile(&[7.0], 0.01), 7.0);
    }

    fn req(sched: f64, end: f64, outcome: Outcome, pod: &str) -> RequestRecord {
        RequestRecord {
            scheduled_ms: sched,
            start_ms: sched,
            end_ms: end,
            outcome,
            pod: Some(pod.into()),
            conn: 1,
        }
    }

    #[test]
    fn series_bins_requests_errors_and_connections() {
        let requests = vec![
            req(100.0, 110.0, Outcome::Ok, "a"),
            req(900.0, 1100.0, Outcome::Reset, "a"),
            req(1500.0, 1600.0, Outcome::Ok, "b"),
        ];
        let conns = vec![
            ConnRecord {
                id: 1,
                open_ms: 50.0,
                close_ms: 2500.0,
                closed_by: ClosedBy::Server,
                pod: Some("a".into()),
                requests: 2,
            },
            ConnRecord {
                id: 2,
                open_ms: 1200.0,
                close_ms: 3000.0,
                closed_by: ClosedBy::Client,
                pod: Some("b".into()),
                requests: 1,
            },
        ];
        let s = time_series(&requests, &conns, 3000.0);
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].requests, 1);
        assert_eq!(s[1].requests, 2);
        assert_eq!(s[1].error_count(), 1);
        assert_eq!(s[0].new_conns.get("a"), Some(&1));
        assert_eq!(s[1].new_conns.get("b"), Some(&1));
        assert_eq!(s[0].open_conns.get("a"), Some(&1));
        assert_eq!(s[1].open_conns.get("a"), Some(&1));
        assert_eq!(s[1].open_conns.get("b"), Some(&1));
        assert_eq!(s[2].open_conns.get("a"), None);
    }

    #[test]
    fn urls_parse_to_addresses() {
        let (a, p) = parse_url("http://127.1.2.3:8080/x?y=1").unwrap();
        assert_eq!(a, "127.1.2.3:8080".parse().unwrap());
        assert_eq!(p, "/x?y=1");
        assert!(parse_url("http://example.com/").is_err());
        assert!(parse_url("https://127.0.0.1/").is_err());
    }
}
