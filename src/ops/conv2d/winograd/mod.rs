//! The 3 x 3, stride-1 convolution on the CPU by Winograd's minimal filtering F(4 x 4, 3 x 3)
//! (Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR 2016): 36
//! multiplies per 4 x 4 output tile instead of 144, so a quarter of the direct method's GEMM
//! work. It covers 88% of ResNet18's multiplies (every 3 x 3 convolution of stride 1).
//!
//! One output tile of one channel pair is `Y = A^T [(G g G^T) ⊙ (B^T d B)] A` for the 6 x 6
//! input patch `d` and the 3 x 3 kernel `g`. Summed over input channels, each of the 36 points
//! xi of the transform domain becomes one GEMM over a group of images' tiles:
//!
//! - forward: `M_xi (C_out x T) = U_xi (C_out x C_in) V_xi (C_in x T)`, U = G w G^T, V = B^T d B,
//!   then each tile's `A^T m A` is scattered into y;
//! - dx: the same forward on dy with the kernels flipped by 180 degrees and C_in and C_out
//!   swapped, padding 2 - pad (the transposed convolution of stride 1 is a convolution);
//! - dW: the gradient of the identity above with respect to g,
//!   `dg = G^T [(B^T d B) ⊙ (A dy A^T)] G` per tile, summed over tiles in the transform
//!   domain: `S_xi (C_out x C_in) += (A dy A^T)_xi (C_out x T) V_xi^T (T x C_in)`.
//!
//! All three are exact in exact arithmetic; in float32 the transforms' constants (up to 8 and
//! 1/24) amplify rounding. Measured against the direct sum in float64 (tests/cpu/conv_versions.rs)
//! at a ResNet18 layer's shape (64 channels, 32 x 32): relative errors 1.7e-6 (y), 3.2e-6 (dW)
//! and 1.7e-6 (dx), against im2col's 3.0e-7, 4.0e-7 and 1.6e-7; the tests hold every case to
//! [`F32_ERROR_BOUND`].
//!
//! The transforms (`transforms.rs`) handle `T::LANES` tiles or channel pairs at once (AVX2
//! f32x8), in the element type. Buffers come from [`crate::scratch`]'s pool. Results depend
//! only on the inputs and the thread count.

mod transforms;

use rayon::prelude::*;

use super::cpu::{group_sizes, per_range};
use super::{Backward, Conv, Forward};
use crate::error::Result;
use crate::linalg::{matmul, GemmShape, MatRef};
use crate::ops::Shape4;
use crate::scratch;
use crate::simd::CpuFloat;

use transforms::*;

/// The largest relative error (Frobenius norm of the difference over that of the float64
/// result) that the tests accept for this version in float32, forward and backward.
pub const F32_ERROR_BOUND: f64 = 1e-5;

/// Fewer channels than this on either side and the transforms cost more than the GEMM work
/// they save (the first convolution, 3 -> 32 channels of convnet-small: 12% slower).
pub const MIN_CHANNELS: usize = 8;

/// Whether this version computes `conv` on inputs of shape `xs` (else the caller uses im2col).
pub fn applies(conv: &Conv, xs: Shape4) -> bool {
    conv.c_in >= MIN_CHANNELS
        && conv.c_out >= MIN_CHANNELS
        && conv.k == 3
        && conv.stride == 1
        && conv.pad <= 2
        && xs.h + 2 * conv.pad >= 3
        && xs.w + 2 * conv.pad >= 3
}

/// Where the tiles of a group of images lie, for an output of shape `ys` (per image).
#[derive(Debug, Clone, Copy)]
struct Tiling {
    /// Tiles per column and per row of one image.
    th: usize,
    tw: usize,
    /// The zero-padded input plane (6 x 6 patches of every tile fit inside it).
    ph: usize,
    pw: usize,
    /// The output plane rounded up to whole tiles.
    oh: usize,
    ow: usize,
}

impl Tiling {
    fn new(ys: Shape4) -> Tiling {
        let (th, tw) = (ys.h.div_ceil(TILE), ys.w.div_ceil(TILE));
        Tiling {
            th,
            tw,
            ph: TILE * th + 2,
            pw: TILE * tw + 2,
            oh: TILE * th,
            ow: TILE * tw,
        }
    }
    fn per_image(&self) -> usize {
        self.th * self.tw
    }
}

/// Per-thread buffers of one group of images.
#[derive(Default)]
struct Scratch<T> {
    /// Zero-padded input planes, [C_in][image][ph][pw].
    padded: Vec<T>,
    /// Transformed inputs V, [xi][C_in][tiles rounded up to LANES].
    v: Vec<T>,
    /// GEMM results M (or the transformed dy of the weight gradient), [xi][C_out][tiles].
    m: Vec<T>,
    /// The backward pass's dy in output planes rounded up to whole tiles, [C_out][image][oh][ow]
    /// (the forward pass writes its output directly).
    out: Vec<T>,
    /// Per tile: its patch's offset in a padded input plane, its output tile's in an output plane.
    in_off: Vec<usize>,
    out_off: Vec<usize>,
    /// Per tile of a forward group: its origin in the output, its rows and columns in the map.
    y_tiles: Vec<(usize, usize, usize)>,
    /// A thread's partial weight gradient in the transform domain, [C_out][xi][C_in].
    part: Vec<T>,
}

/// The transformed kernels of one call, [row][xi][col] (kept between calls by the pool).
#[derive(Default)]
struct Kernels<T>(Vec<T>);

impl<T: CpuFloat> Scratch<T> {
    /// Lays out `images` images' tiles; returns the tile count rounded up to whole vectors
    /// (the extra lanes repeat tile 0 and are never stored).
    fn tiles(&mut self, tiling: &Tiling, images: usize) -> usize {
        let tiles = images * tiling.per_image();
        let padded_tiles = tiles.div_ceil(T::LANES) * T::LANES;
        self.in_off.clear();
        self.out_off.clear();
        for t in 0..padded_tiles {
            let t = if t < tiles { t } else { 0 };
            let (i, rest) = (t / tiling.per_image(), t % tiling.per_image());
            let (ty, tx) = (rest / tiling.tw, rest % tiling.tw);
            self.in_off
                .push(i * tiling.ph * tiling.pw + TILE * (ty * tiling.pw + tx));
            self.out_off
                .push(i * tiling.oh * tiling.ow + TILE * (ty * tiling.ow + tx));
        }
        padded_tiles
    }
}

/// Copies `images` images of `x` (shape `xs`, each C x H x W) into zeroed planes of
/// `rows x cols` at offset (`pad`, `pad`), laid out [channel][image][rows][cols].
fn pad_planes<T: CpuFloat>(
    x: &[T],
    xs: Shape4,
    images: usize,
    (rows, cols, pad): (usize, usize, usize),
    out: &mut Vec<T>,
) {
    scratch::ensure_len(out, xs.c * images * rows * cols);
    let (top, bottom) = (pad * cols, (rows - pad - xs.h) * cols);
    for c in 0..xs.c {
        for i in 0..images {
            let src = &x[(i * xs.c + c) * xs.h * xs.w..][..xs.h * xs.w];
            let dst = &mut out[(c * images + i) * rows * cols..][..rows * cols];
            // Only the border is zeroed: the interior is about to be copied over.
            dst[..top].fill(T::ZERO);
            dst[rows * cols - bottom..].fill(T::ZERO);
            for (iy, row) in src.chunks_exact(xs.w).enumerate() {
                let line = &mut dst[(iy + pad) * cols..][..cols];
                line[..pad].fill(T::ZERO);
                line[pad..pad + xs.w].copy_from_slice(row);
                line[pad + xs.w..].fill(T::ZERO);
            }
        }
    }
}

/// `out (=|+=) conv(x)` for one group of `images` images by the transform above, with the
/// transformed kernels `u` ([xi][C_out][C_in] of `conv`).
#[allow(clippy::too_many_arguments)] // the op's arguments and its scratch, as the callers hold them
fn forward_group<T: CpuFloat>(
    x: &[T],
    xs: Shape4,
    images: usize,
    u: &[T],
    conv: &Conv,
    out: &mut [T],
    accumulate: bool,
    s: &mut Scratch<T>,
) -> Result<()> {
    let ys = conv.out_shape(xs);
    let tiling = Tiling::new(ys);
    let tp = s.tiles(&tiling, images);
    pad_planes(
        x,
        xs,
        images,
        (tiling.ph, tiling.pw, conv.pad),
        &mut s.padded,
    );
    transform_inputs(&s.padded, conv.c_in, &tiling, images, &s.in_off, &mut s.v);
    let (ci, co) = (conv.c_in, conv.c_out);
    scratch::ensure_len(&mut s.m, POINTS * co * tp);
    for xi in 0..POINTS {
        let u_xi = MatRef {
            data: &u[xi * ci..],
            rows: co,
            cols: ci,
            row_stride: POINTS * ci,
            col_stride: 1,
        };
        matmul(
            u_xi,
            MatRef::row_major(&s.v[xi * ci * tp..][..ci * tp], ci, tp),
            &mut s.m[xi * co * tp..][..co * tp],
            tp,
            T::ONE,
            false,
        )?;
    }
    // A^T m A per tile, each lane's 4 x 4 values straight into `out` (clipped at the map's
    // edge): tile t's channel-0 origin in `out` and its rows and columns inside the map.
    let (hw, tiles) = (ys.h * ys.w, images * tiling.per_image());
    s.y_tiles.clear();
    for t in 0..tiles {
        let (i, rest) = (t / tiling.per_image(), t % tiling.per_image());
        let (oy, ox) = (TILE * (rest / tiling.tw), TILE * (rest % tiling.tw));
        let origin = i * co * hw + oy * ys.w + ox;
        s.y_tiles
            .push((origin, (ys.h - oy).min(TILE), (ys.w - ox).min(TILE)));
    }
    crate::simd::dispatch(
        #[inline(always)]
        || {
            for c in 0..co {
                for t0 in (0..tp).step_by(T::LANES) {
                    let m: [[T::V; PATCH]; PATCH] = std::array::from_fn(|i| {
                        std::array::from_fn(|j| {
                            T::load(&s.m[((i * PATCH + j) * co + c) * tp + t0..])
                        })
                    });
                    let mut cols = [[T::splat(T::ZERO); PATCH]; TILE];
                    for j in 0..PATCH {
                        let col = output_1d::<T>(std::array::from_fn(|i| m[i][j]));
                        for a in 0..TILE {
                            cols[a][j] = col[a];
                        }
                    }
                    let lane_tiles = &s.y_tiles[t0.min(tiles)..(t0 + T::LANES).min(tiles)];
                    for (a, row) in cols.into_iter().enumerate() {
                        for (b, value) in output_1d::<T>(row).into_iter().enumerate() {
                            let mut buf = [T::ZERO; 8];
                            T::store(value, &mut buf);
                            for (&v, &(origin, rows, cols)) in buf.iter().zip(lane_tiles) {
                                if a < rows && b < cols {
                                    let at = &mut out[origin + c * hw + a * ys.w + b];
                                    *at = if accumulate { *at + v } else { v };
                                }
                            }
                        }
                    }
                }
            }
        },
    );
    Ok(())
}

/// Tiles per group of images: few enough that a group's transformed inputs and products stay
/// near the cache, enough to keep each GEMM efficient. Measured on ResNet18's four layer
/// shapes (2 cores, batch 256): 64 beat 128, 256 and 512 on all of them, by up to 25%.
const TILES_PER_GROUP: usize = 64;

/// Images per group: about [`TILES_PER_GROUP`] tiles, and a number of groups that is a multiple
/// of the thread count where there are enough images.
fn images_per_group(n: usize, per_image: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let want = TILES_PER_GROUP.div_ceil(per_image.max(1)).max(1);
    let mut groups = n.div_ceil(want).max(1);
    if n >= threads {
        groups = groups.div_ceil(threads) * threads;
    }
    n.div_ceil(groups).max(1)
}

/// The matrix products of one forward and one backward pass (dx included when `with_dx`), in
/// float32.
pub fn gemm_shapes(conv: &Conv, xs: Shape4, with_dx: bool) -> Vec<GemmShape> {
    let tiling = Tiling::new(conv.out_shape(xs));
    let group = images_per_group(xs.n, tiling.per_image());
    let (ci, co) = (conv.c_in, conv.c_out);
    // Tiles of b images, rounded up to whole f32 vectors as the products see them.
    let padded = |b: usize| (b * tiling.per_image()).div_ceil(8) * 8;
    let mut shapes = Vec::new();
    // Forward and backward both run groups within each thread's image range.
    for range in super::cpu::image_ranges(xs.n) {
        for b in group_sizes(range, group) {
            let tiles = b * tiling.per_image();
            shapes.push(GemmShape {
                m: co,
                n: padded(b),
                k: ci,
                count: POINTS,
            });
            shapes.push(GemmShape {
                m: co,
                n: ci,
                k: tiles,
                count: POINTS,
            });
            if with_dx {
                shapes.push(GemmShape {
                    m: ci,
                    n: padded(b),
                    k: co,
                    count: POINTS,
                });
            }
        }
    }
    super::cpu::merge_shapes(shapes)
}

/// y = conv(x, w) for a 3 x 3 convolution of stride 1 ([`applies`]).
pub fn forward<T: CpuFloat>(a: Forward<&[T], &mut [T]>) -> Result<()> {
    let Forward { x, xs, w, conv, y } = a;
    let ys = conv.out_shape(xs);
    let group = images_per_group(xs.n, Tiling::new(ys).per_image());
    let mut u: Kernels<T> = scratch::take();
    transform_kernels(w, &conv, false, &mut u.0);
    let sets = per_range(
        xs.n,
        Some(y),
        ys.image(),
        |range, y_r, s: &mut Scratch<T>| {
            let Some(y_r) = y_r else { return Ok(()) };
            let mut n0 = range.start;
            for b in group_sizes(range.clone(), group) {
                let xg = &x[n0 * xs.image()..][..b * xs.image()];
                let yg = &mut y_r[(n0 - range.start) * ys.image()..][..b * ys.image()];
                forward_group(xg, xs, b, &u.0, &conv, yg, false, s)?;
                n0 += b;
            }
            Ok(())
        },
    );
    scratch::give(u);
    sets?.into_iter().for_each(scratch::give);
    Ok(())
}

/// dw += the weight gradient and, when `dx` is given, dx (=|+=) the input gradient, for a
/// 3 x 3 convolution of stride 1 ([`applies`]). Threads take contiguous image ranges; their
/// partial weight gradients (in the transform domain) are added in range order.
pub fn backward<T: CpuFloat>(a: Backward<&[T], &mut [T]>) -> Result<()> {
    let (dx, dx_accumulate) = match a.dx {
        Some(g) => (Some(g.buf), g.accumulate),
        None => (None, false),
    };
    let mut u_flipped: Kernels<T> = scratch::take();
    if dx.is_some() {
        transform_kernels(a.w, &a.conv, true, &mut u_flipped.0);
    }
    let args = BackwardRange {
        x: a.x,
        xs: a.xs,
        dy: a.dy,
        conv: a.conv,
        u_flipped: &u_flipped.0,
        dx_accumulate,
    };
    let sets = per_range(
        a.xs.n,
        dx,
        a.xs.image(),
        |range, dx_r, s: &mut Scratch<T>| args.run(range, dx_r, s),
    );
    scratch::give(u_flipped);
    let mut sets = sets?.into_iter();
    let Some(mut first) = sets.next() else {
        return Ok(());
    };
    let rest: Vec<Scratch<T>> = sets.collect();
    // The partials added in range order, in parallel over disjoint chunks.
    const CHUNK: usize = 1 << 14;
    first
        .part
        .par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(i, sum)| {
            for other in &rest {
                for (d, &p) in sum.iter_mut().zip(&other.part[i * CHUNK..]) {
                    *d = *d + p;
                }
            }
        });
    add_kernel_grads(&first.part, a.conv.c_in, a.dw);
    scratch::give(first);
    for s in rest {
        scratch::give(s);
    }
    Ok(())
}

/// What one thread's image range of the backward pass reads.
struct BackwardRange<'a, T> {
    x: &'a [T],
    xs: Shape4,
    dy: &'a [T],
    conv: Conv,
    /// The transposed convolution's kernels (empty without dx).
    u_flipped: &'a [T],
    dx_accumulate: bool,
}

impl<T: CpuFloat> BackwardRange<'_, T> {
    /// The range's partial weight gradient (in the returned set's `part`) and its images' dx.
    fn run(
        &self,
        range: std::ops::Range<usize>,
        mut dx: Option<&mut [T]>,
        s: &mut Scratch<T>,
    ) -> Result<()> {
        let (xs, conv) = (self.xs, self.conv);
        let ys = conv.out_shape(xs);
        let tiling = Tiling::new(ys);
        let group = images_per_group(xs.n, tiling.per_image());
        let (ci, co) = (conv.c_in, conv.c_out);
        // dx = conv(dy, flipped w) with C_in and C_out swapped and padding 2 - pad.
        let transposed = Conv {
            c_in: co,
            c_out: ci,
            k: 3,
            stride: 1,
            pad: 2 - conv.pad,
        };
        scratch::zeroed(&mut s.part, co * POINTS * ci);
        let mut n0 = range.start;
        while n0 < range.end {
            let b = group.min(range.end - n0);
            let xg = &self.x[n0 * xs.image()..][..b * xs.image()];
            let dyg = &self.dy[n0 * ys.image()..][..b * ys.image()];
            let tp = s.tiles(&tiling, b);
            let tiles = b * tiling.per_image();
            pad_planes(xg, xs, b, (tiling.ph, tiling.pw, conv.pad), &mut s.padded);
            transform_inputs(&s.padded, ci, &tiling, b, &s.in_off, &mut s.v);
            // dy in whole-tile planes (zero past the output's edge), then A dy A^T.
            pad_planes(dyg, ys, b, (tiling.oh, tiling.ow, 0), &mut s.out);
            transform_output_grads(&s.out, co, &tiling, b, &s.out_off, &mut s.m);
            for xi in 0..POINTS {
                // S_xi += G_xi (C_out x tiles) V_xi^T (tiles x C_in); the padding lanes past
                // `tiles` are left out of the sum.
                let g_xi = MatRef {
                    data: &s.m[xi * co * tp..][..co * tp],
                    rows: co,
                    cols: tiles,
                    row_stride: tp,
                    col_stride: 1,
                };
                let v_xi_t = MatRef {
                    data: &s.v[xi * ci * tp..][..ci * tp],
                    rows: tiles,
                    cols: ci,
                    row_stride: 1,
                    col_stride: tp,
                };
                matmul(
                    g_xi,
                    v_xi_t,
                    &mut s.part[xi * ci..],
                    POINTS * ci,
                    T::ONE,
                    true,
                )?;
            }
            if let Some(dxr) = dx.as_deref_mut() {
                let off = (n0 - range.start) * xs.image();
                let dxg = &mut dxr[off..off + b * xs.image()];
                forward_group(
                    dyg,
                    ys,
                    b,
                    self.u_flipped,
                    &transposed,
                    dxg,
                    self.dx_accumulate,
                    s,
                )?;
            }
            n0 += b;
        }
        Ok(())
    }
}
