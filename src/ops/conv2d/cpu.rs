//! The convolution on the CPU, generic over f32 (training) and f64 (finite-difference tests):
//! im2col + GEMM (the `gemm` crate) per group of images, rayon over groups (forward) or image
//! ranges (backward). The weight gradient's partial sums are added in range order, so a run is
//! reproducible for a given thread count.

use rayon::prelude::*;

use super::{Backward, Conv, Forward};
use crate::error::Result;
use crate::linalg::{matmul, MatRef};
use crate::ops::Shape4;
use crate::simd::CpuFloat;

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

/// y = conv(x, w); w is C_out x C_in x k x k. Groups of images share one GEMM:
/// Y (C_out x B P) = W (C_out x C_in k k) col (C_in k k x B P), then Y is scattered.
pub fn forward<T: CpuFloat>(a: Forward<&[T], &mut [T]>) -> Result<()> {
    let Forward { x, xs, w, conv, y } = a;
    let conv = &conv;
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
    Ok(())
}

/// Accumulates dw += sum_n dy_n col_n^T and, when `dx` is given, writes (or adds) dx =
/// conv^T(dy); both through GEMMs over groups of images as in the forward pass.
pub fn backward<T: CpuFloat>(a: Backward<&[T], &mut [T]>) -> Result<()> {
    let Backward {
        x,
        xs,
        w,
        conv,
        dy,
        dx,
        dw,
    } = a;
    let conv = &conv;
    let (dx, dx_accumulate) = match dx {
        Some(g) => (Some(g.buf), g.accumulate),
        None => (None, false),
    };
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
