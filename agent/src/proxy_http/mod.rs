//! HTTP mode: an HTTP/1.1 + HTTP/2 (prior knowledge) reverse proxy on hyper that drains
//! politely: `Connection: close` on the next HTTP/1.1 response, idle connections closed,
//! two-phase GOAWAY on HTTP/2 (hyper's `graceful_shutdown`), in-flight requests finish.
//!
//! Upstream connections belong to one client connection each (opened lazily, reused for
//! every request of that client connection, reopened after an error). For an HTTP/1.1
//! client the upstream HTTP/1.1 connection is driven by the client connection's own task,
//! so a request crosses no task boundary: no channel hop to a pool's connection task, no
//! cross-thread wake-up. HTTP/2 clients (whose streams hyper runs as tasks) get a small
//! per-connection set of upstream HTTP/1.1 connections, one per concurrent stream, or one
//! upstream HTTP/2 connection with `--upstream-http2`. HTTP/1.1 upgrades (WebSocket) become
//! byte tunnels ([`crate::tunnel`]).
//!
//! - [`proxy`]: [`HttpProxy`], its configuration and the upstream connect;
//! - [`serve`]: one client connection, served and drained;
//! - [`conn`]: a client connection's shared state and upstream connections;
//! - [`handler`]: one request and its response body.

mod conn;
mod handler;
mod proxy;
mod serve;

pub use crate::tunnel::requested_upgrade;
pub use crate::workers::set_worker_threads;
pub use conn::ReqBody;
pub use handler::{Tracked, strip_hop_by_hop, strip_hop_by_hop_keep_te_trailers};
pub use proxy::HttpProxy;

#[cfg(test)]
mod tests;
