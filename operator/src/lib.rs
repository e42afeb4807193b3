//! Sluice operator: lossless rolling releases (`Release`) and GPU inference fleets
//! (`InferenceSet`). See `docs/architecture.md` for how the pieces fit.
//!
//! Every controller follows the same shape: gather observed state (I/O) → a pure planner →
//! an idempotent executor (I/O) → status. The shell in this crate root is shared:
//! [`leader`] election, the [`admin`] HTTP server (health and metrics), [`telemetry`], and
//! the [`pod`] protocol (agent injection, drain) both controllers speak.

pub mod admin;
pub mod analysis;
pub mod crds;
pub mod inference;
pub mod leader;
pub mod panic_guard;
pub mod pod;
pub mod release;
pub mod telemetry;
