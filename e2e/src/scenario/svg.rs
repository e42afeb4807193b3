//! The report drawn as a hand-written SVG.
use std::collections::BTreeSet;
use std::fmt::Write as _;

use super::report::Report;

/// A hand-written SVG: per run, requests/s and errors/s over time, and the connections
/// open to each pod (old pods in greys, new pods in colours).
pub fn render_svg(report: &Report) -> String {
    const W: f64 = 960.0;
    const PANEL_H: f64 = 300.0;
    const LEFT: f64 = 60.0;
    const RIGHT: f64 = 20.0;
    let colours = [
        "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#bcbd22", "#8c564b", "#e377c2",
    ];
    let greys = [
        "#888", "#999", "#aaa", "#777", "#bbb", "#666", "#ccc", "#555",
    ];
    let h = 40.0 + PANEL_H * report.runs.len() as f64;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" viewBox="0 0 {W} {h}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="24" font-size="15" font-weight="bold">Rolling release v1 → v2 under load: requests/s (blue), errors/s (red), connections per pod (below)</text>"#
    );
    for (i, r) in report.runs.iter().enumerate() {
        let top = 40.0 + PANEL_H * i as f64;
        let n = r.series.len().max(1) as f64;
        let x = |t: f64| LEFT + (W - LEFT - RIGHT) * t / n;
        let upper = (top + 20.0, top + 140.0);
        let lower = (top + 160.0, top + 270.0);
        let _ = writeln!(
            s,
            r#"<text x="{LEFT}" y="{}" font-weight="bold">{} (propagation delay {:.0} s): {} failed of {}, storm factor {:.1}, release {:.1} s — {}</text>"#,
            top + 12.0,
            r.strategy,
            r.delay_s,
            r.failed,
            r.requests,
            r.storm.factor,
            r.release_s,
            xml_escape(&r.description)
        );
        for (y0, y1) in [upper, lower] {
            let _ = writeln!(
                s,
                r##"<rect x="{LEFT}" y="{y0}" width="{}" height="{}" fill="none" stroke="#ccc"/>"##,
                W - LEFT - RIGHT,
                y1 - y0
            );
        }
        // Release window.
        let _ = writeln!(
            s,
            r##"<rect x="{}" y="{}" width="{}" height="{}" fill="#fff3cd" opacity="0.6"/>"##,
            x(r.release_start_s),
            upper.0,
            (x(r.release_end_s) - x(r.release_start_s)).max(1.0),
            lower.1 - upper.0
        );
        let max_rps = r
            .series
            .iter()
            .map(|b| b.requests)
            .max()
            .unwrap_or(1)
            .max(1) as f64;
        let max_err = r
            .series
            .iter()
            .map(|b| b.error_count())
            .max()
            .unwrap_or(0)
            .max(1) as f64;
        let scale = max_rps;
        let y_up = |v: f64| upper.1 - (upper.1 - upper.0) * v / scale;
        // Errors get their own scale (right-hand label): a few lost requests must show.
        let y_err = |v: f64| upper.1 - (upper.1 - upper.0) * v / max_err;
        for b in &r.series {
            let e = b.error_count() as f64;
            if e > 0.0 {
                let _ = writeln!(
                    s,
                    r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="#d62728" opacity="0.8"><title>{} errors</title></rect>"##,
                    x(b.t),
                    y_err(e).min(upper.1 - 2.0),
                    (x(b.t + 1.0) - x(b.t) - 1.0).max(1.0),
                    (upper.1 - y_err(e)).max(2.0),
                    e
                );
            }
        }
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}" fill="#d62728" text-anchor="end">{:.0} err/s</text>"##,
            W - RIGHT,
            upper.0 + 10.0,
            max_err
        );
        let pts: Vec<String> = r
            .series
            .iter()
            .map(|b| format!("{:.1},{:.1}", x(b.t + 0.5), y_up(b.requests as f64)))
            .collect();
        let _ = writeln!(
            s,
            r##"<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{}"/>"##,
            pts.join(" ")
        );
        let _ = writeln!(
            s,
            r#"<text x="4" y="{}">{:.0}/s</text><text x="4" y="{}">0</text>"#,
            upper.0 + 10.0,
            scale,
            upper.1
        );
        // Connections per pod.
        let pods: BTreeSet<&String> = r.series.iter().flat_map(|b| b.open_conns.keys()).collect();
        let max_conns = r
            .series
            .iter()
            .flat_map(|b| b.open_conns.values())
            .copied()
            .max()
            .unwrap_or(1)
            .max(1) as f64;
        let y_lo = |v: f64| lower.1 - (lower.1 - lower.0) * v / max_conns;
        let (mut old_i, mut new_i) = (0, 0);
        for pod in pods {
            let colour = if r.new_pods.contains(pod) {
                new_i += 1;
                colours[(new_i - 1) % colours.len()]
            } else {
                old_i += 1;
                greys[(old_i - 1) % greys.len()]
            };
            let pts: Vec<String> = r
                .series
                .iter()
                .map(|b| {
                    format!(
                        "{:.1},{:.1}",
                        x(b.t + 1.0),
                        y_lo(*b.open_conns.get(pod).unwrap_or(&0) as f64)
                    )
                })
                .collect();
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{colour}" stroke-width="1.2" points="{}"><title>{}</title></polyline>"#,
                pts.join(" "),
                xml_escape(pod)
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="4" y="{}">{:.0} conns</text><text x="4" y="{}">0</text>"#,
            lower.0 + 10.0,
            max_conns,
            lower.1
        );
        let step = if n > 120.0 { 20.0 } else { 10.0 };
        let mut t = 0.0;
        while t <= n {
            let _ = writeln!(
                s,
                r##"<text x="{:.1}" y="{}" fill="#555">{t:.0}s</text>"##,
                x(t) - 6.0,
                lower.1 + 14.0
            );
            t += step;
        }
    }
    s.push_str("</svg>\n");
    s
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
