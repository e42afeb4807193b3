//! `sluice-e2e load`: the command line, its target (a URL or a test-ground Service) and
//! its output.
use std::collections::BTreeMap;
use std::io::{self, IsTerminal as _, Write as _};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;

use super::client::run_load;
use super::config::LoadConfig;

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

pub(super) fn parse_url(url: &str) -> anyhow::Result<(SocketAddr, String)> {
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
        report.write_records(path)?;
    }
    let recap = format!(
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
    match &args.out {
        Some(p) => {
            std::fs::write(p, serde_json::to_string_pretty(&report)?)?;
            eprintln!("{recap}");
        }
        // Not a terminal (a pipe, a container's log): the recap, then the summary as one
        // line, both on stdout. A container runtime splits a line longer than its limit
        // (32 KiB) into pieces, and a line on stderr written meanwhile landed glued to a
        // piece; one stream keeps the order.
        None if !io::stdout().is_terminal() => {
            let mut out = format!("{recap}\n").into_bytes();
            out.extend(serde_json::to_vec(&report)?);
            out.push(b'\n');
            io::stdout().lock().write_all(&out)?;
        }
        None => {
            println!("{}", serde_json::to_string_pretty(&report)?);
            eprintln!("{recap}");
        }
    }
    Ok(())
}
