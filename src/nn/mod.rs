//! The encoder: a small autodiff graph and the models it trains.
//!
//! | module | what it holds |
//! |---|---|
//! | [`graph`] | the tape: ops recorded in execution order, backward in reverse, buffers reused |
//! | [`backend`] | the `Backend` trait (buffers and kernels of a device) and its CPU implementation |
//! | [`cuda_backend`] | the CUDA implementation of `Backend`: cuBLAS GEMMs and the kernels in kernels/ |
//! | [`cpu_ops`] | the CPU kernels: conv2d (im2col + GEMM), batchnorm, relu, add, pooling, linear |
//! | [`params`] | named parameters and batchnorm buffers (PyTorch's names and init) |
//! | [`models`] | `resnet18-cifar` and `convnet-small` |
//! | [`optim`] | SGD with momentum and weight decay; step and cosine schedules with warm-up |
//! | [`checkpoint`] | safetensors files that PyTorch's `load_state_dict(strict=True)` takes |
//! | [`train`] | one training step on two augmented views (used by the bench and the trainer) |

pub mod backend;
pub mod checkpoint;
pub mod cpu_ops;
pub mod cuda_backend;
pub mod graph;
pub mod models;
pub mod optim;
pub mod params;
pub mod train;
