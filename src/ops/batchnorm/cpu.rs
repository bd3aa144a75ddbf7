//! BatchNorm2d on the CPU: float64 statistics per channel (rayon over channels), elementwise
//! passes over planes.

// The per-mode kernels take their buffers explicitly; `forward` and `backward` are the op.
#![allow(clippy::too_many_arguments)]

use rayon::prelude::*;

use super::{Backward, Forward, EPS, MOMENTUM};
use crate::ops::Shape4;
use crate::simd::CpuFloat;

/// `sum_{j < len} f(j)` in float64 with 8 interleaved partial sums, so that the compiler can
/// vectorise it (a single running sum cannot be reordered); the order is fixed, so results
/// are reproducible.
#[inline(always)]
fn sum8(len: usize, f: impl Fn(usize) -> f64) -> f64 {
    let mut acc = [0.0f64; 8];
    let full = len / 8 * 8;
    for i in (0..full).step_by(8) {
        for (l, a) in acc.iter_mut().enumerate() {
            *a += f(i + l);
        }
    }
    let tail: f64 = (full..len).map(&f).sum();
    acc.iter().sum::<f64>() + tail
}

/// The op's forward pass in either mode; `saved` keeps the batch statistics for backward.
pub fn forward<T: CpuFloat>(a: Forward<&[T], &mut [T]>, saved: &mut BnSaved) {
    let Forward {
        x,
        xs,
        gamma,
        beta,
        running_mean,
        running_var,
        training,
        y,
    } = a;
    if training {
        *saved = train_forward(
            x,
            xs,
            gamma,
            beta,
            running_mean,
            running_var,
            MOMENTUM,
            EPS,
            y,
        );
    } else {
        eval_forward(x, xs, gamma, beta, running_mean, running_var, EPS, y);
    }
}

/// The op's backward pass in either mode.
pub fn backward<T: CpuFloat>(a: Backward<&[T], &mut [T]>, saved: &BnSaved) {
    let Backward {
        x,
        xs,
        gamma,
        running_mean,
        running_var,
        training,
        dy,
        dx,
        dgamma,
        dbeta,
    } = a;
    let (dx, acc) = match dx {
        Some(g) => (Some(g.buf), g.accumulate),
        None => (None, false),
    };
    if training {
        train_backward(x, xs, gamma, saved, dy, dx, acc, dgamma, dbeta);
    } else {
        eval_backward(
            x,
            xs,
            gamma,
            running_mean,
            running_var,
            EPS,
            dy,
            dx,
            acc,
            dgamma,
            dbeta,
        );
    }
}

/// What batchnorm's training forward keeps for the backward pass.
#[derive(Debug, Clone, Default)]
pub struct BnSaved {
    pub mean: Vec<f64>,
    pub inv_std: Vec<f64>,
}

/// Batch statistics over N, H, W per channel; y = gamma (x - mean) / sqrt(var + eps) + beta.
/// Updates the running statistics as PyTorch does (momentum 0.1, unbiased variance).
pub fn train_forward<T: CpuFloat>(
    x: &[T],
    xs: Shape4,
    gamma: &[T],
    beta: &[T],
    running_mean: &mut [T],
    running_var: &mut [T],
    momentum: f64,
    eps: f64,
    y: &mut [T],
) -> BnSaved {
    let hw = xs.h * xs.w;
    let m = (xs.n * hw) as f64;
    let stats: Vec<(f64, f64)> = (0..xs.c)
        .into_par_iter()
        .map(|c| {
            let mut sum = 0.0;
            for n in 0..xs.n {
                let plane = &x[(n * xs.c + c) * hw..][..hw];
                sum += sum8(hw, |j| plane[j].into());
            }
            let mean = sum / m;
            let mut sq = 0.0;
            for n in 0..xs.n {
                let plane = &x[(n * xs.c + c) * hw..][..hw];
                sq += sum8(hw, |j| (plane[j].into() - mean).powi(2));
            }
            (mean, sq / m)
        })
        .collect();
    let mut saved = BnSaved {
        mean: Vec::with_capacity(xs.c),
        inv_std: Vec::with_capacity(xs.c),
    };
    for (c, &(mean, var)) in stats.iter().enumerate() {
        saved.mean.push(mean);
        saved.inv_std.push(1.0 / (var + eps).sqrt());
        let unbiased = if m > 1.0 { var * m / (m - 1.0) } else { var };
        running_mean[c] = T::of((1.0 - momentum) * running_mean[c].into() + momentum * mean);
        running_var[c] = T::of((1.0 - momentum) * running_var[c].into() + momentum * unbiased);
    }
    apply_affine(x, xs, gamma, beta, &saved.mean, &saved.inv_std, y);
    saved
}

/// Eval mode: the running statistics normalize.
pub fn eval_forward<T: CpuFloat>(
    x: &[T],
    xs: Shape4,
    gamma: &[T],
    beta: &[T],
    running_mean: &[T],
    running_var: &[T],
    eps: f64,
    y: &mut [T],
) {
    let mean: Vec<f64> = running_mean.iter().map(|&v| v.into()).collect();
    let inv_std: Vec<f64> = running_var
        .iter()
        .map(|&v| 1.0 / (v.into() + eps).sqrt())
        .collect();
    apply_affine(x, xs, gamma, beta, &mean, &inv_std, y);
}

fn apply_affine<T: CpuFloat>(
    x: &[T],
    xs: Shape4,
    gamma: &[T],
    beta: &[T],
    mean: &[f64],
    inv_std: &[f64],
    y: &mut [T],
) {
    let hw = xs.h * xs.w;
    y.par_chunks_mut(hw)
        .zip(x.par_chunks(hw))
        .enumerate()
        .for_each(|(i, (yr, xr))| {
            let c = i % xs.c;
            let scale = gamma[c].into() * inv_std[c];
            let shift = beta[c].into() - mean[c] * scale;
            let (scale, shift) = (T::of(scale), T::of(shift));
            for (o, &v) in yr.iter_mut().zip(xr) {
                *o = v * scale + shift;
            }
        });
}

/// Batchnorm training backward: dx (written, or added with `dx_accumulate`), dgamma and
/// dbeta (accumulated).
pub fn train_backward<T: CpuFloat>(
    x: &[T],
    xs: Shape4,
    gamma: &[T],
    saved: &BnSaved,
    dy: &[T],
    dx: Option<&mut [T]>,
    dx_accumulate: bool,
    dgamma: &mut [T],
    dbeta: &mut [T],
) {
    let hw = xs.h * xs.w;
    let m = (xs.n * hw) as f64;
    // Per channel: sum dy and sum dy * xhat.
    let sums: Vec<(f64, f64)> = (0..xs.c)
        .into_par_iter()
        .map(|c| {
            let (mean, inv) = (saved.mean[c], saved.inv_std[c]);
            let (mut s_dy, mut s_dyx) = (0.0, 0.0);
            for n in 0..xs.n {
                let off = (n * xs.c + c) * hw;
                let (g, v) = (&dy[off..off + hw], &x[off..off + hw]);
                s_dy += sum8(hw, |j| g[j].into());
                s_dyx += sum8(hw, |j| g[j].into() * (v[j].into() - mean) * inv);
            }
            (s_dy, s_dyx)
        })
        .collect();
    for (c, &(s_dy, s_dyx)) in sums.iter().enumerate() {
        dbeta[c] = T::of(dbeta[c].into() + s_dy);
        dgamma[c] = T::of(dgamma[c].into() + s_dyx);
    }
    if let Some(dx) = dx {
        dx.par_chunks_mut(hw).enumerate().for_each(|(i, dxr)| {
            let c = i % xs.c;
            let off = i * hw;
            let (mean, inv, (s_dy, s_dyx)) = (saved.mean[c], saved.inv_std[c], sums[c]);
            let k = gamma[c].into() * inv / m;
            for j in 0..hw {
                let xhat = (x[off + j].into() - mean) * inv;
                let v = T::of(k * (m * dy[off + j].into() - s_dy - xhat * s_dyx));
                dxr[j] = if dx_accumulate { dxr[j] + v } else { v };
            }
        });
    }
}

/// Batchnorm eval backward (running statistics are constants): dx = gamma / sqrt(var + eps) dy.
pub fn eval_backward<T: CpuFloat>(
    x: &[T],
    xs: Shape4,
    gamma: &[T],
    running_mean: &[T],
    running_var: &[T],
    eps: f64,
    dy: &[T],
    dx: Option<&mut [T]>,
    dx_accumulate: bool,
    dgamma: &mut [T],
    dbeta: &mut [T],
) {
    let hw = xs.h * xs.w;
    for c in 0..xs.c {
        let inv = 1.0 / (running_var[c].into() + eps).sqrt();
        let mean: f64 = running_mean[c].into();
        let (mut s_dy, mut s_dyx) = (0.0, 0.0);
        for n in 0..xs.n {
            let off = (n * xs.c + c) * hw;
            for j in 0..hw {
                let g: f64 = dy[off + j].into();
                s_dy += g;
                s_dyx += g * (x[off + j].into() - mean) * inv;
            }
        }
        dbeta[c] = T::of(dbeta[c].into() + s_dy);
        dgamma[c] = T::of(dgamma[c].into() + s_dyx);
    }
    if let Some(dx) = dx {
        dx.par_chunks_mut(hw).enumerate().for_each(|(i, dxr)| {
            let c = i % xs.c;
            let k = T::of(gamma[c].into() / (running_var[c].into() + eps).sqrt());
            for (o, &g) in dxr.iter_mut().zip(&dy[i * hw..(i + 1) * hw]) {
                *o = if dx_accumulate { *o + g * k } else { g * k };
            }
        });
    }
}
