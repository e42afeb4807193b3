//! The whole report: every run, side by side, and its table.
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::result::RunResult;

/// The whole report: every run, side by side.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub generated_unix_ms: u64,
    pub cpus: usize,
    pub runs: Vec<RunResult>,
}

impl Report {
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "| strategy | delay | requests | failed | outcomes | storm factor | peak new conns/s at the new pods (capacity) | busiest new pod's peak | p99 steady | p99 release | worst 1 s p99 | p99 release old / new pods | p99 release first / later on a connection | CPU s operator / agents / apps / all | s waiting for a core agents / apps | release | ok req/s |"
        );
        let _ = writeln!(
            s,
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        for r in &self.runs {
            let outcomes: Vec<String> = r
                .by_outcome
                .iter()
                .filter(|(o, n)| o.is_failure() && **n > 0)
                .map(|(o, n)| format!("{} {n}", o.as_str()))
                .collect();
            let cpu = |role: &str| r.cpu_s.get(role).copied().unwrap_or(0.0);
            let waited = |role: &str| r.cpu_wait_s.get(role).copied().unwrap_or(0.0);
            let _ = writeln!(
                s,
                "| {} | {:.0} s | {} | {} | {} | {:.2} | {:.0} ({:.0}) | {:.0} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} / {:.1} ms | {:.1} / {:.1} ms | {:.1} / {:.1} / {:.1} / {:.1} | {:.1} / {:.1} | {:.1} s | {:.0} |",
                r.strategy,
                r.delay_s,
                r.requests,
                r.failed,
                if outcomes.is_empty() {
                    "-".to_string()
                } else {
                    outcomes.join(", ")
                },
                r.storm.factor,
                r.storm.peak_per_s,
                r.storm.capacity_per_s,
                r.storm.pod_peak_per_s,
                r.p99_steady_ms,
                r.p99_release_ms,
                r.tail.worst_second_p99_ms,
                r.tail.window.p99_old_ms,
                r.tail.window.p99_new_ms,
                r.tail.window.p99_first_ms,
                r.tail.window.p99_reused_ms,
                cpu("operator"),
                cpu("agents"),
                cpu("apps"),
                r.cpu_s.values().sum::<f64>(),
                waited("agents"),
                waited("apps"),
                r.release_s,
                r.achieved_rps
            );
        }
        s
    }
}
