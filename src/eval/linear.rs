//! The linear probe: multinomial logistic regression on frozen embeddings, fitted on the train
//! split and reported on the test split (the paper's STL-10 linear accuracy; the common
//! protocol of instance-discrimination papers).
//!
//! Fixed protocol, so that numbers compare across runs: features standardised with the train
//! split's per-dimension mean and standard deviation; weights and bias from zero; mini-batch
//! SGD (batch 256, momentum 0.9, weight decay 5e-4 on the weights, learning rate 0.1 with a
//! cosine decay to 0 over 50 epochs); the batch order a seeded shuffle per epoch. Sums are in
//! float64 and run in row order, so the result depends on the seed alone.

use rand::seq::SliceRandom;
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::rng::rng;

/// The probe's optimisation (see the module documentation for the defaults' origin).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinearProbeConfig {
    pub epochs: usize,
    pub batch: usize,
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    pub seed: u64,
}

impl Default for LinearProbeConfig {
    fn default() -> Self {
        LinearProbeConfig {
            epochs: 50,
            batch: 256,
            lr: 0.1,
            momentum: 0.9,
            weight_decay: 5e-4,
            seed: 0,
        }
    }
}

/// A fitted probe's top-1 accuracy on both splits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinearProbe {
    pub train_top1: f64,
    pub test_top1: f64,
}

/// Per-dimension mean and standard deviation of `x` (rows of `d`); a constant dimension gets 1.
fn standardisation(x: &[f32], d: usize) -> (Vec<f64>, Vec<f64>) {
    let n = (x.len() / d).max(1) as f64;
    let mut mean = vec![0.0f64; d];
    for row in x.chunks_exact(d) {
        for (m, &v) in mean.iter_mut().zip(row) {
            *m += f64::from(v);
        }
    }
    mean.iter_mut().for_each(|m| *m /= n);
    let mut var = vec![0.0f64; d];
    for row in x.chunks_exact(d) {
        for ((s, &v), m) in var.iter_mut().zip(row).zip(&mean) {
            *s += (f64::from(v) - m).powi(2);
        }
    }
    let std = var
        .iter()
        .map(|s| (s / n).sqrt())
        .map(|s| if s > 1e-12 { s } else { 1.0 })
        .collect();
    (mean, std)
}

/// The linear model: `classes x d` weights and `classes` biases.
struct Model {
    w: Vec<f64>,
    b: Vec<f64>,
    d: usize,
}

impl Model {
    fn logits(&self, x: &[f64], out: &mut [f64]) {
        for (c, o) in out.iter_mut().enumerate() {
            let w = &self.w[c * self.d..(c + 1) * self.d];
            *o = self.b[c] + w.iter().zip(x).map(|(a, b)| a * b).sum::<f64>();
        }
    }

    fn predict(&self, x: &[f64], classes: usize) -> usize {
        let mut z = vec![0.0; classes];
        self.logits(x, &mut z);
        (0..classes).fold(0, |best, c| if z[c] > z[best] { c } else { best })
    }
}

/// Fits the probe on (`train`, `train_labels`) and reports top-1 on both splits.
#[allow(clippy::too_many_arguments)] // the two splits, their labels, the sizes and the protocol
pub fn linear_probe(
    train: &[f32],
    train_labels: &[i64],
    test: &[f32],
    test_labels: &[i64],
    d: usize,
    classes: usize,
    cfg: &LinearProbeConfig,
) -> Result<LinearProbe> {
    if d == 0 || train.len() != train_labels.len() * d || test.len() != test_labels.len() * d {
        return Err(Error::invalid(format!(
            "linear probe: {} train values for {} labels and {} test values for {} labels are \
             not rows of {d}",
            train.len(),
            train_labels.len(),
            test.len(),
            test_labels.len()
        )));
    }
    if train_labels.is_empty() || classes < 2 {
        return Err(Error::invalid(format!(
            "linear probe: {} training rows of {classes} classes: expected rows and 2 classes or more",
            train_labels.len()
        )));
    }
    super::check_labels("linear probe", train_labels, test_labels, classes)?;
    let (mean, std) = standardisation(train, d);
    let standardise = |x: &[f32]| -> Vec<f64> {
        x.chunks_exact(d)
            .flat_map(|row| {
                row.iter()
                    .zip(&mean)
                    .zip(&std)
                    .map(|((&v, m), s)| (f64::from(v) - m) / s)
            })
            .collect()
    };
    let (xtr, xte) = (standardise(train), standardise(test));
    let n = train_labels.len();
    let mut model = Model {
        w: vec![0.0; classes * d],
        b: vec![0.0; classes],
        d,
    };
    let (mut vw, mut vb) = (vec![0.0f64; classes * d], vec![0.0f64; classes]);
    let steps_per_epoch = n.div_ceil(cfg.batch.max(1));
    let total = (cfg.epochs * steps_per_epoch).max(1);
    let mut order: Vec<usize> = (0..n).collect();
    let mut r = rng(cfg.seed);
    let mut step = 0usize;
    for _ in 0..cfg.epochs {
        order.shuffle(&mut r);
        for batch in order.chunks(cfg.batch.max(1)) {
            let lr =
                0.5 * cfg.lr * (1.0 + (std::f64::consts::PI * step as f64 / total as f64).cos());
            // Per-row gradients of the mean cross-entropy, computed in parallel and summed
            // in batch order.
            let grads: Vec<Vec<f64>> = batch
                .par_iter()
                .map(|&i| {
                    let x = &xtr[i * d..(i + 1) * d];
                    let mut p = vec![0.0; classes];
                    model.logits(x, &mut p);
                    let top = p.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    p.iter_mut().for_each(|z| *z = (*z - top).exp());
                    let sum: f64 = p.iter().sum();
                    p.iter_mut().for_each(|z| *z /= sum);
                    p[train_labels[i] as usize] -= 1.0;
                    p
                })
                .collect();
            let scale = 1.0 / batch.len() as f64;
            let mut gw = vec![0.0f64; classes * d];
            let mut gb = vec![0.0f64; classes];
            for (&i, g) in batch.iter().zip(&grads) {
                let x = &xtr[i * d..(i + 1) * d];
                for c in 0..classes {
                    gb[c] += g[c] * scale;
                    for (w, &v) in gw[c * d..(c + 1) * d].iter_mut().zip(x) {
                        *w += g[c] * scale * v;
                    }
                }
            }
            for ((w, v), g) in model.w.iter_mut().zip(&mut vw).zip(&gw) {
                *v = cfg.momentum * *v + g + cfg.weight_decay * *w;
                *w -= lr * *v;
            }
            for ((b, v), g) in model.b.iter_mut().zip(&mut vb).zip(&gb) {
                *v = cfg.momentum * *v + g;
                *b -= lr * *v;
            }
            step += 1;
        }
    }
    let accuracy = |x: &[f64], labels: &[i64]| {
        let hits = (0..labels.len())
            .into_par_iter()
            .filter(|&i| model.predict(&x[i * d..(i + 1) * d], classes) as i64 == labels[i])
            .count();
        hits as f64 / labels.len().max(1) as f64
    };
    Ok(LinearProbe {
        train_top1: accuracy(&xtr, train_labels),
        test_top1: accuracy(&xte, test_labels),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    /// Tight clusters (noise +-0.2) around random centres (coordinates +-3): linearly
    /// separable.
    fn separable(n: usize, d: usize, classes: usize, seed: u64) -> (Vec<f32>, Vec<i64>) {
        let mut r = rng(seed);
        let centres: Vec<f32> = (0..classes * d)
            .map(|_| r.random_range(-1.0f32..1.0))
            .collect();
        let mut x = Vec::with_capacity(n * d);
        let mut labels = Vec::with_capacity(n);
        for i in 0..n {
            let c = i % classes;
            labels.push(c as i64);
            for j in 0..d {
                x.push(3.0 * centres[c * d + j] + r.random_range(-0.2f32..0.2));
            }
        }
        (x, labels)
    }

    #[test]
    fn a_linearly_separable_set_is_separated() {
        let (d, classes) = (16, 5);
        let (train, train_labels) = separable(500, d, classes, 1);
        let (test, test_labels) = separable(200, d, classes, 1);
        let cfg = LinearProbeConfig::default();
        let probe =
            linear_probe(&train, &train_labels, &test, &test_labels, d, classes, &cfg).unwrap();
        assert_eq!(
            probe,
            LinearProbe {
                train_top1: 1.0,
                test_top1: 1.0
            }
        );
    }

    #[test]
    fn random_labels_are_not_learnt_beyond_chance_on_the_test_split_and_bad_input_is_refused() {
        let (d, classes) = (8, 4);
        let (train, _) = separable(400, d, classes, 2);
        let mut r = rng(3);
        let noise: Vec<i64> = (0..400)
            .map(|_| r.random_range(0..classes as i64))
            .collect();
        let (test, _) = separable(400, d, classes, 2);
        let test_noise: Vec<i64> = (0..400)
            .map(|_| r.random_range(0..classes as i64))
            .collect();
        let cfg = LinearProbeConfig::default();
        let probe = linear_probe(&train, &noise, &test, &test_noise, d, classes, &cfg).unwrap();
        assert!(probe.test_top1 < 0.4, "chance is 0.25: {probe:?}");
        let again = linear_probe(&train, &noise, &test, &test_noise, d, classes, &cfg).unwrap();
        assert_eq!(probe, again, "seeded");

        let err =
            linear_probe(&train[1..], &noise, &test, &test_noise, d, classes, &cfg).unwrap_err();
        assert!(err.to_string().contains("not rows of 8"), "{err}");
        let mut bad = noise.clone();
        bad[0] = 9;
        let err = linear_probe(&train, &bad, &test, &test_noise, d, classes, &cfg).unwrap_err();
        assert!(
            err.to_string().contains("label 9 outside the 4 classes"),
            "{err}"
        );
    }
}
