//! What the load generator records: every request's [`Outcome`] (classified by the phase
//! an error happened in) and every connection, with who closed it.
use std::io;

use serde::{Deserialize, Serialize};

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
    /// For a failure: at which stage and with which error (see the load client).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
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
