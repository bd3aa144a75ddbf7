//! BatchNorm2d on NCHW activations, PyTorch's semantics (momentum 0.1, eps 1e-5, unbiased
//! running variance). Per channel c over its M = N H W values:
//!
//! - training: mean and biased var of the batch normalize; running_mean = (1 - m) running_mean
//!   + m mean, running_var = (1 - m) running_var + m var M / (M - 1)
//! - eval: the running statistics normalize
//! - y = gamma (x - mean) / sqrt(var + eps) + beta
//! - backward: dbeta += sum dy, dgamma += sum dy xhat; training dx = gamma inv / M (M dy -
//!   sum dy - xhat sum dy xhat), eval dx = gamma inv dy
//! - with `relu` (the CPU's fused batchnorm + ReLU): y = max(gamma xhat + beta, 0), and the
//!   backward first zeroes dy where that is 0, recomputing the mask from x with the forward's
//!   own float arithmetic so the two agree bit for bit. One pass fewer each way, and the
//!   pre-activation is never stored.

pub mod cpu;
pub mod cuda;
pub mod node;

pub use node::BatchNormDevice;

use super::{Grad, Shape4};

/// BatchNorm's constants (PyTorch's defaults).
pub const MOMENTUM: f64 = 0.1;
pub const EPS: f64 = 1e-5;

/// The forward pass; in training it also updates the running statistics.
#[derive(Debug)]
pub struct Forward<X, Y> {
    pub x: X,
    pub xs: Shape4,
    pub gamma: X,
    pub beta: X,
    pub running_mean: Y,
    pub running_var: Y,
    pub training: bool,
    /// Follow with a ReLU (y = max(bn(x), 0)); only the CPU fuses it.
    pub relu: bool,
    pub y: Y,
}

/// The backward pass: dgamma, dbeta += ...; dx when asked for.
#[derive(Debug)]
pub struct Backward<X, Y> {
    pub x: X,
    pub xs: Shape4,
    pub gamma: X,
    pub running_mean: X,
    pub running_var: X,
    pub training: bool,
    /// The forward was fused with a ReLU: dy is the gradient of max(bn(x), 0).
    pub relu: bool,
    pub dy: X,
    pub dx: Option<Grad<Y>>,
    pub dgamma: Y,
    pub dbeta: Y,
}

impl<X, Y> Forward<X, Y> {
    /// The same arguments through other handles to the buffers.
    pub fn map<X2, Y2>(self, fx: impl Fn(X) -> X2, fy: impl Fn(Y) -> Y2) -> Forward<X2, Y2> {
        Forward {
            x: fx(self.x),
            xs: self.xs,
            gamma: fx(self.gamma),
            beta: fx(self.beta),
            running_mean: fy(self.running_mean),
            running_var: fy(self.running_var),
            training: self.training,
            relu: self.relu,
            y: fy(self.y),
        }
    }
}

impl<X, Y> Backward<X, Y> {
    /// The same arguments through other handles to the buffers.
    pub fn map<X2, Y2>(self, fx: impl Fn(X) -> X2, fy: impl Fn(Y) -> Y2) -> Backward<X2, Y2> {
        Backward {
            x: fx(self.x),
            xs: self.xs,
            gamma: fx(self.gamma),
            running_mean: fx(self.running_mean),
            running_var: fx(self.running_var),
            training: self.training,
            relu: self.relu,
            dy: fx(self.dy),
            dx: self.dx.map(|g| g.map(&fy)),
            dgamma: fy(self.dgamma),
            dbeta: fy(self.dbeta),
        }
    }
}

/// The CUDA kernel versions of batchnorm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Version {
    /// One 512-thread block per channel for the statistics, float32 fixed-order reductions.
    V1,
    /// The reductions as a 2-D grid (image chunk x channel) combined in chunk order by the
    /// last block of each channel, 32-bit index math.
    #[default]
    V2,
}
crate::serde_by_name!(Version);
