//! The instance loss of Ye et al. (CVPR 2019), exactly as `../shared/notes/loss.md` states it.
//!
//! - [`versions`]: the registry of every implementation (names, devices, arithmetic,
//!   tolerances): what flags, config.json, benchmarks and tests list.
//! - [`reference`](mod@reference): float64, plain loops, the truth every other version is tested against.
//! - [`cpu`]: the fast CPU path, fused per row block, f32 or f64, never storing N x N.
//! - [`cuda`]: every GPU kernel version (unfused, fused v1, v2), a file each, behind one
//!   launcher that owns their scratch.
//! - [`node`]: the loss on the tape (`Graph::instance_loss`) and on both backends.
//! - [`check`]: an output against the float64 truth (what the benchmarks check before timing).
//! - [`gathered`]: the loss of a global batch split over data-parallel ranks (each rank's rows
//!   against the all-gathered keys), its float64 reference and how its gradient recombines.
//!
//! Batch layout: N = 2m rows; rows `0..m` are view A of images `0..m`, rows `m..2m` view B of
//! the same images, so the partner of row `a` is `(a + m) mod N`.

pub mod check;
pub mod cpu;
pub mod cuda;
pub mod gathered;
pub mod node;
pub mod reference;
pub mod versions;

use crate::error::{Error, Result};

pub use versions::{CpuLossVersion, CudaLossVersion, LossVersion};

/// Which gradient the backward pass returns (loss.md, "Backward: two semantics").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum GradSemantics {
    /// Keys are constants (`.data` in the authors' code): each row gets gradient only as a query.
    #[default]
    QueryOnly,
    /// The paper's equations without stop-gradient: keys receive gradient too.
    BothSides,
}
crate::serde_by_name!(GradSemantics);

impl std::fmt::Display for GradSemantics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&crate::names::Named::name(self))
    }
}

/// Which negatives of each query enter its loss term: all (the method), or, for the paper's
/// ablation (the official code's first version, `negM < 1`; ../shared/notes/recipe.md), the
/// hard or easy fraction F of the 2m - 2: the K = round(F (2m - 2)) negatives (at least 1) of
/// highest (hard) or lowest (easy) similarity, ties to the lower row index. The others leave
/// D_a and the negative sum as if absent, and a row with a selection is divided by K + 1 as
/// that code did. The choice is piecewise constant, so the gradient is that of the kept set.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Negatives {
    #[default]
    All,
    Hard {
        fraction: f64,
    },
    Easy {
        fraction: f64,
    },
}

impl Negatives {
    /// K: the negatives kept of each of `n` rows' n - 2.
    pub fn kept(&self, n: usize) -> usize {
        let all = n.saturating_sub(2);
        match self {
            Negatives::All => all,
            Negatives::Hard { fraction } | Negatives::Easy { fraction } => {
                ((fraction * all as f64).round() as usize).clamp(1, all.max(1))
            }
        }
    }

    /// The factor on each row's loss term and gradient: 1, or 1/(K + 1) with a selection.
    pub fn row_scale(&self, n: usize) -> f64 {
        match self {
            Negatives::All => 1.0,
            _ => 1.0 / (self.kept(n) + 1) as f64,
        }
    }

    /// The negatives of row `a` (its similarities `s`, length N) that the selection leaves
    /// out, in no particular order (none for `All`).
    pub fn dropped<T: Copy + PartialOrd>(&self, s: &[T], a: usize) -> Vec<usize> {
        self.dropped_with_partner(s, a, partner(a, s.len()))
    }

    /// [`Negatives::dropped`] for a row whose partner is `p` (a gathered batch's layout).
    pub fn dropped_with_partner<T: Copy + PartialOrd>(
        &self,
        s: &[T],
        a: usize,
        p: usize,
    ) -> Vec<usize> {
        let n = s.len();
        let hard = match self {
            Negatives::All => return Vec::new(),
            Negatives::Hard { .. } => true,
            Negatives::Easy { .. } => false,
        };
        let mut order: Vec<usize> = (0..n).filter(|&b| b != a && b != p).collect();
        let keep = self.kept(n).min(order.len());
        if keep == order.len() {
            return Vec::new();
        }
        // The kept K first: by similarity (descending for hard, ascending for easy), ties to
        // the lower index.
        order.select_nth_unstable_by(keep, |&x, &y| {
            let by_similarity = if hard {
                s[y].partial_cmp(&s[x])
            } else {
                s[x].partial_cmp(&s[y])
            };
            by_similarity
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(x.cmp(&y))
        });
        order.split_off(keep)
    }

    /// Checks the fraction: 0 < F <= 1.
    pub fn validate(&self) -> Result<()> {
        match self {
            Negatives::All => Ok(()),
            Negatives::Hard { fraction } | Negatives::Easy { fraction } => {
                if fraction.is_finite() && *fraction > 0.0 && *fraction <= 1.0 {
                    Ok(())
                } else {
                    Err(Error::invalid(format!(
                        "negative fraction = {fraction} is invalid: expected 0 < F <= 1 (the \
                         share of each query's negatives kept)"
                    )))
                }
            }
        }
    }
}

/// The loss's hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LossConfig {
    /// Temperature; 0.1 in the paper.
    pub tau: f64,
    /// Weight of the negatives (`negM` in the authors' code); 1 in the paper. Must be >= 1.
    pub mu: f64,
    /// Which gradient the backward pass returns.
    #[serde(rename = "grad_semantics")]
    pub semantics: GradSemantics,
    /// Which negatives enter (configurations from before the choice: all).
    #[serde(default)]
    pub negatives: Negatives,
}

impl Default for LossConfig {
    fn default() -> Self {
        LossConfig {
            tau: 0.1,
            mu: 1.0,
            semantics: GradSemantics::QueryOnly,
            negatives: Negatives::All,
        }
    }
}

impl LossConfig {
    /// Checks tau, mu (loss.md, "Numerics") and the negatives' fraction.
    pub fn validate(&self) -> Result<()> {
        self.negatives.validate()?;
        if !(self.tau.is_finite() && self.tau > 0.0) {
            return Err(Error::invalid(format!(
                "tau = {} is invalid: expected a finite tau > 0",
                self.tau
            )));
        }
        if !(self.mu.is_finite() && self.mu >= 1.0) {
            return Err(Error::invalid(format!(
                "mu = {} is invalid: expected a finite mu >= 1 (mu < 1 lets Q_ab exceed 1, and log(1 - Q_ab) is undefined)",
                self.mu
            )));
        }
        Ok(())
    }
}

/// Checks an N x d input: the shape (N even and >= 4, d >= 1, `z.len() == N d`), every entry
/// finite, and no row all zeros (its direction, and so the loss, would be undefined).
pub fn validate_input<T: Copy + Into<f64>>(z: &[T], n: usize, d: usize) -> Result<()> {
    if n < 4 || n % 2 != 0 {
        return Err(Error::invalid(format!(
            "N = {n} rows is invalid: expected an even N >= 4 (two views of m >= 2 images)"
        )));
    }
    if d == 0 {
        return Err(Error::invalid("d = 0 columns is invalid: expected d >= 1"));
    }
    if z.len() != n * d {
        return Err(Error::invalid(format!(
            "z has {} elements, expected N x d = {n} x {d} = {}",
            z.len(),
            n * d
        )));
    }
    for (a, row) in z.chunks_exact(d).enumerate() {
        let mut all_zero = true;
        for (k, &x) in row.iter().enumerate() {
            let x: f64 = x.into();
            if !x.is_finite() {
                return Err(Error::NonFinite(format!(
                    "z[{a}, {k}] = {x} is not finite: expected finite values"
                )));
            }
            all_zero &= x == 0.0;
        }
        if all_zero {
            return Err(Error::invalid(format!(
                "row {a} of z is all zeros: expected every row to have a non-zero norm"
            )));
        }
    }
    Ok(())
}

/// The partner of row `a` in a batch of `n = 2m` rows.
#[inline]
pub fn partner(a: usize, n: usize) -> usize {
    (a + n / 2) % n
}

/// F.normalize's clamp on the norm (loss.md), the normalization op's.
pub use crate::ops::normalize_rows::NORM_EPS;
