//! `fused-v2`: tiled and recomputed, O(N) extra memory, at most 3 launches
//! (`kernels/instance_loss_fused_v2.cu`): instance_loss_norms_v2; instance_loss_query_v2 (64
//! query rows a block in three sweeps over 64-key tiles: row scalars, the loss, whose last
//! block sums the blocks' partial sums in order, and dF; query-only: the normalization
//! backward in place); both-sides instance_loss_key_v2 (the keys' term, then the
//! normalization backward).

use super::{LossParams, Scratch};
use crate::cuda::{phase, DevPtr, DevPtrMut, Geometry, Kernel, KernelArgs, Queue, BLOCK};
use crate::error::{Error, Result};

const NORMS_V2: Kernel = Kernel::new("instance_loss_fused_v2", "instance_loss_norms_v2");
const QUERY_V2: Kernel = Kernel::new("instance_loss_fused_v2", "instance_loss_query_v2");
const KEY_V2: Kernel = Kernel::new("instance_loss_fused_v2", "instance_loss_key_v2");

/// Rows (and keys) of a tile: one block of the query and key kernels.
pub const TILE: usize = 64;

/// instance_loss_norms_v2: the norms and clamped inverse norms of z's rows (v3 uses it too).
pub fn enqueue_norms(
    q: &impl Queue,
    z: DevPtr<'_, f32>,
    p: &LossParams,
    s: &mut Scratch<'_>,
) -> Result<()> {
    launch_norms(q, z, (p.n, p.d), s.norms.reborrow(), s.inv_norms.reborrow())
}

/// instance_loss_norms_v2 on the `n` rows of z (d wide).
pub fn launch_norms(
    q: &impl Queue,
    z: DevPtr<'_, f32>,
    (n, d): (i32, i32),
    mut norms: DevPtrMut<'_, f32>,
    mut inv_norms: DevPtrMut<'_, f32>,
) -> Result<()> {
    let _p = phase("fused v2: norms");
    let rows = usize::try_from(n).map_err(|_| Error::invalid(format!("norms of {n} rows")))?;
    if z.len() < rows * d.max(0) as usize || norms.len() < rows || inv_norms.len() < rows {
        return Err(Error::invalid(format!(
            "norms of {n} x {d}: buffers of {}, {} and {}",
            z.len(),
            norms.len(),
            inv_norms.len()
        )));
    }
    let mut args = KernelArgs::new();
    args.input(z)
        .value(n)
        .value(d)
        .output(&mut norms)
        .output(&mut inv_norms);
    // SAFETY: instance_loss_norms_v2(const float* z, int n, int d, float* norms,
    // float* inv_norms); one warp per row, 8 rows a block, lengths checked above.
    unsafe {
        q.launch(
            NORMS_V2,
            Geometry::blocks(rows.div_ceil(8), BLOCK),
            &mut args,
        )
    }
}

pub fn enqueue(
    q: &impl Queue,
    z: DevPtr<'_, f32>,
    dz: Option<DevPtrMut<'_, f32>>,
    p: &LossParams,
    s: &mut Scratch<'_>,
    loss: DevPtrMut<'_, f64>,
) -> Result<()> {
    enqueue_norms(q, z, p, s)?;
    enqueue_row_kernels(q, (QUERY_V2, KEY_V2, BLOCK), false, z, dz, p, s, loss)
}

/// The query-row kernel and, both-sides, the key-row kernel of a tiled version (v2, and v3 with
/// its own kernels of v2's argument lists), `threads` a block, one block per 64 rows;
/// `with_selection`: kernels that take the scratch's selection (v3's `_select` variants) after
/// those arguments.
#[allow(clippy::too_many_arguments)] // the loss's own inputs and outputs
pub fn enqueue_row_kernels(
    q: &impl Queue,
    (query, key, threads): (Kernel, Kernel, u32),
    with_selection: bool,
    z: DevPtr<'_, f32>,
    dz: Option<DevPtrMut<'_, f32>>,
    p: &LossParams,
    s: &mut Scratch<'_>,
    mut loss: DevPtrMut<'_, f64>,
) -> Result<()> {
    let n = p.n as usize;
    // Without a gradient the kernels never touch dz: a null pointer stands in.
    let mut dz = dz.unwrap_or_else(DevPtrMut::null);
    let grid = Geometry::blocks(n.div_ceil(TILE), threads);
    let selection = match (with_selection, &s.selection) {
        (false, _) => None,
        (true, Some(sel)) => Some((sel.threshold.as_const(), sel.cut.as_const())),
        (true, None) => return Err(Error::invalid("internal: no selection in the scratch")),
    };
    let rows = &mut s.rows;
    {
        let _p = phase(query.name);
        let mut args = KernelArgs::new();
        args.input(z)
            .input(s.norms.as_const())
            .input(s.inv_norms.as_const())
            .value(*p)
            .output(&mut rows.inv_denom)
            .output(&mut rows.r)
            .output(&mut rows.dominant)
            .output(&mut rows.g_partner)
            .output(&mut rows.g_dominant)
            .output(&mut dz)
            .output(&mut s.block_loss)
            .output(&mut s.counter)
            .output(&mut loss);
        if let Some((threshold, cut)) = selection {
            args.input(threshold).input(cut);
        }
        // SAFETY: instance_loss_query_v2 and _v3_*(const float* z, const float* norms,
        // const float* inv_norms, LossParams p, float* inv_denom, float* r, int* dominant,
        // float* g_partner, float* g_dominant, float* dz, double* block_loss,
        // unsigned* counter, double* loss[, const unsigned* threshold, const int* cut]); row
        // buffers of N, a partial sum per block, dz of N x d when with_grad is set (the caller
        // checked its length).
        unsafe { q.launch(query, grid, &mut args) }?;
    }
    if p.with_grad != 0 && p.both_sides != 0 {
        let _p = phase(key.name);
        let mut args = KernelArgs::new();
        args.input(z)
            .input(s.norms.as_const())
            .input(s.inv_norms.as_const())
            .value(*p)
            .input(rows.inv_denom.as_const())
            .input(rows.r.as_const())
            .input(rows.dominant.as_const())
            .input(rows.g_partner.as_const())
            .input(rows.g_dominant.as_const())
            .output(&mut dz);
        if let Some((threshold, cut)) = selection {
            args.input(threshold).input(cut);
        }
        // SAFETY: instance_loss_key_v2 and _v3_*(const float* z, const float* norms,
        // const float* inv_norms, LossParams p, const float* inv_denom, const float* r,
        // const int* dominant, const float* g_partner, const float* g_dominant, float* dz[,
        // const unsigned* threshold, const int* cut]).
        unsafe { q.launch(key, grid, &mut args) }?;
    }
    Ok(())
}
