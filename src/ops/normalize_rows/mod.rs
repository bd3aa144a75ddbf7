//! Row L2-normalization of an N x d matrix, as torch's F.normalize:
//! forward f_a = z_a / max(||z_a||, eps); backward dz_a = (df_a - f_a (f_a . df_a)) / ||z_a||
//! where ||z_a|| > eps, else df_a / eps (the clamp is a constant). The first and last step of
//! the instance loss, and how embeddings are normalized for the kNN evaluation.

pub mod cpu;
pub mod cuda;
pub mod device;

pub use device::NormalizeDevice;

use crate::error::{Error, Result};

/// Checks that `name` holds N x d elements (`d` = 1 for the norms).
fn check_len(name: &str, len: usize, n: usize, d: usize) -> Result<()> {
    if len != n * d {
        return Err(Error::invalid(format!(
            "{name} has {len} elements, expected {n} x {d} = {}",
            n * d
        )));
    }
    Ok(())
}

/// F.normalize's clamp on the norm (loss.md): rows with a smaller norm are divided by this.
pub const NORM_EPS: f64 = 1e-12;

/// The CUDA kernel versions of the normalization.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Version {
    /// One warp per row, float32 sums.
    #[default]
    V1,
}
crate::serde_by_name!(Version);
