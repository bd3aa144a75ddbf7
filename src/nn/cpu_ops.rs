//! The CPU kernels of the encoder's ops, generic over f32 (training) and f64 (finite-difference
//! tests). Activations are NCHW row-major; convolution and linear layers go through the `gemm`
//! crate (conv2d as im2col + GEMM per image), rayon spreads images or channels over threads.
//!
//! Reductions over the batch (weight gradients, batchnorm statistics) are summed in a fixed
//! order for a given thread count, so a run is reproducible with the same seed and threads.

// Kernels take their buffers and geometry explicitly, as their CUDA twins will.
#![allow(clippy::too_many_arguments)]

use rayon::prelude::*;

use crate::error::Result;
use crate::linalg::{matmul, MatRef};
use crate::simd::CpuFloat;

/// A 4-d activation shape, NCHW.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape4 {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
}

impl Shape4 {
    /// One element: the shape of a scalar node (a loss).
    pub const SCALAR: Shape4 = Shape4 {
        n: 1,
        c: 1,
        h: 1,
        w: 1,
    };

    pub fn len(&self) -> usize {
        self.n * self.c * self.h * self.w
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Elements of one image.
    pub fn image(&self) -> usize {
        self.c * self.h * self.w
    }
}

/// A convolution's geometry: square kernel, stride and zero padding, no bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv {
    pub c_in: usize,
    pub c_out: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
}

impl Conv {
    /// The output shape for input `x`.
    pub fn out_shape(&self, x: Shape4) -> Shape4 {
        let out = |len: usize| (len + 2 * self.pad - self.k) / self.stride + 1;
        Shape4 {
            n: x.n,
            c: self.c_out,
            h: out(x.h),
            w: out(x.w),
        }
    }
    /// Rows of the im2col matrix: C_in k k.
    pub fn patch(&self) -> usize {
        self.c_in * self.k * self.k
    }
    /// FLOPs of the forward pass on `x` (2 per multiply-add).
    pub fn flops(&self, x: Shape4) -> f64 {
        let y = self.out_shape(x);
        2.0 * (y.len() * self.patch()) as f64
    }
}

/// Contiguous image ranges, one per thread: the order of partial sums depends only on the
/// thread count.
fn image_ranges(n: usize) -> Vec<std::ops::Range<usize>> {
    let parts = rayon::current_num_threads().clamp(1, n.max(1));
    (0..parts)
        .map(|p| (p * n / parts)..((p + 1) * n / parts))
        .collect()
}

/// Images per GEMM: enough that B H_out W_out columns keep the product efficient even where
/// the maps are small (4 x 4 in ResNet18's last stage, where one image alone gives 16 columns).
fn images_per_gemm(p: usize) -> usize {
    512usize.div_ceil(p.max(1)).max(1)
}

/// The output columns `ox` whose input column `ox * stride + kj - pad` lies inside `0..w`.
fn valid_columns(conv: &Conv, kj: usize, w: usize, w_out: usize) -> std::ops::Range<usize> {
    let lo = if conv.pad > kj {
        (conv.pad - kj).div_ceil(conv.stride)
    } else {
        0
    };
    let hi = if w + conv.pad > kj {
        ((w - 1 + conv.pad - kj) / conv.stride + 1).min(w_out)
    } else {
        0
    };
    lo.min(hi)..hi
}

/// Writes image `x` (C_in x H x W) into columns `col0 .. col0 + H_out W_out` of `col`
/// (C_in k k rows, row stride `ld`).
fn im2col<T: CpuFloat>(
    x: &[T],
    xs: Shape4,
    conv: &Conv,
    ys: Shape4,
    col: &mut [T],
    ld: usize,
    col0: usize,
) {
    for c in 0..conv.c_in {
        for ki in 0..conv.k {
            for kj in 0..conv.k {
                let row = &mut col[((c * conv.k + ki) * conv.k + kj) * ld + col0..][..ys.h * ys.w];
                let valid = valid_columns(conv, kj, xs.w, ys.w);
                for oy in 0..ys.h {
                    let iy = (oy * conv.stride + ki) as isize - conv.pad as isize;
                    let out = &mut row[oy * ys.w..(oy + 1) * ys.w];
                    if iy < 0 || iy >= xs.h as isize || valid.is_empty() {
                        out.fill(T::ZERO);
                        continue;
                    }
                    let src = &x[(c * xs.h + iy as usize) * xs.w..][..xs.w];
                    out[..valid.start].fill(T::ZERO);
                    out[valid.end..].fill(T::ZERO);
                    let first = valid.start * conv.stride + kj - conv.pad;
                    if conv.stride == 1 {
                        out[valid.clone()].copy_from_slice(&src[first..first + valid.len()]);
                    } else {
                        for (o, i) in out[valid.clone()]
                            .iter_mut()
                            .zip((first..).step_by(conv.stride))
                        {
                            *o = src[i];
                        }
                    }
                }
            }
        }
    }
}

/// Adds columns `col0 ..` of `col` back into one image's gradient (the transpose of im2col).
fn col2im_add<T: CpuFloat>(
    col: &[T],
    ld: usize,
    col0: usize,
    xs: Shape4,
    conv: &Conv,
    ys: Shape4,
    dx: &mut [T],
) {
    for c in 0..conv.c_in {
        for ki in 0..conv.k {
            for kj in 0..conv.k {
                let row = &col[((c * conv.k + ki) * conv.k + kj) * ld + col0..][..ys.h * ys.w];
                let valid = valid_columns(conv, kj, xs.w, ys.w);
                if valid.is_empty() {
                    continue;
                }
                let first = valid.start * conv.stride + kj - conv.pad;
                for oy in 0..ys.h {
                    let iy = (oy * conv.stride + ki) as isize - conv.pad as isize;
                    if iy < 0 || iy >= xs.h as isize {
                        continue;
                    }
                    let dst = &mut dx[(c * xs.h + iy as usize) * xs.w..][..xs.w];
                    let src = &row[oy * ys.w + valid.start..oy * ys.w + valid.end];
                    if conv.stride == 1 {
                        for (d, &g) in dst[first..first + valid.len()].iter_mut().zip(src) {
                            *d = *d + g;
                        }
                    } else {
                        for (i, &g) in (first..).step_by(conv.stride).zip(src) {
                            dst[i] = dst[i] + g;
                        }
                    }
                }
            }
        }
    }
}

/// Per-thread scratch of the convolution: the im2col block and an output block.
fn scratch<T: CpuFloat>(conv: &Conv, p: usize, group: usize) -> (Vec<T>, Vec<T>) {
    (
        vec![T::ZERO; conv.patch() * group * p],
        vec![T::ZERO; conv.c_out * group * p],
    )
}

/// y = conv(x, w); w is C_out x C_in x k x k. Returns y's shape. Groups of images share one
/// GEMM: Y (C_out x B P) = W (C_out x C_in k k) col (C_in k k x B P), then Y is scattered.
pub fn conv2d_forward<T: CpuFloat>(
    x: &[T],
    xs: Shape4,
    w: &[T],
    conv: &Conv,
    y: &mut [T],
) -> Result<Shape4> {
    let ys = conv.out_shape(xs);
    let (k, p) = (conv.patch(), ys.h * ys.w);
    let group = images_per_gemm(p).min(xs.n.max(1));
    let wm = MatRef::row_major(w, conv.c_out, k);
    y.par_chunks_mut(group * ys.image())
        .zip(x.par_chunks(group * xs.image()))
        .try_for_each_init(
            || scratch::<T>(conv, p, group),
            |(col, out), (yg, xg)| -> Result<()> {
                let b = xg.len() / xs.image();
                let ld = b * p;
                for (i, xn) in xg.chunks_exact(xs.image()).enumerate() {
                    im2col(xn, xs, conv, ys, col, ld, i * p);
                }
                matmul(
                    wm,
                    MatRef::row_major(&col[..k * ld], k, ld),
                    &mut out[..conv.c_out * ld],
                    ld,
                    T::ONE,
                    false,
                )?;
                for (i, yn) in yg.chunks_exact_mut(ys.image()).enumerate() {
                    for (co, dst) in yn.chunks_exact_mut(p).enumerate() {
                        dst.copy_from_slice(&out[co * ld + i * p..][..p]);
                    }
                }
                Ok(())
            },
        )?;
    Ok(ys)
}

/// Accumulates dw += sum_n dy_n col_n^T and, when `dx` is given, writes (or with
/// `dx_accumulate` adds) dx = conv^T(dy);
/// both through GEMMs over groups of images as in the forward pass.
pub fn conv2d_backward<T: CpuFloat>(
    x: &[T],
    xs: Shape4,
    w: &[T],
    conv: &Conv,
    dy: &[T],
    dx: Option<&mut [T]>,
    dx_accumulate: bool,
    dw: &mut [T],
) -> Result<()> {
    let ys = conv.out_shape(xs);
    let (k, p) = (conv.patch(), ys.h * ys.w);
    let group = images_per_gemm(p).min(xs.n.max(1));
    let wt = MatRef::transposed(w, conv.c_out, k); // k x C_out
                                                   // Gathers dy of images n0.. into a C_out x B P block.
    let gather = |n0: usize, b: usize, out: &mut [T]| {
        let ld = b * p;
        for i in 0..b {
            let dyn_ = &dy[(n0 + i) * ys.image()..][..ys.image()];
            for (co, src) in dyn_.chunks_exact(p).enumerate() {
                out[co * ld + i * p..][..p].copy_from_slice(src);
            }
        }
    };
    // One pass per thread over its image range: im2col and the gathered dy serve both the
    // weight gradient (a partial per thread, summed in range order) and dx.
    let ranges = image_ranges(xs.n);
    let mut dx_ranges: Vec<Option<&mut [T]>> = match dx {
        Some(dx) => {
            let mut rest = dx;
            ranges
                .iter()
                .map(|r| {
                    let (head, tail) = std::mem::take(&mut rest).split_at_mut(r.len() * xs.image());
                    rest = tail;
                    Some(head)
                })
                .collect()
        }
        None => ranges.iter().map(|_| None).collect(),
    };
    let partials: Vec<Vec<T>> = ranges
        .into_par_iter()
        .zip(dx_ranges.par_iter_mut())
        .map(|(range, dx_range)| -> Result<Vec<T>> {
            let mut part = vec![T::ZERO; dw.len()];
            let (mut col, mut dyb) = scratch::<T>(conv, p, group);
            let mut n0 = range.start;
            while n0 < range.end {
                let b = group.min(range.end - n0);
                let ld = b * p;
                for i in 0..b {
                    im2col(
                        &x[(n0 + i) * xs.image()..][..xs.image()],
                        xs,
                        conv,
                        ys,
                        &mut col,
                        ld,
                        i * p,
                    );
                }
                gather(n0, b, &mut dyb);
                let dyb_m = MatRef::row_major(&dyb[..conv.c_out * ld], conv.c_out, ld);
                matmul(
                    dyb_m,
                    MatRef::transposed(&col[..k * ld], k, ld),
                    &mut part,
                    k,
                    T::ONE,
                    true,
                )?;
                if let Some(dxr) = dx_range.as_deref_mut() {
                    matmul(wt, dyb_m, &mut col[..k * ld], ld, T::ONE, false)?;
                    let off = (n0 - range.start) * xs.image();
                    let dxg = &mut dxr[off..off + b * xs.image()];
                    if !dx_accumulate {
                        dxg.fill(T::ZERO);
                    }
                    for (i, dxn) in dxg.chunks_exact_mut(xs.image()).enumerate() {
                        col2im_add(&col, ld, i * p, xs, conv, ys, dxn);
                    }
                }
                n0 += b;
            }
            Ok(part)
        })
        .collect::<Result<_>>()?;
    for part in partials {
        for (d, p) in dw.iter_mut().zip(part) {
            *d = *d + p;
        }
    }
    Ok(())
}

/// What batchnorm's training forward keeps for the backward pass.
#[derive(Debug, Clone, Default)]
pub struct BnSaved {
    pub mean: Vec<f64>,
    pub inv_std: Vec<f64>,
}

/// Batch statistics over N, H, W per channel; y = gamma (x - mean) / sqrt(var + eps) + beta.
/// Updates the running statistics as PyTorch does (momentum 0.1, unbiased variance).
pub fn batchnorm_train_forward<T: CpuFloat>(
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
                sum += x[(n * xs.c + c) * hw..][..hw]
                    .iter()
                    .map(|&v| v.into())
                    .sum::<f64>();
            }
            let mean = sum / m;
            let mut sq = 0.0;
            for n in 0..xs.n {
                sq += x[(n * xs.c + c) * hw..][..hw]
                    .iter()
                    .map(|&v| (v.into() - mean).powi(2))
                    .sum::<f64>();
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

/// Eval mode: the running statistics normalise.
pub fn batchnorm_eval_forward<T: CpuFloat>(
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
pub fn batchnorm_train_backward<T: CpuFloat>(
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
                for (&g, &v) in dy[off..off + hw].iter().zip(&x[off..off + hw]) {
                    let g: f64 = g.into();
                    s_dy += g;
                    s_dyx += g * (v.into() - mean) * inv;
                }
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
pub fn batchnorm_eval_backward<T: CpuFloat>(
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

pub fn relu_forward<T: CpuFloat>(x: &[T], y: &mut [T]) {
    y.par_chunks_mut(4096)
        .zip(x.par_chunks(4096))
        .for_each(|(yc, xc)| {
            for (o, &v) in yc.iter_mut().zip(xc) {
                *o = if v > T::ZERO { v } else { T::ZERO };
            }
        });
}

/// dx = (or += with `accumulate`) dy where y > 0, else 0 (y is the forward's output).
pub fn relu_backward<T: CpuFloat>(y: &[T], dy: &[T], dx: &mut [T], accumulate: bool) {
    dx.par_chunks_mut(4096)
        .zip(dy.par_chunks(4096))
        .zip(y.par_chunks(4096))
        .for_each(|((dc, gc), yc)| {
            for ((d, &g), &v) in dc.iter_mut().zip(gc).zip(yc) {
                let pass = if v > T::ZERO { g } else { T::ZERO };
                *d = if accumulate { *d + pass } else { pass };
            }
        });
}

/// out = x, or out += x with `accumulate`.
pub fn copy_or_add<T: CpuFloat>(x: &[T], out: &mut [T], accumulate: bool) {
    if accumulate {
        add_into(x, out);
    } else {
        out.copy_from_slice(x);
    }
}

/// out += x (elementwise).
pub fn add_into<T: CpuFloat>(x: &[T], out: &mut [T]) {
    out.par_chunks_mut(4096)
        .zip(x.par_chunks(4096))
        .for_each(|(oc, xc)| {
            for (o, &v) in oc.iter_mut().zip(xc) {
                *o = *o + v;
            }
        });
}

/// k x k average pooling with stride k (k = H = W is global pooling).
pub fn avgpool_forward<T: CpuFloat>(x: &[T], xs: Shape4, k: usize, y: &mut [T]) -> Shape4 {
    let ys = Shape4 {
        n: xs.n,
        c: xs.c,
        h: xs.h / k,
        w: xs.w / k,
    };
    let scale = 1.0 / (k * k) as f64;
    y.par_chunks_mut(ys.h * ys.w)
        .zip(x.par_chunks(xs.h * xs.w))
        .for_each(|(yp, xp)| {
            for oy in 0..ys.h {
                for ox in 0..ys.w {
                    let mut s = 0.0f64;
                    for i in 0..k {
                        for j in 0..k {
                            s += xp[(oy * k + i) * xs.w + ox * k + j].into();
                        }
                    }
                    yp[oy * ys.w + ox] = T::of(s * scale);
                }
            }
        });
    ys
}

/// dx = (or += with `accumulate`) the pooled gradient spread evenly over each window
/// (windows do not overlap, so every element of dx gets exactly one term).
pub fn avgpool_backward<T: CpuFloat>(
    xs: Shape4,
    k: usize,
    dy: &[T],
    dx: &mut [T],
    accumulate: bool,
) {
    let (hy, wy) = (xs.h / k, xs.w / k);
    let scale = T::of(1.0 / (k * k) as f64);
    dx.par_chunks_mut(xs.h * xs.w)
        .zip(dy.par_chunks(hy * wy))
        .for_each(|(dxp, dyp)| {
            for oy in 0..hy {
                for ox in 0..wy {
                    let g = dyp[oy * wy + ox] * scale;
                    for i in 0..k {
                        for j in 0..k {
                            let idx = (oy * k + i) * xs.w + ox * k + j;
                            dxp[idx] = if accumulate { dxp[idx] + g } else { g };
                        }
                    }
                }
            }
        });
}

/// y = x w^T + b; x is N x in, w is out x in.
pub fn linear_forward<T: CpuFloat>(
    x: &[T],
    n: usize,
    w: &[T],
    b: &[T],
    out: usize,
    y: &mut [T],
) -> Result<()> {
    let inp = w.len() / out;
    matmul(
        MatRef::row_major(x, n, inp),
        MatRef::transposed(w, out, inp),
        y,
        out,
        T::ONE,
        false,
    )?;
    for row in y.chunks_mut(out) {
        for (o, &bias) in row.iter_mut().zip(b) {
            *o = *o + bias;
        }
    }
    Ok(())
}

/// dw += dy^T x, db += column sums of dy, dx = (or +=) dy w (when given).
pub fn linear_backward<T: CpuFloat>(
    x: &[T],
    n: usize,
    w: &[T],
    out: usize,
    dy: &[T],
    dx: Option<&mut [T]>,
    dx_accumulate: bool,
    dw: &mut [T],
    db: &mut [T],
) -> Result<()> {
    let inp = w.len() / out;
    matmul(
        MatRef::transposed(dy, n, out),
        MatRef::row_major(x, n, inp),
        dw,
        inp,
        T::ONE,
        true,
    )?;
    for j in 0..out {
        let s: f64 = (0..n).map(|i| dy[i * out + j].into()).sum();
        db[j] = T::of(db[j].into() + s);
    }
    if let Some(dx) = dx {
        matmul(
            MatRef::row_major(dy, n, out),
            MatRef::row_major(w, out, inp),
            dx,
            inp,
            T::ONE,
            dx_accumulate,
        )?;
    }
    Ok(())
}
