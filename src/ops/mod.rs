//! The operations of the encoder and the loss, one folder each (the layout of dfdx): the op's
//! math, its argument structs and `#[repr(C)]` kernel parameters in `mod.rs`, the CPU
//! implementation in `cpu.rs`, the CUDA launchers of `kernels/<op>.cu` in `cuda.rs`. Backends
//! are one-line calls into these; the launchers are generic over [`Queue`](crate::cuda::Queue),
//! so the kernel emulator of the tests runs the same launch code as a GPU.
//!
//! | op | what | CPU | CUDA kernels |
//! |---|---|---|---|
//! | [`conv2d`] | 2-d convolution, no bias, forward, dW and dx | im2col + GEMM per image group; Winograd F(4x4, 3x3) for 3 x 3 stride 1 (`winograd/`) | `conv2d.cu`: im2col, col2im, layout permutes; cuBLAS GEMMs |
//! | [`batchnorm`] | BatchNorm2d, training and eval | float64 sums per channel | `batchnorm.cu` |
//! | [`elementwise`] | relu, copy/add, axpy | rayon chunks | `elementwise.cu` |
//! | [`pool`] | k x k average pooling, stride k | per plane | `pool.cu` |
//! | [`linear`] | y = x W^T + b | GEMM | `linear.cu` (bias, column sums) + cuBLAS |
//! | [`sgd`] | PyTorch's SGD on every parameter | per tensor | `sgd.cu`, one launch for all tensors |
//! | [`topk`] | kNN search: the k most similar bank rows of each query | GEMM per query block + select | `topk.cu` after a cuBLAS GEMM |
//! | [`normalize_rows`] | row L2-normalization, forward and backward | float64 sums | `normalize_rows.cu` |
//! | [`matmul`] | a handwritten tiled SGEMM (the unfused loss's baseline) | [`crate::linalg`] | `matmul.cu` |
//! | [`reduce`] | the mean of N doubles in a fixed order | a sum | `reduce.cu` |
//! | [`mma`] | warp-level tensor-core products (tf32, bf16) of the tensor-core loss versions: the PTX ISA's fragment layouts and their probe | the expected registers | `mma.cuh`, probed by `mma.cu` |
//!
//! Every op with CUDA kernels has a `Version` enum (`v1`, ...): versions are kept side by side,
//! selected by name (see `nn::encoder::EncoderKernels`). Each op's `node.rs` (or `device.rs`) holds its
//! tape op, its `Graph` method and its device trait, implemented for both backends.

pub mod batchnorm;
pub mod conv2d;
pub mod elementwise;
pub mod linear;
pub mod matmul;
pub mod mma;
pub mod normalize_rows;
pub mod pool;
pub mod reduce;
pub mod sgd;
pub mod topk;

/// The tape's shapes and gradient outputs, which every op takes.
pub use crate::tape::{Grad, Shape4};
