//! An implementation's output against the float64 truth, as a benchmark checks each version
//! before it times it (a fast kernel that computes the wrong loss is worth nothing) and as the
//! tests measure error.
//!
//! The truth is the float64 [`reference`](mod@reference) up to [`REFERENCE_MAX_N`] (it keeps N x N), and the
//! fused CPU path in float64 above (tested against the reference in tests/cpu/cpu_loss.rs, and
//! O(N) in memory). The loss is compared relatively; dL/dz with each row scaled by ||z_a||
//! ([`scaled_grad_error`]), because dL/dz_a shrinks as 1/||z_a|| and rows of any norm must count.

use super::{cpu, reference, LossConfig};
use crate::error::{Error, Result};

/// Largest N for which the truth is the reference itself (N x N float64 coefficients: 134 MB).
pub const REFERENCE_MAX_N: usize = 4096;

/// The float64 loss, and dL/dz when asked for, of one input.
#[derive(Debug, Clone)]
pub struct Truth {
    d: usize,
    loss: f64,
    grad_z: Option<Vec<f64>>,
    /// ||z_a|| per row, for [`scaled_grad_error`].
    norms: Vec<f64>,
}

impl Truth {
    /// The truth for `z` (N x d, row-major); see the module documentation for which path.
    pub fn of(z: &[f32], n: usize, d: usize, cfg: &LossConfig, with_grad: bool) -> Result<Truth> {
        let (loss, grad_z) = if n <= REFERENCE_MAX_N {
            let out = reference::instance_loss(z, n, d, cfg, with_grad)?;
            (out.loss, out.grad_z)
        } else {
            let z64: Vec<f64> = z.iter().map(|&x| f64::from(x)).collect();
            let out = cpu::instance_loss(&z64, n, d, cfg, with_grad)?;
            (out.loss, out.grad_z)
        };
        Ok(Truth {
            d,
            loss,
            grad_z,
            norms: row_norms(z, d),
        })
    }

    pub fn loss(&self) -> f64 {
        self.loss
    }

    /// The worse of the loss's relative error and dL/dz's scaled error (when both have one).
    /// NaN or infinity counts as infinitely wrong.
    pub fn error(&self, loss: f64, grad_z: Option<&[f32]>) -> f64 {
        let loss_err = if loss.is_finite() {
            (loss - self.loss).abs() / self.loss.abs().max(f64::MIN_POSITIVE)
        } else {
            f64::INFINITY
        };
        let grad_err = match (grad_z, &self.grad_z) {
            (Some(got), Some(want)) => {
                let got: Vec<f64> = got.iter().map(|&x| f64::from(x)).collect();
                scaled_error(&got, want, &self.norms, self.d)
            }
            _ => 0.0,
        };
        loss_err.max(grad_err)
    }

    /// [`Truth::error`], or an error naming `what` when it is above `tolerance`.
    pub fn check(
        &self,
        what: &str,
        loss: f64,
        grad_z: Option<&[f32]>,
        tolerance: f64,
    ) -> Result<f64> {
        let err = self.error(loss, grad_z);
        if err <= tolerance {
            Ok(err)
        } else {
            Err(Error::invalid(format!(
                "{what} disagrees with the float64 truth: loss {loss} against {}, error {err:.3e} \
                 above {tolerance:.1e} (loss relative, dL/dz scaled by row norms)",
                self.loss
            )))
        }
    }
}

fn row_norms(z: &[f32], d: usize) -> Vec<f64> {
    z.chunks_exact(d.max(1))
        .map(|row| {
            row.iter()
                .map(|&x| f64::from(x) * f64::from(x))
                .sum::<f64>()
                .sqrt()
        })
        .collect()
}

/// Largest error of dL/dz with each row scaled by ||z_a|| (which makes every row's gradient
/// comparable: dz_a ||z_a|| is the projected dL/df_a), relative to the largest such reference
/// entry. NaN counts as infinitely wrong.
pub fn scaled_grad_error(got: &[f64], want: &[f64], z: &[f32], d: usize) -> f64 {
    scaled_error(got, want, &row_norms(z, d), d)
}

fn scaled_error(got: &[f64], want: &[f64], norms: &[f64], d: usize) -> f64 {
    let mut worst = 0.0f64;
    let mut scale = 0.0f64;
    for (a, &norm) in norms.iter().enumerate() {
        for k in 0..d {
            let (g, w) = (got[a * d + k] * norm, want[a * d + k] * norm);
            worst = worst.max(if g.is_nan() {
                f64::INFINITY
            } else {
                (g - w).abs()
            });
            scale = scale.max(w.abs());
        }
    }
    worst / scale.max(f64::MIN_POSITIVE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::{random_matrix, rng};

    #[test]
    fn the_fused_truth_above_the_reference_limit_agrees_with_the_reference() {
        // The switch at REFERENCE_MAX_N must not change the truth: both paths on one input.
        let (n, d) = (64, 9);
        let z = random_matrix(&mut rng(5), n, d);
        let cfg = LossConfig::default();
        let want = reference::instance_loss(&z, n, d, &cfg, true).unwrap();
        let z64: Vec<f64> = z.iter().map(|&x| f64::from(x)).collect();
        let fused = cpu::instance_loss(&z64, n, d, &cfg, true).unwrap();
        let truth = Truth::of(&z, n, d, &cfg, true).unwrap();
        assert!((fused.loss - want.loss).abs() <= 1e-12 * want.loss);
        let grad: Vec<f32> = want.grad_z.unwrap().iter().map(|&x| x as f32).collect();
        // The reference's own gradient, rounded to float32, is within float32 rounding.
        assert!(truth.error(want.loss, Some(&grad)) < 1e-6);
        // A wrong loss and a NaN gradient are caught, naming what was checked.
        let e = truth
            .check("fused-v9 N=64", want.loss * 1.01, None, 5e-5)
            .unwrap_err();
        assert!(e.to_string().contains("fused-v9 N=64 disagrees"), "{e}");
        let mut bad = grad.clone();
        bad[3] = f32::NAN;
        assert_eq!(truth.error(want.loss, Some(&bad)), f64::INFINITY);
    }
}
