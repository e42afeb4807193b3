//! The data path: a listener per service port, each new connection forwarded to the
//! backend chosen when it arrives, and kept there.
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use super::endpoints::{EndpointTable, pick};

/// Accepts connections for one service port and forwards each to a backend chosen when it
/// arrives; the connection then stays with that backend.
pub(super) async fn serve(
    listener: TcpListener,
    svc_key: String,
    port_name: String,
    applied: EndpointTable,
) {
    let rr = Arc::new(AtomicUsize::new(0));
    loop {
        let (client, _) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(service = %svc_key, "accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let backend = {
            let table = applied.read().expect("poisoned");
            let eps = table.get(&svc_key).map(Vec::as_slice).unwrap_or(&[]);
            pick(eps, &port_name, rr.fetch_add(1, Ordering::Relaxed))
        };
        tokio::spawn(forward(client, backend, svc_key.clone()));
    }
}

/// How long a backend connect may take. A SYN to a vanished pod hits the blackhole route and
/// is never answered; like a client behind kube-proxy, the caller then waits for its own timeout.
const BACKEND_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

async fn forward(mut client: TcpStream, backend: Option<SocketAddr>, svc_key: String) {
    let _ = client.set_nodelay(true);
    let Some(backend) = backend else {
        // kube-proxy rejects connections to a Service without endpoints; a reset is the
        // closest a userspace proxy can get after having accepted.
        tracing::debug!(service = %svc_key, "no endpoint; resetting connection");
        let _ = client.set_zero_linger();
        return;
    };
    let mut upstream =
        match tokio::time::timeout(BACKEND_CONNECT_TIMEOUT, TcpStream::connect(backend)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!(service = %svc_key, %backend, "backend connect failed: {e}");
                let _ = client.set_zero_linger();
                return;
            }
            Err(_) => {
                let _ = client.set_zero_linger();
                return;
            }
        };
    let _ = upstream.set_nodelay(true);
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        // Pass a reset on: the client must see the connection break, not a polite close.
        tracing::debug!(service = %svc_key, %backend, "connection broke: {e}");
        let _ = client.set_zero_linger();
        let _ = upstream.set_zero_linger();
    }
}
