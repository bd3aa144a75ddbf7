//! k x k average pooling with stride k on NCHW activations (k = H = W is global pooling):
//! `y[nc][oy][ox]` = the mean of `x[nc][oy k + i][ox k + j]`; backward spreads dy evenly over each
//! window (windows do not overlap, so every input gets exactly one term).

pub mod cpu;
pub mod cuda;
pub mod node;

pub use node::PoolDevice;

use super::Shape4;

/// The pooled shape of `xs`.
pub fn out_shape(xs: Shape4, k: usize) -> Shape4 {
    Shape4 {
        n: xs.n,
        c: xs.c,
        h: xs.h / k,
        w: xs.w / k,
    }
}

/// The CUDA kernel versions of pooling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Version {
    /// One thread per output (forward) or input (backward), grid-stride.
    #[default]
    V1,
}
crate::serde_by_name!(Version);
