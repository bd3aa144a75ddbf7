//! The convolution on the CPU, generic over f32 (training) and f64 (finite-difference tests):
//! im2col + GEMM (the `gemm` crate) per group of images, rayon over groups (forward) or image
//! ranges (backward). The weight gradient's partial sums are added in range order, so a run is
//! reproducible for a given thread count.

use rayon::prelude::*;

use super::{winograd, Backward, Conv, CpuVersion, Forward};
use crate::error::Result;
use crate::linalg::{matmul, GemmShape, MatRef};
use crate::ops::Shape4;
use crate::scratch;
use crate::simd::CpuFloat;

/// Contiguous image ranges, one per thread: the order of partial sums depends only on the
/// thread count.
pub(super) fn image_ranges(n: usize) -> Vec<std::ops::Range<usize>> {
    let parts = rayon::current_num_threads().clamp(1, n.max(1));
    (0..parts)
        .map(|p| (p * n / parts)..((p + 1) * n / parts))
        .collect()
}

/// `dx` cut into the images of each range (`image` elements an image), or no cuts without dx.
fn split_by_ranges<'a, T>(
    dx: Option<&'a mut [T]>,
    ranges: &[std::ops::Range<usize>],
    image: usize,
) -> Vec<Option<&'a mut [T]>> {
    match dx {
        Some(dx) => {
            let mut rest = dx;
            ranges
                .iter()
                .map(|r| {
                    let (head, tail) = std::mem::take(&mut rest).split_at_mut(r.len() * image);
                    rest = tail;
                    Some(head)
                })
                .collect()
        }
        None => ranges.iter().map(|_| None).collect(),
    }
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

/// Whether `conv` on maps `w` wide is the 3 x 3, stride-2, pad-1 convolution of an even width
/// (every stride-2 3 x 3 layer of both encoders): output column `ox` then reads input columns
/// `2 ox - 1, 2 ox, 2 ox + 1`, so one pass over an input row's pairs serves all three taps.
fn is_k3_s2_even(conv: &Conv, w: usize, w_out: usize) -> bool {
    conv.k == 3 && conv.stride == 2 && conv.pad == 1 && w.is_multiple_of(2) && w_out * 2 == w
}

/// The three taps of one input row for [`is_k3_s2_even`]: `taps[kj][ox] = src[2 ox + kj - 1]`
/// (zero left of the row).
#[inline(always)]
fn gather_k3_s2<T: CpuFloat>(src: &[T], left: &mut [T], mid: &mut [T], right: &mut [T]) {
    for ((pair, m), r) in src
        .chunks_exact(2)
        .zip(mid.iter_mut())
        .zip(right.iter_mut())
    {
        *m = pair[0];
        *r = pair[1];
    }
    // left[ox] = src[2 ox - 1], read from the row rather than copied from `right`: copying
    // these short rows (4-16 values) was a libc memmove call per row.
    left[0] = T::ZERO;
    for (l, pair) in left[1..].iter_mut().zip(src[1..].chunks_exact(2)) {
        *l = pair[0];
    }
}

/// The transpose of [`gather_k3_s2`], added into the row: `dst[2 ox + kj - 1] += taps[kj][ox]`.
fn scatter_add_k3_s2<T: CpuFloat>(left: &[T], mid: &[T], right: &[T], dst: &mut [T]) {
    let w_out = mid.len();
    for (j, pair) in dst.chunks_exact_mut(2).enumerate() {
        pair[0] = pair[0] + mid[j];
        let from_left = if j + 1 < w_out { left[j + 1] } else { T::ZERO };
        pair[1] = pair[1] + right[j] + from_left;
    }
}

/// For [`is_k3_s2_even`]: the input row `2 oy + ki - 1` that output row `oy` reads at tap row
/// `ki`, or `None` where that falls in the padding (above row 0 or below row `h - 1`).
fn k3_s2_input_row(oy: usize, ki: usize, h: usize) -> Option<usize> {
    (2 * oy + ki).checked_sub(1).filter(|&iy| iy < h)
}

/// The three `len`-long rows starting at `at`, `at + ld` and `at + 2 ld` (a channel's taps
/// `kj = 0, 1, 2` for one `ki`), split out of the block once for all output rows.
fn three_taps_mut<T>(
    col: &mut [T],
    at: usize,
    ld: usize,
    len: usize,
) -> (&mut [T], &mut [T], &mut [T]) {
    let (left, rest) = col[at..].split_at_mut(ld);
    let (mid, rest) = rest.split_at_mut(ld);
    (&mut left[..len], &mut mid[..len], &mut rest[..len])
}

/// Row `oy` of tap `(c, ki, kj)` in a column block: the `w_out` entries it starts at.
fn tap_row(conv: &Conv, c: usize, ki: usize, kj: usize, ld: usize, col0: usize) -> usize {
    ((c * conv.k + ki) * conv.k + kj) * ld + col0
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
    if is_k3_s2_even(conv, xs.w, ys.w) {
        let p = ys.h * ys.w;
        for (c, plane) in x.chunks_exact(xs.h * xs.w).enumerate() {
            for ki in 0..3 {
                let (left, mid, right) =
                    three_taps_mut(col, tap_row(conv, c, ki, 0, ld, col0), ld, p);
                let rows = left
                    .chunks_exact_mut(ys.w)
                    .zip(mid.chunks_exact_mut(ys.w))
                    .zip(right.chunks_exact_mut(ys.w));
                for (oy, ((l, m), r)) in rows.enumerate() {
                    match k3_s2_input_row(oy, ki, xs.h) {
                        Some(iy) => gather_k3_s2(&plane[iy * xs.w..][..xs.w], l, m, r),
                        None => {
                            l.fill(T::ZERO);
                            m.fill(T::ZERO);
                            r.fill(T::ZERO);
                        }
                    }
                }
            }
        }
        return;
    }
    for c in 0..conv.c_in {
        for ki in 0..conv.k {
            for kj in 0..conv.k {
                let row = &mut col[tap_row(conv, c, ki, kj, ld, col0)..][..ys.h * ys.w];
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
                        continue;
                    }
                    let taps = src[first..].iter().step_by(conv.stride);
                    for (o, &v) in out[valid.clone()].iter_mut().zip(taps) {
                        *o = v;
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
    if is_k3_s2_even(conv, xs.w, ys.w) {
        let p = ys.h * ys.w;
        for (c, plane) in dx.chunks_exact_mut(xs.h * xs.w).enumerate() {
            for ki in 0..3 {
                let base = tap_row(conv, c, ki, 0, ld, col0);
                let tap = |kj: usize| &col[base + kj * ld..][..p];
                let rows = tap(0)
                    .chunks_exact(ys.w)
                    .zip(tap(1).chunks_exact(ys.w))
                    .zip(tap(2).chunks_exact(ys.w));
                for (oy, ((l, m), r)) in rows.enumerate() {
                    if let Some(iy) = k3_s2_input_row(oy, ki, xs.h) {
                        scatter_add_k3_s2(l, m, r, &mut plane[iy * xs.w..][..xs.w]);
                    }
                }
            }
        }
        return;
    }
    for c in 0..conv.c_in {
        for ki in 0..conv.k {
            for kj in 0..conv.k {
                let row = &col[tap_row(conv, c, ki, kj, ld, col0)..][..ys.h * ys.w];
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
                        continue;
                    }
                    let taps = dst[first..].iter_mut().step_by(conv.stride);
                    for (d, &g) in taps.zip(src) {
                        *d = *d + g;
                    }
                }
            }
        }
    }
}

/// Per-thread scratch of the convolution (kept between calls by [`scratch`]'s pool).
#[derive(Default)]
struct Im2colScratch<T> {
    /// The im2col block of a group, C_in k k x B P.
    col: Vec<T>,
    /// A group's output (or gathered dy) block, C_out x B P.
    out: Vec<T>,
    /// The thread's partial weight gradient, transposed: C_in k k x C_out.
    part: Vec<T>,
}

/// Runs `f` on each thread's contiguous image range of `0..n` at once, with that range's part
/// of `out` (`image` elements an image; none without `out`) and a pooled scratch set; returns
/// the sets in range order (for partial sums; the caller gives them back to the pool).
pub(super) fn per_range<T: Send, S: Default + Send + 'static>(
    n: usize,
    out: Option<&mut [T]>,
    image: usize,
    f: impl Fn(std::ops::Range<usize>, Option<&mut [T]>, &mut S) -> Result<()> + Sync,
) -> Result<Vec<S>> {
    let ranges = image_ranges(n);
    let mut outs = split_by_ranges(out, &ranges, image);
    ranges
        .into_par_iter()
        .zip(outs.par_iter_mut())
        .map(|(range, out)| {
            let mut s: S = scratch::take();
            f(range, out.as_deref_mut(), &mut s)?;
            Ok(s)
        })
        .collect()
}

/// The matrix products `version` runs for one forward and one backward pass (dx included when
/// `with_dx`) of `conv` on `xs`, in float32: what a floor is computed from.
pub fn gemm_shapes(version: CpuVersion, conv: &Conv, xs: Shape4, with_dx: bool) -> Vec<GemmShape> {
    if version == CpuVersion::Winograd && winograd::applies(conv, xs) {
        return winograd::gemm_shapes(conv, xs, with_dx);
    }
    let ys = conv.out_shape(xs);
    let (k, p) = (conv.patch(), ys.h * ys.w);
    let group = images_per_gemm(p).min(xs.n.max(1));
    let mut shapes = Vec::new();
    // Forward and backward both run groups within each thread's image range.
    for range in image_ranges(xs.n) {
        for b in group_sizes(range, group) {
            shapes.push(GemmShape {
                m: conv.c_out,
                n: b * p,
                k,
                count: 1,
            });
            shapes.push(GemmShape {
                m: k,
                n: conv.c_out,
                k: b * p,
                count: 1,
            });
            if with_dx {
                shapes.push(GemmShape {
                    m: k,
                    n: b * p,
                    k: conv.c_out,
                    count: 1,
                });
            }
        }
    }
    merge_shapes(shapes)
}

/// The sizes of consecutive groups of at most `group` images over `range`.
pub(super) fn group_sizes(range: std::ops::Range<usize>, group: usize) -> Vec<usize> {
    let mut sizes = Vec::new();
    let mut n0 = range.start;
    while n0 < range.end {
        let b = group.max(1).min(range.end - n0);
        sizes.push(b);
        n0 += b;
    }
    sizes
}

/// Equal shapes counted once with their multiplicity.
pub(super) fn merge_shapes(shapes: Vec<GemmShape>) -> Vec<GemmShape> {
    let mut merged: Vec<GemmShape> = Vec::new();
    for s in shapes {
        match merged
            .iter_mut()
            .find(|m| (m.m, m.n, m.k) == (s.m, s.n, s.k))
        {
            Some(m) => m.count += s.count,
            None => merged.push(s),
        }
    }
    merged
}

/// y = conv(x, w) by `version` (im2col where Winograd does not apply).
pub fn forward_by<T: CpuFloat>(version: CpuVersion, a: Forward<&[T], &mut [T]>) -> Result<()> {
    match version {
        CpuVersion::Winograd if winograd::applies(&a.conv, a.xs) => winograd::forward(a),
        _ => forward(a),
    }
}

/// The backward pass by `version` (im2col where Winograd does not apply).
pub fn backward_by<T: CpuFloat>(version: CpuVersion, a: Backward<&[T], &mut [T]>) -> Result<()> {
    match version {
        CpuVersion::Winograd if winograd::applies(&a.conv, a.xs) => winograd::backward(a),
        _ => backward(a),
    }
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
    let sets = per_range(
        xs.n,
        Some(y),
        ys.image(),
        |range, y_r, s: &mut Im2colScratch<T>| {
            let Some(y_r) = y_r else { return Ok(()) };
            let mut n0 = range.start;
            for b in group_sizes(range.clone(), group) {
                let ld = b * p;
                scratch::ensure_len(&mut s.col, k * ld);
                scratch::ensure_len(&mut s.out, conv.c_out * ld);
                let xg = &x[n0 * xs.image()..][..b * xs.image()];
                for (i, xn) in xg.chunks_exact(xs.image()).enumerate() {
                    im2col(xn, xs, conv, ys, &mut s.col, ld, i * p);
                }
                matmul(
                    wm,
                    MatRef::row_major(&s.col, k, ld),
                    &mut s.out,
                    ld,
                    T::ONE,
                    false,
                )?;
                let yg = &mut y_r[(n0 - range.start) * ys.image()..][..b * ys.image()];
                for (i, yn) in yg.chunks_exact_mut(ys.image()).enumerate() {
                    for (co, dst) in yn.chunks_exact_mut(p).enumerate() {
                        dst.copy_from_slice(&s.out[co * ld + i * p..][..p]);
                    }
                }
                n0 += b;
            }
            Ok(())
        },
    )?;
    sets.into_iter().for_each(scratch::give);
    Ok(())
}

/// Accumulates dw += sum_n dy_n col_n^T and, when `dx` is given, writes (or adds) dx =
/// conv^T(dy); both through GEMMs over groups of images as in the forward pass. One pass per
/// thread over its image range: im2col and the gathered dy serve both the weight gradient (a
/// partial per thread, summed in range order) and dx.
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
    let sets = per_range(
        xs.n,
        dx,
        xs.image(),
        |range, mut dx_r, s: &mut Im2colScratch<T>| {
            scratch::zeroed(&mut s.part, dw.len());
            let mut n0 = range.start;
            for b in group_sizes(range.clone(), group) {
                let ld = b * p;
                scratch::ensure_len(&mut s.col, k * ld);
                scratch::ensure_len(&mut s.out, conv.c_out * ld);
                for i in 0..b {
                    let xn = &x[(n0 + i) * xs.image()..][..xs.image()];
                    im2col(xn, xs, conv, ys, &mut s.col, ld, i * p);
                    // dy of the group gathered into a C_out x B P block.
                    let dyn_ = &dy[(n0 + i) * ys.image()..][..ys.image()];
                    for (co, src) in dyn_.chunks_exact(p).enumerate() {
                        s.out[co * ld + i * p..][..p].copy_from_slice(src);
                    }
                }
                let dyb = MatRef::row_major(&s.out, conv.c_out, ld);
                // dW^T = col dy^T rather than dW = dy col^T: both operands run along the
                // B P columns either way, and the gemm crate packs this orientation about
                // 1.2-1.6x faster when C_out is small next to C_in k k (measured at
                // convnet-small's shapes).
                let dy_t = MatRef::transposed(&s.out, conv.c_out, ld);
                matmul(
                    MatRef::row_major(&s.col, k, ld),
                    dy_t,
                    &mut s.part,
                    conv.c_out,
                    T::ONE,
                    true,
                )?;
                if let Some(dxr) = dx_r.as_deref_mut() {
                    matmul(wt, dyb, &mut s.col, ld, T::ONE, false)?;
                    let dxg = &mut dxr[(n0 - range.start) * xs.image()..][..b * xs.image()];
                    if !dx_accumulate {
                        dxg.fill(T::ZERO);
                    }
                    for (i, dxn) in dxg.chunks_exact_mut(xs.image()).enumerate() {
                        col2im_add(&s.col, ld, i * p, xs, conv, ys, dxn);
                    }
                }
                n0 += b;
            }
            Ok(())
        },
    )?;
    for s in sets {
        for (co, row) in dw.chunks_exact_mut(k).enumerate() {
            for (r, d) in row.iter_mut().enumerate() {
                *d = *d + s.part[r * conv.c_out + co];
            }
        }
        scratch::give(s);
    }
    Ok(())
}
