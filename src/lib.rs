//! # invaspread
//!
//! Unsupervised embedding learning by the method of Ye et al., CVPR 2019 ("Unsupervised
//! Embedding Learning via Invariant and Spreading Instance Feature"): an instance-wise softmax
//! over the real features of a batch, invariant to augmentation and spread across instances.
//!
//! ## Map of the crate
//! | module | what it holds |
//! |---|---|
//! | [`loss`] | the instance loss: config and validation; [`loss::reference`], the float64 truth; [`loss::cpu`], the fused CPU path; [`loss::cuda`], every GPU version |
//! | [`ops`] | operations with a CPU implementation and a CUDA launcher side by side ([`ops::normalize_rows`]) |
//! | [`cuda`] | the GPU runtime: [`cuda::Gpu`] (never panics without CUDA) and the embedded kernel modules |
//! | [`linalg`] | a bounds-checked front to the `gemm` crate's matrix product |
//! | [`simd`] | f32/f64 SIMD vectors (`wide`) and row helpers for the CPU paths |
//! | [`nn`] | the encoder: autodiff tape, the backend trait with its CPU and CUDA ([`nn::cuda_backend`]) implementations, ResNet18/ConvNet, SGD, checkpoints |
//! | [`data`] | datasets (synthetic default, digits, CIFAR-10, STL-10, image folders) and the recipe's augmentation |
//! | [`eval`] | weighted kNN, Recall@K, k-means NMI |
//! | [`trainer`] | the training loop of `invaspread train` on either backend: metrics, checkpoints, resume |
//! | [`npy`] | `.npy` reading and writing with clear errors, atomic writes |
//! | [`error`] | the crate's [`Error`] type |
//! | [`bench`](mod@bench) | timing of the loss implementations for `bench-loss` and criterion |
//! | [`testing`] | seeded inputs and the `SKIPPED (no GPU)` guard used by tests and benches |
//!
//! The CUDA sources live in `kernels/` (see `kernels/README.md` for the table of kernels and
//! versions); `build.rs` compiles them with nvcc into fat binaries embedded in this crate.

pub mod bench;
pub mod cuda;
pub mod data;
pub mod error;
pub mod eval;
pub mod linalg;
pub mod loss;
pub mod nn;
pub mod npy;
pub mod ops;
pub mod simd;
pub mod testing;
pub mod trainer;

pub use error::{Error, Result};
pub use loss::{GradSemantics, LossConfig};
