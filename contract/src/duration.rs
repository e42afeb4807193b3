//! Durations as users write them in a Release (`500ms`, `30s`, `5m`, `1h30m`) and as the
//! operator renders them into the agent's flags: one grammar, parsed and formatted here, so
//! that every duration the operator accepts is one the agent's flags accept too.

use std::time::Duration;

/// Parse `500ms`, `30s`, `5m`, `1h30m`: one or more `<digits><unit>` with units ms, s,
/// m, h.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration such as 500ms, 30s, 5m or 1h30m");
    if s.is_empty() {
        return Err(bad());
    }
    let bytes = s.as_bytes();
    let mut i = 0;
    let mut total_ms: u128 = 0;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return Err(bad());
        }
        let n: u128 = s[start..i].parse().map_err(|_| bad())?;
        let unit_ms = if s[i..].starts_with("ms") {
            i += 2;
            1
        } else if s[i..].starts_with('s') {
            i += 1;
            1000
        } else if s[i..].starts_with('m') {
            i += 1;
            60_000
        } else if s[i..].starts_with('h') {
            i += 1;
            3_600_000
        } else {
            return Err(bad());
        };
        total_ms = total_ms
            .checked_add(n.checked_mul(unit_ms).ok_or_else(bad)?)
            .ok_or_else(bad)?;
    }
    if total_ms > MAX_DURATION.as_millis() {
        return Err(format!(
            "{s:?} is longer than {}",
            format_duration(MAX_DURATION)
        ));
    }
    Ok(Duration::from_millis(total_ms as u64))
}

/// The longest duration [`parse_duration`] accepts: far above every bound admission puts
/// on a Release's durations (a Release stored before a bound existed may still carry one),
/// and well inside what the agent's flags accept, so that every duration the operator
/// renders into the agent's arguments parses there too.
pub const MAX_DURATION: Duration = Duration::from_secs(10_000 * 3600);

/// Format a duration the way users write them and both sides parse (`1m30s`, `500ms`).
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".into();
    }
    if !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let mut s = (ms / 1000) as u64;
    let mut out = String::new();
    let h = s / 3600;
    s %= 3600;
    let m = s / 60;
    s %= 60;
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if s > 0 {
        out.push_str(&format!("{s}s"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_the_schema_says() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1m500ms"), Ok(Duration::from_millis(60_500)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("10000h"), Ok(MAX_DURATION));
        for bad in [
            "",
            "5",
            "s",
            "1.5s",
            "-1s",
            "5 s",
            "1d",
            "1h30",
            "ms5",
            "10000h1ms",
            "42949672951h",
            "99999999999999999999999999999999999999999h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn durations_format_back() {
        for s in ["500ms", "30s", "5m", "1h30m", "1h0m5s", "10000h"] {
            let d = parse_duration(s).unwrap();
            assert_eq!(parse_duration(&format_duration(d)).unwrap(), d);
        }
        assert_eq!(format_duration(Duration::ZERO), "0s");
        assert_eq!(format_duration(Duration::from_secs(90)), "1m30s");
    }
}
