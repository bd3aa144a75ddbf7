//! Collectives as their own layer above the backends: [`Collectives`], implemented by one
//! device alone ([`SingleDevice`]: a copy, nothing to wait for) and by a rank of a
//! data-parallel group over NCCL (`dist::data_parallel::DataParallel`). The trainer asks this
//! one object what to do (which rank writes, which images are its share, whether any rank
//! saw a signal) and through it shares state; a group also takes over the ops that cross
//! devices by registering its hooks on the graph ([`Collectives::install`]), so that neither
//! the backends nor the ops know of ranks.

use std::sync::Arc;

use crate::backend::Backend;
use crate::error::Result;
use crate::tape::Graph;

/// What a process does with the others of its group (nothing, on one device).
pub trait Collectives<B: Backend>: Send + Sync {
    /// This process's rank, 0-based.
    fn rank(&self) -> usize;
    /// Ranks in the group.
    fn world_size(&self) -> usize;
    /// `local` of every rank (the same length on every rank), concatenated in rank order into
    /// `out` (resized to ranks x that length).
    fn all_gather(&self, backend: &B, local: &B::Buffer, out: &mut B::Buffer) -> Result<()>;
    /// Rank 0's values of every buffer on every rank (the same lengths on every rank).
    fn broadcast(&self, backend: &B, bufs: &mut [&mut B::Buffer]) -> Result<()>;
    /// Registers on `graph` the hooks through which the group computes the ops that cross
    /// devices (the gathered loss, BatchNorm over the global batch, the gradients' sums);
    /// nothing on one device.
    fn install(self: Arc<Self>, graph: &mut Graph<B>) -> Result<()> {
        let _ = graph;
        Ok(())
    }
}

/// One device on its own: rank 0 of 1.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleDevice;

impl<B: Backend> Collectives<B> for SingleDevice {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_gather(&self, backend: &B, local: &B::Buffer, out: &mut B::Buffer) -> Result<()> {
        backend.ensure_len(out, backend.len(local))?;
        backend.copy_into(local, out, 0)
    }
    fn broadcast(&self, _: &B, _: &mut [&mut B::Buffer]) -> Result<()> {
        Ok(())
    }
}
