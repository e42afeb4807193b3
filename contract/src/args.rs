//! The agent's command line, rendered from a typed description: what the operator puts in
//! the injected sidecar's `args`. The agent's tests parse this output with its real
//! command-line parser, so a flag renamed on one side fails there.

use std::time::Duration;

use crate::duration::format_duration;

/// Subcommand: in the data path.
pub const PROXY: &str = "proxy";
/// Subcommand: no data path, the kernel's TCP tables.
pub const OBSERVE: &str = "observe";

pub const FLAG_LISTEN: &str = "--listen";
pub const FLAG_UPSTREAM: &str = "--upstream";
pub const FLAG_PROTOCOL: &str = "--protocol";
pub const FLAG_PORT: &str = "--port";
pub const FLAG_ADMIN: &str = "--admin";
pub const FLAG_QUIET_PERIOD: &str = "--quiet-period";
pub const FLAG_PROPAGATION_TIMEOUT: &str = "--propagation-timeout";
pub const FLAG_CLOSE_RATE: &str = "--close-rate";
pub const FLAG_DRAIN_TIMEOUT: &str = "--drain-timeout";
pub const FLAG_DRAIN_ORPHAN_AFTER: &str = "--drain-orphan-after";
pub const FLAG_MAX_CONNECTIONS: &str = "--max-connections";
pub const FLAG_HTTP2_MAX_CONCURRENT_STREAMS: &str = "--http2-max-concurrent-streams";
pub const FLAG_HEADER_READ_TIMEOUT: &str = "--header-read-timeout";
pub const FLAG_BODY_TIMEOUT: &str = "--body-timeout";
pub const FLAG_UPSTREAM_TIMEOUT: &str = "--upstream-timeout";
pub const FLAG_HTTP2_IDLE_TIMEOUT: &str = "--http2-idle-timeout";
pub const FLAG_TCP_KEEPALIVE: &str = "--tcp-keepalive";

/// What the proxy speaks (`--protocol`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http,
    Tcp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Tcp => "tcp",
        }
    }
}

/// The agent's mode and the ports that mode needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentCommand {
    /// `proxy`: listen on every address at `listen_port`, forward to the application on
    /// loopback at `upstream_port`.
    Proxy {
        listen_port: u16,
        upstream_port: u16,
        protocol: Protocol,
        limits: ProxyLimits,
    },
    /// `observe`: watch the application's `port`.
    Observe { port: u16 },
}

/// The proxy's limits a Release may set; `None` leaves the agent's default (docs/agent.md
/// lists each default and what a client over it sees). A zero duration turns off the
/// timeouts that can be off (body, upstream, TCP keep-alive).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProxyLimits {
    pub max_connections: Option<u32>,
    pub http2_max_concurrent_streams: Option<u32>,
    pub header_read_timeout: Option<Duration>,
    pub body_timeout: Option<Duration>,
    pub upstream_timeout: Option<Duration>,
    pub http2_idle_timeout: Option<Duration>,
    pub tcp_keepalive: Option<Duration>,
}

impl ProxyLimits {
    fn render(&self, args: &mut Vec<String>) {
        let counts = [
            (FLAG_MAX_CONNECTIONS, self.max_connections),
            (
                FLAG_HTTP2_MAX_CONCURRENT_STREAMS,
                self.http2_max_concurrent_streams,
            ),
        ];
        for (name, value) in counts {
            if let Some(v) = value {
                args.extend([name.to_string(), v.to_string()]);
            }
        }
        let durations = [
            (FLAG_HEADER_READ_TIMEOUT, self.header_read_timeout),
            (FLAG_BODY_TIMEOUT, self.body_timeout),
            (FLAG_UPSTREAM_TIMEOUT, self.upstream_timeout),
            (FLAG_HTTP2_IDLE_TIMEOUT, self.http2_idle_timeout),
            (FLAG_TCP_KEEPALIVE, self.tcp_keepalive),
        ];
        for (name, value) in durations {
            if let Some(d) = value {
                args.extend([name.to_string(), format_duration(d)]);
            }
        }
    }
}

/// The drain policy flags, common to both modes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DrainFlags {
    pub quiet_period: Duration,
    pub propagation_timeout: Duration,
    /// Connections told to leave per second while closing.
    pub close_rate: u32,
    pub drain_timeout: Duration,
    /// `None`: the agent's default (the drain timeout + 2m).
    pub drain_orphan_after: Option<Duration>,
}

/// The agent's whole command line (without the program name). The drain token is not a
/// flag: it travels in the environment ([`crate::DRAIN_TOKEN_ENV`]), out of `ps` and the
/// pod's args.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentArgs {
    pub command: AgentCommand,
    /// The admin endpoint listens on every address at this port.
    pub admin_port: u16,
    pub drain: DrainFlags,
}

impl AgentArgs {
    /// The arguments, flag and value as separate words, e.g. `proxy --listen
    /// 0.0.0.0:15101 --upstream 127.0.0.1:8080 --protocol http --admin 0.0.0.0:9901
    /// --quiet-period 2s …`.
    pub fn render(&self) -> Vec<String> {
        fn flag(args: &mut Vec<String>, name: &str, value: String) {
            args.push(name.to_string());
            args.push(value);
        }
        let mut args: Vec<String> = Vec::new();
        match &self.command {
            AgentCommand::Proxy {
                listen_port,
                upstream_port,
                protocol,
                limits,
            } => {
                args.push(PROXY.into());
                flag(&mut args, FLAG_LISTEN, format!("0.0.0.0:{listen_port}"));
                flag(
                    &mut args,
                    FLAG_UPSTREAM,
                    format!("127.0.0.1:{upstream_port}"),
                );
                flag(&mut args, FLAG_PROTOCOL, protocol.as_str().into());
                limits.render(&mut args);
            }
            AgentCommand::Observe { port } => {
                args.push(OBSERVE.into());
                flag(&mut args, FLAG_PORT, port.to_string());
            }
        }
        let d = &self.drain;
        flag(
            &mut args,
            FLAG_ADMIN,
            format!("0.0.0.0:{}", self.admin_port),
        );
        flag(
            &mut args,
            FLAG_QUIET_PERIOD,
            format_duration(d.quiet_period),
        );
        flag(
            &mut args,
            FLAG_PROPAGATION_TIMEOUT,
            format_duration(d.propagation_timeout),
        );
        flag(&mut args, FLAG_CLOSE_RATE, d.close_rate.to_string());
        flag(
            &mut args,
            FLAG_DRAIN_TIMEOUT,
            format_duration(d.drain_timeout),
        );
        if let Some(o) = d.drain_orphan_after {
            flag(&mut args, FLAG_DRAIN_ORPHAN_AFTER, format_duration(o));
        }
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain() -> DrainFlags {
        DrainFlags {
            quiet_period: Duration::from_secs(2),
            propagation_timeout: Duration::from_secs(60),
            close_rate: 100,
            drain_timeout: Duration::from_secs(90),
            drain_orphan_after: None,
        }
    }

    #[test]
    fn renders_proxy_and_observe() {
        let proxy = AgentArgs {
            command: AgentCommand::Proxy {
                listen_port: 15101,
                upstream_port: 8080,
                protocol: Protocol::Http,
                limits: ProxyLimits::default(),
            },
            admin_port: 9901,
            drain: drain(),
        };
        assert_eq!(
            proxy.render().join(" "),
            "proxy --listen 0.0.0.0:15101 --upstream 127.0.0.1:8080 --protocol http --admin 0.0.0.0:9901 --quiet-period 2s --propagation-timeout 1m --close-rate 100 --drain-timeout 1m30s"
        );
        let limited = AgentArgs {
            command: AgentCommand::Proxy {
                listen_port: 15101,
                upstream_port: 8080,
                protocol: Protocol::Http,
                limits: ProxyLimits {
                    max_connections: Some(20_000),
                    upstream_timeout: Some(Duration::from_secs(30)),
                    tcp_keepalive: Some(Duration::ZERO),
                    ..ProxyLimits::default()
                },
            },
            admin_port: 9901,
            drain: drain(),
        };
        assert!(
            limited.render().join(" ").starts_with(
                "proxy --listen 0.0.0.0:15101 --upstream 127.0.0.1:8080 --protocol http --max-connections 20000 --upstream-timeout 30s --tcp-keepalive 0s --admin"
            ),
            "{:?}",
            limited.render()
        );
        let observe = AgentArgs {
            command: AgentCommand::Observe { port: 8080 },
            admin_port: 9901,
            drain: DrainFlags {
                drain_orphan_after: Some(Duration::from_millis(1500)),
                ..drain()
            },
        };
        assert_eq!(
            observe.render().join(" "),
            "observe --port 8080 --admin 0.0.0.0:9901 --quiet-period 2s --propagation-timeout 1m --close-rate 100 --drain-timeout 1m30s --drain-orphan-after 1500ms"
        );
    }
}
