//! Sluice GPU placement engine: a pure library (no Kubernetes types, no async) used by the
//! InferenceSet controller, the trace-driven simulator and the benchmarks.
//!
//! ```
//! use sluice_placement::*;
//! let topo = GpuTopology { groups: Some(vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7]]), numa: None };
//! let mut fleet = Fleet::new(TopologyConfig::default());
//! for i in 0..4 {
//!     fleet.add_node(NodeSpec::new(format!("n{i}"), "NVIDIA-L40S", 8)
//!         .label(LABEL_RACK, "r1").topology(&topo)).unwrap();
//! }
//! let mut placer = Placer::new(WorkloadProfile::inference_default());
//! let req = GangRequest::gpus(1, 4).required(TopologyLevel::GpuGroup);
//! let placement = placer.place(&fleet, &req).unwrap();
//! fleet.allocate("replica-0", None, &placement.pods).unwrap();
//! assert_eq!(placement.pods[0].gpus.len(), 4);
//! ```
//!
//! See `docs/placement.md` for the model, the annotation format and the scoring.

mod error;
mod fleet;
mod fx;
mod placer;
mod profile;
mod request;

pub use error::{FleetError, PlaceError};
pub use fleet::{
    Fleet, GPU_TOPOLOGY_ANNOTATION, GpuTopology, LABEL_GPU_CLIQUE, LABEL_GPU_COUNT,
    LABEL_GPU_MEMORY, LABEL_GPU_PRODUCT, LABEL_MIG_STRATEGY, LABEL_RACK, LABEL_ZONE,
    MAX_GPUS_PER_NODE, MIG_RESOURCE_PREFIX, MILLI_PER_GPU, NodeSpec, PodAssignment, TopologyConfig,
};
pub use fx::{Rng, splitmix64};
pub use placer::{Placer, PlacerConfig, Policy};
pub use profile::WorkloadProfile;
pub use request::{
    GangPlacement, GangRequest, GpuDemand, GpuSelector, MigDevices, MigSelector, Spread,
    TopologyLevel,
};

#[cfg(test)]
mod tests;
