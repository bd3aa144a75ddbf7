//! Hard and easy negatives held to the authors' formula: a float64 implementation written from
//! the math of their first upload (`BatchCriterion` with `negM = F < 1`, commit 045f5bc of
//! mangye16/Unsupervised_Embedding_Learning), sharing no code with the crate, and one test body
//! that runs any implementation against it (the CPU's in tests/cpu, the GPU's in tests/gpu).
//!
//! The formula, N = 2m rows, K = floor(N F) negatives kept per row (clamped to [1, N - 2]):
//!   D_a = e_ap + mu sum_{b kept} e_ab,   A = sum_a log(e_ap / D_a),
//!   B = sum_a sum_{b kept} log(1 - e_ab / D_a),   L = -(A + mu F B) / (K + 1).
//! (mu = 1 in the authors' code, whose negM is F; mu > 1 weighs D_a and B as the crate does.)
//! Ties go to the lower row index (torch.topk leaves their order unspecified).

use invaspread::loss::{GradSemantics, LossConfig, Negatives};
use invaspread::testing::{random_matrix, rng};

use super::numerical_gradient;

/// The fractions the formula is held at.
pub const FRACTIONS: [f64; 5] = [0.1, 0.25, 0.5, 0.7, 1.0];

/// The rows of `z` (N x d) divided by their norms.
pub fn unit_rows(z: &[f64], d: usize) -> Vec<f64> {
    z.chunks_exact(d)
        .flat_map(|row| {
            let norm = row.iter().map(|x| x * x).sum::<f64>().sqrt();
            row.iter().map(move |x| x / norm)
        })
        .collect()
}

/// One row's negatives in the order the selection keeps them (hard: most similar first).
fn ranked_negatives(s: &[f64], a: usize, p: usize, hard: bool) -> Vec<usize> {
    let mut negatives: Vec<usize> = (0..s.len()).filter(|&b| b != a && b != p).collect();
    negatives.sort_by(|&x, &y| {
        let by_similarity = if hard {
            s[y].total_cmp(&s[x])
        } else {
            s[x].total_cmp(&s[y])
        };
        by_similarity.then(x.cmp(&y))
    });
    negatives
}

/// K = floor(N F) in [1, N - 2], as `negNum = int(2 * batchSize * negM)`.
pub fn kept(n: usize, fraction: f64) -> usize {
    ((n as f64 * fraction) as usize).clamp(1, n - 2)
}

/// The authors' loss with the queries' rows taken from `queries` and the keys' from `keys`
/// (both N x d, unnormalised): `queries == keys` is the loss; differentiating in `queries`
/// alone is the query-only gradient (the keys' `.data` in their code).
pub fn official_loss(
    queries: &[f64],
    keys: &[f64],
    (n, d): (usize, usize),
    (tau, mu): (f64, f64),
    hard: bool,
    fraction: f64,
) -> f64 {
    let (fq, fk) = (unit_rows(queries, d), unit_rows(keys, d));
    let k = kept(n, fraction);
    let (mut a_sum, mut b_sum) = (0.0, 0.0);
    for a in 0..n {
        let p = (a + n / 2) % n;
        let s: Vec<f64> = (0..n)
            .map(|b| (0..d).map(|c| fq[a * d + c] * fk[b * d + c]).sum::<f64>() / tau)
            .collect();
        let negatives = &ranked_negatives(&s, a, p, hard)[..k];
        let e_pos = s[p].exp();
        let denom = e_pos + mu * negatives.iter().map(|&b| s[b].exp()).sum::<f64>();
        a_sum += (e_pos / denom).ln();
        b_sum += negatives
            .iter()
            .map(|&b| (1.0 - s[b].exp() / denom).ln())
            .sum::<f64>();
    }
    -(a_sum + mu * fraction * b_sum) / (k + 1) as f64
}

/// Per row, the cosine gap between its last kept and first dropped negative (infinite when
/// every negative is kept): an implementation whose similarities err by less than half of it
/// keeps the formula's set, and a finite-difference step far below it keeps it too.
pub fn cut_gaps(z: &[f64], (n, d): (usize, usize), hard: bool, fraction: f64) -> Vec<f64> {
    let f = unit_rows(z, d);
    let k = kept(n, fraction);
    (0..n)
        .map(|a| {
            let p = (a + n / 2) % n;
            let s: Vec<f64> = (0..n)
                .map(|b| (0..d).map(|c| f[a * d + c] * f[b * d + c]).sum::<f64>())
                .collect();
            let ranked = ranked_negatives(&s, a, p, hard);
            match ranked.get(k) {
                Some(&dropped) => (s[ranked[k - 1]] - s[dropped]).abs(),
                None => f64::INFINITY,
            }
        })
        .collect()
}

/// An input of the formula's tests: N x d, and whether it has exact ties.
pub struct Input {
    pub name: String,
    pub z: Vec<f32>,
    pub n: usize,
    pub d: usize,
}

impl Input {
    /// The rows in float64.
    pub fn z64(&self) -> Vec<f64> {
        self.z.iter().map(|&x| f64::from(x)).collect()
    }
}

/// Random rows at N = 6 and N = 70 (not a multiple of the kernels' 64-row tiles, nor d of 4),
/// and the same with exact ties: rows copied bit for bit onto others (never their partners),
/// so a query sees equal similarities, kept by the lower index.
pub fn inputs() -> Vec<Input> {
    let mut out = Vec::new();
    for (seed, n, d) in [(3500u64, 6usize, 3usize), (3501, 70, 5)] {
        let z = random_matrix(&mut rng(seed), n, d);
        out.push(Input {
            name: format!("random N={n} d={d}"),
            z: z.clone(),
            n,
            d,
        });
        let m = n / 2;
        let mut copies = vec![(1usize, 2usize), (0, n - 1)];
        if n > 8 {
            copies.extend([(m + 2, m - 1), (10, 11)]);
        }
        let mut tied = z;
        for (from, to) in copies {
            assert_ne!(to, (from + m) % n, "a copy onto the partner");
            tied.copy_within(from * d..(from + 1) * d, to * d);
        }
        out.push(Input {
            name: format!("ties N={n} d={d}"),
            z: tied,
            n,
            d,
        });
    }
    out
}

/// What one implementation returns: the loss and dL/dz (N x d, in float64).
pub type Output = (f64, Vec<f64>);

/// How closely an implementation must follow the formula.
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    /// Relative error of the loss.
    pub loss: f64,
    /// `scaled_grad_error` of dL/dz against the formula's finite differences.
    pub grad: f64,
    /// How far its similarities (cosines) may be from float64's: rows whose cut gap is within
    /// four times this may keep another set (loss continuous, gradient not), so their
    /// gradients are not compared (all rows', for both-sides, where keys see every query).
    pub similarity: f64,
}

/// Holds every implementation `run` returns for `cfg` on an input (its name, bounds and
/// output) to the formula, on every input, fraction, hard and easy, both semantics, tau = 0.2
/// and mu = 1 (the authors') or 1.5. Returns how many gradients were compared, so the caller
/// can see that its bounds left some to compare.
pub fn hold_to_the_official_formula(
    label: &str,
    mut run: impl FnMut(&Input, &LossConfig) -> Vec<(String, Bounds, Output)>,
) -> usize {
    let mut compared = 0;
    for input in inputs() {
        let (n, d) = (input.n, input.d);
        let z: Vec<f64> = input.z.iter().map(|&x| f64::from(x)).collect();
        for fraction in FRACTIONS {
            for hard in [true, false] {
                let gaps = cut_gaps(&z, (n, d), hard, fraction);
                for (mu, semantics) in [
                    (1.0, GradSemantics::QueryOnly),
                    (1.0, GradSemantics::BothSides),
                    (1.5, GradSemantics::QueryOnly),
                ] {
                    let tau = 0.2;
                    let negatives = if hard {
                        Negatives::hard(fraction)
                    } else {
                        Negatives::easy(fraction)
                    };
                    let cfg = LossConfig {
                        tau,
                        mu,
                        semantics,
                        negatives,
                    };
                    let want = official_loss(&z, &z, (n, d), (tau, mu), hard, fraction);
                    let mut numerical: Option<Vec<f64>> = None;
                    for (name, bound, (loss, grad)) in run(&input, &cfg) {
                        let case = format!("{label} {name} {} {cfg:?}", input.name);
                        let rel = (loss - want).abs() / want.abs();
                        assert!(
                            rel < bound.loss,
                            "{case}: loss {loss} vs the formula's {want} ({rel:e})"
                        );
                        assert!(grad.iter().all(|g| g.is_finite()), "{case}: not finite");
                        // A step of 1e-6 moves a cosine by about 1e-6 / ||z||: well inside.
                        let safe = |a: usize| gaps[a] > 4.0 * bound.similarity + 1e-4;
                        let rows: Vec<bool> = match semantics {
                            GradSemantics::QueryOnly => (0..n).map(safe).collect(),
                            GradSemantics::BothSides => vec![(0..n).all(safe); n],
                        };
                        if !rows.contains(&true) {
                            continue;
                        }
                        let numerical = numerical.get_or_insert_with(|| match semantics {
                            GradSemantics::QueryOnly => numerical_gradient(&z, 1e-6, |q| {
                                official_loss(q, &z, (n, d), (tau, mu), hard, fraction)
                            }),
                            GradSemantics::BothSides => numerical_gradient(&z, 1e-6, |x| {
                                official_loss(x, x, (n, d), (tau, mu), hard, fraction)
                            }),
                        });
                        let err = row_scaled_error(&grad, numerical, &input.z, d, &rows);
                        assert!(
                            err < bound.grad,
                            "{case}: gradient against the formula's finite differences {err:e}"
                        );
                        compared += 1;
                    }
                }
            }
        }
    }
    compared
}

/// `scaled_grad_error` over the `checked` rows, relative to the largest entry of every row of
/// `want` (a checked row's gradient may be exactly 0: a query whose one kept negative ties
/// with its partner has a constant loss term).
fn row_scaled_error(got: &[f64], want: &[f64], z: &[f32], d: usize, checked: &[bool]) -> f64 {
    let (mut worst, mut scale) = (0.0f64, 0.0f64);
    for (a, row) in z.chunks_exact(d).enumerate() {
        let norm = row
            .iter()
            .map(|&x| f64::from(x).powi(2))
            .sum::<f64>()
            .sqrt();
        for k in a * d..(a + 1) * d {
            scale = scale.max((want[k] * norm).abs());
            if checked[a] {
                let err = (got[k] - want[k]).abs() * norm;
                worst = worst.max(if err.is_nan() { f64::INFINITY } else { err });
            }
        }
    }
    worst / scale.max(f64::MIN_POSITIVE)
}
