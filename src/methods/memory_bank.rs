//! The memory-bank baselines of Wu et al. 2018 (zhirongw/lemniscate.pytorch), as
//! ../shared/notes/recipe.md states them: a bank V of one L2-normalised feature per training
//! image, initialised uniform in +-1/sqrt(d/3) as lemniscate does, read at temperature
//! T = 0.07 and, after each step, updated as v_i <- normalise(0.5 v_i + 0.5 f_i) for the
//! batch's images.
//!
//! - `npid` (non-parametric softmax): s_ij = f_i . v_j / T over all n entries,
//!   l_i = -log softmax_j(s_i)[y_i]; L = mean_i l_i; dL/ds_ij = (p_ij - [j = y_i]) / m.
//! - `nce`: for each image, K = 4,096 noise entries drawn uniformly (with replacement), the
//!   image's own entry first; o_ij = exp(s_ij) / Z with Z = n times the mean of exp(s) over the
//!   first batch's entries, then fixed (lemniscate's estimate, a known weakness); with
//!   c = K / n, l_i = -log(o_i0 / (o_i0 + c)) - sum_{j >= 1} log(c / (o_ij + c)),
//!   L = mean_i l_i; dL/ds_i0 = -c / (o_i0 + c) / m, dL/ds_ij = o_ij / (o_ij + c) / m.
//!
//! Both give dL/df_i = sum_j dL/ds_ij v_j / T (the bank is a constant, as in lemniscate), then
//! the normalisation's backward. Products with the whole bank run as float32 GEMMs; the
//! softmax and the sums run in float64.

use rand::Rng;
use rayon::prelude::*;

use super::StepLoss;
use crate::error::{Error, Result};
use crate::linalg::{matmul, MatRef};
use crate::rng::rng;

/// The bank's temperature (lemniscate's default).
pub const TEMPERATURE: f64 = 0.07;
/// The bank's update momentum.
pub const MOMENTUM: f64 = 0.5;
/// NCE's noise entries per image.
pub const NOISE: usize = 4096;

/// Which loss reads the bank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Objective {
    Softmax,
    Nce,
}

/// The bank and what its loss keeps (NCE's normaliser once estimated).
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryBank {
    pub objective: Objective,
    pub n: usize,
    pub d: usize,
    /// n x d, row i the feature of training image i.
    pub v: Vec<f32>,
    /// NCE's Z (None until the first batch sets it).
    pub z_nce: Option<f64>,
    /// Seeds NCE's noise draws (with the step).
    pub seed: u64,
}

const BANK: &str = "method.memory_bank";
const Z_NCE: &str = "method.nce_z";

impl MemoryBank {
    /// A bank of `n` entries of `d`, uniform in +-1/sqrt(d/3) from `seed`.
    pub fn new(n: usize, d: usize, objective: Objective, seed: u64) -> Result<MemoryBank> {
        crate::limits::check_allocation(
            "the memory bank (n x d float32)",
            (n as u64).checked_mul(d as u64 * 4),
        )?;
        let bound = 1.0 / (d as f32 / 3.0).sqrt();
        let mut r = rng(seed ^ 0xba_4b);
        let v = (0..n * d).map(|_| r.random_range(-bound..bound)).collect();
        Ok(MemoryBank {
            objective,
            n,
            d,
            v,
            z_nce: None,
            seed,
        })
    }

    fn check(&self, z: &[f32], indices: &[usize]) -> Result<()> {
        if z.len() != indices.len() * self.d {
            return Err(Error::invalid(format!(
                "memory bank: {} values for {} images of {}",
                z.len(),
                indices.len(),
                self.d
            )));
        }
        if let Some(&i) = indices.iter().find(|&&i| i >= self.n) {
            return Err(Error::invalid(format!(
                "memory bank: image {i} past the bank's {} entries",
                self.n
            )));
        }
        Ok(())
    }

    /// NCE's noise entries of step `step`: for each of `m` images, K indices in 0..n.
    pub fn noise(&self, step: u64, m: usize) -> Vec<usize> {
        let mut r = rng(self.seed ^ 0x0c_e000 ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        (0..m * NOISE).map(|_| r.random_range(0..self.n)).collect()
    }

    /// The loss of the raw embeddings `z` (one row per image of `indices`) and dL/dz; sets
    /// NCE's Z at the first call.
    pub fn loss(&mut self, z: &[f32], indices: &[usize], step: u64) -> Result<StepLoss> {
        self.check(z, indices)?;
        let (f, norms) = super::normalize(z, self.d);
        let (loss, df) = match self.objective {
            Objective::Softmax => self.softmax(&f, indices)?,
            Objective::Nce => {
                let noise = self.noise(step, indices.len());
                if self.z_nce.is_none() {
                    // Rounded to float32 at once, as the run state keeps it, so that a resumed
                    // run reads the very value an uninterrupted one uses.
                    let z = self.estimate_z(&f, indices, &noise) as f32;
                    self.z_nce = Some(f64::from(z));
                }
                self.nce(&f, indices, &noise)
            }
        };
        Ok(StepLoss {
            loss,
            dz: super::normalize_backward(&f, &norms, &df, self.d),
        })
    }

    /// NPID: the full softmax over the bank; (L, dL/df).
    fn softmax(&self, f: &[f64], indices: &[usize]) -> Result<(f64, Vec<f64>)> {
        let (m, n, d) = (indices.len(), self.n, self.d);
        let f32s: Vec<f32> = f.iter().map(|&x| x as f32).collect();
        let mut s = vec![0.0f32; m * n];
        matmul(
            MatRef::row_major(&f32s, m, d),
            MatRef::transposed(&self.v, n, d),
            &mut s,
            n,
            (1.0 / TEMPERATURE) as f32,
            false,
        )?;
        // Each row of s becomes dL/ds = (p - onehot) / m, its loss term kept aside.
        let losses = super::softmax_cross_entropy(&mut s, n, indices);
        let mut df32 = vec![0.0f32; m * d];
        matmul(
            MatRef::row_major(&s, m, n),
            MatRef::row_major(&self.v, n, d),
            &mut df32,
            d,
            (1.0 / TEMPERATURE) as f32,
            false,
        )?;
        let loss = losses.iter().sum::<f64>() / m as f64;
        Ok((loss, df32.into_iter().map(f64::from).collect()))
    }

    /// s_ij for image i's entries: its own, then its noise.
    fn entries<'a>(
        &'a self,
        i: usize,
        y: usize,
        noise: &'a [usize],
    ) -> impl Iterator<Item = usize> + 'a {
        std::iter::once(y).chain(noise[i * NOISE..(i + 1) * NOISE].iter().copied())
    }

    fn dot(&self, f: &[f64], j: usize) -> f64 {
        let v = &self.v[j * self.d..(j + 1) * self.d];
        f.iter().zip(v).map(|(a, &b)| a * f64::from(b)).sum::<f64>() / TEMPERATURE
    }

    /// Z = n mean(exp(s)) over every entry of the batch (lemniscate's first-batch estimate).
    fn estimate_z(&self, f: &[f64], indices: &[usize], noise: &[usize]) -> f64 {
        let d = self.d;
        let total: f64 = indices
            .par_iter()
            .enumerate()
            .map(|(i, &y)| {
                let fi = &f[i * d..(i + 1) * d];
                self.entries(i, y, noise)
                    .map(|j| self.dot(fi, j).exp())
                    .sum::<f64>()
            })
            .collect::<Vec<f64>>()
            .iter()
            .sum();
        total / (indices.len() * (NOISE + 1)) as f64 * self.n as f64
    }

    /// NCE with the fixed Z; (L, dL/df).
    fn nce(&self, f: &[f64], indices: &[usize], noise: &[usize]) -> (f64, Vec<f64>) {
        let (m, d) = (indices.len(), self.d);
        let z = self.z_nce.unwrap_or(1.0);
        let c = NOISE as f64 / self.n as f64;
        let rows: Vec<(f64, Vec<f64>)> = indices
            .par_iter()
            .enumerate()
            .map(|(i, &y)| {
                let fi = &f[i * d..(i + 1) * d];
                let mut loss = 0.0;
                let mut df = vec![0.0f64; d];
                for (k, j) in self.entries(i, y, noise).enumerate() {
                    let o = self.dot(fi, j).exp() / z;
                    let ds = if k == 0 {
                        loss -= (o / (o + c)).ln();
                        -c / (o + c)
                    } else {
                        loss -= (c / (o + c)).ln();
                        o / (o + c)
                    };
                    let v = &self.v[j * d..(j + 1) * d];
                    for (g, &vk) in df.iter_mut().zip(v) {
                        *g += ds * f64::from(vk) / (TEMPERATURE * m as f64);
                    }
                }
                (loss, df)
            })
            .collect();
        let loss = rows.iter().map(|r| r.0).sum::<f64>() / m as f64;
        (loss, rows.into_iter().flat_map(|r| r.1).collect())
    }

    /// v_i <- normalise(0.5 v_i + 0.5 f_i) for the batch's images (f the normalised `z`).
    pub fn update(&mut self, z: &[f32], indices: &[usize]) -> Result<()> {
        self.check(z, indices)?;
        let d = self.d;
        let (f, _) = super::normalize(z, d);
        for (i, &y) in indices.iter().enumerate() {
            let row = &mut self.v[y * d..(y + 1) * d];
            let mixed: Vec<f64> = row
                .iter()
                .zip(&f[i * d..(i + 1) * d])
                .map(|(&v, &fi)| MOMENTUM * f64::from(v) + (1.0 - MOMENTUM) * fi)
                .collect();
            let norm = mixed.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
            for (v, x) in row.iter_mut().zip(&mixed) {
                *v = (x / norm) as f32;
            }
        }
        Ok(())
    }

    pub fn tensors(&self) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        let mut t = vec![(BANK.to_string(), vec![self.n, self.d], self.v.clone())];
        if self.objective == Objective::Nce {
            // NaN until set (the value is a float32 from the start; see `loss`).
            t.push((
                Z_NCE.to_string(),
                vec![1],
                vec![self.z_nce.map_or(f32::NAN, |z| z as f32)],
            ));
        }
        t
    }

    pub fn set(&mut self, name: &str, values: &[f32]) -> Result<()> {
        match name {
            BANK => self.v.copy_from_slice(values),
            Z_NCE => {
                let z = values.first().copied().unwrap_or(f32::NAN);
                self.z_nce = if z.is_nan() { None } else { Some(f64::from(z)) };
            }
            other => return Err(Error::invalid(format!("memory bank: no tensor {other}"))),
        }
        Ok(())
    }
}
