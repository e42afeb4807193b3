//! Error types.

use thiserror::Error;

/// Errors building or updating the fleet.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FleetError {
    /// A node with this name is already in the fleet.
    #[error("node {0:?} is already in the fleet")]
    DuplicateNode(String),
    /// No live node has this name.
    #[error("unknown node {0:?}")]
    UnknownNode(String),
    /// A node's labels or annotations are malformed.
    #[error("node {node:?}: {msg}")]
    BadNode {
        /// Node name.
        node: String,
        /// What is wrong.
        msg: String,
    },
    /// An assignment names GPUs that do not exist or repeats one.
    #[error("bad assignment on node {node:?}: {msg}")]
    BadAssignment {
        /// Node name.
        node: String,
        /// What is wrong.
        msg: String,
    },
    /// An assignment takes more than is free.
    #[error("node {node:?}: {what} would be overcommitted")]
    Overcommitted {
        /// Node name.
        node: String,
        /// The resource.
        what: String,
    },
    /// An allocation id is recorded twice.
    #[error("allocation {0:?} already recorded")]
    DuplicateAllocation(String),
    /// No allocation has this id.
    #[error("unknown allocation {0:?}")]
    UnknownAllocation(String),
    /// A label key that is not one of the configured topology levels.
    #[error("topology level {0:?} is not configured")]
    UnknownLevel(String),
}

/// Why a gang cannot be placed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PlaceError {
    /// The request itself is malformed.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// A topology level that is not configured in the fleet.
    #[error("topology level {0:?} is not configured in the fleet")]
    UnknownLevel(String),
    /// No schedulable node matches the GPU selector at all.
    #[error("no schedulable node has GPUs matching {selector}")]
    NoMatchingGpu {
        /// The selector, in words.
        selector: String,
    },
    /// No matching node could host even one pod of the gang when empty.
    #[error("no matching node can ever host one pod ({pod}); largest matching node has {largest}")]
    PodLargerThanAnyNode {
        /// One pod's demand, in words.
        pod: String,
        /// The largest matching node, in words.
        largest: String,
    },
    /// No domain of the required level is large enough, even when empty.
    #[error(
        "required topology level {level}: no domain can ever hold the gang of {pods} pods ({pod} each); the largest holds {largest} such pods"
    )]
    RequiredDomainTooSmall {
        /// The level.
        level: String,
        /// Pods in the gang.
        pods: u32,
        /// One pod's demand, in words.
        pod: String,
        /// Most pods of this shape one domain of the level holds when empty.
        largest: u32,
    },
    /// Domains of the required level are large enough, but none has the room now.
    #[error(
        "required topology level {level}: no domain has room for the gang of {pods} pods ({pod} each) now; the most any domain takes now is {best} pods"
    )]
    RequiredDomainFull {
        /// The level.
        level: String,
        /// Pods in the gang.
        pods: u32,
        /// One pod's demand, in words.
        pod: String,
        /// Most pods of this shape one domain takes now.
        best: u32,
    },
    /// The spread constraint's skew limit rules out every domain with room.
    #[error("spread over {level} with max skew {max_skew} rules out every domain with room")]
    SpreadUnsatisfiable {
        /// The spread level.
        level: String,
        /// The limit.
        max_skew: u32,
    },
    /// Not enough free capacity for the whole gang right now.
    #[error("not enough free capacity for the gang of {pods} pods ({pod} each): {detail}")]
    InsufficientCapacity {
        /// Pods in the gang.
        pods: u32,
        /// One pod's demand, in words.
        pod: String,
        /// What is free, in words.
        detail: String,
    },
}
