//! The operator↔agent contract, checked against the agent's real code: its `/metrics`
//! output read with the operator's parser, and the operator's rendered command line read
//! with the agent's own command-line parser. A name or flag changed on one side only fails
//! here (the operator would otherwise skip the metric silently, and every drain would turn
//! "quiet" after quietPeriod).

mod common;

use std::time::Duration;

use clap::{CommandFactory, Parser};
use common::*;
use sluice_agent::config::{Cli, Command, Protocol as AgentProtocol, ProxyArgs};
use sluice_agent::start_proxy;
use sluice_contract::{
    AgentArgs, AgentCommand, DRAIN_TOKEN_ENV, DRAIN_TOKEN_HEADER, DrainFlags, METRICS_PATH,
    Protocol, ProxyLimits, parse_agent_metrics,
};

const LIMIT: Duration = Duration::from_secs(20);

/// Every field the operator reads comes out of a real agent's `/metrics` non-zero after a
/// connection, requests (one answered 502), a refused `/drain` and a drain under way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operators_parser_reads_every_field_from_the_agents_metrics() {
    let upstream = start_upstream().await;
    let mut args = ProxyArgs::new(lo0(), upstream.to_string(), lo0());
    args.drain_token = Some(DRAIN_TOKEN.into());
    // Long enough that the drain is still under way when scraped.
    args.drain.quiet_period = Duration::from_secs(30);
    args.drain.propagation_timeout = Duration::from_secs(60);
    args.drain.drain_timeout = Duration::from_secs(90);
    let agent = start_proxy(args).await.unwrap();
    let listen = agent.listen_addr.unwrap();
    let admin = agent.admin_addr;

    // A connection kept open (active), a request answered and one the upstream resets
    // (502: an error); a second connection that ends (closed).
    let mut kept = H1::connect(listen).await.unwrap();
    assert_eq!(kept.request("/").await.unwrap().status, 200);
    assert_eq!(kept.request("/reset").await.unwrap().status, 502);
    assert_eq!(http(listen, "GET", "/").await.0, 200);
    // A refused drain: the wrong token.
    let mut c = H1::connect(admin).await.unwrap();
    c.send_with(
        "GET",
        "/drain",
        &format!("{DRAIN_TOKEN_HEADER}: not-it\r\n"),
    )
    .await
    .unwrap();
    assert_eq!(c.read_response().await.unwrap().status, 403);
    // A drain under way (the kept connection holds it in quiescing or closing).
    tokio::spawn(drain(admin));

    let deadline = std::time::Instant::now() + LIMIT;
    let s = loop {
        let text = http(admin, "GET", METRICS_PATH).await.1;
        let s = parse_agent_metrics(&text, 1.0);
        if s.drain_phase.is_some_and(|p| p > 0.0) && s.connections_closed > 0.0 {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "{s:?}\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(s.connections_accepted >= 2.0, "{s:?}");
    assert!(s.connections_active >= 1.0, "{s:?}");
    assert!(s.connections_closed >= 1.0, "{s:?}");
    assert!(s.requests >= 3.0, "{s:?}");
    assert!(s.errors >= 1.0, "{s:?}");
    assert_eq!(s.drain_refused, 1.0, "{s:?}");
    assert!(s.drain_phase.is_some_and(|p| p > 0.0), "{s:?}");
    // The latency histogram: cumulative, ends at +Inf with every request.
    let last = s.latency_buckets.last().copied().unwrap_or_default();
    assert_eq!(last.0, f64::INFINITY, "{s:?}");
    assert!(last.1 >= 3.0, "{s:?}");
    assert!(s.latency_buckets.len() > 2, "{s:?}");
    assert!(
        s.latency_buckets.windows(2).all(|w| w[0].1 <= w[1].1),
        "{s:?}"
    );
    agent.abort();
}

fn drain_flags() -> DrainFlags {
    DrainFlags {
        quiet_period: Duration::from_millis(1500),
        propagation_timeout: Duration::from_secs(75),
        close_rate: 7,
        drain_timeout: Duration::from_secs(5400),
        drain_orphan_after: Some(Duration::from_secs(200)),
    }
}

fn parse(args: &AgentArgs) -> Cli {
    let words = std::iter::once("sluice-agent".to_string()).chain(args.render());
    Cli::try_parse_from(words).unwrap_or_else(|e| panic!("{:?}: {e}", args.render()))
}

/// The operator's rendered command line, every drain flag set, means to the agent what the
/// operator meant.
#[test]
fn the_agent_parses_the_rendered_command_line_as_meant() {
    for protocol in [Protocol::Http, Protocol::Tcp] {
        let args = AgentArgs {
            command: AgentCommand::Proxy {
                listen_port: 15101,
                upstream_port: 8080,
                protocol,
                limits: ProxyLimits {
                    max_connections: Some(20_000),
                    http2_max_concurrent_streams: Some(250),
                    header_read_timeout: Some(Duration::from_secs(12)),
                    body_timeout: Some(Duration::ZERO),
                    upstream_timeout: Some(Duration::from_millis(2500)),
                    http2_idle_timeout: Some(Duration::from_secs(3600)),
                    tcp_keepalive: Some(Duration::from_secs(45)),
                },
            },
            admin_port: 9902,
            drain: drain_flags(),
        };
        let Command::Proxy(p) = parse(&args).command else {
            panic!("not proxy: {:?}", args.render())
        };
        assert_eq!(p.listen, "0.0.0.0:15101".parse().unwrap());
        assert_eq!(p.upstream, "127.0.0.1:8080");
        assert_eq!(p.admin, "0.0.0.0:9902".parse().unwrap());
        let want = match protocol {
            Protocol::Http => AgentProtocol::Http,
            Protocol::Tcp => AgentProtocol::Tcp,
        };
        assert_eq!(p.protocol, want);
        assert_eq!(p.drain.quiet_period, Duration::from_millis(1500));
        assert_eq!(p.drain.propagation_timeout, Duration::from_secs(75));
        assert_eq!(p.drain.close_rate, 7);
        assert_eq!(p.drain.drain_timeout, Duration::from_secs(5400));
        assert_eq!(p.drain.drain_orphan_after, Some(Duration::from_secs(200)));
        assert_eq!(p.limits.max_connections, 20_000);
        assert_eq!(p.limits.http2_max_concurrent_streams, 250);
        assert_eq!(p.header_read_timeout, Duration::from_secs(12));
        assert_eq!(p.limits.body_timeout, Duration::ZERO);
        assert_eq!(p.limits.upstream_timeout, Duration::from_millis(2500));
        assert_eq!(p.limits.http2_idle_timeout, Duration::from_secs(3600));
        assert_eq!(p.limits.tcp_keepalive, Duration::from_secs(45));
    }

    let args = AgentArgs {
        command: AgentCommand::Observe { port: 8080 },
        admin_port: 9901,
        drain: drain_flags(),
    };
    let Command::Observe(o) = parse(&args).command else {
        panic!("not observe: {:?}", args.render())
    };
    assert_eq!(o.port, 8080);
    assert_eq!(o.admin, "0.0.0.0:9901".parse().unwrap());
    assert_eq!(o.drain.quiet_period, Duration::from_millis(1500));
    assert_eq!(o.drain.propagation_timeout, Duration::from_secs(75));
    assert_eq!(o.drain.close_rate, 7);
    assert_eq!(o.drain.drain_timeout, Duration::from_secs(5400));
    assert_eq!(o.drain.drain_orphan_after, Some(Duration::from_secs(200)));
}

/// The drain token is no flag: both modes read it from the contract's environment variable.
#[test]
fn both_modes_take_the_drain_token_from_the_contracts_env() {
    let cli = Cli::command();
    for mode in ["proxy", "observe"] {
        let sub = cli.find_subcommand(mode).unwrap();
        let token = sub
            .get_arguments()
            .find(|a| a.get_id() == "drain_token")
            .unwrap_or_else(|| panic!("{mode}: no drain_token argument"));
        assert_eq!(
            token.get_env(),
            Some(std::ffi::OsStr::new(DRAIN_TOKEN_ENV)),
            "{mode}"
        );
    }
}
