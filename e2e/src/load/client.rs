//! The open-loop client pool: the schedule, the workers and their keep-alive connections
//! (HTTP/1.1, or HTTP/2 with several streams each).
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

use super::config::LoadConfig;
use super::records::{
    ClosedBy, ConnRecord, Outcome, Phase, RequestRecord, classify_io, classify_status,
};
use super::report::LoadReport;

/// Classifies a hyper error: the phase decides, an underlying timeout wins.
/// What went wrong, for the record: the stage (`ready`: the connection was found closed
/// before the request was written; `send`: writing it or waiting for the head; `body`)
/// and hyper's error with its sources.
fn hyper_detail(stage: &str, err: &hyper::Error) -> String {
    let mut text = format!("{stage}: {err}");
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

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

/// One request's outcome, the pod that answered, and what went wrong (for failures).
type Exchanged = (Outcome, Option<String>, Option<String>);

/// Sends one request on `sender`; returns the outcome and the answering pod.
async fn exchange(sender: &mut Sender, path: &str, host: &str) -> Exchanged {
    let req = Request::get(path)
        .header("host", host)
        .body(Empty::<Bytes>::new())
        .expect("static request parts are valid");
    let resp = match sender {
        Sender::H1(s) => {
            if let Err(e) = s.ready().await {
                return (
                    classify_hyper(Phase::Head, &e),
                    None,
                    Some(hyper_detail("ready", &e)),
                );
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
        Err(e) => {
            return (
                classify_hyper(Phase::Head, &e),
                None,
                Some(hyper_detail("send", &e)),
            );
        }
    };
    let pod = resp
        .headers()
        .get("x-pod-name")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let status = resp.status().as_u16();
    match resp.into_body().collect().await {
        Ok(_) => (classify_status(status), pod, None),
        Err(e) => (
            classify_hyper(Phase::Body, &e),
            pod,
            Some(hyper_detail("body", &e)),
        ),
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
                    record(
                        &shared,
                        &ticket,
                        start,
                        outcome,
                        None,
                        0,
                        Some("connect".into()),
                    );
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
        let (outcome, pod, detail) =
            result.unwrap_or((Outcome::Timeout, None, Some("timeout".into())));
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
        record(&shared, &ticket, start, outcome, pod, conn_id, detail);
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
    detail: Option<String>,
) {
    let rec = RequestRecord {
        scheduled_ms: shared.ms(ticket.scheduled),
        start_ms: shared.ms(start),
        end_ms: shared.ms(Instant::now()),
        outcome,
        pod,
        conn,
        detail,
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
            record(
                &shared,
                &t,
                Instant::now(),
                Outcome::Timeout,
                None,
                0,
                Some("never started".into()),
            );
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
