//! The encoder: a small autodiff graph and the models it trains.
//!
//! | module | what it holds |
//! |---|---|
//! | [`graph`] | the tape: ops recorded in execution order, backward in reverse, buffers reused |
//! | [`backend`] | the `Backend` trait: buffers and ops of a device, each op a call into `ops::<op>` |
//! | [`cpu_backend`] | the CPU implementation (f32 training, f64 gradient checks) |
//! | [`cuda_backend`] | the CUDA implementation, its scratch and the kernel version of every op |
//! | [`data_parallel`] | a CUDA backend as one rank of a group: the gathered loss, the gradients summed over ranks |
//! | [`gradient_buckets`] | a rank's parameter gradients all-reduced in buckets while the backward pass runs |
//! | [`params`] | named parameters and batchnorm buffers (PyTorch's names and init) |
//! | [`models`] | `resnet18-cifar` and `convnet-small` |
//! | [`optim`] | SGD with momentum and weight decay; step and cosine schedules with warm-up |
//! | [`checkpoint`] | safetensors files that PyTorch's `load_state_dict(strict=True)` takes |
//! | [`step`] | one training step on two augmented views (used by the bench and the trainer) |
//! | [`embed`] | L2-normalized embeddings of a dataset split on the backend, and the kNN over them |

pub mod backend;
pub mod checkpoint;
pub mod cpu_backend;
pub mod cuda_backend;
pub mod data_parallel;
pub mod embed;
pub mod gradient_buckets;
pub mod graph;
pub mod models;
pub mod optim;
pub mod params;
pub mod step;
