//! Instant queries against Prometheus' HTTP API (`POST /api/v1/query`, form-encoded).

use std::time::Duration;

use serde_json::Value;

use super::http::{HttpClient, HttpError, form_encode};
use super::model::{PrometheusSource, format_duration};

/// Why a query gave no values.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PromError {
    #[error("`{0}` is not a plain http:// address (https is not supported yet)")]
    BadAddress(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("request failed: {0}")]
    Transport(String),
    /// Prometheus answered with `"status": "error"`.
    #[error("HTTP {status}: {error_type}: {error}")]
    Api {
        status: u16,
        error_type: String,
        error: String,
    },
    /// A non-2xx answer that is not Prometheus' error document.
    #[error("HTTP {status}: {body}")]
    Status { status: u16, body: String },
    #[error("cannot decode the answer: {0}")]
    Decode(String),
    #[error("result type `{0}` is not supported: write an instant query giving a vector or scalar")]
    ResultType(String),
}

impl From<HttpError> for PromError {
    fn from(e: HttpError) -> Self {
        match e {
            HttpError::BadUrl(u) => PromError::BadAddress(u),
            HttpError::Timeout(t) => PromError::Timeout(t),
            HttpError::Transport(s) | HttpError::Request(s) => PromError::Transport(s),
            HttpError::Body(s) => PromError::Decode(s),
        }
    }
}

/// A Prometheus client; cheap to clone.
#[derive(Clone, Default)]
pub struct PrometheusClient {
    http: HttpClient,
}

impl PrometheusClient {
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs an instant query and returns the vector's (or scalar's) values in the order
    /// Prometheus gave them. NaN and ±Inf come back as such.
    pub async fn query(
        &self,
        source: &PrometheusSource,
        query: &str,
    ) -> Result<Vec<f64>, PromError> {
        let url = format!("{}/api/v1/query", source.address.trim_end_matches('/'));
        let timeout = format_duration(source.timeout);
        let body = form_encode(&[("query", query), ("timeout", &timeout)]);
        let (status, bytes) = self
            .http
            .send(
                hyper::Method::POST,
                &url,
                &source.headers,
                Some(("application/x-www-form-urlencoded", body.into_bytes())),
                source.timeout,
            )
            .await?;
        parse_response(status.as_u16(), &bytes)
    }
}

/// Decodes an answer of `/api/v1/query`.
pub fn parse_response(status: u16, body: &[u8]) -> Result<Vec<f64>, PromError> {
    let doc: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) if (200..300).contains(&status) => return Err(PromError::Decode(e.to_string())),
        Err(_) => {
            return Err(PromError::Status {
                status,
                body: String::from_utf8_lossy(&body[..body.len().min(256)]).into_owned(),
            });
        }
    };
    if doc["status"] == "error" {
        return Err(PromError::Api {
            status,
            error_type: doc["errorType"].as_str().unwrap_or("unknown").to_string(),
            error: doc["error"].as_str().unwrap_or("").to_string(),
        });
    }
    if !(200..300).contains(&status) || doc["status"] != "success" {
        return Err(PromError::Status {
            status,
            body: doc.to_string().chars().take(256).collect(),
        });
    }
    let data = &doc["data"];
    let result_type = data["resultType"].as_str().unwrap_or("");
    match result_type {
        "vector" => data["result"]
            .as_array()
            .ok_or_else(|| PromError::Decode("data.result is not a list".into()))?
            .iter()
            .map(|sample| sample_value(&sample["value"]))
            .collect(),
        "scalar" => Ok(vec![sample_value(&data["result"])?]),
        other => Err(PromError::ResultType(other.to_string())),
    }
}

/// `[<unix time>, "<value>"]` → the value.
fn sample_value(pair: &Value) -> Result<f64, PromError> {
    let text = pair
        .get(1)
        .and_then(Value::as_str)
        .ok_or_else(|| PromError::Decode(format!("`{pair}` is not [time, \"value\"]")))?;
    parse_value(text).ok_or_else(|| PromError::Decode(format!("`{text}` is not a number")))
}

/// Prometheus' float text: decimal, `NaN`, `+Inf`, `-Inf`.
pub fn parse_value(text: &str) -> Option<f64> {
    match text {
        "NaN" => Some(f64::NAN),
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        t => t.parse().ok().filter(|v: &f64| v.is_finite()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_and_scalars_decode() {
        let vector = br#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"track":"canary"},"value":[1735689600.123,"0.5"]},
            {"metric":{"track":"stable"},"value":[1735689600.123,"NaN"]},
            {"metric":{},"value":[1735689600.123,"+Inf"]},
            {"metric":{},"value":[1735689600.123,"-Inf"]}]}}"#;
        let v = parse_response(200, vector).expect("decodes");
        assert_eq!(v.len(), 4);
        assert_eq!(v[0], 0.5);
        assert!(v[1].is_nan());
        assert_eq!((v[2], v[3]), (f64::INFINITY, f64::NEG_INFINITY));
        let empty = br#"{"status":"success","data":{"resultType":"vector","result":[]}}"#;
        assert_eq!(parse_response(200, empty), Ok(vec![]));
        let scalar = br#"{"status":"success","data":{"resultType":"scalar","result":[1.5,"42"]}}"#;
        assert_eq!(parse_response(200, scalar), Ok(vec![42.0]));
    }

    #[test]
    fn prometheus_errors_are_typed() {
        let bad = br#"{"status":"error","errorType":"bad_data","error":"parse error at char 5"}"#;
        assert_eq!(
            parse_response(400, bad),
            Err(PromError::Api {
                status: 400,
                error_type: "bad_data".into(),
                error: "parse error at char 5".into()
            })
        );
        assert!(matches!(
            parse_response(502, b"<html>Bad Gateway</html>"),
            Err(PromError::Status { status: 502, .. })
        ));
        assert!(matches!(
            parse_response(200, b"not json"),
            Err(PromError::Decode(_))
        ));
        let matrix = br#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#;
        assert_eq!(
            parse_response(200, matrix),
            Err(PromError::ResultType("matrix".into()))
        );
        let odd =
            br#"{"status":"success","data":{"resultType":"vector","result":[{"value":[1,"x"]}]}}"#;
        assert!(matches!(
            parse_response(200, odd),
            Err(PromError::Decode(_))
        ));
        let no_value = br#"{"status":"success","data":{"resultType":"vector","result":[{}]}}"#;
        assert!(matches!(
            parse_response(200, no_value),
            Err(PromError::Decode(_))
        ));
    }

    #[test]
    fn float_text_follows_prometheus() {
        assert_eq!(parse_value("1e3"), Some(1000.0));
        assert_eq!(parse_value("inf"), None, "Prometheus writes +Inf");
        assert_eq!(parse_value(""), None);
    }
}
