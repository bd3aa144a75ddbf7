//! The paper's baselines for its learning-speed comparison (RQ3), beside the method itself
//! (`train --method`; ../shared/notes/recipe.md, "Baselines and ablations"):
//!
//! | method | what it learns with | module |
//! |---|---|---|
//! | `invaspread` | the instance loss over the batch's two views (`loss`) | the graph's own op |
//! | `npid` | a memory bank of every training image's feature, the full non-parametric softmax (Wu et al. 2018) | [`memory_bank`] |
//! | `nce` | the same bank, noise-contrastive estimation with 4,096 noise entries | [`memory_bank`] |
//! | `exemplar` | a linear classifier with one class per training image (Dosovitskiy et al.) | [`exemplar`] |
//!
//! The baselines see one augmented view per image (view A of the batch, as lemniscate's
//! loader gives one). Their losses are computed on the host from the encoder's output, in
//! float32 with float64 sums, and handed to the graph as a loss node with its gradient
//! (`Graph::given_loss` in `nn`), so they run on either backend. Their state (the
//! bank, NCE's normaliser, the classifier and its momentum) is part of the run state: saved
//! with every commit, restored on resume ([`MethodState::tensors`], [`MethodState::restore`]).

pub mod exemplar;
pub mod memory_bank;

use crate::error::{Error, Result};

/// How a run learns (`--method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Method {
    /// The instance loss of Ye et al. (this crate's method).
    #[default]
    Invaspread,
    /// Memory bank + non-parametric softmax over every instance (Wu et al. 2018).
    Npid,
    /// Memory bank + noise-contrastive estimation, 4,096 noise entries (Wu et al. 2018).
    Nce,
    /// A parametric classifier with one class per training image (Exemplar CNN).
    Exemplar,
}
crate::serde_by_name!(Method);

/// A tensor of a method's state: its shape and float32 values.
pub type ShapedValues = (Vec<usize>, Vec<f32>);

/// The state a baseline keeps between steps.
#[derive(Debug, Clone, PartialEq)]
pub enum MethodState {
    Bank(memory_bank::MemoryBank),
    Exemplar(exemplar::Classifier),
}

/// One step's loss and its gradient in the raw embeddings (m x d, the encoder's output).
#[derive(Debug, Clone)]
pub struct StepLoss {
    pub loss: f64,
    pub dz: Vec<f32>,
}

impl MethodState {
    /// The initial state of `method` for `n` training images of `d`-wide features (None for
    /// the method itself, which keeps none).
    pub fn new(method: Method, n: usize, d: usize, seed: u64) -> Result<Option<MethodState>> {
        Ok(match method {
            Method::Invaspread => None,
            Method::Npid => Some(MethodState::Bank(memory_bank::MemoryBank::new(
                n,
                d,
                memory_bank::Objective::Softmax,
                seed,
            )?)),
            Method::Nce => Some(MethodState::Bank(memory_bank::MemoryBank::new(
                n,
                d,
                memory_bank::Objective::Nce,
                seed,
            )?)),
            Method::Exemplar => Some(MethodState::Exemplar(exemplar::Classifier::new(
                n, d, seed,
            )?)),
        })
    }

    /// The loss of the raw embeddings `z` (one row per image of `indices`) and dL/dz; `step`
    /// seeds NCE's noise draw.
    pub fn loss(&mut self, z: &[f32], indices: &[usize], step: u64) -> Result<StepLoss> {
        match self {
            MethodState::Bank(bank) => bank.loss(z, indices, step),
            MethodState::Exemplar(c) => c.loss(z, indices),
        }
    }

    /// After the encoder's update: the bank takes the batch's features; the classifier takes
    /// its SGD step (learning rate `lr`, the run's momentum and weight decay).
    pub fn update(&mut self, z: &[f32], indices: &[usize], sgd: &SgdSettings) -> Result<()> {
        match self {
            MethodState::Bank(bank) => bank.update(z, indices),
            MethodState::Exemplar(c) => c.update(sgd),
        }
    }

    /// The state as named float32 tensors (name, shape, values) for the run state file.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        match self {
            MethodState::Bank(bank) => bank.tensors(),
            MethodState::Exemplar(c) => c.tensors(),
        }
    }

    /// Restores the state from the tensors [`MethodState::tensors`] wrote; `get(name)` gives
    /// a tensor's shape and values, or None.
    pub fn restore(&mut self, get: &dyn Fn(&str) -> Option<ShapedValues>) -> Result<()> {
        for (name, shape, values) in self.tensors() {
            let (got_shape, got) = get(&name).ok_or_else(|| {
                Error::invalid(format!("the run state has no tensor {name} (method state)"))
            })?;
            if got_shape != shape || got.len() != values.len() {
                return Err(Error::invalid(format!(
                    "the run state's {name} has shape {got_shape:?}, expected {shape:?}"
                )));
            }
            match self {
                MethodState::Bank(bank) => bank.set(&name, &got)?,
                MethodState::Exemplar(c) => c.set(&name, &got)?,
            }
        }
        Ok(())
    }
}

/// The run's SGD settings at one step, for the exemplar classifier's own update.
#[derive(Debug, Clone, Copy)]
pub struct SgdSettings {
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
}

/// Softmax cross-entropy of each row of `logits` (m rows of n) against its target in `targets`,
/// in float64 from the row maximum: returns the rows' losses, and turns `logits` into
/// dL/dlogits of the mean, (softmax - onehot) / m. NPID's bank logits and Exemplar's
/// classifier logits share it.
pub(crate) fn softmax_cross_entropy(logits: &mut [f32], n: usize, targets: &[usize]) -> Vec<f64> {
    use rayon::prelude::*;
    let m = targets.len() as f64;
    logits
        .par_chunks_mut(n)
        .zip(targets)
        .map(|(row, &y)| {
            let top = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let sum: f64 = row.iter().map(|&x| f64::from(x - top).exp()).sum();
            let loss = sum.ln() - f64::from(row[y] - top);
            for (j, x) in row.iter_mut().enumerate() {
                let p = f64::from(*x - top).exp() / sum;
                *x = ((p - if j == y { 1.0 } else { 0.0 }) / m) as f32;
            }
            loss
        })
        .collect()
}

/// L2-normalises the rows of `z` (`d` wide) into float64, with their norms (clamped as
/// torch's F.normalize).
pub(crate) fn normalize(z: &[f32], d: usize) -> (Vec<f64>, Vec<f64>) {
    let mut f = Vec::with_capacity(z.len());
    let mut norms = Vec::with_capacity(z.len() / d.max(1));
    for row in z.chunks_exact(d) {
        let norm = row
            .iter()
            .map(|&x| f64::from(x).powi(2))
            .sum::<f64>()
            .sqrt();
        let clamped = norm.max(crate::ops::normalize_rows::NORM_EPS);
        f.extend(row.iter().map(|&x| f64::from(x) / clamped));
        norms.push(norm);
    }
    (f, norms)
}

/// dL/dz from dL/df through the normalisation (the reference's, loss.md).
pub(crate) fn normalize_backward(f: &[f64], norms: &[f64], df: &[f64], d: usize) -> Vec<f32> {
    crate::loss::reference::normalize_backward(f, norms, df, d)
        .into_iter()
        .map(|x| x as f32)
        .collect()
}
