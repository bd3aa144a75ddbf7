//! BatchNorm2d on the CPU: float64 statistics per channel (rayon over channels), elementwise
//! passes over planes.

// The per-mode kernels take their buffers explicitly; `forward` and `backward` are the op.
#![allow(clippy::too_many_arguments)]

use rayon::prelude::*;

use super::{Backward, Forward, EPS, MOMENTUM};
use crate::ops::Shape4;
use crate::simd::CpuFloat;

/// `(sum_j f(a_j, b_j).0, sum_j f(a_j, b_j).1)` in float64 over two equal-length slices, with
/// 8 interleaved partial sums per total so that the compiler vectorises it (a single running
/// sum cannot be reordered; chunks of 8 leave no bounds checks in the loop); the order is
/// fixed, so results are reproducible.
#[inline(always)]
fn sum_pairs8<T: CpuFloat>(a: &[T], b: &[T], f: impl Fn(T, T) -> (f64, f64)) -> (f64, f64) {
    let (mut s0, mut s1) = ([0.0f64; 8], [0.0f64; 8]);
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let (a_tail, b_tail) = (a8.remainder(), b8.remainder());
    for (ac, bc) in a8.zip(b8) {
        for l in 0..8 {
            let (u, v) = f(ac[l], bc[l]);
            s0[l] += u;
            s1[l] += v;
        }
    }
    let (mut t0, mut t1) = (0.0, 0.0);
    for (&x, &y) in a_tail.iter().zip(b_tail) {
        let (u, v) = f(x, y);
        t0 += u;
        t1 += v;
    }
    (s0.iter().sum::<f64>() + t0, s1.iter().sum::<f64>() + t1)
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
        relu,
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
            relu,
            y,
        );
    } else {
        *saved = eval_forward(x, xs, gamma, beta, running_mean, running_var, EPS, relu, y);
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
        relu,
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
        train_backward(x, xs, gamma, saved, relu, dy, dx, acc, dgamma, dbeta);
    } else {
        eval_backward(
            x,
            xs,
            gamma,
            running_mean,
            running_var,
            EPS,
            saved,
            relu,
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
    /// The forward's per-channel `y = x scale + shift` (either mode): the fused ReLU's backward
    /// recomputes its mask from x with exactly these.
    pub affine: Vec<(f64, f64)>,
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
    relu: bool,
    y: &mut [T],
) -> BnSaved {
    let hw = xs.h * xs.w;
    let m = (xs.n * hw) as f64;
    // Per plane (one image's channel, contiguous) its mean and sum of squared deviations,
    // in memory order; then per channel the planes combined in image order (Chan et al.'s
    // pairwise update): sequential reads, and the same result for any thread count.
    let planes: Vec<(f64, f64)> = x
        .par_chunks(hw)
        .with_min_len(planes_per_task(hw))
        .map(|plane| {
            let mean = sum_pairs8(plane, plane, |v, _| (v.into(), 0.0)).0 / hw as f64;
            let dev = |v: T, _| (0.0, (v.into() - mean).powi(2));
            (mean, sum_pairs8(plane, plane, dev).1)
        })
        .collect();
    let stats: Vec<(f64, f64)> = (0..xs.c)
        .map(|c| {
            let (mut count, mut mean, mut m2) = (0.0, 0.0, 0.0);
            for n in 0..xs.n {
                let (p_mean, p_m2) = planes[n * xs.c + c];
                let total = count + hw as f64;
                let delta = p_mean - mean;
                mean += delta * hw as f64 / total;
                m2 += p_m2 + delta * delta * count * hw as f64 / total;
                count = total;
            }
            (mean, m2 / m)
        })
        .collect();
    let mut saved = BnSaved {
        mean: Vec::with_capacity(xs.c),
        inv_std: Vec::with_capacity(xs.c),
        affine: Vec::new(),
    };
    for (c, &(mean, var)) in stats.iter().enumerate() {
        saved.mean.push(mean);
        saved.inv_std.push(1.0 / (var + eps).sqrt());
        let unbiased = if m > 1.0 { var * m / (m - 1.0) } else { var };
        running_mean[c] = T::of((1.0 - momentum) * running_mean[c].into() + momentum * mean);
        running_var[c] = T::of((1.0 - momentum) * running_var[c].into() + momentum * unbiased);
    }
    saved.affine = affine(gamma, beta, &saved.mean, &saved.inv_std);
    apply_affine(x, xs, &in_type(&saved.affine), relu, y);
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
    relu: bool,
    y: &mut [T],
) -> BnSaved {
    let (mean, inv_std) = running_statistics(running_mean, running_var, eps);
    let affine = affine(gamma, beta, &mean, &inv_std);
    apply_affine(x, xs, &in_type(&affine), relu, y);
    BnSaved {
        mean,
        inv_std,
        affine,
    }
}

/// Eval mode's mean and 1 / sqrt(var + eps) per channel, in float64.
fn running_statistics<T: CpuFloat>(
    running_mean: &[T],
    running_var: &[T],
    eps: f64,
) -> (Vec<f64>, Vec<f64>) {
    let mean = running_mean.iter().map(|&v| v.into()).collect();
    let inv_std = running_var
        .iter()
        .map(|&v| 1.0 / (v.into() + eps).sqrt())
        .collect();
    (mean, inv_std)
}

/// Per channel, the forward's `y = x scale + shift` coefficients.
fn affine<T: CpuFloat>(gamma: &[T], beta: &[T], mean: &[f64], inv_std: &[f64]) -> Vec<(f64, f64)> {
    (0..gamma.len())
        .map(|c| {
            let scale = gamma[c].into() * inv_std[c];
            (scale, beta[c].into() - mean[c] * scale)
        })
        .collect()
}

/// The coefficients rounded to T, as the forward applies them. The backward of the fused ReLU
/// recomputes its mask from x with these same values and the same arithmetic ([`activation`]),
/// so it is the forward's mask exactly.
fn in_type<T: CpuFloat>(affine: &[(f64, f64)]) -> Vec<(T, T)> {
    affine.iter().map(|&(a, b)| (T::of(a), T::of(b))).collect()
}

/// Whether the ReLU passes `y` (false for NaN, as in the ReLU op).
#[inline(always)]
fn positive<T: CpuFloat>(y: T) -> bool {
    y > T::ZERO
}

/// bn(x) for one value, and max(bn(x), 0) with `relu` (NaN goes to 0, as in the ReLU op).
#[inline(always)]
fn activation<T: CpuFloat>(v: T, (scale, shift): (T, T), relu: bool) -> T {
    let y = v * scale + shift;
    if relu && !positive(y) {
        T::ZERO
    } else {
        y
    }
}

/// dy as it reaches the batchnorm: zero where the fused ReLU cut the forward's output.
#[inline(always)]
fn through_relu<T: CpuFloat>(g: T, v: T, coeff: (T, T), relu: bool) -> T {
    if relu && !positive(activation(v, coeff, false)) {
        T::ZERO
    } else {
        g
    }
}

/// Planes handed to a rayon task at once: at least 4,096 values, so that the 4 x 4 maps of a
/// last stage are not 16-value tasks.
fn planes_per_task(hw: usize) -> usize {
    4096usize.div_ceil(hw.max(1))
}

fn apply_affine<T: CpuFloat>(x: &[T], xs: Shape4, coeffs: &[(T, T)], relu: bool, y: &mut [T]) {
    let hw = xs.h * xs.w;
    y.par_chunks_mut(hw)
        .zip(x.par_chunks(hw))
        .enumerate()
        .with_min_len(planes_per_task(hw))
        .for_each(|(i, (yr, xr))| {
            let coeff = coeffs[i % xs.c];
            for (o, &v) in yr.iter_mut().zip(xr) {
                *o = activation(v, coeff, relu);
            }
        });
}

/// How x was normalised (per channel: mean, 1 / std, the forward's coefficients in T) and
/// whether a fused ReLU followed: what both modes' backward passes share.
struct Normalized<'a, T> {
    mean: &'a [f64],
    inv_std: &'a [f64],
    coeffs: &'a [(T, T)],
    relu: bool,
}

impl<T: CpuFloat> Normalized<'_, T> {
    /// dbeta += sum g and dgamma += sum g xhat per channel (g: dy through the fused ReLU);
    /// returns those two sums. Per plane in memory order, then per channel in image order, in
    /// float64: sequential reads, the same result for any thread count.
    fn affine_gradients(
        &self,
        x: &[T],
        xs: Shape4,
        dy: &[T],
        dgamma: &mut [T],
        dbeta: &mut [T],
    ) -> Vec<(f64, f64)> {
        let hw = xs.h * xs.w;
        let planes: Vec<(f64, f64)> = dy
            .par_chunks(hw)
            .zip(x.par_chunks(hw))
            .enumerate()
            .with_min_len(planes_per_task(hw))
            .map(|(i, (g, v))| {
                let c = i % xs.c;
                let (mean, coeff) = (self.mean[c], self.coeffs[c]);
                let (s_g, s_gx) = sum_pairs8(g, v, |g, v| {
                    let g: f64 = through_relu(g, v, coeff, self.relu).into();
                    (g, g * (v.into() - mean))
                });
                (s_g, s_gx * self.inv_std[c])
            })
            .collect();
        let sums: Vec<(f64, f64)> = (0..xs.c)
            .map(|c| {
                (0..xs.n).fold((0.0, 0.0), |(a, b), n| {
                    let (pa, pb) = planes[n * xs.c + c];
                    (a + pa, b + pb)
                })
            })
            .collect();
        for (c, &(s_dy, s_dyx)) in sums.iter().enumerate() {
            dbeta[c] = T::of(dbeta[c].into() + s_dy);
            dgamma[c] = T::of(dgamma[c].into() + s_dyx);
        }
        sums
    }
}

/// Batchnorm training backward: dx (written, or added with `dx_accumulate`), dgamma and
/// dbeta (accumulated). Sums in float64; dx per element in T from per-channel coefficients,
/// dx = a g + b (x - mean) + c with g the gradient through the fused ReLU (if any).
pub fn train_backward<T: CpuFloat>(
    x: &[T],
    xs: Shape4,
    gamma: &[T],
    saved: &BnSaved,
    relu: bool,
    dy: &[T],
    dx: Option<&mut [T]>,
    dx_accumulate: bool,
    dgamma: &mut [T],
    dbeta: &mut [T],
) {
    let hw = xs.h * xs.w;
    let m = (xs.n * hw) as f64;
    let coeffs: Vec<(T, T)> = in_type(&saved.affine);
    let grads = Normalized {
        mean: &saved.mean,
        inv_std: &saved.inv_std,
        coeffs: &coeffs,
        relu,
    };
    let sums = grads.affine_gradients(x, xs, dy, dgamma, dbeta);
    let Some(dx) = dx else { return };
    // dx = gamma inv / M (M g - s_dy - xhat s_dyx), xhat = (x - mean) inv.
    let terms: Vec<[T; 4]> = (0..xs.c)
        .map(|c| {
            let (mean, inv, (s_dy, s_dyx)) = (saved.mean[c], saved.inv_std[c], sums[c]);
            let k = gamma[c].into() * inv / m;
            [
                T::of(k * m),
                T::of(-k * s_dyx * inv),
                T::of(-k * s_dy),
                T::of(mean),
            ]
        })
        .collect();
    let task = planes_per_task(hw);
    dx.par_chunks_mut(hw)
        .enumerate()
        .with_min_len(task)
        .for_each(|(i, dxr)| {
            let c = i % xs.c;
            let [a, b, c0, mean] = terms[c];
            let coeff = coeffs[c];
            let (g, v) = (&dy[i * hw..][..hw], &x[i * hw..][..hw]);
            for ((d, &g), &v) in dxr.iter_mut().zip(g).zip(v) {
                let g = through_relu(g, v, coeff, relu);
                let val = a * g + b * (v - mean) + c0;
                *d = if dx_accumulate { *d + val } else { val };
            }
        });
}

/// Batchnorm eval backward (running statistics are constants): dx = gamma / sqrt(var + eps) g,
/// g the gradient through the fused ReLU (if any).
pub fn eval_backward<T: CpuFloat>(
    x: &[T],
    xs: Shape4,
    gamma: &[T],
    running_mean: &[T],
    running_var: &[T],
    eps: f64,
    saved: &BnSaved,
    relu: bool,
    dy: &[T],
    dx: Option<&mut [T]>,
    dx_accumulate: bool,
    dgamma: &mut [T],
    dbeta: &mut [T],
) {
    let hw = xs.h * xs.w;
    let (mean, inv_std) = running_statistics(running_mean, running_var, eps);
    let coeffs: Vec<(T, T)> = if relu {
        in_type(&saved.affine)
    } else {
        vec![(T::ONE, T::ZERO); xs.c]
    };
    let grads = Normalized {
        mean: &mean,
        inv_std: &inv_std,
        coeffs: &coeffs,
        relu,
    };
    grads.affine_gradients(x, xs, dy, dgamma, dbeta);
    if let Some(dx) = dx {
        dx.par_chunks_mut(hw).enumerate().for_each(|(i, dxr)| {
            let c = i % xs.c;
            let k = T::of(gamma[c].into() * inv_std[c]);
            let (g, v) = (&dy[i * hw..][..hw], &x[i * hw..][..hw]);
            for ((o, &g), &v) in dxr.iter_mut().zip(g).zip(v) {
                let g = through_relu(g, v, coeffs[c], relu);
                *o = if dx_accumulate { *o + g * k } else { g * k };
            }
        });
    }
}
