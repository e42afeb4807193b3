//! The fleet by topology level: the domain a node lies in, and whether a gang's pods share
//! one. Apart from mod.rs so that the fleet's core does not depend on the request types.

use crate::error::FleetError;
use crate::request::TopologyLevel;

use super::{Fleet, PodAssignment};

impl Fleet {
    /// Name of the domain holding `node` at `level` (`None` for the GPU-group level, which
    /// depends on the GPUs, not only the node).
    pub fn domain_of(
        &self,
        node: &str,
        level: &TopologyLevel,
    ) -> Result<Option<String>, FleetError> {
        let idx = self.index_of(node)?;
        Ok(match level {
            TopologyLevel::Label(key) => {
                let lvl = self
                    .level_index(key)
                    .ok_or_else(|| FleetError::UnknownLevel(key.clone()))?;
                Some(self.domains[lvl].names[self.nodes[idx].domains[lvl] as usize].clone())
            }
            TopologyLevel::Node => Some(self.nodes[idx].name.clone()),
            TopologyLevel::GpuGroup => None,
        })
    }

    /// Whether all the pods of a gang lie inside one domain of `level`.
    pub fn within_one_domain(
        &self,
        pods: &[PodAssignment],
        level: &TopologyLevel,
    ) -> Result<bool, FleetError> {
        let Some(first) = pods.first() else {
            return Ok(true);
        };
        let f = self.index_of(&first.node)?;
        for p in pods {
            let i = self.index_of(&p.node)?;
            let same = match level {
                TopologyLevel::Label(key) => {
                    let lvl = self
                        .level_index(key)
                        .ok_or_else(|| FleetError::UnknownLevel(key.clone()))?;
                    self.nodes[i].domains[lvl] == self.nodes[f].domains[lvl]
                }
                TopologyLevel::Node => i == f,
                TopologyLevel::GpuGroup => {
                    let g0 = first
                        .gpus
                        .first()
                        .map(|&g| self.nodes[f].group_of[g as usize]);
                    i == f
                        && p.gpus
                            .iter()
                            .all(|&g| Some(self.nodes[i].group_of[g as usize]) == g0)
                }
            };
            if !same {
                return Ok(false);
            }
        }
        Ok(true)
    }
}
