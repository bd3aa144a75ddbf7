//! The training loop behind `invaspread train`, in parts:
//!
//! | module | what it does |
//! |---|---|
//! | this file | the run's configuration ([`TrainConfig`], serialised as `config.json`), its options, and [`train`], which picks the backend |
//! | [`config`] | `config.json`: written by every run, read back by `train --config` with errors naming the file, the field and the value |
//! | [`run`] | the run itself: start or resume, the steps, the end of an epoch, a clean stop on Ctrl-C |
//! | [`batches`] | the batch worker: two augmented views per image, prepared on a thread one step ahead |
//! | [`losses`] | the losses of a window of steps on their way back from the device |
//! | [`outputs`] | metrics.csv/json/png, steps.csv and the checkpoints |
//! | [`evaluate`] | the per-epoch kNN on the test split, and the raw-pixel baseline |
//! | [`ranks`] | data-parallel runs: joining the group, the state rank 0 hands the others, stops all ranks agree on |
//!
//! Everything random is a function of the seed and the step (data order per epoch, each view's
//! augmentation), and the checkpoint holds the rest of the state (parameters, batchnorm
//! statistics, momentum, the step, the epoch's running loss), so a resumed run computes the
//! same losses as an uninterrupted one with the same thread count.

pub mod batches;
pub mod config;
pub mod evaluate;
pub mod lock;
pub mod losses;
pub mod outputs;
pub mod ranks;
pub mod run;
pub mod signals;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::backend::CudaBackend;
use crate::backend::{Backend, Cpu};
use crate::cuda::GemmPrecision;
use crate::cuda::Gpu;
use crate::data::{DataConfig, Dataset};
use crate::dist::collectives::{Collectives, SingleDevice};
use crate::error::Result;
use crate::loss::LossConfig;
use crate::loss::{CpuLossVersion, CudaLossVersion, LossVersion};
use crate::names::Named;
use crate::nn::models::ModelKind;
use crate::nn::optim::{Schedule, SgdConfig};
use crate::nn::EncoderKernels;
use crate::ops::conv2d;

pub use config::Recorded;
pub use outputs::EpochMetrics;

/// Everything that defines a run: what `config.json` holds and `train --config` replays.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub model: ModelKind,
    /// The dataset (informational when a caller hands [`train`] a loaded dataset).
    pub data: DataConfig,
    pub epochs: Option<usize>,
    pub steps: Option<usize>,
    /// Images per step (each gives two views: 2 x batch rows).
    pub batch: usize,
    pub sgd: SgdConfig,
    pub schedule: Schedule,
    pub warmup_steps: usize,
    /// The recipe's augmentations this run applies (configurations from before the choice
    /// applied all four).
    #[serde(default)]
    pub augment: crate::data::augment::Augmentations,
    pub loss: LossConfig,
    /// How the run learns: the method, or one of the paper's baselines (configurations from
    /// before the choice: the method).
    #[serde(default)]
    pub method: crate::methods::MethodKind,
    /// Where the encoder trains, and which loss implementation it runs.
    pub backend: BackendChoice,
    /// Steps between loss reads (None: every step on the CPU, every
    /// [`CUDA_LOSS_READ_EVERY`] on a GPU). Reads never change what is computed.
    pub loss_read_every: Option<usize>,
    pub seed: u64,
    pub knn: KnnConfig,
    /// The classes evaluated (`--eval-classes`, a class spec like `data.classes`); None: the
    /// training classes. Classes outside the training ones make an unseen-category run, whose
    /// per-epoch metric is Recall@1 among their test images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_classes: Option<String>,
    /// Data-parallel ranks (processes, one GPU each) the global batch `batch` is split over:
    /// the launcher's WORLD_SIZE (configurations from before the choice: one).
    #[serde(
        default = "TrainConfig::one_rank",
        skip_serializing_if = "TrainConfig::is_one"
    )]
    pub ranks: usize,
    /// BatchNorm's training statistics over the global batch (`--sync-bn`, PyTorch's
    /// SyncBatchNorm); otherwise each rank normalizes its own images, as PyTorch's DDP does.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sync_bn: bool,
    /// What the run found when it wrote config.json (the dataset's size, the thread count);
    /// ignored when the file is read back as a configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recorded: Option<Recorded>,
}

impl Default for TrainConfig {
    /// The recipe's settings (../shared/notes/recipe.md) on the built-in dataset.
    fn default() -> Self {
        TrainConfig {
            model: ModelKind::ConvnetSmall,
            data: DataConfig::default(),
            epochs: None,
            steps: None,
            batch: 128,
            sgd: SgdConfig::default(),
            schedule: Schedule::paper_step(),
            warmup_steps: 0,
            augment: crate::data::augment::Augmentations::all(),
            loss: LossConfig::default(),
            method: crate::methods::MethodKind::Invaspread,
            backend: BackendChoice::Cpu {
                loss: CpuLossVersion::Fused,
                conv: conv2d::CpuVersion::default(),
            },
            loss_read_every: None,
            seed: 0,
            knn: KnnConfig::default(),
            eval_classes: None,
            ranks: 1,
            sync_bn: false,
            recorded: None,
        }
    }
}

impl TrainConfig {
    fn one_rank() -> usize {
        1
    }

    fn is_one(ranks: &usize) -> bool {
        *ranks == 1
    }
}

/// The weighted kNN evaluation of the initial network and of the epochs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KnnConfig {
    /// Neighbours.
    pub k: usize,
    /// Temperature of the vote weights exp(s / sigma).
    pub sigma: f64,
    /// Evaluate every this many epochs (and always after the last); the epochs between get
    /// their loss row without kNN. Configurations from before the option evaluated every one.
    #[serde(default = "KnnConfig::every_epoch")]
    pub every: usize,
    /// Also print kNN on raw pixels at the start (the baseline to beat; about a minute on
    /// CIFAR-10), when progress is shown.
    #[serde(default = "KnnConfig::with_pixel_baseline")]
    pub pixel_baseline: bool,
}

impl KnnConfig {
    fn every_epoch() -> usize {
        1
    }

    fn with_pixel_baseline() -> bool {
        true
    }

    /// Whether the epoch `epoch` (1-based) is evaluated in a run of `epochs` (rounded up).
    pub fn evaluates(&self, epoch: usize, last: bool) -> bool {
        last || epoch.is_multiple_of(self.every.max(1))
    }
}

impl Default for KnnConfig {
    fn default() -> Self {
        KnnConfig {
            k: 200,
            sigma: 0.1,
            every: KnnConfig::every_epoch(),
            pixel_baseline: KnnConfig::with_pixel_baseline(),
        }
    }
}

/// How a run is carried out, not what it computes.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Output folder: metrics, plot, checkpoints, configuration.
    pub out: PathBuf,
    /// Continue the run in `out` from its last checkpoint.
    pub resume: bool,
    /// Show a progress bar (off in tests).
    pub progress: bool,
    /// This process's place in a data-parallel group (the launcher's variables); None: one
    /// process. Its world size must be the configuration's `ranks`.
    pub group: Option<crate::dist::DistEnv>,
    /// A data-parallel run's MiB of parameter gradients per all-reduce (`--bucket-mb`).
    pub bucket_mb: f64,
    /// `--resume` accepts the run's dataset at another path (`--allow-moved-data`); its
    /// classes, counts and fingerprint are still checked.
    pub allow_moved_data: bool,
}

/// The device a run trains on and its loss implementation (a CPU or a CUDA version of the
/// loss registry, `loss::versions`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    tag = "device",
    rename_all = "kebab-case",
    deny_unknown_fields,
    try_from = "BackendFile"
)]
pub enum BackendChoice {
    /// The CPU backend (float32) with the given loss version; `conv` is the convolution's
    /// version (configurations written before the choice existed ran im2col, and resume with
    /// it).
    Cpu {
        loss: CpuLossVersion,
        conv: conv2d::CpuVersion,
    },
    /// The CUDA backend on device 0 with the given loss kernels, GEMM precision and encoder
    /// kernel versions.
    Cuda {
        loss: CudaLossVersion,
        precision: GemmPrecision,
        kernels: EncoderKernels,
    },
}

/// [`BackendChoice`] as config.json may hold it: also as configurations before the loss
/// registry wrote it (`"reference_loss": true|false` on the CPU).
#[derive(Deserialize)]
#[serde(tag = "device", rename_all = "kebab-case", deny_unknown_fields)]
enum BackendFile {
    Cpu {
        #[serde(default)]
        loss: Option<CpuLossVersion>,
        #[serde(default)]
        reference_loss: Option<bool>,
        #[serde(default = "conv2d::CpuVersion::legacy")]
        conv: conv2d::CpuVersion,
    },
    Cuda {
        loss: CudaLossVersion,
        precision: GemmPrecision,
        #[serde(default)]
        kernels: EncoderKernels,
    },
}

impl TryFrom<BackendFile> for BackendChoice {
    type Error = String;

    fn try_from(file: BackendFile) -> std::result::Result<Self, String> {
        Ok(match file {
            BackendFile::Cpu {
                loss,
                reference_loss,
                conv,
            } => {
                let loss = match (loss, reference_loss) {
                    (Some(_), Some(_)) => {
                        return Err(
                            "backend: give `loss`, or the older `reference_loss`, not both".into(),
                        )
                    }
                    (Some(loss), None) => loss,
                    (None, Some(true)) => CpuLossVersion::Reference,
                    (None, Some(false) | None) => CpuLossVersion::Fused,
                };
                BackendChoice::Cpu { loss, conv }
            }
            BackendFile::Cuda {
                loss,
                precision,
                kernels,
            } => BackendChoice::Cuda {
                loss,
                precision,
                kernels,
            },
        })
    }
}

impl BackendChoice {
    /// The run's loss version.
    pub fn loss(&self) -> LossVersion {
        match *self {
            BackendChoice::Cpu { loss, .. } => LossVersion::Cpu(loss),
            BackendChoice::Cuda { loss, .. } => LossVersion::Cuda(loss),
        }
    }

    /// How the run's loss is computed, for messages.
    pub fn describe(&self) -> String {
        match self {
            BackendChoice::Cpu { loss, conv } => {
                format!("cpu {} loss, {} convolutions", loss.name(), conv.name())
            }
            BackendChoice::Cuda {
                loss, precision, ..
            } => {
                format!("cuda {} {}", loss.name(), precision.name())
            }
        }
    }

    /// Steps between reads of the loss: every step on the CPU (free), every few on a GPU
    /// (each read waits for the device to drain its queue).
    pub fn loss_read_every(&self) -> usize {
        match self {
            BackendChoice::Cpu { .. } => 1,
            BackendChoice::Cuda { .. } => CUDA_LOSS_READ_EVERY,
        }
    }
}

/// Steps between loss reads on a GPU.
pub const CUDA_LOSS_READ_EVERY: usize = 10;

/// The result of a run.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub metrics: Vec<EpochMetrics>,
    /// Every step's loss of this invocation (a resumed run starts at its first new step).
    pub step_losses: Vec<f64>,
    pub interrupted: bool,
    /// kNN of the initialised network (None for a resumed run that evaluated it before, or an
    /// unseen-class run).
    pub knn_at_start: Option<crate::eval::KnnAccuracy>,
    /// The classes trained on and evaluated on (names).
    pub classes_trained: Vec<String>,
    pub classes_evaluated: Vec<String>,
    /// The evaluated classes include some not trained on (Recall@1, not kNN).
    pub unseen: bool,
}

/// Set by Ctrl-C; the loop saves and stops at the next step boundary.
pub fn stop_flag() -> Arc<AtomicBool> {
    static FLAG: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();
    FLAG.get_or_init(|| Arc::new(AtomicBool::new(false)))
        .clone()
}

/// Trains as configured on `ds`; see the module documentation.
pub fn train(cfg: &TrainConfig, opts: &RunOptions, ds: Arc<Dataset>) -> Result<TrainSummary> {
    match cfg.backend {
        BackendChoice::Cpu { loss, conv } => {
            cfg.backend.loss().supports(&cfg.loss)?;
            let backend = Cpu::<f32>::new().with_option(loss).with_option(conv);
            run::Run::start(cfg, opts, ds, backend, Arc::new(SingleDevice))?.train()
        }
        BackendChoice::Cuda {
            loss,
            precision,
            kernels,
        } => {
            crate::loss::cuda::validate_for_kernels(&cfg.loss)?;
            if cfg.method == crate::methods::MethodKind::Invaspread {
                crate::loss::cuda::check_version_supports(&cfg.loss, loss)?;
            }
            let gpu = match &opts.group {
                None => Gpu::require()?,
                Some(env) => Gpu::require_ordinal(env.local_rank)?,
            };
            let gpu = Arc::new(gpu);
            if opts.progress {
                eprintln!(
                    "training on {}{} ({} loss kernels, {} GEMMs)",
                    gpu.name()?,
                    ranks::describe(cfg, opts),
                    loss.name(),
                    precision.name()
                );
            }
            let backend = kernels
                .apply(CudaBackend::new(gpu.clone())?.with_option(loss))
                .with_gemm_precision(precision);
            let group: Arc<dyn Collectives<CudaBackend>> = match ranks::join(cfg, opts, &ds, &gpu)?
            {
                Some(group) => Arc::new(group),
                None => Arc::new(SingleDevice),
            };
            run::Run::start(cfg, opts, ds, backend, group)?.train()
        }
    }
}
