//! The transforms of Winograd's F(4 x 4, 3 x 3), vectorised across tiles or channel pairs:
//! the 1-d factors B^T, A^T, A and G, the input, dy and kernel transforms and the weight
//! gradient's way back (see `mod.rs` for where each is used).

use rayon::prelude::*;

use super::Tiling;
use crate::ops::conv2d::Conv;
use crate::scratch;
use crate::simd::CpuFloat;

/// Output tile side.
pub(super) const TILE: usize = 4;
/// Input patch side: TILE + 3 - 1.
pub(super) const PATCH: usize = 6;
/// Points of the transform domain: one GEMM each.
pub(super) const POINTS: usize = PATCH * PATCH;

/// G (6 x 3): the kernel transform, `U = G g G^T`.
pub(super) const G: [[f64; 3]; PATCH] = [
    [1.0 / 4.0, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];

/// `B^T d` for one column of a patch: the input transform's 1-d factor (rows of B^T:
/// [4 0 -5 0 1 0], [0 -4 -4 1 1 0], [0 4 -4 -1 1 0], [0 -2 -1 2 1 0], [0 2 -1 -2 1 0],
/// [0 4 0 -5 0 1]), written out so that no multiply by zero is spent.
#[inline(always)]
pub(super) fn input_1d<T: CpuFloat>(d: [T::V; PATCH]) -> [T::V; PATCH] {
    let (two, four, five) = (
        T::splat(T::of(2.0)),
        T::splat(T::of(4.0)),
        T::splat(T::of(5.0)),
    );
    [
        four * d[0] - five * d[2] + d[4],
        d[4] + d[3] - four * (d[1] + d[2]),
        d[4] - d[3] + four * (d[1] - d[2]),
        d[4] - d[2] + two * (d[3] - d[1]),
        d[4] - d[2] - two * (d[3] - d[1]),
        four * d[1] - five * d[3] + d[5],
    ]
}

/// `A^T m`: the output transform's 1-d factor (rows of A^T: [1 1 1 1 1 0], [0 1 -1 2 -2 0],
/// [0 1 1 4 4 0], [0 1 -1 8 -8 1]).
#[inline(always)]
pub(super) fn output_1d<T: CpuFloat>(m: [T::V; PATCH]) -> [T::V; TILE] {
    let (two, four, eight) = (
        T::splat(T::of(2.0)),
        T::splat(T::of(4.0)),
        T::splat(T::of(8.0)),
    );
    let (s12, d12, s34, d34) = (m[1] + m[2], m[1] - m[2], m[3] + m[4], m[3] - m[4]);
    [
        m[0] + s12 + s34,
        d12 + two * d34,
        s12 + four * s34,
        d12 + eight * d34 + m[5],
    ]
}

/// `A y`: the transpose of the output transform, for the weight gradient's dy tiles.
#[inline(always)]
pub(super) fn output_grad_1d<T: CpuFloat>(y: [T::V; TILE]) -> [T::V; PATCH] {
    let (two, four, eight) = (
        T::splat(T::of(2.0)),
        T::splat(T::of(4.0)),
        T::splat(T::of(8.0)),
    );
    let (even, odd) = (y[0] + four * y[2], two * y[1] + eight * y[3]);
    [
        y[0],
        y[0] + y[1] + y[2] + y[3],
        y[0] - y[1] + y[2] - y[3],
        even + odd,
        even - odd,
        y[3],
    ]
}

/// Loads `lanes <= T::LANES` elements (the rest zero).
#[inline(always)]
pub(super) fn load_lanes<T: CpuFloat>(s: &[T], lanes: usize) -> T::V {
    if lanes == T::LANES {
        T::load(s)
    } else {
        let mut b = [T::ZERO; 8];
        b[..lanes].copy_from_slice(&s[..lanes]);
        T::load(&b)
    }
}

/// Stores the first `lanes <= T::LANES` lanes of `v`.
#[inline(always)]
pub(super) fn store_lanes<T: CpuFloat>(v: T::V, s: &mut [T], lanes: usize) {
    if lanes == T::LANES {
        T::store(v, s)
    } else {
        let mut b = [T::ZERO; 8];
        T::store(v, &mut b);
        s[..lanes].copy_from_slice(&b[..lanes]);
    }
}

/// G as vectors.
#[inline(always)]
pub(super) fn g_vectors<T: CpuFloat>() -> [[T::V; 3]; PATCH] {
    G.map(|row| row.map(|c| T::splat(T::of(c))))
}

/// Gathers a `n x n` patch of `T::LANES` tiles (patch origins `offsets`) from `plane` (row
/// stride `stride`) as vectors across the tiles.
#[inline(always)]
pub(super) fn gather<T: CpuFloat, const N: usize>(
    plane: &[T],
    offsets: &[usize],
    stride: usize,
) -> [[T::V; N]; N] {
    let mut lanes = [[[T::ZERO; 8]; N]; N];
    for (l, &off) in offsets.iter().take(T::LANES).enumerate() {
        for (r, lane_row) in lanes.iter_mut().enumerate() {
            let row: &[T] = &plane[off + r * stride..][..N];
            for (k, &value) in row.iter().enumerate() {
                lane_row[k][l] = value;
            }
        }
    }
    lanes.map(|row| row.map(|v| T::load(&v)))
}

/// V = B^T d B for every channel and tile: `padded` holds `channels` channels' planes.
pub(super) fn transform_inputs<T: CpuFloat>(
    padded: &[T],
    channels: usize,
    tiling: &Tiling,
    images: usize,
    in_off: &[usize],
    v: &mut Vec<T>,
) {
    let planes = (padded, images * tiling.ph * tiling.pw, tiling.pw);
    transform_tiles::<T, PATCH>(planes, channels, in_off, v, input_1d::<T>);
}

/// A dy^ A^T for every output channel and tile (the weight gradient's transformed dy): `planes`
/// holds dy in output planes rounded up to whole tiles, [C_out][image][oh][ow].
pub(super) fn transform_output_grads<T: CpuFloat>(
    planes: &[T],
    channels: usize,
    tiling: &Tiling,
    images: usize,
    out_off: &[usize],
    g: &mut Vec<T>,
) {
    let planes = (planes, images * tiling.oh * tiling.ow, tiling.ow);
    transform_tiles::<T, TILE>(planes, channels, out_off, g, output_grad_1d::<T>);
}

/// `out[xi][c][t] = (F p F^T)[xi]` for the N x N patch p of every channel c and tile t, where
/// `one_d` is the 1-d factor F (N values to 6); `planes` = (the channels' planes, the length
/// of one channel's, their row stride); `offsets` holds each tile's patch origin.
#[inline(always)]
fn transform_tiles<T: CpuFloat, const N: usize>(
    (planes, plane, stride): (&[T], usize, usize),
    channels: usize,
    offsets: &[usize],
    out: &mut Vec<T>,
    one_d: impl Fn([T::V; N]) -> [T::V; PATCH],
) {
    let tp = offsets.len();
    scratch::ensure_len(out, POINTS * channels * tp);
    crate::simd::dispatch(
        #[inline(always)]
        || {
            for c in 0..channels {
                let channel = &planes[c * plane..][..plane];
                for t0 in (0..tp).step_by(T::LANES) {
                    let p = gather::<T, N>(channel, &offsets[t0..], stride);
                    let mut cols = [[T::splat(T::ZERO); N]; PATCH];
                    for k in 0..N {
                        let col = one_d(std::array::from_fn(|r| p[r][k]));
                        for i in 0..PATCH {
                            cols[i][k] = col[i];
                        }
                    }
                    for (i, row) in cols.into_iter().enumerate() {
                        for (j, value) in one_d(row).into_iter().enumerate() {
                            T::store(
                                value,
                                &mut out[((i * PATCH + j) * channels + c) * tp + t0..],
                            );
                        }
                    }
                }
            }
        },
    );
}

/// U = G k G^T for the 3 x 3 kernel k of every channel pair (row, col), laid out
/// [row][xi][col] (U_xi is a matrix of row stride 36 cols). `flipped`: the kernels of the
/// transposed convolution (rows are w's input channels, columns its output channels, each kernel
/// rotated by 180 degrees); else w's own (rows C_out). Vectorised across columns.
pub(super) fn transform_kernels<T: CpuFloat>(w: &[T], conv: &Conv, flipped: bool, u: &mut Vec<T>) {
    let (rows, cols) = if flipped {
        (conv.c_in, conv.c_out)
    } else {
        (conv.c_out, conv.c_in)
    };
    scratch::ensure_len(u, rows * POINTS * cols);
    u.par_chunks_mut(POINTS * cols)
        .enumerate()
        .for_each(|(r, u_r)| {
            crate::simd::dispatch(
                #[inline(always)]
                || {
                    let g = g_vectors::<T>();
                    for c0 in (0..cols).step_by(T::LANES) {
                        let lanes = (cols - c0).min(T::LANES);
                        let mut buf = [[T::ZERO; 8]; 9];
                        // `l` is the lane in each of the nine kernel positions' vectors.
                        #[allow(clippy::needless_range_loop)]
                        for l in 0..lanes {
                            let (co, ci) = if flipped { (c0 + l, r) } else { (r, c0 + l) };
                            let kernel = &w[(co * conv.c_in + ci) * 9..][..9];
                            for (ab, &v) in kernel.iter().enumerate() {
                                // A flipped kernel's (a, b) is the original's (2 - a, 2 - b).
                                buf[if flipped { 8 - ab } else { ab }][l] = v;
                            }
                        }
                        let k: [[T::V; 3]; 3] = std::array::from_fn(|a| {
                            std::array::from_fn(|b| T::load(&buf[a * 3 + b]))
                        });
                        // t = G k (6 x 3), then U = t G^T (6 x 6).
                        let t: [[T::V; 3]; PATCH] = std::array::from_fn(|i| {
                            std::array::from_fn(|b| {
                                g[i][0] * k[0][b] + g[i][1] * k[1][b] + g[i][2] * k[2][b]
                            })
                        });
                        for i in 0..PATCH {
                            for j in 0..PATCH {
                                let v = t[i][0] * g[j][0] + t[i][1] * g[j][1] + t[i][2] * g[j][2];
                                store_lanes::<T>(v, &mut u_r[(i * PATCH + j) * cols + c0..], lanes);
                            }
                        }
                    }
                },
            )
        });
}

/// dw[co][ci] += G^T S G for the transform-domain gradient S ([C_out][xi][C_in]).
pub(super) fn add_kernel_grads<T: CpuFloat>(sum: &[T], ci: usize, dw: &mut [T]) {
    dw.par_chunks_mut(ci * 9)
        .zip(sum.par_chunks(POINTS * ci))
        .for_each(|(dw_o, s_o)| {
            crate::simd::dispatch(
                #[inline(always)]
                || {
                    let g = g_vectors::<T>();
                    for c0 in (0..ci).step_by(T::LANES) {
                        let lanes = (ci - c0).min(T::LANES);
                        let s: [[T::V; PATCH]; PATCH] = std::array::from_fn(|i| {
                            std::array::from_fn(|j| {
                                load_lanes::<T>(&s_o[(i * PATCH + j) * ci + c0..], lanes)
                            })
                        });
                        // t = G^T s (3 x 6), then d = t G (3 x 3).
                        let t: [[T::V; PATCH]; 3] = std::array::from_fn(|k| {
                            std::array::from_fn(|j| {
                                (1..PATCH).fold(g[0][k] * s[0][j], |acc, i| acc + g[i][k] * s[i][j])
                            })
                        });
                        for k in 0..3 {
                            for l in 0..3 {
                                let d = (1..PATCH)
                                    .fold(t[k][0] * g[0][l], |acc, j| acc + t[k][j] * g[j][l]);
                                let mut buf = [T::ZERO; 8];
                                T::store(d, &mut buf);
                                for (lane, &v) in buf.iter().enumerate().take(lanes) {
                                    let slot = &mut dw_o[(c0 + lane) * 9 + k * 3 + l];
                                    *slot = *slot + v;
                                }
                            }
                        }
                    }
                },
            )
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The 1-d identity behind the transforms, in float64: for a 6-vector d and a 3-vector g,
    /// A^T [(G g) ⊙ (B^T d)] is the 4 outputs of the correlation of d with g.
    #[test]
    fn the_transforms_compute_a_correlation() {
        let d: [f64; 6] = [0.3, -1.2, 2.5, 0.7, -0.4, 1.9];
        let g: [f64; 3] = [0.8, -0.5, 1.3];
        let bd = input_1d::<f64>(d.map(f64::splat));
        let gg: [f64; 6] = std::array::from_fn(|i| (0..3).map(|k| G[i][k] * g[k]).sum());
        let prod: [<f64 as CpuFloat>::V; 6] = std::array::from_fn(|i| bd[i] * f64::splat(gg[i]));
        let y = output_1d::<f64>(prod);
        for (i, yi) in y.iter().enumerate() {
            let want: f64 = (0..3).map(|k| d[i + k] * g[k]).sum();
            assert!((yi.to_array()[0] - want).abs() < 1e-12, "y[{i}]");
        }
        // A y is the transpose of A^T: <A^T m, y> = <m, A y>.
        let m: [f64; 6] = [0.1, 0.2, -0.3, 0.4, 0.5, -0.6];
        let yv: [f64; 4] = [1.5, -0.5, 0.25, 2.0];
        let at_m = output_1d::<f64>(m.map(f64::splat));
        let a_y = output_grad_1d::<f64>(yv.map(f64::splat));
        let lhs: f64 = (0..4).map(|i| at_m[i].to_array()[0] * yv[i]).sum();
        let rhs: f64 = (0..6).map(|i| a_y[i].to_array()[0] * m[i]).sum();
        assert!((lhs - rhs).abs() < 1e-12);
    }
}
