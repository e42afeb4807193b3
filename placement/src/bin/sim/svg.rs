//! The chart: unallocated GPUs against arrived demand, one panel per scenario.

use std::fmt::Write as _;

use crate::workloads::STOP_PCT;

pub(crate) const COLORS: [&str; 6] = [
    "#999999", "#e69f00", "#56b4e9", "#009e73", "#0072b2", "#d55e00",
];

/// One panel: title and (policy, curve) series.
pub(crate) type Panel = (String, Vec<(String, Vec<(f64, f64)>)>);

pub(crate) fn svg(panels: &[Panel]) -> String {
    let (pw, ph, cols) = (420.0, 300.0, 3usize);
    let rows = panels.len().div_ceil(cols);
    let (w, h) = (pw * cols as f64, ph * rows as f64 + 40.0);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="10" y="20" font-size="14">Unallocated GPUs (% of capacity) vs arrived workload (% of cluster GPU capacity)</text>"#
    );
    for (pi, (title, series)) in panels.iter().enumerate() {
        let ox = (pi % cols) as f64 * pw;
        let oy = 40.0 + (pi / cols) as f64 * ph;
        let (l, r, t, b) = (ox + 45.0, ox + pw - 15.0, oy + 25.0, oy + ph - 40.0);
        let (x0, x1) = (60.0, STOP_PCT);
        let ymax = series
            .iter()
            .flat_map(|(_, c)| c.iter().filter(|p| p.0 >= x0).map(|p| p.1))
            .fold(10.0f64, f64::max);
        let ymax = (ymax / 10.0).ceil() * 10.0;
        let sx = |x: f64| l + (x - x0) / (x1 - x0) * (r - l);
        let sy = |y: f64| b - y / ymax * (b - t);
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" font-size="12" font-weight="bold">{title}</text>"#,
            l,
            oy + 15.0
        );
        let _ = writeln!(
            s,
            r##"<rect x="{l}" y="{t}" width="{}" height="{}" fill="none" stroke="#333"/>"##,
            r - l,
            b - t
        );
        for k in 0..=7 {
            let x = x0 + k as f64 * 10.0;
            let _ = writeln!(
                s,
                r##"<line x1="{0}" y1="{t}" x2="{0}" y2="{b}" stroke="#eee"/><text x="{0}" y="{1}" text-anchor="middle">{x}</text>"##,
                sx(x),
                b + 14.0
            );
        }
        for k in 0..=5 {
            let y = ymax * k as f64 / 5.0;
            let _ = writeln!(
                s,
                r##"<line x1="{l}" y1="{0}" x2="{r}" y2="{0}" stroke="#eee"/><text x="{1}" y="{2}" text-anchor="end">{y}</text>"##,
                sy(y),
                l - 4.0,
                sy(y) + 4.0
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">arrived %</text>"#,
            (l + r) / 2.0,
            b + 28.0
        );
        // Ideal: max(0, 100 - arrived).
        let _ = writeln!(
            s,
            r##"<polyline fill="none" stroke="#000" stroke-dasharray="3,3" points="{},{} {},{} {},{}"/>"##,
            sx(x0),
            sy((100.0 - x0).min(ymax)),
            sx(100.0),
            sy(0.0),
            sx(x1),
            sy(0.0)
        );
        for (si, (name, c)) in series.iter().enumerate() {
            let pts: Vec<String> = c
                .iter()
                .filter(|p| p.0 >= x0)
                .map(|p| format!("{:.1},{:.1}", sx(p.0), sy(p.1.min(ymax))))
                .collect();
            let col = COLORS[si % COLORS.len()];
            let width = if name == "sluice" { 2.2 } else { 1.3 };
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{col}" stroke-width="{width}" points="{}"/>"#,
                pts.join(" ")
            );
            let ly = t + 12.0 + si as f64 * 13.0;
            let _ = writeln!(
                s,
                r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{col}" stroke-width="2"/><text x="{}" y="{}">{name}</text>"#,
                r - 80.0,
                r - 62.0,
                r - 58.0,
                ly + 4.0
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

// ---------------------------------------------------------------- main
