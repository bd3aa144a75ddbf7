//! Row normalization on a [`Queue`] (`kernels/normalize_rows.cu`): one warp per row, 8 rows
//! per 256-thread block.

use super::{check_len, Version};
use crate::cuda::{to_i32, DevPtr, DevPtrMut, Geometry, Kernel, KernelArgs, Queue};
use crate::error::Result;

const FWD_V1: Kernel = Kernel::new("normalize_rows", "normalize_rows_fwd_v1");
const BWD_V1: Kernel = Kernel::new("normalize_rows", "normalize_rows_bwd_v1");

const ROWS_PER_BLOCK: usize = 8;

fn geometry(n: usize) -> Geometry {
    Geometry::blocks(n.div_ceil(ROWS_PER_BLOCK), 256)
}

/// Writes f (N x d) and the unclamped norms (N) of z.
pub fn forward(
    q: &impl Queue,
    version: Version,
    z: DevPtr<'_, f32>,
    mut f: DevPtrMut<'_, f32>,
    mut norms: DevPtrMut<'_, f32>,
    (n, d): (usize, usize),
) -> Result<()> {
    let Version::V1 = version;
    check_len("z", z.len(), n, d)?;
    check_len("f", f.len(), n, d)?;
    check_len("norms", norms.len(), n, 1)?;
    let (n32, d32) = (to_i32("N", n)?, to_i32("d", d)?);
    if n == 0 {
        return Ok(());
    }
    let mut args = KernelArgs::new();
    args.input(z)
        .output(&mut f)
        .output(&mut norms)
        .value(n32)
        .value(d32);
    // SAFETY: normalize_rows_fwd_v1(const float* z, float* f, float* norms, int n, int d);
    // every buffer holds N x d (or N) floats, checked above.
    unsafe { q.launch(FWD_V1, geometry(n), &mut args) }
}

/// dz from df, the forward's f and norms.
pub fn backward(
    q: &impl Queue,
    version: Version,
    f: DevPtr<'_, f32>,
    norms: DevPtr<'_, f32>,
    grad_f: DevPtr<'_, f32>,
    mut grad_z: DevPtrMut<'_, f32>,
    (n, d): (usize, usize),
) -> Result<()> {
    let Version::V1 = version;
    check_len("f", f.len(), n, d)?;
    check_len("norms", norms.len(), n, 1)?;
    check_len("grad_f", grad_f.len(), n, d)?;
    check_len("grad_z", grad_z.len(), n, d)?;
    let (n32, d32) = (to_i32("N", n)?, to_i32("d", d)?);
    if n == 0 {
        return Ok(());
    }
    let mut args = KernelArgs::new();
    args.input(f)
        .input(norms)
        .input(grad_f)
        .output(&mut grad_z)
        .value(n32)
        .value(d32);
    // SAFETY: normalize_rows_bwd_v1(const float* f, const float* norms, const float* df,
    // float* dz, int n, int d); sizes checked above.
    unsafe { q.launch(BWD_V1, geometry(n), &mut args) }
}
