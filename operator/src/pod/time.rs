//! Times as the API writes them: status fields and pod annotations hold RFC 3339 strings;
//! the planners work in seconds since the epoch.

use k8s_openapi::jiff::Timestamp;

/// Seconds since the epoch → RFC 3339 (millisecond precision).
pub fn rfc3339(t: f64) -> String {
    Timestamp::from_millisecond((t * 1000.0) as i64)
        .map(|ts| ts.to_string())
        .unwrap_or_default()
}

/// RFC 3339 → seconds since the epoch.
pub fn parse_rfc3339(s: &str) -> Option<f64> {
    s.parse::<Timestamp>()
        .ok()
        .map(|t| t.as_millisecond() as f64 / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_to_the_millisecond() {
        assert_eq!(rfc3339(0.0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1.5), "1970-01-01T00:00:01.5Z");
        assert_eq!(parse_rfc3339(&rfc3339(1234.567)), Some(1234.567));
        assert_eq!(parse_rfc3339("not a time"), None);
    }

    #[test]
    fn rfc3339_round_trips() {
        let t = 1_700_000_000.5;
        assert_eq!(parse_rfc3339(&rfc3339(t)), Some(t));
    }
}
