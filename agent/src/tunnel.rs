//! HTTP/1.1 upgrades in http mode (WebSocket and the like): the request goes upstream on
//! an upstream connection of its own; when the upstream answers `101 Switching Protocols`,
//! the client's connection and that upstream connection are joined into a byte tunnel for
//! as long as both sides keep it open.
//!
//! A tunnel cannot be asked to leave politely: what ends it is the application's own
//! protocol (a WebSocket close frame). So a drain waits for tunnels like for any open
//! connection, and at the drain deadline closes both sides with FIN, never RST. `h2c`
//! upgrades are declined (the request is served as plain HTTP/1.1, which RFC 9110 allows);
//! HTTP/2 clients use prior knowledge.

use std::future::Future;

use http::HeaderMap;
use http::header::{self, HeaderValue};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::debug;

use crate::conns::LINGER;

/// The protocol an HTTP/1.1 request asks to switch to: `Connection` names `upgrade` and
/// `Upgrade` is present. `None` for anything else, and for `h2c` (declined).
pub fn requested_upgrade(headers: &HeaderMap) -> Option<HeaderValue> {
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if !asks {
        return None;
    }
    let proto = headers.get(header::UPGRADE)?;
    let h2c = proto
        .to_str()
        .is_ok_and(|v| v.split(',').any(|p| p.trim().eq_ignore_ascii_case("h2c")));
    (!h2c).then(|| proto.clone())
}

/// Puts back the two headers an upgrade needs after the hop-by-hop ones were stripped.
pub(crate) fn restore_upgrade_headers(headers: &mut HeaderMap, proto: HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, proto);
}

/// Both halves of an accepted upgrade, ready once hyper has handed over the connections.
pub(crate) struct PendingTunnel {
    pub client: OnUpgrade,
    pub upstream: OnUpgrade,
}

/// Joins the two connections until both directions are done (each side's FIN is passed
/// on as a FIN), or until `close_now` resolves (the drain deadline): then FIN both ways
/// and read what is still in flight before the sockets go.
pub(crate) async fn run(p: PendingTunnel, close_now: impl Future<Output = ()>) {
    tokio::pin!(close_now);
    // Told to close before hyper handed the connections over (the 101 not even written):
    // nothing to tunnel.
    let joined = tokio::select! {
        r = async { tokio::try_join!(p.client, p.upstream) } => r,
        _ = &mut close_now => return,
    };
    let (client, upstream) = match joined {
        Ok(both) => both,
        Err(e) => {
            debug!(error = %e, "upgrade did not complete");
            return;
        }
    };
    let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut client, &mut upstream) => match r {
            Ok((up, down)) => debug!(to_upstream = up, to_client = down, "tunnel ended"),
            Err(e) => debug!(error = %e, "tunnel ended with an error"),
        },
        _ = &mut close_now => {
            tokio::join!(fin_and_discard(&mut client), fin_and_discard(&mut upstream));
        }
    }
}

/// FIN, then read and drop until the peer's FIN (or [`LINGER`]): closing a socket with
/// unread bytes would make the kernel send RST.
async fn fin_and_discard<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) {
    let _ = s.shutdown().await;
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + LINGER;
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
        if n == 0 {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(kv: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in kv {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn websocket_upgrade_is_recognised() {
        let h = headers(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ]);
        assert_eq!(requested_upgrade(&h).unwrap(), "websocket");
        // Across several Connection headers too.
        let h = headers(&[
            ("connection", "keep-alive"),
            ("connection", "upgrade"),
            ("upgrade", "websocket"),
        ]);
        assert!(requested_upgrade(&h).is_some());
    }

    #[test]
    fn not_an_upgrade_without_both_headers_or_for_h2c() {
        assert!(requested_upgrade(&headers(&[("upgrade", "websocket")])).is_none());
        assert!(requested_upgrade(&headers(&[("connection", "upgrade")])).is_none());
        assert!(
            requested_upgrade(&headers(&[
                ("connection", "upgrade-insecure"),
                ("upgrade", "x")
            ]))
            .is_none()
        );
        let h2c = headers(&[
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
            ("http2-settings", "AAMAAABkAAQCAAAAAAIAAAAA"),
        ]);
        assert!(requested_upgrade(&h2c).is_none());
    }
}
