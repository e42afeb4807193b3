//! The load generator: an open-loop HTTP client pool that records every request and every
//! connection.
//!
//! Requests are scheduled by the clock (request `i` is due at `i / rate`), not by the
//! previous answer, so a stalled server shows up as latency (measured from the scheduled
//! time) instead of as less load — the coordinated-omission trap closed-loop generators
//! fall into. A pool of `connections` keep-alive connections carries them; a connection the
//! server closed between requests is replaced on the next request, as real client pools do.
//! Every request ends in one [`Outcome`]; every connection records who closed it.
//!
//! Used from the command line (`sluice-e2e load`) and in-process by the scenarios
//! ([`run_load`]).
//!
//! - [`records`]: outcomes and the request and connection records;
//! - [`config`]: what to send, how fast, for how long;
//! - [`client`]: the open-loop schedule and the connection pool ([`run_load`]);
//! - [`report`]: counts, percentiles, the per-second series (pure);
//! - [`cli`]: `sluice-e2e load`.

mod cli;
mod client;
mod config;
mod records;
mod report;

pub use cli::{LoadArgs, resolve_service, run};
pub use client::run_load;
pub use config::LoadConfig;
pub use records::{
    ClosedBy, ConnRecord, Outcome, Phase, RequestRecord, classify_io, classify_status,
};
pub use report::{Bin, LoadReport, Percentiles, percentile, percentiles, time_series};

#[cfg(test)]
mod tests;
