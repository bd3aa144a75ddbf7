//! The fast CPU loss, fused in the CPU's own way; generic over f32 and f64.
//!
//! Rows are cut into blocks of [`ROW_BLOCK`]; rayon hands blocks to threads. For one block the
//! thread forms the block's similarity rows S = F_blk F^T (a GEMM through the `gemm` crate)
//! into a B x N buffer of its own, and while those rows are hot in cache it forms, row by
//! row, the exponentials, D_a, the loss terms, R_a and then the gradient coefficients g_ab in
//! place, and finishes with a second GEMM, dF_blk = G_blk F. The whole N x N matrix is never
//! stored: memory is O(N d) plus one B x N buffer per thread.
//!
//! `both-sides` adds the key-side term (G^T F)_b = sum_a g_ab f_a with a second sweep over
//! blocks of keys b: S is symmetric, so the same GEMM gives s_ab for all a, and g_ab is
//! rebuilt from the per-row scalars (shift_a, 1/D_a, R_a) kept from the first sweep. Every
//! output row is written by one thread in a fixed order, so results are deterministic.
//!
//! Numerics: each row is offset by its own maximum similarity (not the fixed 1/tau of the
//! kernels), so the largest term is exp(0) = 1 and D_a >= 1 for every tau; exp and ln are
//! `simd`'s vector versions (compiled for the CPU's widest vectors at run time); row sums accumulate in f64. 1 - Q_ab is formed as 1 - q in
//! the working precision except for the row's largest negative b*: when one negative is far
//! closer than the partner, Q_ab* -> 1 and 1 - q would cancel (PyTorch's float32 reference
//! then returns garbage or inf); there it is (D_a - e_ab*) / D_a with D_a - e_ab* summed from
//! the other terms. Every other negative has Q_ab <= 1/2 (mu >= 1), so 1 - q is safe.

use rayon::prelude::*;

use super::{partner, validate_input, GradSemantics, LossConfig};
use crate::error::Result;
use crate::linalg::{matmul, MatRef};
use crate::ops::normalize_rows;
use crate::simd::{map_row, map_row_with, row_max, sum_row, CpuFloat};

/// Rows per block: big enough for an efficient GEMM, small enough that a block of similarity
/// rows (B x N) stays in a core's cache for N up to a few thousand.
pub const ROW_BLOCK: usize = 64;

/// What the fused CPU loss returns.
#[derive(Debug, Clone)]
pub struct CpuLossOutput<T> {
    /// L = (1/N) sum_a l_a, accumulated in f64.
    pub loss: f64,
    /// dL/dz (N x d) when asked for ([`instance_loss_normalized`]: dL/df).
    pub grad_z: Option<Vec<T>>,
}

/// Per-row scalars of the first sweep, kept for the key-side sweep of `both-sides`.
#[derive(Debug, Clone, Copy, Default)]
struct RowScalars<T> {
    shift: T,
    inv_denom: T,
    r: T,
    /// The row's largest negative b*, whose 1 - Q_ab* is formed without cancellation, and
    /// its g_ab* (valid when a gradient was asked for).
    dominant: usize,
    dominant_g: T,
}

/// The loss of the raw embeddings `z` (N x d, row-major) and, when `with_grad`, dL/dz.
pub fn instance_loss<T: CpuFloat>(
    z: &[T],
    n: usize,
    d: usize,
    cfg: &LossConfig,
    with_grad: bool,
) -> Result<CpuLossOutput<T>> {
    cfg.validate()?;
    validate_input(z, n, d)?;
    let (f, norms) = normalize_rows::cpu::forward(z, n, d)?;
    let out = loss_of_rows(&f, n, d, cfg, with_grad)?;
    let grad_z = match out.grad_z {
        Some(grad_f) => Some(normalize_rows::cpu::backward(&f, &norms, &grad_f, n, d)?),
        None => None,
    };
    Ok(CpuLossOutput {
        loss: out.loss,
        grad_z,
    })
}

/// The loss of embeddings `f` (N x d) that the caller has already normalised (each row of
/// unit length: the similarities are f_a . f_b as given, no row is rescaled), and, when
/// `with_grad`, dL/df. For a model whose last layer normalises, so that the rows are not
/// normalised twice.
pub fn instance_loss_normalized<T: CpuFloat>(
    f: &[T],
    n: usize,
    d: usize,
    cfg: &LossConfig,
    with_grad: bool,
) -> Result<CpuLossOutput<T>> {
    cfg.validate()?;
    validate_input(f, n, d)?;
    loss_of_rows(f, n, d, cfg, with_grad)
}

/// The two sweeps over the rows `f` (see the module documentation); the gradient is dL/df.
fn loss_of_rows<T: CpuFloat>(
    f: &[T],
    n: usize,
    d: usize,
    cfg: &LossConfig,
    with_grad: bool,
) -> Result<CpuLossOutput<T>> {
    let mut grad_f = vec![T::ZERO; if with_grad { n * d } else { 0 }];
    let mut row_loss = vec![0.0f64; n];
    let mut scalars = vec![RowScalars::<T>::default(); n];
    let grad_scale = T::of(1.0 / (n as f64 * cfg.tau));
    let selecting = cfg.negatives != super::Negatives::All;
    let record = with_grad && selecting && cfg.semantics == GradSemantics::BothSides;
    let mut dropped = DroppedPairs::new(n, record)?;

    // Sweep 1: queries. Each block owns its rows of grad_f, row_loss and scalars.
    let grad_blocks: Vec<&mut [T]> = if with_grad {
        grad_f.chunks_mut(ROW_BLOCK * d).collect()
    } else {
        (0..n.div_ceil(ROW_BLOCK)).map(|_| &mut [][..]).collect()
    };
    grad_blocks
        .into_par_iter()
        .zip(row_loss.par_chunks_mut(ROW_BLOCK))
        .zip(scalars.par_chunks_mut(ROW_BLOCK))
        .zip(dropped.rows.par_chunks_mut(ROW_BLOCK))
        .enumerate()
        .try_for_each_init(
            || vec![T::ZERO; ROW_BLOCK * n],
            |buf, (block, (((grad_block, loss_block), scalar_block), bits))| -> Result<()> {
                let r0 = block * ROW_BLOCK;
                let rows = loss_block.len();
                let s = &mut buf[..rows * n];
                similarity_rows(f, r0, rows, n, d, s)?;
                // Compiled for the CPU's widest vectors (simd::dispatch), once per block.
                crate::simd::dispatch(
                    #[inline(always)]
                    || {
                        for (i, row) in s.chunks_exact_mut(n).enumerate() {
                            let (loss, sc) = query_row(row, r0 + i, cfg, with_grad, &mut bits[i]);
                            loss_block[i] = loss;
                            scalar_block[i] = sc;
                        }
                    },
                );
                if with_grad {
                    matmul(
                        MatRef::row_major(s, rows, n),
                        MatRef::row_major(f, n, d),
                        grad_block,
                        d,
                        grad_scale,
                        false,
                    )?;
                }
                Ok(())
            },
        )?;
    let loss = row_loss.iter().sum::<f64>() / n as f64;
    if !with_grad {
        return Ok(CpuLossOutput { loss, grad_z: None });
    }

    if cfg.semantics == GradSemantics::BothSides {
        let shift: Vec<T> = scalars.iter().map(|s| s.shift).collect();
        let inv_denom: Vec<T> = scalars.iter().map(|s| s.inv_denom).collect();
        let r: Vec<T> = scalars.iter().map(|s| s.r).collect();
        // (b*, a, g_ab*) sorted by key b*, so that each key block finds its exact entries.
        let mut dominant: Vec<(usize, usize, T)> = scalars
            .iter()
            .enumerate()
            .map(|(a, s)| (s.dominant, a, s.dominant_g))
            .filter(|&(b, a, _)| b != a)
            .collect();
        dominant.sort_by_key(|&(b, a, _)| (b, a));
        // Sweep 2: keys. Row b of the block buffer becomes (g_ab) over all queries a.
        grad_f
            .par_chunks_mut(ROW_BLOCK * d)
            .enumerate()
            .try_for_each_init(
                || vec![T::ZERO; ROW_BLOCK * n],
                |buf, (block, grad_block)| -> Result<()> {
                    let r0 = block * ROW_BLOCK;
                    let rows = grad_block.len() / d;
                    let s = &mut buf[..rows * n];
                    similarity_rows(f, r0, rows, n, d, s)?;
                    crate::simd::dispatch(
                        #[inline(always)]
                        || {
                            for (i, row) in s.chunks_exact_mut(n).enumerate() {
                                let pairs = selecting.then_some(&dropped);
                                key_row(row, r0 + i, cfg, [&shift, &inv_denom, &r], pairs);
                            }
                        },
                    );
                    let first = dominant.partition_point(|&(b, _, _)| b < r0);
                    for &(b, a, g) in dominant[first..]
                        .iter()
                        .take_while(|&&(b, _, _)| b < r0 + rows)
                    {
                        s[(b - r0) * n + a] = g;
                    }
                    matmul(
                        MatRef::row_major(s, rows, n),
                        MatRef::row_major(f, n, d),
                        grad_block,
                        d,
                        grad_scale,
                        true,
                    )
                },
            )?;
    }
    Ok(CpuLossOutput {
        loss,
        grad_z: Some(grad_f),
    })
}

/// s = F[r0 .. r0 + rows] F^T: the block's similarity rows (rows x N).
fn similarity_rows<T: CpuFloat>(
    f: &[T],
    r0: usize,
    rows: usize,
    n: usize,
    d: usize,
    s: &mut [T],
) -> Result<()> {
    matmul(
        MatRef::row_major(&f[r0 * d..(r0 + rows) * d], rows, d),
        MatRef::transposed(f, n, d),
        s,
        n,
        T::ONE,
        false,
    )
}

/// Row `a` as a query. On entry `row` holds s_ab = f_a . f_b (b = 0..N); on exit, when
/// `with_grad`, it holds g_ab (zero at b = a). Returns l_a and the row's scalars.
#[inline(always)] // into simd::dispatch's function for the CPU's vectors
fn query_row<T: CpuFloat>(
    row: &mut [T],
    a: usize,
    cfg: &LossConfig,
    with_grad: bool,
    dropped_bits: &mut [u64],
) -> (f64, RowScalars<T>) {
    let n = row.len();
    let p = partner(a, n);
    let mu = cfg.mu;
    let inv_tau = T::of(1.0 / cfg.tau);
    let s_ap: f64 = row[p].into();
    let dropped = cfg.negatives.dropped(row, a);
    let row_scale = cfg.negatives.row_scale(n);
    // nu: the log(1 - Q) terms' weight (mu, or mu F under the official hard/easy scale).
    let nu = cfg.negatives.log_weight(mu);

    // The diagonal never enters: put it below any cosine similarity for the maximum, then 0.
    row[a] = T::of(-3.0);
    let shift = row_max(row);
    let (shift_v, inv_tau_v) = (T::splat(shift), T::splat(inv_tau));
    map_row(row, T::ZERO, |s| T::exp((s - shift_v) * inv_tau_v));
    row[a] = T::ZERO;
    // Left-out negatives are absent: a zero term is one (like the diagonal's).
    for &b in &dropped {
        row[b] = T::ZERO;
        if let Some(word) = dropped_bits.get_mut(b / 64) {
            *word |= 1 << (b % 64);
        }
    }

    // D_a = e_ap + mu * (sum of the negatives). The partner and the largest negative b* are
    // zeroed while the rest is summed, so nothing is subtracted: D_a - e_ab* is exact too.
    let e_p = row[p];
    row[p] = T::ZERO;
    let e_max = row_max(row);
    let dominant = row.iter().position(|&e| e == e_max).unwrap_or(a);
    row[dominant] = T::ZERO;
    let [rest] = sum_row(row, |e| [e]);
    let (e_p64, e_max64): (f64, f64) = (e_p.into(), e_max.into());
    let denom = e_p64 + mu * (rest + e_max64);
    let inv_denom = T::of(1.0 / denom);

    // log(1 - Q_ab) and Q_ab / (1 - Q_ab) over the other negatives; the zeroed diagonal,
    // partner and b* give log(1) = 0 and 0, so the whole row can be swept.
    let (one, inv_denom_v) = (T::splat(T::ONE), T::splat(inv_denom));
    let [log_one_minus_q, r_rest] = sum_row(row, |e| {
        let q = e * inv_denom_v;
        let one_minus_q = one - q;
        [T::ln_one_minus(q), q / one_minus_q]
    });
    // b*'s terms from 1 - Q_ab* = (e_ap + mu * rest + (mu - 1) e_ab*) / D_a.
    let (q_max, one_minus_q_max) = if dominant == a {
        (0.0, 1.0) // no negative (cannot happen for N >= 4; kept total)
    } else {
        (
            e_max64 / denom,
            (e_p64 + mu * rest + (mu - 1.0) * e_max64) / denom,
        )
    };
    let r = r_rest + q_max / one_minus_q_max;
    let shift64: f64 = shift.into();
    let loss = row_scale
        * (denom.ln() - (s_ap - shift64) / cfg.tau - nu * (log_one_minus_q + one_minus_q_max.ln()));
    let mut scalars = RowScalars {
        shift,
        inv_denom,
        r: T::of(r),
        dominant,
        dominant_g: T::ZERO,
    };

    if with_grad {
        // Negatives: g_ab = mu Q (1 + (nu/mu)/(1 - Q) - nu R_a); the zeroed entries stay 0.
        // (nu/mu is exactly 1 but for the official hard/easy scale.)
        let ratio = nu / mu;
        let (mu_v, ratio_v, nu_r) = (
            T::splat(T::of(mu)),
            T::splat(T::of(ratio)),
            T::splat(T::of(nu * r)),
        );
        map_row(row, T::ZERO, |e| {
            let q = e * inv_denom_v;
            mu_v * q * (one + ratio_v / (one - q) - nu_r)
        });
        if dominant != a {
            scalars.dominant_g = T::of(mu * q_max * (1.0 + ratio / one_minus_q_max - nu * r));
            row[dominant] = scalars.dominant_g;
        }
        // The partner: g_ap = -1 + P_a - nu P_a R_a.
        let p_a = e_p64 / denom;
        row[p] = T::of(-1.0 + p_a - nu * p_a * r);
        if row_scale != 1.0 {
            let scale = T::splat(T::of(row_scale));
            map_row(row, T::ZERO, |g| g * scale);
            scalars.dominant_g = T::of(row_scale) * scalars.dominant_g;
        }
    } else {
        row[p] = e_p;
        row[dominant] = e_max;
    }
    (loss, scalars)
}

/// Row `b` as a key. On entry `row` holds s_ab over all queries a; on exit g_ab, rebuilt from
/// each query's scalars (shift_a, 1/D_a, R_a). Entries where b is query a's largest negative
/// are overwritten by the caller with the exact values of the first sweep.
#[inline(always)] // into simd::dispatch's function for the CPU's vectors
fn key_row<T: CpuFloat>(
    row: &mut [T],
    b: usize,
    cfg: &LossConfig,
    scalars: [&[T]; 3],
    dropped: Option<&DroppedPairs>,
) {
    let n = row.len();
    let a_partner = partner(b, n); // the one query whose partner is b
    let s_partner: f64 = row[a_partner].into();
    let mu = cfg.mu;
    let nu = cfg.negatives.log_weight(mu);
    let (one, mu_v, nu_v, ratio_v, inv_tau) = (
        T::splat(T::ONE),
        T::splat(T::of(mu)),
        T::splat(T::of(nu)),
        T::splat(T::of(nu / mu)),
        T::splat(T::of(1.0 / cfg.tau)),
    );
    map_row_with(row, scalars, |s, [shift, inv_denom, r]| {
        let q = T::exp((s - shift) * inv_tau) * inv_denom;
        mu_v * q * (one + ratio_v / (one - q) - nu_v * r)
    });
    row[b] = T::ZERO;
    let [shift, inv_denom, r] = scalars.map(|v| v[a_partner].into());
    let p = ((s_partner - shift) / cfg.tau).exp() * inv_denom;
    row[a_partner] = T::of(-1.0 + p - nu * p * r);
    if let Some(dropped) = dropped {
        for (a, g) in row.iter_mut().enumerate() {
            if dropped.contains(a, b) {
                *g = T::ZERO;
            }
        }
        let scale = T::splat(T::of(cfg.negatives.row_scale(n)));
        map_row(row, T::ZERO, |g| g * scale);
    }
}

/// Which (query, key) pairs a negative selection leaves out: a row of N bits per query, kept
/// for the key sweep of `both-sides` (the selection of each query is made in the query sweep;
/// remaking it from the key side could differ in the last bit of a tied similarity). One
/// vector per row, so that each block of the query sweep writes only its own.
struct DroppedPairs {
    rows: Vec<Vec<u64>>,
}

impl DroppedPairs {
    /// Bits for `n` rows when `record`, else empty rows.
    fn new(n: usize, record: bool) -> Result<DroppedPairs> {
        if !record {
            return Ok(DroppedPairs {
                rows: vec![Vec::new(); n],
            });
        }
        let words = n.div_ceil(64) as u64;
        crate::limits::check_allocation(
            "the negative selection's N x N bits (both-sides)",
            words.checked_mul(8 * n as u64),
        )?;
        Ok(DroppedPairs {
            rows: vec![vec![0; words as usize]; n],
        })
    }

    fn contains(&self, a: usize, b: usize) -> bool {
        self.rows[a][b / 64] >> (b % 64) & 1 == 1
    }
}
