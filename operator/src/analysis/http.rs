//! A small HTTP/1.1 client for the analysis: plain `http://`, one request with a deadline
//! covering connect, headers and body, and a bounded body.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::StatusCode;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Largest response body read.
pub const MAX_BODY: usize = 4 << 20;

/// Why a request got no answer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HttpError {
    #[error("`{0}` is not a plain http:// URL (https is not supported yet)")]
    BadUrl(String),
    #[error("cannot build the request: {0}")]
    Request(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("request failed: {0}")]
    Transport(String),
    #[error("response body: {0}")]
    Body(String),
}

/// A reusable client (connection pooling included).
#[derive(Clone)]
pub struct HttpClient {
    inner: Client<HttpConnector, Full<Bytes>>,
}

impl Default for HttpClient {
    fn default() -> Self {
        Self::new()
    }
}

impl HttpClient {
    pub fn new() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        Self {
            inner: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build(connector),
        }
    }

    /// Sends one request; the whole exchange must finish within `timeout`.
    pub async fn send(
        &self,
        method: hyper::Method,
        url: &str,
        headers: &[(String, String)],
        body: Option<(&str, Vec<u8>)>,
        timeout: Duration,
    ) -> Result<(StatusCode, Bytes), HttpError> {
        check_url(url)?;
        let mut req = hyper::Request::builder().method(method).uri(url);
        for (k, v) in headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let payload = match body {
            Some((content_type, bytes)) => {
                req = req.header(hyper::header::CONTENT_TYPE, content_type);
                Bytes::from(bytes)
            }
            None => Bytes::new(),
        };
        let req = req
            .body(Full::new(payload))
            .map_err(|e| HttpError::Request(format!("{url}: {e}")))?;
        let exchange = async {
            let resp = self
                .inner
                .request(req)
                .await
                .map_err(|e| HttpError::Transport(error_chain(&e)))?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| HttpError::Body(e.to_string()))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| HttpError::Timeout(timeout))?
    }
}

/// Accepts `http://host[:port][/path]` only.
pub fn check_url(url: &str) -> Result<(), HttpError> {
    let bad = || HttpError::BadUrl(url.to_string());
    let uri: hyper::Uri = url.parse().map_err(|_| bad())?;
    if uri.scheme_str() != Some("http") || uri.host().is_none_or(str::is_empty) {
        return Err(bad());
    }
    Ok(())
}

/// The error and its sources, e.g. `client error (Connect): tcp connect error: refused`.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    let mut depth = 0;
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
        depth += 1;
        if depth >= 8 {
            break;
        }
    }
    out
}

/// Percent-encodes a form value (`application/x-www-form-urlencoded`).
pub fn form_encode(pairs: &[(&str, &str)]) -> String {
    let enc = |s: &str| {
        let mut out = String::with_capacity(s.len());
        for b in s.bytes() {
            match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    out.push(b as char)
                }
                b' ' => out.push('+'),
                _ => out.push_str(&format!("%{b:02X}")),
            }
        }
        out
    };
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_http_urls() {
        assert_eq!(check_url("http://prometheus.monitoring:9090"), Ok(()));
        assert_eq!(check_url("http://127.0.0.1:9090/prefix"), Ok(()));
        for bad in [
            "https://p:9090",
            "prometheus:9090",
            "ftp://x",
            "http://",
            "",
        ] {
            assert!(check_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn form_values_are_percent_encoded() {
        assert_eq!(
            form_encode(&[("query", "sum(x{a=\"b c\"}) / 2 + 1&"), ("t", "1.5")]),
            "query=sum%28x%7Ba%3D%22b+c%22%7D%29+%2F+2+%2B+1%26&t=1.5"
        );
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_transport_error() {
        // Port 1 on loopback: nothing listens there.
        let e = HttpClient::new()
            .send(
                hyper::Method::GET,
                "http://127.0.0.1:1/",
                &[],
                None,
                Duration::from_secs(5),
            )
            .await
            .expect_err("refused");
        assert!(matches!(e, HttpError::Transport(_)), "{e:?}");
    }
}
