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
//! (`Graph::given_loss`), so they run on either backend. Each is a [`Method`]: the step loop
//! asks it for the batch's loss and its own update, and the run state holds its state (the
//! bank, NCE's normaliser, the classifier and its momentum): saved with every commit,
//! restored on resume ([`Method::tensors`], [`restore`]).

pub mod exemplar;
pub mod memory_bank;

use crate::error::{Error, Result};
use crate::loss::LossConfig;
use crate::nn::models::Model;
use crate::nn::optim::Sgd;
use crate::nn::step::queue_step as queue_train_loss;
use crate::nn::Encoder;
use crate::ops::Shape4;
use crate::tape::{Graph, Var};

/// How a run learns (`--method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum MethodKind {
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
crate::serde_by_name!(MethodKind);

/// A tensor of a method's state: its shape and float32 values (as `nn::checkpoint` reads
/// the run state's extra tensors).
pub use crate::nn::checkpoint::ShapedValues;

/// A named tensor of a method's state, as the run state file holds it.
pub type NamedTensor = (String, Vec<usize>, Vec<f32>);

/// How a run learns, as the step loop sees it: the loss of a batch on the encoder's output,
/// the state kept between steps, and what of it a run saves and restores. The step loop holds
/// one `Box<dyn Method<B>>` ([`build`]) and no branch per method.
pub trait Method<B: Encoder>: Send {
    /// The views of each image it trains on: 2 (the instance loss: both), or 1 (the baselines
    /// see view A, as lemniscate's loader gives one view).
    fn views(&self) -> usize;
    /// Records the batch's loss on `graph` from the encoder's output `z` (one row per view of
    /// each of the images `indices`, view A first); `step` is the optimiser's (it seeds NCE's
    /// noise).
    fn loss(&mut self, graph: &mut Graph<B>, z: Var, indices: &[usize], step: u64) -> Result<Var>;
    /// After the encoder's update: the method's own (the bank takes the batch's features, the
    /// classifier its SGD step with the run's settings).
    fn after_update(&mut self, sgd: &SgdSettings) -> Result<()> {
        let _ = sgd;
        Ok(())
    }
    /// Its state as named float32 tensors for the run state file (none for the instance loss).
    fn tensors(&self) -> Vec<NamedTensor> {
        Vec::new()
    }
    /// Sets the tensor `name` ([`Method::tensors`]' names) to `values`.
    fn set(&mut self, name: &str, values: &[f32]) -> Result<()> {
        let _ = values;
        Err(Error::invalid(format!(
            "the method has no state tensor {name}"
        )))
    }
}

/// The method a run's configuration names, for `n` training images of `d`-wide features.
pub fn build<B: Encoder>(
    method: MethodKind,
    loss: LossConfig,
    n: usize,
    d: usize,
    seed: u64,
) -> Result<Box<dyn Method<B>>> {
    Ok(match method {
        MethodKind::Invaspread => Box::new(InstanceLoss(loss)),
        MethodKind::Npid => Box::new(BankMethod::new(memory_bank::MemoryBank::new(
            n,
            d,
            memory_bank::Objective::Softmax,
            seed,
        )?)),
        MethodKind::Nce => Box::new(BankMethod::new(memory_bank::MemoryBank::new(
            n,
            d,
            memory_bank::Objective::Nce,
            seed,
        )?)),
        MethodKind::Exemplar => Box::new(exemplar::Classifier::new(n, d, seed)?),
    })
}

/// Restores `method`'s state from the tensors [`Method::tensors`] wrote; `get(name)` gives a
/// tensor's shape and values, or None. Nothing for a method without state.
pub fn restore<B: Encoder>(
    method: &mut dyn Method<B>,
    get: &dyn Fn(&str) -> Option<ShapedValues>,
) -> Result<()> {
    for (name, shape, values) in method.tensors() {
        let (got_shape, got) = get(&name).ok_or_else(|| {
            Error::invalid(format!("the run state has no tensor {name} (method state)"))
        })?;
        if got_shape != shape || got.len() != values.len() {
            return Err(Error::invalid(format!(
                "the run state's {name} has shape {got_shape:?}, expected {shape:?}"
            )));
        }
        method.set(&name, &got)?;
    }
    Ok(())
}

/// One training step of `method`: its views of the batch (`views`, N x 3 x H x W with both
/// views of the images `indices`, view A first) through the encoder, its loss, backward, SGD,
/// then its own update. Returns the loss node (nothing is read back).
#[allow(clippy::too_many_arguments)] // the step's graph, model, optimisers, batch and position
pub fn queue_step<B: Encoder>(
    method: &mut dyn Method<B>,
    graph: &mut Graph<B>,
    model: &Model,
    sgd: &mut Sgd,
    views: &[f32],
    shape: Shape4,
    indices: &[usize],
    lr: f64,
) -> Result<Var> {
    let input = match method.views() {
        2 => (views, shape),
        _ => {
            // The baselines see view A of each image (the first m rows).
            let one = Shape4 {
                n: indices.len(),
                ..shape
            };
            if one.n == 0 || one.len() > views.len() {
                return Err(Error::invalid(format!(
                    "a baseline's batch is m x 3 x H x W for m images, got {shape:?} for {} images",
                    indices.len()
                )));
            }
            (&views[..one.len()], one)
        }
    };
    let loss = queue_train_loss(graph, model, sgd, input, lr, |g, z, step| {
        method.loss(g, z, indices, step)
    })?;
    method.after_update(&SgdSettings {
        lr,
        momentum: sgd.cfg.momentum,
        weight_decay: sgd.cfg.weight_decay,
        nesterov: sgd.cfg.nesterov,
    })?;
    Ok(loss)
}

/// The method of Ye et al.: the instance loss over the batch's two views.
pub struct InstanceLoss(pub LossConfig);

impl<B: Encoder> Method<B> for InstanceLoss {
    fn views(&self) -> usize {
        2
    }
    fn loss(&mut self, graph: &mut Graph<B>, z: Var, _: &[usize], _: u64) -> Result<Var> {
        graph.instance_loss(z, &self.0)
    }
}

/// A memory bank's method: the bank, and the batch whose features it takes after the update.
pub struct BankMethod {
    pub bank: memory_bank::MemoryBank,
    batch: (Vec<f32>, Vec<usize>),
}

impl BankMethod {
    pub fn new(bank: memory_bank::MemoryBank) -> Self {
        BankMethod {
            bank,
            batch: (Vec::new(), Vec::new()),
        }
    }
}

impl<B: Encoder> Method<B> for BankMethod {
    fn views(&self) -> usize {
        1
    }
    fn loss(&mut self, graph: &mut Graph<B>, z: Var, indices: &[usize], step: u64) -> Result<Var> {
        let z_host = graph.value(z)?;
        let out = self.bank.loss(&z_host, indices, step)?;
        self.batch = (z_host, indices.to_vec());
        graph.given_loss(z, out.loss, &out.dz)
    }
    fn after_update(&mut self, _: &SgdSettings) -> Result<()> {
        self.bank.update(&self.batch.0, &self.batch.1)
    }
    fn tensors(&self) -> Vec<NamedTensor> {
        self.bank.tensors()
    }
    fn set(&mut self, name: &str, values: &[f32]) -> Result<()> {
        self.bank.set(name, values)
    }
}

impl<B: Encoder> Method<B> for exemplar::Classifier {
    fn views(&self) -> usize {
        1
    }
    fn loss(&mut self, graph: &mut Graph<B>, z: Var, indices: &[usize], _: u64) -> Result<Var> {
        let z_host = graph.value(z)?;
        let out = exemplar::Classifier::loss(self, &z_host, indices)?;
        graph.given_loss(z, out.loss, &out.dz)
    }
    fn after_update(&mut self, sgd: &SgdSettings) -> Result<()> {
        self.update(sgd)
    }
    fn tensors(&self) -> Vec<NamedTensor> {
        exemplar::Classifier::tensors(self)
    }
    fn set(&mut self, name: &str, values: &[f32]) -> Result<()> {
        exemplar::Classifier::set(self, name, values)
    }
}

/// One step's loss and its gradient in the raw embeddings (m x d, the encoder's output).
#[derive(Debug, Clone)]
pub struct StepLoss {
    pub loss: f64,
    pub dz: Vec<f32>,
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
