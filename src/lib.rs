//! # invaspread
//!
//! Unsupervised embedding learning by the method of Ye et al., CVPR 2019 ("Unsupervised
//! Embedding Learning via Invariant and Spreading Instance Feature"): an instance-wise softmax
//! over the real features of a batch, invariant to augmentation and spread across instances.
//!
//! ## Map of the crate
//!
//! Lower rows never depend on higher ones (no module circles; `docs/ARCHITECTURE.md` says who
//! may call whom and where each kind of change goes).
//!
//! | module | what it holds |
//! |---|---|
//! | [`trainer`] | `invaspread train`: configuration as data (`config.json`), the run in parts (`trainer::run`: checkpointer, reporter, step loop, epoch end), the batch worker, loss read-back, outputs, evaluation, data-parallel runs (`trainer::ranks`) |
//! | [`bench`](mod@bench) | timing of the loss implementations for `bench-loss` and criterion, each checked against the float64 truth first; floors from rates measured on the machine ([`bench::floor`]) and its measured FMA peak ([`bench::peak`]) |
//! | [`testing`] | adversarial inputs, error measures, the `SKIPPED (no GPU)` guard and the virtual GPU's notes for tests and benches |
//! | [`methods`] | how a run learns: the [`methods::Method`] trait, the instance loss and the paper's baselines (`--method npid\|nce\|exemplar`: memory bank, NCE, exemplar classifier), their state |
//! | [`dist`] | collectives as a layer above the backends ([`dist::collectives`]: one device, or a data-parallel group), the launcher's variables, the rendezvous, NCCL with a watchdog, the data-parallel hooks of a CUDA rank ([`dist::data_parallel`]), `invaspread launch` |
//! | [`nn`] | the encoder: ResNet18/ConvNet, the one list of encoder ops ([`nn::encoder`]), SGD, checkpoints, the training step, embeddings |
//! | [`loss`] | the instance loss: the registry of its versions ([`loss::versions`]), config and validation, [`loss::reference`] (the float64 truth), [`loss::check`], [`loss::cpu`], [`loss::cuda`] (every GPU version, a file each), its tape node ([`loss::node`]), [`loss::gathered`] |
//! | [`eval`] | metrics of embeddings: weighted kNN, Recall@K, k-means NMI, the linear probe |
//! | [`ops`] | one folder per op: its math and parameter structs, `cpu.rs`, `cuda.rs` (the launchers of `kernels/<op>.cu`), `node.rs` (its tape op, `Graph` method and device trait for both backends) |
//! | [`tape`] | the autodiff tape: nodes, the `TapeOp` trait, parameters, extensions (hooks of a layer above), the gradient hook; no op |
//! | [`backend`] | where buffers live: the `Backend` trait (storage and copies only), `Cpu` and `CudaBackend` with their options and per-op state |
//! | [`cuda`] | the GPU runtime only: [`cuda::Gpu`] and its module cache, launches ([`cuda::Queue`]), the one cuBLAS front, staged copies, the choice of device and the virtual GPU ([`cuda::virtual_gpu`]) |
//! | [`data`] | datasets, one file each (synthetic default, digits, CIFAR-10, STL-10, image folders), and the recipe's augmentation |
//! | [`linalg`], [`simd`], [`scratch`] | a bounds-checked front to the `gemm` crate; f32/f64 SIMD vectors with exp/ln for the CPU paths, compiled for AVX-512, AVX2+FMA or SSE2 as the CPU has ([`simd::dispatch`]); scratch buffers kept between calls |
//! | [`npy`] | `.npy` reading and writing with clear errors |
//! | [`plot`] | charts as PNG with axes, ticks, labels and legends: `metrics.png`, `invaspread plot`, `embed --png` |
//! | [`durable`] | atomic, synced file writes; leftovers of killed writers |
//! | [`files`] | the one guarded read of a user's file (regular files only, bounded, never blocking on a FIFO) and the check of an output's target |
//! | [`limits`] | the range of every numeric setting (flags, config files, library calls) and the memory check before large allocations |
//! | [`names`] | one spelling for every named choice (clap's `ValueEnum` names, also in config files) |
//! | [`rng`] | seeded generators |
//! | [`test_hooks`] | fault injection for the crate's tests (a crash at a write, a signal at an evaluation), only with the `test-hooks` feature |
//! | [`error`] | the crate's [`Error`] type |
//!
//! The CUDA sources live in `kernels/` (see `kernels/README.md` for the table of kernels and
//! versions); `build.rs` compiles them with nvcc into fat binaries embedded in this crate.

pub mod backend;
pub mod bench;
pub mod cuda;
pub mod data;
pub mod dist;
pub mod durable;
pub mod error;
pub mod eval;
pub mod files;
pub mod limits;
pub mod linalg;
pub mod loss;
pub mod methods;
pub mod names;
pub mod nn;
pub mod npy;
pub mod ops;
pub mod plot;
pub mod rng;
pub mod scratch;
pub mod simd;
pub mod tape;
pub mod test_hooks;
pub mod testing;
pub mod trainer;

pub use error::{Error, Result};
pub use loss::{GradSemantics, LossConfig};
