//! What to send, how fast, for how long.
use std::net::SocketAddr;
use std::time::{Duration, Instant};

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
