//! The encoder: the models, their ops' list, SGD, checkpoints, a training step and
//! embeddings. The tape they record on is [`crate::tape`], the ops themselves live in
//! [`crate::ops`] (and the loss in [`crate::loss`]), the backends in [`crate::backend`].
//!
//! | module | what it holds |
//! |---|---|
//! | [`encoder`] | the one list of encoder ops: the `Encoder` bound and `EncoderKernels` (each op's CUDA version) |
//! | [`models`] | `resnet18-cifar` and `convnet-small` (PyTorch's parameter names and init) |
//! | [`optim`] | SGD with momentum and weight decay; step and cosine schedules with warm-up |
//! | [`checkpoint`] | safetensors files that PyTorch's `load_state_dict(strict=True)` takes |
//! | [`step`] | one training step on two augmented views (used by the bench and the trainer) |
//! | [`embed`] | L2-normalized embeddings of a dataset split on the backend, and the kNN over them |

pub mod checkpoint;
pub mod embed;
pub mod encoder;
pub mod models;
pub mod optim;
pub mod step;

pub use encoder::{Encoder, EncoderKernels};
