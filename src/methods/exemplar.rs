//! Exemplar CNN's objective (Dosovitskiy et al.; ../shared/notes/recipe.md): a linear
//! classifier with one class per training image, `Linear(d -> n)` on the L2-normalised
//! embedding (PyTorch's initialisation: weights and biases uniform in +-1/sqrt(d)), softmax
//! cross-entropy against the image's own index, trained by SGD with the network (the run's
//! learning rate, momentum, weight decay on the weights and biases as PyTorch's SGD applies
//! it to every parameter given).
//!
//! logits_ij = f_i . w_j + b_j; L = mean_i -log softmax_j(logits_i)[y_i];
//! with G = (P - onehot) / m: dL/dF = G W, dL/dW = G^T F, dL/db = sum_i G_i.

use rand::Rng;
use rayon::prelude::*;

use super::{SgdSettings, StepLoss};
use crate::error::{Error, Result};
use crate::linalg::{matmul, MatRef};
use crate::rng::rng;

/// The classifier, its gradient from the last loss, and its momentum buffers.
#[derive(Debug, Clone, PartialEq)]
pub struct Classifier {
    pub n: usize,
    pub d: usize,
    /// n x d.
    pub w: Vec<f32>,
    pub b: Vec<f32>,
    grad_w: Vec<f32>,
    grad_b: Vec<f32>,
    momentum_w: Vec<f32>,
    momentum_b: Vec<f32>,
    /// Whether the momentum buffers hold a first value (PyTorch starts them at the gradient).
    started: bool,
}

const W: &str = "method.exemplar.weight";
const B: &str = "method.exemplar.bias";
const MW: &str = "method.exemplar.weight.momentum_buffer";
const MB: &str = "method.exemplar.bias.momentum_buffer";

impl Classifier {
    pub fn new(n: usize, d: usize, seed: u64) -> Result<Classifier> {
        crate::limits::check_allocation(
            "the exemplar classifier (n x d float32, with gradient and momentum)",
            (n as u64).checked_mul(d as u64 * 12),
        )?;
        let bound = 1.0 / (d as f32).sqrt();
        let mut r = rng(seed ^ 0xe4e_0000);
        let w = (0..n * d).map(|_| r.random_range(-bound..bound)).collect();
        let b = (0..n).map(|_| r.random_range(-bound..bound)).collect();
        Ok(Classifier {
            n,
            d,
            w,
            b,
            grad_w: vec![0.0; n * d],
            grad_b: vec![0.0; n],
            momentum_w: vec![0.0; n * d],
            momentum_b: vec![0.0; n],
            started: false,
        })
    }

    /// The loss of the raw embeddings `z` (one row per image of `indices`), dL/dz; keeps
    /// dL/dW and dL/db for [`Classifier::update`].
    pub fn loss(&mut self, z: &[f32], indices: &[usize]) -> Result<StepLoss> {
        let (m, n, d) = (indices.len(), self.n, self.d);
        if z.len() != m * d || indices.iter().any(|&i| i >= n) {
            return Err(Error::invalid(format!(
                "exemplar: {} values for {m} images of {d}, or an image past the {n} classes",
                z.len()
            )));
        }
        let (f, norms) = super::normalize(z, d);
        let f32s: Vec<f32> = f.iter().map(|&x| x as f32).collect();
        let mut g = vec![0.0f32; m * n];
        matmul(
            MatRef::row_major(&f32s, m, d),
            MatRef::transposed(&self.w, n, d),
            &mut g,
            n,
            1.0,
            false,
        )?;
        for row in g.chunks_exact_mut(n) {
            row.iter_mut().zip(&self.b).for_each(|(x, &bj)| *x += bj);
        }
        let losses = super::softmax_cross_entropy(&mut g, n, indices);
        let mut df = vec![0.0f32; m * d];
        matmul(
            MatRef::row_major(&g, m, n),
            MatRef::row_major(&self.w, n, d),
            &mut df,
            d,
            1.0,
            false,
        )?;
        matmul(
            MatRef::transposed(&g, m, n),
            MatRef::row_major(&f32s, m, d),
            &mut self.grad_w,
            d,
            1.0,
            false,
        )?;
        for (j, gb) in self.grad_b.iter_mut().enumerate() {
            *gb = (0..m).map(|i| g[i * n + j]).sum();
        }
        let df: Vec<f64> = df.into_iter().map(f64::from).collect();
        Ok(StepLoss {
            loss: losses.iter().sum::<f64>() / m as f64,
            dz: super::normalize_backward(&f, &norms, &df, d),
        })
    }

    /// PyTorch's SGD step on the classifier with the last loss's gradient.
    pub fn update(&mut self, sgd: &SgdSettings) -> Result<()> {
        let started = self.started;
        let step = |w: &mut [f32], g: &[f32], buf: &mut [f32]| {
            w.par_iter_mut()
                .zip(g.par_iter())
                .zip(buf.par_iter_mut())
                .for_each(|((w, &g), buf)| {
                    let d_p = f64::from(g) + sgd.weight_decay * f64::from(*w);
                    let v = if started {
                        sgd.momentum * f64::from(*buf) + d_p
                    } else {
                        d_p
                    };
                    *buf = v as f32;
                    let dir = if sgd.nesterov {
                        d_p + sgd.momentum * v
                    } else {
                        v
                    };
                    *w = (f64::from(*w) - sgd.lr * dir) as f32;
                });
        };
        step(&mut self.w, &self.grad_w, &mut self.momentum_w);
        step(&mut self.b, &self.grad_b, &mut self.momentum_b);
        self.started = true;
        Ok(())
    }

    pub fn tensors(&self) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        let (n, d) = (self.n, self.d);
        // A momentum buffer not yet started is saved as NaN in its first entry's place, so
        // that the resumed run starts it as PyTorch would.
        let mut mw = self.momentum_w.clone();
        if !self.started && !mw.is_empty() {
            mw[0] = f32::NAN;
        }
        vec![
            (W.into(), vec![n, d], self.w.clone()),
            (B.into(), vec![n], self.b.clone()),
            (MW.into(), vec![n, d], mw),
            (MB.into(), vec![n], self.momentum_b.clone()),
        ]
    }

    pub fn set(&mut self, name: &str, values: &[f32]) -> Result<()> {
        match name {
            W => self.w.copy_from_slice(values),
            B => self.b.copy_from_slice(values),
            MW => {
                self.started = !values.first().is_some_and(|v| v.is_nan());
                self.momentum_w.copy_from_slice(values);
                if !self.started {
                    self.momentum_w.iter_mut().for_each(|v| *v = 0.0);
                }
            }
            MB => self.momentum_b.copy_from_slice(values),
            other => return Err(Error::invalid(format!("exemplar: no tensor {other}"))),
        }
        Ok(())
    }
}
