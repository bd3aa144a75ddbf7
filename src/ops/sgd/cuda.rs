//! The multi-tensor SGD update on a [`Queue`] (`kernels/sgd.cu`): the host builds a table of
//! every parameter's pointers ([`table`]), uploads it (the backend keeps it while no buffer
//! moves), and one launch updates every tensor.

use super::{SgdParams, SgdStep, SgdTensor, Version, SGD_CHUNK};
use crate::cuda::{check_len, DevPtr, Geometry, Kernel, KernelArgs, Queue, BLOCK};
use crate::error::Result;

const SGD_MULTI_TENSOR_V1: Kernel = Kernel::new("sgd", "sgd_multi_tensor_v1");

/// One parameter: its weights, gradient and momentum buffer (the same length).
pub struct TensorRef<'a> {
    pub w: DevPtr<'a, f32>,
    pub g: DevPtr<'a, f32>,
    pub v: DevPtr<'a, f32>,
}

/// The kernel's table for `tensors`, and the blocks it spans. `w` and `v` are written by the
/// launch although the table only holds their addresses: the caller keeps them exclusively
/// borrowed until the update has run.
pub fn table(tensors: &[TensorRef<'_>]) -> Result<(Vec<SgdTensor>, usize)> {
    let mut table = Vec::with_capacity(tensors.len());
    let mut blocks = 0usize;
    for (i, t) in tensors.iter().enumerate() {
        let len = t.w.len();
        check_len(&format!("sgd gradient of tensor {i}"), t.g.len(), len)?;
        check_len(&format!("sgd momentum of tensor {i}"), t.v.len(), len)?;
        table.push(SgdTensor {
            w: t.w.addr(),
            g: t.g.addr(),
            v: t.v.addr(),
            len: len as i64,
            first_block: blocks as i64,
        });
        blocks += len.div_ceil(SGD_CHUNK);
    }
    Ok((table, blocks))
}

/// Updates every tensor of an uploaded `table` spanning `blocks` blocks.
///
/// # Safety
/// `table` holds `tensors` entries built by [`table`] from buffers that are still live and
/// not used by anything else until the update has run.
pub unsafe fn update_all(
    q: &impl Queue,
    version: Version,
    table: DevPtr<'_, SgdTensor>,
    blocks: usize,
    step: &SgdStep,
) -> Result<()> {
    let Version::V1 = version;
    if table.is_empty() || blocks == 0 {
        return Ok(());
    }
    let mut args = KernelArgs::new();
    args.input(table).value(SgdParams::new(step, table.len())?);
    // SAFETY: sgd_multi_tensor_v1(const SgdTensor* table, SgdParams p); the caller guarantees
    // the table's pointers, and `blocks` is the sum of their chunk counts.
    unsafe {
        q.launch(
            SGD_MULTI_TENSOR_V1,
            Geometry::blocks(blocks, BLOCK),
            &mut args,
        )
    }
}
