//! SGD with momentum and weight decay (PyTorch's update rule) and learning-rate schedules.

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::ops::sgd::SgdDevice;
use crate::ops::sgd::SgdStep;
use crate::tape::params::ParamStore;

/// SGD's hyper-parameters; the recipe's: lr 0.03, momentum 0.9, weight decay 5e-4 on every
/// parameter (batchnorm and biases included), no Nesterov, dampening 0.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SgdConfig {
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
}

impl Default for SgdConfig {
    fn default() -> Self {
        SgdConfig {
            lr: 0.03,
            momentum: 0.9,
            weight_decay: 5e-4,
            nesterov: false,
        }
    }
}

/// How the learning rate moves over training; in config.json an object tagged by `kind`:
/// `{"kind": "step", "milestones": [120, 160], "gamma": 0.1}` or `{"kind": "cosine"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Schedule {
    /// lr x gamma^(number of milestones passed); the paper's: x0.1 at epoch 120, x0.01 at 160.
    Step { milestones: Vec<usize>, gamma: f64 },
    /// lr x (1 + cos(pi t / T)) / 2 over the whole run. (A struct variant with no fields, so
    /// that serde refuses `{"kind": "cosine", "milestones": [...]}`: a unit variant of a tagged
    /// enum lets unknown fields pass.)
    Cosine {},
}

impl Schedule {
    pub fn paper_step() -> Self {
        Schedule::Step {
            milestones: vec![120, 160],
            gamma: 0.1,
        }
    }
}

/// The learning rate at `step` (0-based) of `total_steps`, with `steps_per_epoch` and an
/// optional linear warm-up over the first `warmup_steps`.
pub fn learning_rate(
    base: f64,
    schedule: &Schedule,
    step: usize,
    total_steps: usize,
    steps_per_epoch: usize,
    warmup_steps: usize,
) -> f64 {
    let lr = match schedule {
        Schedule::Step { milestones, gamma } => {
            let epoch = step / steps_per_epoch.max(1);
            base * gamma.powi(milestones.iter().filter(|&&m| epoch >= m).count() as i32)
        }
        Schedule::Cosine {} => {
            let t = step as f64 / total_steps.max(1) as f64;
            base * 0.5 * (1.0 + (std::f64::consts::PI * t.min(1.0)).cos())
        }
    };
    if step < warmup_steps {
        lr * (step + 1) as f64 / warmup_steps as f64
    } else {
        lr
    }
}

/// The optimiser's state: the step count (momentum buffers live beside each parameter).
#[derive(Debug, Clone)]
pub struct Sgd {
    pub cfg: SgdConfig,
    pub step: u64,
}

impl Sgd {
    pub fn new(cfg: SgdConfig) -> Self {
        Sgd { cfg, step: 0 }
    }

    /// One update of every parameter with learning rate `lr` (after
    /// `Graph::finish_gradients`, which gives a data-parallel group's sums).
    pub fn update<B: SgdDevice>(
        &mut self,
        backend: &B,
        store: &mut ParamStore<B>,
        lr: f64,
    ) -> Result<()> {
        let step = SgdStep {
            lr,
            momentum: self.cfg.momentum,
            weight_decay: self.cfg.weight_decay,
            nesterov: self.cfg.nesterov,
            first: self.step == 0,
        };
        backend.sgd_update_all(&mut crate::ops::sgd::device::tensors(store), &step)?;
        self.step += 1;
        Ok(())
    }
}
