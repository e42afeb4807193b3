//! `kubectl sluice`: status, promote and abort for Releases.
//!
//! Install by putting this binary on `PATH` as `kubectl-sluice`. Each command has a plain
//! `kubectl` equivalent (printed by `--help`), because the plugin only sets annotations
//! that the operator acts on:
//!
//! - promote: `kubectl annotate release NAME sluice.dev/promote=$(date +%s) --overwrite`
//! - full promote: `kubectl annotate release NAME sluice.dev/promote=full-$(date +%s) --overwrite`
//! - abort: `kubectl annotate release NAME sluice.dev/abort=$(date +%s) --overwrite`
//! - pause / resume: `kubectl patch release NAME --type merge -p '{"spec":{"paused":true}}'`

use anyhow::Context;
use clap::{Parser, Subcommand};
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use sluice_operator::release::Release;
use sluice_operator::release::crd::{ABORT_ANNOTATION, PROMOTE_ANNOTATION};

#[derive(Parser)]
#[command(name = "kubectl-sluice", version, about = "Drive Sluice Releases")]
struct Cli {
    /// Namespace (default: the kubeconfig context's).
    #[arg(short, long, global = true)]
    namespace: Option<String>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Show a Release: phase, step, revisions, gates, drains.
    Status { name: String },
    /// Promote the current pause or gate step (`--full`: skip every remaining step).
    /// Equivalent: kubectl annotate release NAME sluice.dev/promote=$(date +%s) --overwrite
    Promote {
        name: String,
        #[arg(long)]
        full: bool,
    },
    /// Abort the release in progress: traffic returns to stable, losslessly.
    /// Equivalent: kubectl annotate release NAME sluice.dev/abort=$(date +%s) --overwrite
    Abort { name: String },
    /// Hold the release (no step advances, no new drain starts).
    /// Equivalent: kubectl patch release NAME --type merge -p '{"spec":{"paused":true}}'
    Pause { name: String },
    /// Undo `pause`.
    Resume { name: String },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let client = kube::Client::try_default()
        .await
        .context("no kubeconfig (set KUBECONFIG) and not in a cluster")?;
    let api: Api<Release> = match &cli.namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::default_namespaced(client),
    };
    let token = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis()
        .to_string();
    let annotate =
        |key: &'static str, value: String| json!({"metadata": {"annotations": {key: value}}});
    match cli.command {
        Cmd::Status { name } => {
            let r = api
                .get(&name)
                .await
                .with_context(|| format!("release {name}"))?;
            print!("{}", render_status(&r));
        }
        Cmd::Promote { name, full } => {
            let value = if full { format!("full-{token}") } else { token };
            api.patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(annotate(PROMOTE_ANNOTATION, value)),
            )
            .await
            .with_context(|| format!("promoting release {name}"))?;
            println!(
                "release {name} promoted{}",
                if full { " (full)" } else { "" }
            );
        }
        Cmd::Abort { name } => {
            api.patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(annotate(ABORT_ANNOTATION, token)),
            )
            .await
            .with_context(|| format!("aborting release {name}"))?;
            println!("release {name} aborted: traffic returns to stable");
        }
        Cmd::Pause { name } => {
            api.patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"paused": true}})),
            )
            .await?;
            println!("release {name} paused");
        }
        Cmd::Resume { name } => {
            api.patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"paused": false}})),
            )
            .await?;
            println!("release {name} resumed");
        }
    }
    Ok(())
}

fn render_status(r: &Release) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let st = r.status.clone().unwrap_or_default();
    let name = r.metadata.name.clone().unwrap_or_default();
    let _ = writeln!(o, "Release:   {name}");
    let _ = writeln!(o, "Workload:  Deployment/{}", r.spec.workload_ref.name);
    let _ = writeln!(
        o,
        "Phase:     {}",
        st.phase
            .map(|p| p.as_str())
            .unwrap_or("(not reconciled yet)")
    );
    if let Some(m) = &st.message {
        let _ = writeln!(o, "Message:   {m}");
    }
    let _ = writeln!(
        o,
        "Step:      {}   Weight: {}%   Paused: {}",
        st.step_display.as_deref().unwrap_or("-"),
        st.canary_weight.unwrap_or(0),
        r.spec.paused
    );
    let _ = writeln!(
        o,
        "Stable:    {}   Canary: {}",
        st.stable_revision.as_deref().unwrap_or("-"),
        st.canary_revision.as_deref().unwrap_or("-")
    );
    if !st.revisions.is_empty() {
        let _ = writeln!(
            o,
            "\nREVISION     ROLE    DESIRED CURRENT READY SERVING DRAINING"
        );
        for rv in &st.revisions {
            let _ = writeln!(
                o,
                "{:<12} {:<7} {:>7} {:>7} {:>5} {:>7} {:>8}",
                rv.revision, rv.role, rv.desired, rv.current, rv.ready, rv.serving, rv.draining
            );
        }
    }
    if !st.gates.is_empty() {
        let _ = writeln!(o, "\nGATE            RESULT        FAILURES  VALUES");
        for g in &st.gates {
            let values: Vec<String> = g
                .values
                .iter()
                .map(|(k, v)| format!("{k}={v:.4}"))
                .collect();
            let _ = writeln!(
                o,
                "{:<15} {:<13} {:>8}  {}",
                g.name,
                g.result,
                g.consecutive_failures,
                values.join(" ")
            );
            if let Some(m) = &g.message {
                let _ = writeln!(o, "{:<15} {m}", "");
            }
        }
    }
    if let Some(a) = &st.abort {
        let _ = writeln!(
            o,
            "\nAborted:   {} {} at {}: {}",
            a.reason,
            a.gate
                .as_deref()
                .map(|g| format!("(gate {g})"))
                .unwrap_or_default(),
            a.at,
            a.message
        );
    }
    if !st.drains.is_empty() {
        let _ = writeln!(
            o,
            "\nDRAIN POD                          STATE         QUIET(s)  CLOSED  DURATION(s)"
        );
        for d in st.drains.iter().rev().take(12) {
            let _ = writeln!(
                o,
                "{:<34} {:<13} {:>8}  {:>6}  {:>11}",
                d.pod,
                d.state,
                d.quiet_seconds
                    .map(|q| format!("{q:.1}"))
                    .unwrap_or("-".into()),
                d.connections_closed
                    .map(|c| c.to_string())
                    .unwrap_or("-".into()),
                d.duration_seconds
                    .map(|q| format!("{q:.1}"))
                    .unwrap_or("-".into()),
            );
        }
    }
    for c in &st.conditions {
        let _ = writeln!(o, "Condition {:<12} {:<6} {}", c.type_, c.status, c.reason);
    }
    o
}
