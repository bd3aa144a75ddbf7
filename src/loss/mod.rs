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
//! Hard and easy negatives (the paper's ablation): [`Negatives`] and [`NegativeScale`], whose
//! table gives both forms' math (the authors' `official`, the default, and the earlier `mean`).
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
/// hard or easy fraction F: the K negatives of highest (hard) or lowest (easy) similarity,
/// ties to the lower row index. The others leave D_a and the negative sum as if absent. The
/// choice is piecewise constant, so the gradient is that of the kept set.
///
/// How a selection's loss is scaled is [`NegativeScale`]: by default exactly the official
/// code's `BatchCriterion` (K = floor(N F), L = -(A + F B) / (K + 1)); the crate's earlier
/// normalised form stays selectable as `mean`.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize, serde::Deserialize)]
#[serde(
    tag = "kind",
    rename_all = "kebab-case",
    deny_unknown_fields,
    try_from = "NegativesFile"
)]
pub enum Negatives {
    #[default]
    All,
    Hard {
        fraction: f64,
        /// Configurations from before the choice recorded no scale: they ran `mean`.
        #[serde(default = "NegativeScale::before_the_choice")]
        scale: NegativeScale,
    },
    Easy {
        fraction: f64,
        #[serde(default = "NegativeScale::before_the_choice")]
        scale: NegativeScale,
    },
}

/// The `negatives` object of a configuration as written, read field by field: serde's
/// internally tagged enums let an unknown field of the unit variant (`{"kind": "all",
/// "fraction": 0.5}`) pass silently, so the fields are checked here against the kind.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NegativesFile {
    kind: String,
    fraction: Option<f64>,
    scale: Option<NegativeScale>,
}

impl TryFrom<NegativesFile> for Negatives {
    type Error = String;

    fn try_from(file: NegativesFile) -> std::result::Result<Self, String> {
        let scale = file.scale.unwrap_or_else(NegativeScale::before_the_choice);
        let fraction = |kind: &str| {
            file.fraction
                .ok_or_else(|| format!("negatives of kind \"{kind}\" need a `fraction`"))
        };
        match file.kind.as_str() {
            "all" if file.fraction.is_some() || file.scale.is_some() => Err(
                "negatives of kind \"all\" take no `fraction` or `scale` (they select hard or easy negatives)"
                    .into(),
            ),
            "all" => Ok(Negatives::All),
            "hard" => Ok(Negatives::Hard {
                fraction: fraction("hard")?,
                scale,
            }),
            "easy" => Ok(Negatives::Easy {
                fraction: fraction("easy")?,
                scale,
            }),
            other => Err(format!(
                "unknown negatives kind `{other}`, expected `all`, `hard` or `easy`"
            )),
        }
    }
}

/// How a hard/easy selection's loss is formed (both keep the loss.md row term's shape).
///
/// With N = 2m rows, A = sum_a log P_a, B = sum_a sum_{b kept} log(1 - Q_ab), and
/// D_a = e_ap + mu sum_{b kept} e_ab:
///
/// | scale | kept per row K | loss |
/// |---|---|---|
/// | `official` | floor(N F), clamped to [1, N - 2] | -(A + mu F B) / (K + 1) |
/// | `mean` | round(F (N - 2)), clamped to [1, N - 2] | -(A + mu B) / (N (K + 1)) |
///
/// `official` is the authors' first upload (mangye16/Unsupervised_Embedding_Learning, commit
/// 045f5bc, `BatchCriterion` with `negM = F < 1`: `negNum = int(2 batchSize negM)`, D_a without
/// a weight, the log(1 - Q) sum times negM, the total divided by `negNum + 1` and not by N).
/// mu = 1 there; mu > 1 weighs D_a's negatives as loss.md does and the B term by mu F. Easy
/// negatives were never committed by the authors; `easy` is the same formula over the lowest
/// similarities. At F = 1 the official code takes its other branch (all negatives, / N);
/// here F = 1 keeps every negative under the formula above, / (N - 1).
///
/// `mean` is this crate's form before it matched the official code: a row with a selection
/// divided by K + 1 inside the mean over rows, the negatives' terms at full weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum NegativeScale {
    /// The official code's loss: K = floor(N F), -(A + mu F B) / (K + 1).
    #[default]
    Official,
    /// The earlier normalised form: K = round(F (N - 2)), -(A + mu B) / (N (K + 1)).
    Mean,
}
crate::serde_by_name!(NegativeScale);

impl NegativeScale {
    /// What a configuration that records no scale ran.
    pub fn before_the_choice() -> NegativeScale {
        NegativeScale::Mean
    }
}

impl std::fmt::Display for NegativeScale {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&crate::names::Named::name(self))
    }
}

impl Negatives {
    /// The hardest fraction F of each row's negatives, scaled as the official code.
    pub fn hard(fraction: f64) -> Negatives {
        Negatives::Hard {
            fraction,
            scale: NegativeScale::Official,
        }
    }

    /// The easiest fraction F, scaled as [`Negatives::hard`].
    pub fn easy(fraction: f64) -> Negatives {
        Negatives::Easy {
            fraction,
            scale: NegativeScale::Official,
        }
    }

    /// The same selection under `scale` (no change for `All`).
    pub fn with_scale(self, scale: NegativeScale) -> Negatives {
        match self {
            Negatives::All => Negatives::All,
            Negatives::Hard { fraction, .. } => Negatives::Hard { fraction, scale },
            Negatives::Easy { fraction, .. } => Negatives::Easy { fraction, scale },
        }
    }

    /// F and the scale of a selection (None for `All`).
    pub fn selection(&self) -> Option<(f64, NegativeScale)> {
        match *self {
            Negatives::All => None,
            Negatives::Hard { fraction, scale } | Negatives::Easy { fraction, scale } => {
                Some((fraction, scale))
            }
        }
    }

    /// K: the negatives kept of each of `n` rows' n - 2 ([`NegativeScale`]'s table).
    pub fn kept(&self, n: usize) -> usize {
        let all = n.saturating_sub(2);
        let Some((fraction, scale)) = self.selection() else {
            return all;
        };
        let k = match scale {
            // Python's int() of a positive float is its floor; n F is the same IEEE product.
            NegativeScale::Official => (n as f64 * fraction).floor(),
            NegativeScale::Mean => (fraction * all as f64).round(),
        };
        (k as usize).clamp(1, all.max(1))
    }

    /// The factor on each row's term l_a inside the mean over rows, (1/N) sum_a factor l_a:
    /// 1 for all negatives, N / (K + 1) for `official` (its total is divided by K + 1, not N),
    /// 1 / (K + 1) for `mean`. The gradient carries the same factor.
    pub fn row_scale(&self, n: usize) -> f64 {
        match self.selection() {
            None => 1.0,
            Some((_, NegativeScale::Official)) => n as f64 / (self.kept(n) + 1) as f64,
            Some((_, NegativeScale::Mean)) => 1.0 / (self.kept(n) + 1) as f64,
        }
    }

    /// nu, the weight of a row's log(1 - Q_ab) terms (l_a = -log P_a - nu sum log(1 - Q_ab)),
    /// for the loss's `mu`: mu F for `official`, mu otherwise. D_a's weight stays mu.
    pub fn log_weight(&self, mu: f64) -> f64 {
        match self.selection() {
            Some((fraction, NegativeScale::Official)) => mu * fraction,
            _ => mu,
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
            Negatives::Hard { fraction, .. } | Negatives::Easy { fraction, .. } => {
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
    if n < 4 || !n.is_multiple_of(2) {
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
