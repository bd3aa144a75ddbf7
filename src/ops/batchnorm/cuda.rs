//! BatchNorm2d on a [`Queue`] (`kernels/batchnorm.cu`): the statistics kernel of the mode,
//! then the affine apply; backward a per-channel reduction, then dx. Storage and sums are
//! float32. `saved` (4 C floats: mean, 1/std, sum dy, sum dy xhat) carries the statistics from
//! the forward to the backward pass.

use super::{Backward, Forward, Version, EPS, MOMENTUM};
use crate::cuda::{
    check_len, to_i32, DevPtr, DevPtrMut, Geometry, Kernel, KernelArgs, Queue, BLOCK,
};
use crate::error::Result;
use crate::ops::Shape4;

const TRAIN_STATS_V1: Kernel = Kernel::new("batchnorm", "batchnorm_train_stats_v1");
const EVAL_STATS_V1: Kernel = Kernel::new("batchnorm", "batchnorm_eval_stats_v1");
const APPLY_V1: Kernel = Kernel::new("batchnorm", "batchnorm_apply_v1");
const BWD_REDUCE_V1: Kernel = Kernel::new("batchnorm", "batchnorm_bwd_reduce_v1");
const BWD_DX_V1: Kernel = Kernel::new("batchnorm", "batchnorm_bwd_dx_v1");

/// Threads per block of the per-channel reductions (BN_THREADS in batchnorm.cu).
const BN_THREADS: u32 = 512;

/// Floats of the statistics the forward leaves for the backward.
pub fn saved_len(channels: usize) -> usize {
    4 * channels
}

/// (N, C, H W) as the kernels take them.
fn dims(xs: Shape4) -> Result<(i32, i32, i32)> {
    Ok((
        to_i32("N", xs.n)?,
        to_i32("C", xs.c)?,
        to_i32("HW", xs.h * xs.w)?,
    ))
}

/// The forward pass on `q`; `saved` receives the statistics.
/// No kernel here fuses the ReLU (the graph records it as its own op on CUDA, see
/// `Backend::fuses_batchnorm_relu`).
fn refuse_fused_relu(relu: bool) -> Result<()> {
    if relu {
        return Err(crate::Error::invalid(
            "batchnorm with a fused ReLU has no CUDA kernel; record batchnorm and relu apart",
        ));
    }
    Ok(())
}

pub fn forward(
    q: &impl Queue,
    version: Version,
    a: Forward<DevPtr<'_, f32>, DevPtrMut<'_, f32>>,
    saved: &mut DevPtrMut<'_, f32>,
) -> Result<()> {
    let Version::V1 = version;
    let Forward {
        x,
        xs,
        gamma,
        beta,
        mut running_mean,
        mut running_var,
        training,
        relu,
        mut y,
    } = a;
    refuse_fused_relu(relu)?;
    let (n, c, hw) = dims(xs)?;
    check_len("batchnorm x", x.len(), xs.len())?;
    check_len("batchnorm y", y.len(), xs.len())?;
    check_len("batchnorm saved", saved.len(), saved_len(xs.c))?;
    for (what, len) in [
        ("gamma", gamma.len()),
        ("beta", beta.len()),
        ("running_mean", running_mean.len()),
        ("running_var", running_var.len()),
    ] {
        check_len(what, len, xs.c)?;
    }
    let eps = EPS as f32;
    let mut args = KernelArgs::new();
    if training {
        args.input(x)
            .value(n)
            .value(c)
            .value(hw)
            .value(MOMENTUM as f32)
            .value(eps)
            .output(saved)
            .output(&mut running_mean)
            .output(&mut running_var);
        // SAFETY: batchnorm_train_stats_v1(const float* x, int n, int c, int hw, float momentum,
        // float eps, float* saved, float* running_mean, float* running_var); one block per
        // channel, buffers checked above.
        unsafe {
            q.launch(
                TRAIN_STATS_V1,
                Geometry::blocks(xs.c, BN_THREADS),
                &mut args,
            )
        }?;
    } else {
        args.input(running_mean.as_const())
            .input(running_var.as_const())
            .value(c)
            .value(eps)
            .output(saved);
        let grid = Geometry::blocks(xs.c.div_ceil(BLOCK as usize), BLOCK);
        // SAFETY: batchnorm_eval_stats_v1(const float* running_mean, const float* running_var,
        // int c, float eps, float* saved); one thread per channel.
        unsafe { q.launch(EVAL_STATS_V1, grid, &mut args) }?;
    }
    let mut args = KernelArgs::new();
    args.input(x)
        .input(gamma)
        .input(beta)
        .input(saved.as_const())
        .value(n)
        .value(c)
        .value(hw)
        .output(&mut y);
    // SAFETY: batchnorm_apply_v1(const float* x, const float* gamma, const float* beta,
    // const float* saved, int n, int c, int hw, float* y); x and y hold N C H W floats.
    unsafe { q.launch(APPLY_V1, Geometry::grid_stride(xs.len()), &mut args) }
}

/// The backward pass on `q`, from the statistics the forward left in `saved` (the running ones
/// in eval mode, so the running statistics themselves are not read here).
pub fn backward(
    q: &impl Queue,
    version: Version,
    a: Backward<DevPtr<'_, f32>, DevPtrMut<'_, f32>>,
    saved: &mut DevPtrMut<'_, f32>,
) -> Result<()> {
    let Version::V1 = version;
    let Backward {
        x,
        xs,
        gamma,
        training,
        relu,
        dy,
        dx,
        mut dgamma,
        mut dbeta,
        ..
    } = a;
    refuse_fused_relu(relu)?;
    let (n, c, hw) = dims(xs)?;
    check_len("batchnorm x", x.len(), xs.len())?;
    check_len("batchnorm dy", dy.len(), xs.len())?;
    check_len("batchnorm saved", saved.len(), saved_len(xs.c))?;
    check_len("batchnorm dgamma", dgamma.len(), xs.c)?;
    check_len("batchnorm dbeta", dbeta.len(), xs.c)?;
    let mut args = KernelArgs::new();
    args.input(x)
        .input(dy)
        .value(n)
        .value(c)
        .value(hw)
        .output(saved)
        .output(&mut dgamma)
        .output(&mut dbeta);
    // SAFETY: batchnorm_bwd_reduce_v1(const float* x, const float* dy, int n, int c, int hw,
    // float* saved, float* dgamma, float* dbeta); one block per channel.
    unsafe { q.launch(BWD_REDUCE_V1, Geometry::blocks(xs.c, BN_THREADS), &mut args) }?;
    if let Some(mut dx) = dx {
        check_len("batchnorm dx", dx.buf.len(), xs.len())?;
        let mut args = KernelArgs::new();
        args.input(x)
            .input(dy)
            .input(gamma)
            .input(saved.as_const())
            .value(n)
            .value(c)
            .value(hw)
            .value(i32::from(training))
            .output(&mut dx.buf)
            .value(i32::from(dx.accumulate));
        // SAFETY: batchnorm_bwd_dx_v1(const float* x, const float* dy, const float* gamma,
        // const float* saved, int n, int c, int hw, int training, float* dx, int accumulate);
        // N C H W elements.
        unsafe { q.launch(BWD_DX_V1, Geometry::grid_stride(xs.len()), &mut args) }?;
    }
    Ok(())
}
