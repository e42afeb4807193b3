//! Command line and configuration.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use sluice_contract::{DEFAULT_ADMIN_PORT, DRAIN_TOKEN_ENV};

use crate::drain::DrainConfig;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("invalid duration {input:?}: {reason} (examples: 500ms, 2s, 1m)")]
    Duration { input: String, reason: String },
}

/// Parses `500ms`, `2s`, `1m`, `1m30s` (humantime); a bare `0` is zero.
pub fn parse_duration(s: &str) -> Result<Duration, ConfigError> {
    let t = s.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(t).map_err(|e| ConfigError::Duration {
        input: s.to_string(),
        reason: e.to_string(),
    })
}

/// Every address, the contract's admin port: where the operator's probes, preStop hook and
/// scrapes go unless it says otherwise.
fn default_admin() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], DEFAULT_ADMIN_PORT))
}

#[derive(Debug, Parser)]
#[command(
    name = "sluice-agent",
    version,
    about = "Sluice in-pod agent: lossless drain (graceful TCP shutdown) and connection signals"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, global = true, env = "SLUICE_LOG", default_value = "info")]
    pub log: String,
    /// Log as JSON lines instead of text.
    #[arg(long, global = true)]
    pub log_json: bool,
    /// Worker threads (proxy mode: each serves its connections on a single-threaded
    /// runtime; 0 or 1 serve everything on the main thread. Observe mode: the runtime's
    /// workers, 0 single-threaded). Default: the cores, at most 2.
    #[arg(long, global = true, env = "SLUICE_AGENT_WORKERS")]
    pub workers: Option<usize>,
    /// Where to leave the termination message the operator reads when the pod was stopped
    /// before any drain (written only if the file exists, as the kubelet provides it).
    #[arg(long, global = true, default_value = sluice_contract::TERMINATION_MESSAGE_PATH)]
    pub termination_log: std::path::PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Sit in the data path in front of the application and drain it politely.
    Proxy(ProxyArgs),
    /// No data path: watch the application's port in the kernel's tables.
    Observe(ObserveArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Protocol {
    /// HTTP/1.1 and HTTP/2 (prior knowledge) reverse proxy.
    Http,
    /// L4 proxy.
    Tcp,
}

#[derive(Debug, Clone, Args)]
pub struct DrainArgs {
    /// No new connection for this long means load balancers stopped sending.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub quiet_period: Duration,
    /// Longest wait for quiet before closing anyway.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub propagation_timeout: Duration,
    /// Connections told to leave per second while closing (0: all at once).
    #[arg(long, default_value_t = 100)]
    pub close_rate: u32,
    /// Whole drain's deadline, counted from its start.
    #[arg(long, default_value = "90s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// A drain that no termination signal follows within this (counted from the drain's
    /// start) is reported: error log and `sluice_agent_drain_orphaned` 1 (default: the
    /// drain timeout + 2m).
    #[arg(long, value_parser = parse_duration)]
    pub drain_orphan_after: Option<Duration>,
}

impl Default for DrainArgs {
    fn default() -> Self {
        let d = DrainConfig::default();
        DrainArgs {
            quiet_period: d.quiet_period,
            propagation_timeout: d.propagation_timeout,
            close_rate: 100,
            drain_timeout: d.drain_timeout,
            drain_orphan_after: None,
        }
    }
}

impl DrainArgs {
    /// When a drain that no termination signal followed is reported, from its start.
    pub fn orphan_after(&self) -> Duration {
        self.drain_orphan_after
            .unwrap_or(self.drain_timeout + Duration::from_secs(120))
    }

    pub fn drain_config(&self) -> DrainConfig {
        DrainConfig {
            quiet_period: self.quiet_period,
            propagation_timeout: self.propagation_timeout,
            drain_timeout: self.drain_timeout,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct ProxyArgs {
    /// Address clients connect to.
    #[arg(long)]
    pub listen: SocketAddr,
    /// The application's address (host:port).
    #[arg(long)]
    pub upstream: String,
    /// Admin endpoint (/healthz, /ready, /drain, /metrics).
    #[arg(long, default_value_t = default_admin())]
    pub admin: SocketAddr,
    #[arg(long, value_enum, default_value_t = Protocol::Http)]
    pub protocol: Protocol,
    /// Speak HTTP/2 (prior knowledge) to the upstream instead of HTTP/1.1 (http mode).
    #[arg(long)]
    pub upstream_http2: bool,
    /// A client that sends no complete request head for this long is closed (http mode).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,
    /// While closing, a connection told to leave is closed once idle this long
    /// (http: no request; tcp: no byte in either direction).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub idle_close_after: Duration,
    #[command(flatten)]
    pub drain: DrainArgs,
    /// The secret `/drain` requires in the `x-sluice-drain-token` header (the operator
    /// puts it in the injected `preStop.httpGet`). Without one, `/drain` is refused.
    #[arg(long, env = DRAIN_TOKEN_ENV, hide_env_values = true)]
    pub drain_token: Option<String>,
    #[command(flatten)]
    pub limits: LimitArgs,
}

impl ProxyArgs {
    /// Defaults for an in-process agent (tests, embedding).
    pub fn new(listen: SocketAddr, upstream: impl Into<String>, admin: SocketAddr) -> Self {
        ProxyArgs {
            listen,
            upstream: upstream.into(),
            admin,
            protocol: Protocol::Http,
            upstream_http2: false,
            header_read_timeout: Duration::from_secs(30),
            idle_close_after: Duration::from_secs(1),
            drain: DrainArgs::default(),
            drain_token: None,
            limits: LimitArgs::default(),
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct ObserveArgs {
    /// The application's port.
    #[arg(long)]
    pub port: u16,
    /// Admin endpoint (/healthz, /ready, /drain, /metrics).
    #[arg(long, default_value_t = default_admin())]
    pub admin: SocketAddr,
    /// How often to read /proc/net/tcp{,6}.
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    pub poll_interval: Duration,
    #[command(flatten)]
    pub drain: DrainArgs,
    /// The secret `/drain` requires in the `x-sluice-drain-token` header (the operator
    /// puts it in the injected `preStop.httpGet`). Without one, `/drain` is refused.
    #[arg(long, env = DRAIN_TOKEN_ENV, hide_env_values = true)]
    pub drain_token: Option<String>,
}

impl ObserveArgs {
    pub fn new(port: u16, admin: SocketAddr) -> Self {
        ObserveArgs {
            port,
            admin,
            poll_interval: Duration::from_millis(100),
            drain: DrainArgs::default(),
            drain_token: None,
        }
    }
}

/// What one client (or a crowd of them) may hold in proxy mode, and how long peers may
/// stall. docs/agent.md lists each with what a client over it sees.
#[derive(Debug, Clone, Args)]
pub struct LimitArgs {
    /// Client connections open at once; a client over it is accepted and closed at once
    /// (FIN), the others are unaffected.
    #[arg(long, default_value_t = 4096)]
    pub max_connections: usize,
    /// http: concurrent HTTP/2 streams per client connection (advertised in SETTINGS; a
    /// stream over it is refused with RST_STREAM REFUSED_STREAM).
    #[arg(long, default_value_t = 100)]
    pub http2_max_concurrent_streams: u32,
    /// http: upstream HTTP/1.1 connections one HTTP/2 client connection may open; its
    /// further streams wait for one of them.
    #[arg(long, default_value_t = 32)]
    pub upstream_connections_per_client: usize,
    /// http: an HTTP/2 connection with no stream open for this long gets GOAWAY.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub http2_idle_timeout: Duration,
    /// http: HTTP/2 PING sent after this long without a frame from the client (0: off).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub http2_keepalive_interval: Duration,
    /// http: a PING not answered within this closes the connection.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub http2_keepalive_timeout: Duration,
    /// http: a request or response body that moves no byte for this long closes the
    /// client connection (a slow sender or a reader that stopped reading; 0: off).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub body_timeout: Duration,
    /// http: longest wait for the upstream's response head (0: none); then 504.
    #[arg(long, default_value = "0", value_parser = parse_duration)]
    pub upstream_timeout: Duration,
    /// TCP keep-alive on client and upstream sockets: idle time before the first probe
    /// (probes every min(this, 10s), 3 unanswered close the connection; 0: off).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub tcp_keepalive: Duration,
}

impl Default for LimitArgs {
    fn default() -> Self {
        LimitArgs {
            max_connections: 4096,
            http2_max_concurrent_streams: 100,
            upstream_connections_per_client: 32,
            http2_idle_timeout: Duration::from_secs(300),
            http2_keepalive_interval: Duration::from_secs(30),
            http2_keepalive_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(60),
            upstream_timeout: Duration::ZERO,
            tcp_keepalive: Duration::from_secs(60),
        }
    }
}

impl LimitArgs {
    /// `d`, or `None` for zero (off).
    pub fn nonzero(d: Duration) -> Option<Duration> {
        (!d.is_zero()).then_some(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration(" 0 "), Ok(Duration::ZERO));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("2").is_err());
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn cli_defaults() {
        let cli = Cli::try_parse_from([
            "sluice-agent",
            "proxy",
            "--listen",
            "0.0.0.0:8080",
            "--upstream",
            "127.0.0.1:8081",
        ])
        .unwrap();
        let Command::Proxy(p) = cli.command else {
            panic!("not proxy")
        };
        assert_eq!(p.admin, "0.0.0.0:9901".parse().unwrap());
        assert_eq!(p.protocol, Protocol::Http);
        assert_eq!(p.drain.quiet_period, Duration::from_secs(2));
        assert_eq!(p.drain.propagation_timeout, Duration::from_secs(60));
        assert_eq!(p.drain.close_rate, 100);
        assert_eq!(p.drain.drain_timeout, Duration::from_secs(90));
    }

    #[test]
    fn cli_all_flags() {
        let cli = Cli::try_parse_from([
            "sluice-agent",
            "proxy",
            "--listen",
            "127.0.0.1:1",
            "--upstream",
            "localhost:2",
            "--admin",
            "127.0.0.1:3",
            "--protocol",
            "tcp",
            "--quiet-period",
            "500ms",
            "--propagation-timeout",
            "1m",
            "--close-rate",
            "7",
            "--drain-timeout",
            "2s",
            "--workers",
            "3",
        ])
        .unwrap();
        assert_eq!(cli.workers, Some(3));
        let Command::Proxy(p) = cli.command else {
            panic!("not proxy")
        };
        assert_eq!(p.protocol, Protocol::Tcp);
        assert_eq!(p.drain.quiet_period, Duration::from_millis(500));
        assert_eq!(p.drain.close_rate, 7);
        assert_eq!(p.drain.drain_timeout, Duration::from_secs(2));

        let cli = Cli::try_parse_from([
            "sluice-agent",
            "observe",
            "--port",
            "8080",
            "--admin",
            "127.0.0.1:9901",
            "--quiet-period",
            "1s",
        ])
        .unwrap();
        let Command::Observe(o) = cli.command else {
            panic!("not observe")
        };
        assert_eq!(o.port, 8080);
        assert_eq!(o.drain.quiet_period, Duration::from_secs(1));
    }

    #[test]
    fn cli_rejects_bad_duration() {
        let r = Cli::try_parse_from([
            "sluice-agent",
            "observe",
            "--port",
            "1",
            "--quiet-period",
            "soon",
        ]);
        assert!(r.is_err());
    }
}
