//! # invaspread
//!
//! Unsupervised embedding learning by the method of Ye et al., CVPR 2019 ("Unsupervised
//! Embedding Learning via Invariant and Spreading Instance Feature"): an instance-wise softmax
//! over the real features of a batch, invariant to augmentation and spread across instances.
//!
//! ## Map of the crate
//!
//! Lower rows never depend on higher ones (no module circles).
//!
//! | module | what it holds |
//! |---|---|
//! | [`trainer`] | `invaspread train` in parts: configuration as data (`config.json`), the run, the batch worker, loss read-back, outputs, evaluation, data-parallel runs (`trainer::ranks`: rank 0 writes and hands the others its state, sharded batches and kNN, agreed stops) |
//! | [`nn`] | the encoder: autodiff tape, the `Backend` trait and its CPU and CUDA implementations, a CUDA backend as one rank of a data-parallel group (`nn::data_parallel`: gathered loss, summed gradients, `--sync-bn`), ResNet18/ConvNet, SGD, checkpoints, embeddings |
//! | [`methods`] | the paper's baselines beside the method (`--method npid\|nce\|exemplar`): memory bank, NCE, exemplar classifier, their state |
//! | [`eval`] | metrics of embeddings: weighted kNN, Recall@K, k-means NMI |
//! | [`data`] | datasets, one file each (synthetic default, digits, CIFAR-10, STL-10, image folders), and the recipe's augmentation |
//! | [`bench`](mod@bench) | timing of the loss implementations for `bench-loss` and criterion, each checked against the float64 truth first; floors from rates measured on the machine ([`bench::floor`]) |
//! | [`testing`] | adversarial inputs, error measures, the `SKIPPED (no GPU)` guard and the virtual GPU's notes for tests and benches |
//! | [`loss`] | the instance loss: config and validation; [`loss::reference`], the float64 truth; [`loss::check`], an output against it; [`loss::cpu`], the fused CPU path; [`loss::cuda`], every GPU version, a file each; [`loss::gathered`], a global batch over data-parallel ranks |
//! | [`dist`] | data-parallel process groups: the launcher's variables (`RANK`, `WORLD_SIZE`, ...), the start-up rendezvous that checks every rank's configuration, and NCCL's collectives with a watchdog that names a failed rank ([`dist::nccl`]), and `invaspread launch` ([`dist::launch`]) |
//! | [`ops`] | one folder per op: its math and parameter structs, `cpu.rs`, `cuda.rs` (the launchers of `kernels/<op>.cu`) |
//! | [`cuda`] | the GPU runtime only: [`cuda::Gpu`] and its module cache, launches ([`cuda::Queue`]), the one cuBLAS front, staged copies, the choice of device and the virtual GPU ([`cuda::virtual_gpu`]) |
//! | [`linalg`], [`simd`], [`scratch`] | a bounds-checked front to the `gemm` crate; f32/f64 SIMD vectors for the CPU paths; scratch buffers kept between calls |
//! | [`npy`] | `.npy` reading and writing with clear errors |
//! | [`plot`] | charts as PNG with axes, ticks, labels and legends: `metrics.png`, `invaspread plot`, `embed --png` |
//! | [`durable`] | atomic, synced file writes; leftovers of killed writers |
//! | [`test_hooks`] | fault injection for the crate's tests, only with the `test-hooks` feature |
//! | [`limits`] | the range of every numeric setting (flags, config files, library calls) and the memory check before large allocations |
//! | [`names`] | one spelling for every named choice (clap's `ValueEnum` names, also in config files) |
//! | [`rng`] | seeded generators |
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
