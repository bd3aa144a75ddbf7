//! `fused-v3-tf32` and `fused-v3-bf16`: fused v2's three sweeps with every matrix product on
//! tensor cores (`kernels/instance_loss_fused_v3.cu`, warp-level `mma.sync` through
//! `kernels/mma.cuh`): TF32 or bf16 operands, float32 accumulation, row scalars in double.
//! Launches as v2: v2's norms kernel; instance_loss_query_v3_* (64 query rows a block, 4 warps
//! of 16 rows, three sweeps over 64-key tiles; the loss summed by the last block in order;
//! query-only: the normalization backward in place); both-sides instance_loss_key_v3_*.
//! Scratch as v2 (O(N)); deterministic (no floating-point atomics, fixed reduction orders).

use super::{fused_v2, LossParams, Scratch};
use crate::cuda::{DevPtr, DevPtrMut, Kernel, Queue};
use crate::error::Result;

const QUERY_TF32: Kernel = Kernel::new("instance_loss_fused_v3", "instance_loss_query_v3_tf32");
const QUERY_BF16: Kernel = Kernel::new("instance_loss_fused_v3", "instance_loss_query_v3_bf16");
const KEY_TF32: Kernel = Kernel::new("instance_loss_fused_v3", "instance_loss_key_v3_tf32");
const KEY_BF16: Kernel = Kernel::new("instance_loss_fused_v3", "instance_loss_key_v3_bf16");

/// Query rows (and keys) of a tile: one block of the query and key kernels (as v2's, so the
/// scratch's partial sums fit both).
pub const TILE: usize = fused_v2::TILE;
/// Threads of a query or key block: 4 warps of 16 rows.
pub const THREADS: u32 = 128;

/// The operand format of the tensor-core products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operands {
    Tf32,
    Bf16,
}

pub fn enqueue(
    q: &impl Queue,
    operands: Operands,
    z: DevPtr<'_, f32>,
    dz: Option<DevPtrMut<'_, f32>>,
    p: &LossParams,
    s: &mut Scratch<'_>,
    loss: DevPtrMut<'_, f64>,
) -> Result<()> {
    let kernels = match operands {
        Operands::Tf32 => (QUERY_TF32, KEY_TF32, THREADS),
        Operands::Bf16 => (QUERY_BF16, KEY_BF16, THREADS),
    };
    fused_v2::enqueue_norms(q, z, p, s)?;
    fused_v2::enqueue_row_kernels(q, kernels, z, dz, p, s, loss)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_is_four_warps_of_sixteen_rows() {
        assert_eq!(THREADS as usize / 32 * 16, TILE);
    }
}
