//! `invaspread train`, `eval` and `embed`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use invaspread::cuda::Gpu;
use invaspread::data::{self, DatasetKind, LoadOptions, OnBadImage};
use invaspread::eval;
use invaspread::loss::cuda::CudaLossVersion;
use invaspread::loss::{GradSemantics, LossConfig};
use invaspread::nn::backend::{Backend, Cpu};
use invaspread::nn::checkpoint;
use invaspread::nn::cuda_backend::{CudaBackend, GemmPrecision};
use invaspread::nn::graph::Graph;
use invaspread::nn::models::{Model, ModelKind};
use invaspread::nn::optim::{Schedule, SgdConfig};
use invaspread::nn::params::ParamStore;
use invaspread::trainer::{self, BackendChoice, TrainConfig};
use invaspread::{npy, Error};

use super::Device;

/// Where the images come from.
#[derive(Debug, clap::Args)]
pub struct DataArgs {
    /// Which dataset; `synthetic` is generated and needs no file.
    #[arg(long, value_enum, default_value_t = DatasetKind::Synthetic)]
    dataset: DatasetKind,
    /// The dataset's folder (or file: digits.csv.gz, or a .tar.gz of an image folder).
    #[arg(long, value_name = "PATH")]
    data_dir: Option<PathBuf>,
    /// Resize every image to S x S.
    #[arg(long, value_name = "S")]
    image_size: Option<usize>,
    /// What to do with an image file that cannot be decoded.
    #[arg(long, value_enum, default_value_t = OnBadImage::Stop)]
    on_bad_image: OnBadImage,
    /// STL-10: also train on unlabeled_X.bin (the paper's "train + 100k unlabelled").
    #[arg(long)]
    stl10_unlabeled: bool,
}

impl DataArgs {
    fn load(&self, seed: u64) -> invaspread::Result<data::Dataset> {
        let opts = LoadOptions {
            data_dir: self.data_dir.clone(),
            image_size: self.image_size,
            on_bad_image: self.on_bad_image,
            stl10_unlabeled: self.stl10_unlabeled,
            seed,
        };
        let ds = data::load(self.dataset, &opts)?;
        eprintln!(
            "dataset {}: {} train{} and {} test images of {}x{}, {} classes{}",
            ds.name,
            ds.train.len(),
            if ds.unlabeled.is_empty() {
                String::new()
            } else {
                format!(" (+{} unlabelled)", ds.unlabeled.len())
            },
            ds.test.len(),
            ds.size,
            ds.size,
            ds.classes.len(),
            if ds.skipped > 0 {
                format!(", {} unreadable files skipped", ds.skipped)
            } else {
                String::new()
            }
        );
        Ok(ds)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ScheduleArg {
    /// x0.1 at epoch 120 and x0.01 at 160 (the paper's).
    Step,
    Cosine,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LossArg {
    /// The float64 reference (slow; stores N x N).
    Reference,
    /// The fused CPU loss.
    Fused,
    /// The unfused CUDA chain (--device cuda).
    Unfused,
    /// The unfused CUDA chain with cuBLAS products (--device cuda).
    UnfusedCublas,
    /// Fused CUDA kernels, one block per row (--device cuda).
    FusedV1,
    /// Fused, tiled CUDA kernels (--device cuda; its default).
    FusedV2,
}

#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    #[command(flatten)]
    data: DataArgs,
    /// The encoder.
    #[arg(long, value_enum, default_value_t = ModelKind::ConvnetSmall)]
    model: ModelKind,
    /// Epochs (passes over the training split, the last incomplete batch dropped).
    #[arg(long, conflicts_with = "steps")]
    epochs: Option<usize>,
    /// Steps instead of epochs; 0 writes the initialised network's checkpoint.
    #[arg(long)]
    steps: Option<usize>,
    /// Images per step (2 x batch rows: two views each).
    #[arg(long, default_value_t = 128)]
    batch: usize,
    #[arg(long, default_value_t = 0.03)]
    lr: f64,
    #[arg(long, default_value_t = 0.9)]
    momentum: f64,
    #[arg(long, default_value_t = 5e-4)]
    weight_decay: f64,
    #[arg(long)]
    nesterov: bool,
    #[arg(long, value_enum, default_value_t = ScheduleArg::Step)]
    schedule: ScheduleArg,
    /// Linear learning-rate warm-up over this many steps.
    #[arg(long, default_value_t = 0)]
    warmup_steps: usize,
    #[arg(long, default_value_t = 0.1)]
    tau: f64,
    #[arg(long, default_value_t = 1.0)]
    mu: f64,
    #[arg(long, value_enum, default_value_t = GradSemantics::QueryOnly)]
    grad_semantics: GradSemantics,
    #[arg(long, value_enum, default_value_t = LossArg::Fused)]
    loss: LossArg,
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    device: Device,
    /// GEMM precision on CUDA; float32 storage and sums in every mode. tf32 is what PyTorch
    /// uses for convolutions by default.
    #[arg(long, value_enum, default_value_t = GemmPrecision::Tf32)]
    precision: GemmPrecision,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output folder: metrics, plot, checkpoints, configuration.
    #[arg(long)]
    out: PathBuf,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    resume: bool,
    /// kNN neighbours and temperature of the per-epoch evaluation.
    #[arg(long, default_value_t = 200)]
    k: usize,
    #[arg(long, default_value_t = 0.1)]
    sigma: f64,
}

pub fn train(args: TrainArgs) -> invaspread::Result<()> {
    let cuda = |loss| BackendChoice::Cuda {
        loss,
        precision: args.precision,
    };
    let backend = match (args.device, args.loss) {
        (Device::Cpu, LossArg::Reference) => BackendChoice::Cpu {
            reference_loss: true,
        },
        (Device::Cpu, LossArg::Fused) => BackendChoice::Cpu {
            reference_loss: false,
        },
        (Device::Cuda, LossArg::Fused | LossArg::FusedV2) => cuda(CudaLossVersion::FusedV2),
        (Device::Cuda, LossArg::FusedV1) => cuda(CudaLossVersion::FusedV1),
        (Device::Cuda, LossArg::Unfused) => cuda(CudaLossVersion::Unfused),
        (Device::Cuda, LossArg::UnfusedCublas) => cuda(CudaLossVersion::UnfusedCublas),
        (Device::Cuda, LossArg::Reference) => {
            return Err(Error::InvalidInput(
                "--loss reference runs on the CPU only; use --device cpu, or a CUDA loss (fused-v2, fused-v1, unfused, unfused-cublas)".into(),
            ))
        }
        (Device::Cpu, other) => {
            return Err(Error::InvalidInput(format!(
                "--loss {} is a CUDA kernel; add --device cuda, or use --loss fused on the CPU",
                clap::ValueEnum::to_possible_value(&other)
                    .map(|v| v.get_name().to_string())
                    .unwrap_or_default()
            )))
        }
    };
    if matches!(backend, BackendChoice::Cuda { .. }) {
        Gpu::require()?; // before minutes of decoding a dataset, not after
    }
    let flag = trainer::stop_flag();
    ctrlc::set_handler(move || flag.store(true, std::sync::atomic::Ordering::SeqCst))
        .map_err(|e| Error::InvalidInput(format!("cannot install the Ctrl-C handler: {e}")))?;
    let ds = Arc::new(args.data.load(args.seed)?);
    let cfg = TrainConfig {
        model: args.model,
        epochs: args.epochs,
        steps: args.steps,
        batch: args.batch,
        sgd: SgdConfig {
            lr: args.lr,
            momentum: args.momentum,
            weight_decay: args.weight_decay,
            nesterov: args.nesterov,
        },
        schedule: match args.schedule {
            ScheduleArg::Step => Schedule::paper_step(),
            ScheduleArg::Cosine => Schedule::Cosine,
        },
        warmup_steps: args.warmup_steps,
        loss: LossConfig {
            tau: args.tau,
            mu: args.mu,
            semantics: args.grad_semantics,
        },
        backend,
        loss_read_every: None,
        seed: args.seed,
        out: args.out.clone(),
        resume: args.resume,
        knn_k: args.k,
        knn_sigma: args.sigma,
        progress: true,
    };
    let summary = trainer::train(&cfg, ds)?;
    let state = if summary.interrupted {
        "stopped"
    } else {
        "done"
    };
    match summary.metrics.last() {
        Some(last) => eprintln!(
            "{state}: epoch {} kNN top-1 {:.2}%; outputs in {}",
            last.epoch,
            100.0 * last.knn_top1,
            args.out.display()
        ),
        None => eprintln!("{state}: outputs in {}", args.out.display()),
    }
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// A model checkpoint written by `train`.
    #[arg(long)]
    checkpoint: PathBuf,
    #[command(flatten)]
    data: DataArgs,
    #[arg(long, default_value_t = 200)]
    k: usize,
    #[arg(long, default_value_t = 0.1)]
    sigma: f64,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Where the embeddings and the kNN search run (Recall@K and k-means stay on the CPU).
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    device: Device,
}

/// Builds the model a checkpoint names on `backend` and loads it.
fn load_checkpoint<B: Backend>(
    path: &PathBuf,
    backend: B,
) -> invaspread::Result<(Graph<B>, Model)> {
    let bytes = std::fs::read(path).map_err(|e| Error::Io {
        path: path.clone(),
        source: e,
    })?;
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| Error::BadFile {
            path: path.clone(),
            message: format!("not a safetensors file: {e}"),
        })?;
    let meta: HashMap<String, String> = meta.metadata().clone().unwrap_or_default();
    let kind = match meta.get("model").map(String::as_str) {
        Some("resnet18-cifar") => ModelKind::Resnet18Cifar,
        Some("convnet-small") => ModelKind::ConvnetSmall,
        other => {
            return Err(Error::BadFile {
                path: path.clone(),
                message: format!(
                    "metadata names model {other:?}, expected resnet18-cifar or convnet-small"
                ),
            })
        }
    };
    let mut store = ParamStore::default();
    let model = Model::new(kind, &mut store, &backend, 0)?;
    checkpoint::load_model(&mut store, &backend, path)?;
    Ok((Graph::new(backend, store), model))
}

/// The CUDA backend for `eval` and `embed` (float32 GEMMs: the CPU's numbers to rounding).
fn cuda_backend() -> invaspread::Result<CudaBackend> {
    CudaBackend::new(Arc::new(Gpu::require()?))
}

pub fn eval(args: EvalArgs) -> invaspread::Result<()> {
    match args.device {
        Device::Cpu => eval_on(args, Cpu::<f32>::new()),
        Device::Cuda => eval_on(args, cuda_backend()?),
    }
}

fn eval_on<B: Backend>(args: EvalArgs, backend: B) -> invaspread::Result<()> {
    let ds = args.data.load(0)?;
    let (mut graph, model) = load_checkpoint(&args.checkpoint, backend)?;
    let train = eval::embed(&mut graph, &model, &ds.train, ds.size, 256)?;
    let test = eval::embed(&mut graph, &model, &ds.test, ds.size, 256)?;
    let knn = eval::knn_top1_on(
        &graph.backend,
        &train,
        &ds.train.labels,
        &test,
        &ds.test.labels,
        ds.classes.len(),
        args.k,
        args.sigma,
    )?;
    let recall = eval::recall_at_k(&test, &ds.test.labels, &[1, 2, 4, 8])?;
    let clusters = eval::kmeans(
        &test,
        invaspread::nn::models::EMBED_DIM,
        ds.classes.len(),
        0,
    );
    let labels: Vec<usize> = ds.test.labels.iter().map(|&l| l as usize).collect();
    let nmi = eval::nmi(&clusters, &labels);
    if args.json {
        println!(
            "{{\"knn_top1\":{knn},\"k\":{},\"sigma\":{},\"recall_at_1\":{},\"recall_at_2\":{},\"recall_at_4\":{},\"recall_at_8\":{},\"nmi\":{nmi}}}",
            args.k, args.sigma, recall[0], recall[1], recall[2], recall[3]
        );
    } else {
        println!(
            "kNN top-1 (k={}, sigma={}): {:.2}%",
            args.k,
            args.sigma,
            100.0 * knn
        );
        println!(
            "Recall@1/2/4/8: {:.2}% {:.2}% {:.2}% {:.2}%",
            100.0 * recall[0],
            100.0 * recall[1],
            100.0 * recall[2],
            100.0 * recall[3]
        );
        println!("NMI (k-means, {} clusters): {:.4}", ds.classes.len(), nmi);
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SplitArg {
    Train,
    Test,
}

#[derive(Debug, clap::Args)]
pub struct EmbedArgs {
    #[arg(long)]
    checkpoint: PathBuf,
    #[command(flatten)]
    data: DataArgs,
    #[arg(long, value_enum, default_value_t = SplitArg::Test)]
    split: SplitArg,
    /// Output: float32 N x 128; the labels go to a sibling .labels.npy (int64).
    #[arg(long, value_name = "E.npy")]
    out: PathBuf,
    /// Where the encoder runs.
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    device: Device,
}

pub fn embed(args: EmbedArgs) -> invaspread::Result<()> {
    match args.device {
        Device::Cpu => embed_on(args, Cpu::<f32>::new()),
        Device::Cuda => embed_on(args, cuda_backend()?),
    }
}

fn embed_on<B: Backend>(args: EmbedArgs, backend: B) -> invaspread::Result<()> {
    let ds = args.data.load(0)?;
    let (mut graph, model) = load_checkpoint(&args.checkpoint, backend)?;
    let split = if args.split == SplitArg::Train {
        &ds.train
    } else {
        &ds.test
    };
    let emb = eval::embed(&mut graph, &model, split, ds.size, 256)?;
    npy::write(
        &args.out,
        &[split.len(), invaspread::nn::models::EMBED_DIM],
        &emb,
    )?;
    let labels_path = args.out.with_extension("labels.npy");
    npy::write(&labels_path, &[split.len()], &split.labels)?;
    eprintln!("wrote {} and {}", args.out.display(), labels_path.display());
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct StepArgs {
    /// The model before the step (a checkpoint written by `train`).
    #[arg(long)]
    checkpoint: PathBuf,
    /// The batch: float32 N x 3 x H x W, already normalised; rows 0..N/2 view A, N/2..N view B.
    #[arg(long, value_name = "X.npy")]
    input: PathBuf,
    /// Where to write the model after the step.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 0.03)]
    lr: f64,
    #[arg(long, default_value_t = 0.1)]
    tau: f64,
}

/// One training step (fresh SGD state, the recipe's hyper-parameters) on a given batch: for
/// comparing the whole step with another implementation.
pub fn step(args: StepArgs) -> invaspread::Result<()> {
    let (mut graph, model) = load_checkpoint(&args.checkpoint, Cpu::<f32>::new())?;
    let array = npy::read(&args.input)?;
    let shape = match array.shape[..] {
        [n, 3, h, w] => invaspread::nn::cpu_ops::Shape4 { n, c: 3, h, w },
        _ => {
            return Err(Error::BadFile {
                path: args.input.clone(),
                message: format!("shape {:?}, expected N x 3 x H x W", array.shape),
            })
        }
    };
    let mut sgd = invaspread::nn::optim::Sgd::new(SgdConfig {
        lr: args.lr,
        ..SgdConfig::default()
    });
    let cfg = LossConfig {
        tau: args.tau,
        ..LossConfig::default()
    };
    let loss = invaspread::nn::train::train_step(
        &mut graph,
        &model,
        &mut sgd,
        &array.to_f32(),
        shape,
        &cfg,
        args.lr,
    )
    .map_err(|e| e.in_file(&args.input))?;
    println!("{loss}");
    let meta = HashMap::from([
        ("model".to_string(), model.kind.name().to_string()),
        ("format".to_string(), "pt".to_string()),
    ]);
    checkpoint::save_model(&graph.params, &graph.backend, &args.out, meta)
}
