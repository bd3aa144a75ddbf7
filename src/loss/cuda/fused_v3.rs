//! `fused-v3-tf32` and `fused-v3-bf16`: fused v2's three sweeps with every matrix product on
//! tensor cores (`kernels/instance_loss_fused_v3.cu`, warp-level `mma.sync` through
//! `kernels/mma.cuh`): TF32 or bf16 operands, float32 accumulation, row scalars in double.
//! Launches as v2: v2's norms kernel; instance_loss_query_v3_* (64 query rows a block, 4 warps
//! of 16 rows, three sweeps over 64-key tiles; the loss summed by the last block in order;
//! query-only: the normalization backward in place); both-sides instance_loss_key_v3_*.
//! With a hard/easy selection, instance_loss_select_v3_* runs first: each row's kept negatives
//! as a threshold key and a tie cut (a radix select over recomputed similarity tiles), which
//! the row kernels test every negative against.
//! Scratch as v2 plus 2N words (O(N)); deterministic (no floating-point atomics, fixed
//! reduction orders).

use super::{fused_v2, LossParams, Scratch};
use crate::cuda::{phase, DevPtr, DevPtrMut, Geometry, Kernel, KernelArgs, Queue};
use crate::error::{Error, Result};

const QUERY_TF32: Kernel = Kernel::new("instance_loss_fused_v3", "instance_loss_query_v3_tf32");
const QUERY_BF16: Kernel = Kernel::new("instance_loss_fused_v3", "instance_loss_query_v3_bf16");
const KEY_TF32: Kernel = Kernel::new("instance_loss_fused_v3", "instance_loss_key_v3_tf32");
const KEY_BF16: Kernel = Kernel::new("instance_loss_fused_v3", "instance_loss_key_v3_bf16");
const QUERY_TF32_SELECT: Kernel = Kernel::new(
    "instance_loss_fused_v3",
    "instance_loss_query_v3_tf32_select",
);
const QUERY_BF16_SELECT: Kernel = Kernel::new(
    "instance_loss_fused_v3",
    "instance_loss_query_v3_bf16_select",
);
const KEY_TF32_SELECT: Kernel =
    Kernel::new("instance_loss_fused_v3", "instance_loss_key_v3_tf32_select");
const KEY_BF16_SELECT: Kernel =
    Kernel::new("instance_loss_fused_v3", "instance_loss_key_v3_bf16_select");
const SELECT_TF32: Kernel = Kernel::new("instance_loss_fused_v3", "instance_loss_select_v3_tf32");
const SELECT_BF16: Kernel = Kernel::new("instance_loss_fused_v3", "instance_loss_select_v3_bf16");

/// Each row's hard/easy selection: negative c of row r is kept when its rank key (the
/// similarity's float order, reversed for easy) is above `threshold[r]`, or equal to it with
/// c <= `cut[r]`.
pub struct Selection<'a> {
    pub threshold: DevPtrMut<'a, u32>,
    pub cut: DevPtrMut<'a, i32>,
}

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

/// Queues v3 with `operands`; `selects`: run the selection kernel (a hard/easy choice).
#[allow(clippy::too_many_arguments)] // the loss's own inputs and outputs
pub fn enqueue(
    q: &impl Queue,
    operands: Operands,
    selects: bool,
    z: DevPtr<'_, f32>,
    dz: Option<DevPtrMut<'_, f32>>,
    p: &LossParams,
    s: &mut Scratch<'_>,
    loss: DevPtrMut<'_, f64>,
) -> Result<()> {
    let (query, key, select) = match (operands, selects) {
        (Operands::Tf32, false) => (QUERY_TF32, KEY_TF32, SELECT_TF32),
        (Operands::Bf16, false) => (QUERY_BF16, KEY_BF16, SELECT_BF16),
        (Operands::Tf32, true) => (QUERY_TF32_SELECT, KEY_TF32_SELECT, SELECT_TF32),
        (Operands::Bf16, true) => (QUERY_BF16_SELECT, KEY_BF16_SELECT, SELECT_BF16),
    };
    fused_v2::enqueue_norms(q, z, p, s)?;
    if selects {
        let _p = phase(select.name);
        let sel = s
            .selection
            .as_mut()
            .ok_or_else(|| Error::invalid("internal: fused v3's scratch has no selection"))?;
        let mut args = KernelArgs::new();
        args.input(z)
            .input(s.inv_norms.as_const())
            .value(*p)
            .output(&mut sel.threshold)
            .output(&mut sel.cut);
        // SAFETY: instance_loss_select_v3_*(const float* z, const float* inv_norms,
        // LossParams p, unsigned* threshold, int* cut); buffers of N (carved for N), one
        // block per 64 rows.
        unsafe {
            q.launch(
                select,
                Geometry::blocks((p.n as usize).div_ceil(TILE), THREADS),
                &mut args,
            )
        }?;
    }
    fused_v2::enqueue_row_kernels(q, (query, key, THREADS), selects, z, dz, p, s, loss)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_is_four_warps_of_sixteen_rows() {
        assert_eq!(THREADS as usize / 32 * 16, TILE);
    }
}
