//! Average pooling on a [`Queue`] (`kernels/pool.cu`).

use super::{out_shape, Version};
use crate::cuda::{check_len, to_i32, DevPtr, DevPtrMut, Geometry, Kernel, KernelArgs, Queue};
use crate::error::Result;
use crate::ops::{Grad, Shape4};

const AVGPOOL_FWD_V1: Kernel = Kernel::new("pool", "avgpool_fwd_v1");
const AVGPOOL_BWD_V1: Kernel = Kernel::new("pool", "avgpool_bwd_v1");

/// (planes = N C, H, W, k) as the kernels take them.
fn dims(xs: Shape4, k: usize) -> Result<(i32, i32, i32, i32)> {
    Ok((
        to_i32("N C", xs.n * xs.c)?,
        to_i32("H", xs.h)?,
        to_i32("W", xs.w)?,
        to_i32("k", k)?,
    ))
}

/// y = the k x k means of x.
pub fn forward(
    q: &impl Queue,
    version: Version,
    x: DevPtr<'_, f32>,
    xs: Shape4,
    k: usize,
    mut y: DevPtrMut<'_, f32>,
) -> Result<()> {
    let Version::V1 = version;
    let ys = out_shape(xs, k);
    check_len("avgpool x", x.len(), xs.len())?;
    check_len("avgpool y", y.len(), ys.len())?;
    let (planes, h, w, ki) = dims(xs, k)?;
    let mut args = KernelArgs::new();
    args.input(x)
        .value(planes)
        .value(h)
        .value(w)
        .value(ki)
        .output(&mut y);
    // SAFETY: avgpool_fwd_v1(const float* x, int planes, int h, int w, int k, float* y); sizes
    // checked above.
    unsafe { q.launch(AVGPOOL_FWD_V1, Geometry::grid_stride(ys.len()), &mut args) }
}

/// dx (=|+=) dy spread over each window.
pub fn backward(
    q: &impl Queue,
    version: Version,
    xs: Shape4,
    k: usize,
    dy: DevPtr<'_, f32>,
    mut dx: Grad<DevPtrMut<'_, f32>>,
) -> Result<()> {
    let Version::V1 = version;
    check_len("avgpool dy", dy.len(), out_shape(xs, k).len())?;
    check_len("avgpool dx", dx.buf.len(), xs.len())?;
    let (planes, h, w, ki) = dims(xs, k)?;
    let mut args = KernelArgs::new();
    args.input(dy)
        .value(planes)
        .value(h)
        .value(w)
        .value(ki)
        .output(&mut dx.buf)
        .value(i32::from(dx.accumulate));
    // SAFETY: avgpool_bwd_v1(const float* dy, int planes, int h, int w, int k, float* dx,
    // int accumulate); sizes checked above.
    unsafe { q.launch(AVGPOOL_BWD_V1, Geometry::grid_stride(xs.len()), &mut args) }
}
