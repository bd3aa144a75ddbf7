//! The float64 reference: plain loops, every quantity named as in `../shared/notes/loss.md`.
//!
//! This is the truth that the fast CPU path and every CUDA kernel version are tested against.
//! It stores the N x N gradient matrix G when a gradient is asked for, so it is meant for
//! N up to a few thousand. Rows are independent, so they are spread over threads with rayon;
//! inside a row everything is a plain loop in float64.

// Index loops on purpose: they read like the sums in loss.md.
#![allow(clippy::needless_range_loop)]

use rayon::prelude::*;

use super::{partner, validate_input, GradSemantics, LossConfig, NORM_EPS};
use crate::error::Result;

/// What the reference computes for one batch.
#[derive(Debug, Clone)]
pub struct ReferenceOutput {
    /// L = (1/N) sum_a l_a.
    pub loss: f64,
    /// The per-row terms l_a.
    pub row_losses: Vec<f64>,
    /// dL/dF (N x d, row-major), before the normalization backward; present when asked for.
    pub grad_f: Option<Vec<f64>>,
    /// dL/dz (N x d, row-major), with respect to the raw input; present when asked for.
    pub grad_z: Option<Vec<f64>>,
}

/// Computes the loss of the raw embeddings `z` (N x d, row-major) and, when `with_grad` is set,
/// its gradient under `cfg.semantics`. Errors on any input loss.md rejects.
pub fn instance_loss<T: Copy + Into<f64> + Sync>(
    z: &[T],
    n: usize,
    d: usize,
    cfg: &LossConfig,
    with_grad: bool,
) -> Result<ReferenceOutput> {
    cfg.validate()?;
    validate_input(z, n, d)?;
    let z: Vec<f64> = z.iter().map(|&x| x.into()).collect();
    let (f, norms) = normalize(&z, d);

    let rows: Vec<RowTerms> = (0..n)
        .into_par_iter()
        .map(|a| {
            let fa = &f[a * d..(a + 1) * d];
            row_terms(fa, &f, (n, d), (a, partner(a, n)), cfg, with_grad)
        })
        .collect();
    let row_losses: Vec<f64> = rows.iter().map(|r| r.loss).collect();
    let loss = row_losses.iter().sum::<f64>() / n as f64;
    if !with_grad {
        return Ok(ReferenceOutput {
            loss,
            row_losses,
            grad_f: None,
            grad_z: None,
        });
    }

    // dL/df_a = (1/(N tau)) sum_b c_ab f_b with c = G (query-only) or G + G^T (both-sides).
    let scale = 1.0 / (n as f64 * cfg.tau);
    let g = |a: usize, b: usize| rows[a].g[b];
    let grad_f: Vec<f64> = (0..n)
        .into_par_iter()
        .flat_map_iter(|a| {
            let mut out = vec![0.0f64; d];
            for b in 0..n {
                let c = match cfg.semantics {
                    GradSemantics::QueryOnly => g(a, b),
                    GradSemantics::BothSides => g(a, b) + g(b, a),
                };
                for k in 0..d {
                    out[k] += c * f[b * d + k];
                }
            }
            out.into_iter().map(move |x| x * scale)
        })
        .collect();
    let grad_z = normalize_backward(&f, &norms, &grad_f, d);
    Ok(ReferenceOutput {
        loss,
        row_losses,
        grad_f: Some(grad_f),
        grad_z: Some(grad_z),
    })
}

/// The loss with each row's query taken from `z_query` and every key from `z_keys` (both N x d,
/// normalized here). At `z_query == z_keys` it equals [`instance_loss`]; its gradient in
/// `z_query` with the keys held fixed is the `query-only` gradient, which is how tests check it
/// by finite differences.
pub fn loss_with_fixed_keys(
    z_query: &[f64],
    z_keys: &[f64],
    n: usize,
    d: usize,
    cfg: &LossConfig,
) -> Result<f64> {
    cfg.validate()?;
    validate_input(z_query, n, d)?;
    validate_input(z_keys, n, d)?;
    let (q, k) = (normalize(z_query, d).0, normalize(z_keys, d).0);
    let total: f64 = (0..n)
        .map(|a| {
            row_terms(
                &q[a * d..(a + 1) * d],
                &k,
                (n, d),
                (a, partner(a, n)),
                cfg,
                false,
            )
            .loss
        })
        .sum();
    Ok(total / n as f64)
}

/// f_a = z_a / max(||z_a||, eps) for each row of `z` (d wide): torch's F.normalize, whose clamp
/// keeps tiny rows finite. Returns F and the rows' norms ||z_a|| (the backward's input).
pub fn normalize(z: &[f64], d: usize) -> (Vec<f64>, Vec<f64>) {
    let norms: Vec<f64> = z
        .chunks_exact(d)
        .map(|row| row.iter().map(|x| x * x).sum::<f64>().sqrt())
        .collect();
    let mut f = z.to_vec();
    for (row, &norm) in f.chunks_exact_mut(d).zip(&norms) {
        let scale = 1.0 / norm.max(NORM_EPS);
        row.iter_mut().for_each(|x| *x *= scale);
    }
    (f, norms)
}

/// dL/dz from dL/df through f = z / max(||z||, eps):
/// (df - f (f . df)) / ||z|| when the norm exceeds eps, else df / eps (the clamp is a constant).
pub fn normalize_backward(f: &[f64], norms: &[f64], grad_f: &[f64], d: usize) -> Vec<f64> {
    let mut grad_z = vec![0.0; grad_f.len()];
    for (a, &norm) in norms.iter().enumerate() {
        let (fa, ga) = (&f[a * d..(a + 1) * d], &grad_f[a * d..(a + 1) * d]);
        let out = &mut grad_z[a * d..(a + 1) * d];
        if norm > NORM_EPS {
            let dot: f64 = fa.iter().zip(ga).map(|(x, y)| x * y).sum();
            for k in 0..d {
                out[k] = (ga[k] - fa[k] * dot) / norm;
            }
        } else {
            for k in 0..d {
                out[k] = ga[k] / NORM_EPS;
            }
        }
    }
    grad_z
}

/// One row's loss term l_a and, when asked for, its row of G (zero on the diagonal).
pub(crate) struct RowTerms {
    pub loss: f64,
    pub g: Vec<f64>,
}

/// Row `a` as a query, its partner key `p`: `fa` is its normalized query, `f` holds the N
/// normalized keys (N x d). The batch's layout is the caller's: one device's `partner(a, N)`,
/// or a gathered batch's (`loss::gathered`).
pub(crate) fn row_terms(
    fa: &[f64],
    f: &[f64],
    (n, d): (usize, usize),
    (a, p): (usize, usize),
    cfg: &LossConfig,
    with_grad: bool,
) -> RowTerms {
    let mu = cfg.mu;

    // s_ab = f_a . f_b / tau for b != a. The diagonal never enters any sum.
    let mut s = vec![0.0f64; n];
    for b in 0..n {
        if b != a {
            let fb = &f[b * d..(b + 1) * d];
            let mut dot = 0.0;
            for k in 0..d {
                dot += fa[k] * fb[k];
            }
            s[b] = dot / cfg.tau;
        }
    }

    // The negatives a selection leaves out (loss.md's sums then run over the kept ones only).
    let mut kept = vec![true; n];
    for b in cfg.negatives.dropped_with_partner(&s, a, p) {
        kept[b] = false;
    }
    let row_scale = cfg.negatives.row_scale(n);
    // nu: the weight of the log(1 - Q) terms, mu but for the official hard/easy scale (mu F).
    let nu = cfg.negatives.log_weight(mu);

    // Every ratio below is invariant to a common factor on e_ab, so subtract the row maximum:
    // then the largest term is exactly 1, nothing overflows, and D_a >= 1 never underflows
    // even for a tiny tau. (The kernels use the fixed offset 1/tau instead; see loss.md.)
    let shift = (0..n)
        .filter(|&b| b != a)
        .map(|b| s[b])
        .fold(f64::NEG_INFINITY, f64::max);
    let e = |b: usize| (s[b] - shift).exp();

    // D_a = e_{a,p} + mu * sum_{b not in {a,p}} e_ab, as a sum of the weighted terms
    // t_b = w_b e_ab (w_p = 1, w_b = mu for a negative, t_a = 0). The negatives are summed
    // directly, never as (row sum - positive), which would cancel when P_a -> 1.
    let weight = |b: usize| if b == p { 1.0 } else { mu };
    let t: Vec<f64> = (0..n)
        .map(|b| {
            if b == a || !kept[b] {
                0.0
            } else {
                weight(b) * e(b)
            }
        })
        .collect();
    // prefix[b] = sum_{c < b} t_c: D_a without term b is prefix[b] + (D_a - prefix[b+1]) would
    // cancel, so keep suffix sums too and add the two halves, both sums of positive terms.
    let mut prefix = vec![0.0f64; n + 1];
    for b in 0..n {
        prefix[b + 1] = prefix[b] + t[b];
    }
    let mut suffix = vec![0.0f64; n + 1];
    for b in (0..n).rev() {
        suffix[b] = suffix[b + 1] + t[b];
    }
    let denom = prefix[n];

    // 1 - Q_ab = (D_a - e_ab) / D_a, and D_a - e_ab = (D_a without t_b) + (mu - 1) e_ab: a sum
    // of positive terms, so log(1 - Q_ab) stays accurate when Q_ab -> 1 (a negative far closer
    // than the partner at small tau), where 1 - Q_ab formed in floating point would round to 0.
    let one_minus_q_numerator = |b: usize| prefix[b] + suffix[b + 1] + (mu - 1.0) * e(b);

    // l_a = -log P_a - nu * sum_{b not in {a,p}} log(1 - Q_ab), with P_a = Q_ap = e_ap / D_a.
    // -log P_a is formed in the log domain so that P_a underflowing to 0 cannot give inf.
    // (With tau below about 0.003 the terms of one row span more than float64's exponent range
    // and the loss may still come out inf; nothing in training is near that.)
    let neg_log_p = denom.ln() - (s[p] - shift);
    let mut log_one_minus_q = 0.0;
    let mut r = 0.0; // R_a = sum_{c not in {a,p}, kept} Q_ac / (1 - Q_ac)
    for b in 0..n {
        if b != a && b != p && kept[b] {
            let numerator = one_minus_q_numerator(b);
            log_one_minus_q += numerator.ln() - denom.ln();
            r += e(b) / numerator; // Q / (1 - Q) = e_ab / (D_a - e_ab)
        }
    }
    let loss = row_scale * (neg_log_p - nu * log_one_minus_q);
    if !with_grad {
        return RowTerms {
            loss,
            g: Vec::new(),
        };
    }

    // g_ab = -[b = p] + w_b Q_ab + nu [b not in {a,p}] Q_ab / (1 - Q_ab) - nu w_b Q_ab R_a
    // (loss.md, query-only, with nu = mu; d/ds_ab of -nu log(1 - Q_ac) is
    // nu Q_ac/(1 - Q_ac) ([c = b] - w_b Q_ab)).
    let mut g = vec![0.0f64; n];
    for b in 0..n {
        if b == a || !kept[b] {
            continue;
        }
        let q = e(b) / denom;
        let w = weight(b);
        let mut gab = w * q - nu * w * q * r;
        if b == p {
            gab -= 1.0;
        } else {
            gab += nu * e(b) / one_minus_q_numerator(b);
        }
        g[b] = row_scale * gab;
    }
    RowTerms { loss, g }
}
