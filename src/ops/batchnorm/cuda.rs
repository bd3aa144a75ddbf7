//! BatchNorm2d on a [`Queue`] (`kernels/batchnorm.cu`): the statistics kernel of the mode,
//! then the affine apply; backward a per-channel reduction, then dx. Storage and sums are
//! float32. `saved` (4 C floats: mean, 1/std, sum dy, sum dy xhat, and for v2 the chunks'
//! partial results and a counter per channel) carries the statistics from the forward to the
//! backward pass.
//!
//! v1: one block per channel for each reduction. v2: a grid of (image chunk, channel) blocks,
//! [`chunks`] chosen for about [`V2_TARGET_BLOCKS`] blocks, combined in chunk order by each
//! channel's last block; 32-bit indices, so tensors of 2^31 values or more run v1's kernels
//! ([`effective`]).
//!
//! `--sync-bn` (a data-parallel group's statistics over the global batch) splits the training
//! statistics in two, [`sync_moments`] and [`sync_stats`], and the backward's dx into the
//! unchanged v1 reduction and [`sync_dx`]; the collectives between them are the caller's
//! (`dist::data_parallel`). Its `saved` has v1's layout.

use super::{Backward, Forward, Version, EPS, MOMENTUM};
use crate::cuda::{
    check_len, to_i32, DevPtr, DevPtrMut, Geometry, Kernel, KernelArgs, Queue, BLOCK,
};
use crate::error::Result;
use crate::ops::{Grad, Shape4};

const TRAIN_STATS_V1: Kernel = Kernel::new("batchnorm", "batchnorm_train_stats_v1");
const EVAL_STATS_V1: Kernel = Kernel::new("batchnorm", "batchnorm_eval_stats_v1");
const APPLY_V1: Kernel = Kernel::new("batchnorm", "batchnorm_apply_v1");
const BWD_REDUCE_V1: Kernel = Kernel::new("batchnorm", "batchnorm_bwd_reduce_v1");
const BWD_DX_V1: Kernel = Kernel::new("batchnorm", "batchnorm_bwd_dx_v1");
const TRAIN_STATS_V2: Kernel = Kernel::new("batchnorm", "batchnorm_train_stats_v2");
const APPLY_V2: Kernel = Kernel::new("batchnorm", "batchnorm_apply_v2");
const BWD_REDUCE_V2: Kernel = Kernel::new("batchnorm", "batchnorm_bwd_reduce_v2");
const BWD_DX_V2: Kernel = Kernel::new("batchnorm", "batchnorm_bwd_dx_v2");
const SYNC_MOMENTS_V1: Kernel = Kernel::new("batchnorm", "batchnorm_sync_moments_v1");
const SYNC_STATS_V1: Kernel = Kernel::new("batchnorm", "batchnorm_sync_stats_v1");
const SYNC_BWD_DX_V1: Kernel = Kernel::new("batchnorm", "batchnorm_sync_bwd_dx_v1");

/// Threads per block of the per-channel reductions (BN_THREADS in batchnorm.cu).
const BN_THREADS: u32 = 512;

/// Threads per block of v2's reductions (BN2_THREADS in batchnorm.cu).
const BN2_THREADS: u32 = 256;

/// Blocks v2's reductions aim for: about 4 per SM of an H100 or H200 (132 SMs).
pub const V2_TARGET_BLOCKS: usize = 4 * 132;

/// The version whose kernels run for `xs`: v2 needs 32-bit indices and a grid row per
/// channel (at most 65,535), so larger tensors run v1.
pub fn effective(version: Version, xs: Shape4) -> Version {
    match version {
        Version::V2 if xs.len() >= i32::MAX as usize || xs.c > 65_535 => Version::V1,
        v => v,
    }
}

/// v2's chunks of each channel's images: (chunks, images per chunk).
pub fn chunks(xs: Shape4) -> (usize, usize) {
    let n = xs.n.max(1);
    let wanted = V2_TARGET_BLOCKS.div_ceil(xs.c.max(1)).clamp(1, n);
    let per_chunk = n.div_ceil(wanted);
    (n.div_ceil(per_chunk), per_chunk)
}

/// Floats of the statistics the forward leaves for the backward (and, v2, of the chunks'
/// partial results and the per-channel counters).
pub fn saved_len(version: Version, xs: Shape4) -> usize {
    match effective(version, xs) {
        Version::V1 => 4 * xs.c,
        Version::V2 => 4 * xs.c + 3 * xs.c * chunks(xs).0 + xs.c,
    }
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
/// `BatchNormDevice::fuses_relu`).
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
    let version = effective(version, a.xs);
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
    check_len("batchnorm saved", saved.len(), saved_len(version, xs))?;
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
    if training && version == Version::V2 {
        let (grid_chunks, per_chunk) = chunks(xs);
        args.input(x)
            .value(n)
            .value(c)
            .value(hw)
            .value(to_i32("images per chunk", per_chunk)?)
            .value(MOMENTUM as f32)
            .value(eps)
            .output(saved)
            .output(&mut running_mean)
            .output(&mut running_var);
        // SAFETY: batchnorm_train_stats_v2(const float* x, int n, int c, int hw, int ipb,
        // float momentum, float eps, float* saved, float* running_mean, float* running_var);
        // grid (chunks, C), saved of saved_len(V2, xs) (checked above), N C H W < 2^31.
        let grid = Geometry::grid_2d(grid_chunks, xs.c, BN2_THREADS);
        unsafe { q.launch(TRAIN_STATS_V2, grid, &mut args) }?;
    } else if training {
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
    apply(q, version, x, gamma, beta, saved.as_const(), xs, &mut y)
}

/// y = x scale + shift per channel from the statistics in `saved` (the forward's second half;
/// `--sync-bn` runs it after [`sync_stats`] with v1's layout).
#[allow(clippy::too_many_arguments)] // the op's buffers, as forward takes them in a struct
pub fn apply(
    q: &impl Queue,
    version: Version,
    x: DevPtr<'_, f32>,
    gamma: DevPtr<'_, f32>,
    beta: DevPtr<'_, f32>,
    saved: DevPtr<'_, f32>,
    xs: Shape4,
    y: &mut DevPtrMut<'_, f32>,
) -> Result<()> {
    let version = effective(version, xs);
    let (n, c, hw) = dims(xs)?;
    check_len("batchnorm x", x.len(), xs.len())?;
    check_len("batchnorm y", y.len(), xs.len())?;
    check_len("gamma", gamma.len(), xs.c)?;
    check_len("beta", beta.len(), xs.c)?;
    check_len("batchnorm saved", saved.len(), saved_len(version, xs))?;
    let mut args = KernelArgs::new();
    args.input(x)
        .input(gamma)
        .input(beta)
        .input(saved)
        .value(n)
        .value(c)
        .value(hw)
        .output(y);
    let apply = match version {
        Version::V1 => APPLY_V1,
        Version::V2 => APPLY_V2,
    };
    // SAFETY: batchnorm_apply_v1|v2(const float* x, const float* gamma, const float* beta,
    // const float* saved, int n, int c, int hw, float* y); x and y hold N C H W floats (v2:
    // fewer than 2^31).
    unsafe { q.launch(apply, Geometry::grid_stride(xs.len()), &mut args) }
}

/// The backward pass on `q`, from the statistics the forward left in `saved` (the running ones
/// in eval mode, so the running statistics themselves are not read here).
pub fn backward(
    q: &impl Queue,
    version: Version,
    a: Backward<DevPtr<'_, f32>, DevPtrMut<'_, f32>>,
    saved: &mut DevPtrMut<'_, f32>,
) -> Result<()> {
    let version = effective(version, a.xs);
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
    check_len("batchnorm saved", saved.len(), saved_len(version, xs))?;
    check_len("batchnorm dgamma", dgamma.len(), xs.c)?;
    check_len("batchnorm dbeta", dbeta.len(), xs.c)?;
    let mut args = KernelArgs::new();
    args.input(x).input(dy).value(n).value(c).value(hw);
    if version == Version::V2 {
        let (grid_chunks, per_chunk) = chunks(xs);
        args.value(to_i32("images per chunk", per_chunk)?)
            .output(saved)
            .output(&mut dgamma)
            .output(&mut dbeta);
        // SAFETY: batchnorm_bwd_reduce_v2(const float* x, const float* dy, int n, int c,
        // int hw, int ipb, float* saved, float* dgamma, float* dbeta); grid (chunks, C).
        let grid = Geometry::grid_2d(grid_chunks, xs.c, BN2_THREADS);
        unsafe { q.launch(BWD_REDUCE_V2, grid, &mut args) }?;
    } else {
        args.output(saved).output(&mut dgamma).output(&mut dbeta);
        // SAFETY: batchnorm_bwd_reduce_v1(const float* x, const float* dy, int n, int c,
        // int hw, float* saved, float* dgamma, float* dbeta); one block per channel.
        unsafe { q.launch(BWD_REDUCE_V1, Geometry::blocks(xs.c, BN_THREADS), &mut args) }?;
    }
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
        let dx_kernel = match version {
            Version::V1 => BWD_DX_V1,
            Version::V2 => BWD_DX_V2,
        };
        // SAFETY: batchnorm_bwd_dx_v1|v2(const float* x, const float* dy, const float* gamma,
        // const float* saved, int n, int c, int hw, int training, float* dx, int accumulate);
        // N C H W elements (v2: fewer than 2^31).
        unsafe { q.launch(dx_kernel, Geometry::grid_stride(xs.len()), &mut args) }?;
    }
    Ok(())
}

/// `--sync-bn`, first half of the training statistics: this rank's mean and M2 (the sum of
/// squared deviations) of every channel, into `moments` (mean\[C\], M2\[C\]).
pub fn sync_moments(
    q: &impl Queue,
    x: DevPtr<'_, f32>,
    xs: Shape4,
    moments: &mut DevPtrMut<'_, f32>,
) -> Result<()> {
    let (n, c, hw) = dims(xs)?;
    check_len("batchnorm x", x.len(), xs.len())?;
    check_len("batchnorm moments", moments.len(), 2 * xs.c)?;
    let mut args = KernelArgs::new();
    args.input(x).value(n).value(c).value(hw).output(moments);
    // SAFETY: batchnorm_sync_moments_v1(const float* x, int n, int c, int hw, float* moments);
    // one block per channel, lengths checked above.
    unsafe {
        q.launch(
            SYNC_MOMENTS_V1,
            Geometry::blocks(xs.c, BN_THREADS),
            &mut args,
        )
    }
}

/// `--sync-bn`, second half: the moments of `parts` devices (`gathered`, device after device, each
/// over its own `xs`, the same on every device) merged into the whole batch's statistics in
/// `saved` (v1's layout), and the running statistics updated with them.
pub fn sync_stats(
    q: &impl Queue,
    gathered: DevPtr<'_, f32>,
    parts: usize,
    xs: Shape4,
    saved: &mut DevPtrMut<'_, f32>,
    running_mean: &mut DevPtrMut<'_, f32>,
    running_var: &mut DevPtrMut<'_, f32>,
) -> Result<()> {
    let (_, c, _) = dims(xs)?;
    check_len(
        "batchnorm gathered moments",
        gathered.len(),
        2 * xs.c * parts,
    )?;
    check_len("batchnorm saved", saved.len(), saved_len(Version::V1, xs))?;
    check_len("running_mean", running_mean.len(), xs.c)?;
    check_len("running_var", running_var.len(), xs.c)?;
    let count = i64::try_from(xs.n * xs.h * xs.w)
        .map_err(|_| crate::Error::invalid("batchnorm: N H W exceeds a 64-bit count"))?;
    let mut args = KernelArgs::new();
    args.input(gathered)
        .value(to_i32("parts", parts)?)
        .value(count)
        .value(c)
        .value(MOMENTUM as f32)
        .value(EPS as f32)
        .output(saved)
        .output(running_mean)
        .output(running_var);
    let grid = Geometry::blocks(xs.c.div_ceil(BLOCK as usize), BLOCK);
    // SAFETY: batchnorm_sync_stats_v1(const float* gathered, int ranks, long long count, int c,
    // float momentum, float eps, float* saved, float* running_mean, float* running_var); one
    // thread per channel, lengths checked above.
    unsafe { q.launch(SYNC_STATS_V1, grid, &mut args) }
}

/// `--sync-bn`'s training dx, from the statistics of [`sync_stats`] and the (s1, s2) of the
/// backward's reduction summed over the `parts` devices (in `saved`).
#[allow(clippy::too_many_arguments)] // the op's buffers, as backward takes them in a struct
pub fn sync_dx(
    q: &impl Queue,
    x: DevPtr<'_, f32>,
    dy: DevPtr<'_, f32>,
    gamma: DevPtr<'_, f32>,
    saved: DevPtr<'_, f32>,
    xs: Shape4,
    parts: usize,
    mut dx: Grad<DevPtrMut<'_, f32>>,
) -> Result<()> {
    let (n, c, hw) = dims(xs)?;
    for (what, len) in [("x", x.len()), ("dy", dy.len()), ("dx", dx.buf.len())] {
        check_len(what, len, xs.len())?;
    }
    check_len("gamma", gamma.len(), xs.c)?;
    check_len("batchnorm saved", saved.len(), saved_len(Version::V1, xs))?;
    let m = (xs.n * xs.h * xs.w * parts) as f32;
    let mut args = KernelArgs::new();
    args.input(x)
        .input(dy)
        .input(gamma)
        .input(saved)
        .value(n)
        .value(c)
        .value(hw)
        .value(m)
        .output(&mut dx.buf)
        .value(i32::from(dx.accumulate));
    // SAFETY: batchnorm_sync_bwd_dx_v1(const float* x, const float* dy, const float* gamma,
    // const float* saved, int n, int c, int hw, float m, float* dx, int accumulate);
    // grid-stride over N C H W, lengths checked above.
    unsafe { q.launch(SYNC_BWD_DX_V1, Geometry::grid_stride(xs.len()), &mut args) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// v2's 32-bit indices: N C H W of 2^31 - 1 or more, or more than 65,535 channels, run v1.
    #[test]
    fn v2_runs_only_below_2_pow_31_values() {
        let xs = |n, c| Shape4 { n, c, h: 32, w: 32 };
        // 64 channels of 32 x 32: 65,536 values an image, so 2^31 at N = 32,768.
        assert_eq!(effective(Version::V2, xs(32_767, 64)), Version::V2);
        assert_eq!(effective(Version::V2, xs(32_768, 64)), Version::V1);
        assert_eq!(effective(Version::V2, xs(1, 65_536)), Version::V1);
        assert_eq!(effective(Version::V1, xs(2, 64)), Version::V1);
    }
}
