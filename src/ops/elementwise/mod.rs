//! Elementwise ops of the encoder: relu forward and backward, copy-or-add (the add layer,
//! flatten and gradient fan-in), axpy (the loss gradient scaled by its upstream gradient), and
//! the f64 -> f32 copy of a scalar (the loss into its graph node).

pub mod cpu;
pub mod cuda;
pub mod node;

pub use node::ElementwiseDevice;

/// The CUDA kernel versions of the elementwise ops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Version {
    /// Grid-stride loops, block 256.
    #[default]
    V1,
}
crate::serde_by_name!(Version);
