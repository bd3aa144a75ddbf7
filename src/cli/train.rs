//! `invaspread train`: flags (or a `config.json` to replay, with flags overriding its fields)
//! become a [`TrainConfig`], and the trainer runs it.

use std::path::PathBuf;
use std::sync::Arc;

use clap::ArgMatches;
use invaspread::cuda::GemmPrecision;
use invaspread::cuda::Gpu;
use invaspread::data::augment::Augmentations;
use invaspread::dist::DistEnv;
use invaspread::loss::{GradSemantics, LossVersion};
use invaspread::methods::MethodKind;
use invaspread::names::Named;
use invaspread::nn::models::ModelKind;
use invaspread::nn::optim::Schedule;
use invaspread::nn::EncoderKernels;
use invaspread::ops::conv2d::CpuVersion;
use invaspread::trainer::{self, config, BackendChoice, RunOptions, TrainConfig};
use invaspread::Error;

use super::data::{self, DataArgs};
use super::Device;
use super::{on_command_line, ranges};

/// The recipe's defaults, the one source of the flags' defaults.
fn defaults() -> TrainConfig {
    TrainConfig::default()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ScheduleArg {
    /// x0.1 at epoch 120 and x0.01 at 160 (the paper's).
    Step,
    Cosine,
}

#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    /// Replay a run: its config.json gives every setting, and flags given here override them.
    #[arg(long, value_name = "CONFIG.json")]
    config: Option<PathBuf>,
    #[command(flatten)]
    data: DataArgs,
    /// The encoder.
    #[arg(long, value_enum, default_value_t = defaults().model)]
    model: ModelKind,
    /// Epochs (passes over the training split, the last incomplete batch dropped)
    /// [0 <= epochs <= 1000000].
    #[arg(long, conflicts_with = "steps", value_parser = ranges::epochs)]
    epochs: Option<usize>,
    /// Steps instead of epochs; 0 writes the initialised network's checkpoint
    /// [0 <= steps <= 1000000000].
    #[arg(long, value_parser = ranges::steps)]
    steps: Option<usize>,
    /// Images per step (2 x batch rows: two views each); under a launcher, the global batch,
    /// batch / WORLD_SIZE images per rank [2 <= batch <= 65536].
    #[arg(long, default_value_t = defaults().batch, value_parser = ranges::batch)]
    batch: usize,
    /// Learning rate [0 < lr <= 10].
    #[arg(long, default_value_t = defaults().sgd.lr, value_parser = ranges::lr, allow_negative_numbers = true)]
    lr: f64,
    /// SGD momentum [0 <= momentum < 1].
    #[arg(long, default_value_t = defaults().sgd.momentum, value_parser = ranges::momentum, allow_negative_numbers = true)]
    momentum: f64,
    /// Weight decay [0 <= weight_decay < 1].
    #[arg(long, default_value_t = defaults().sgd.weight_decay, value_parser = ranges::weight_decay, allow_negative_numbers = true)]
    weight_decay: f64,
    #[arg(long)]
    nesterov: bool,
    #[arg(long, value_enum, default_value_t = ScheduleArg::Step)]
    schedule: ScheduleArg,
    /// The step schedule's milestones: the epochs at which the learning rate is multiplied by
    /// 0.1, in increasing order (the paper's 120,160 suit 200 epochs; scale them for short
    /// runs, e.g. 6,8 for 10 epochs).
    /// With --schedule step (the default) or alone; refused with --schedule cosine.
    #[arg(long, value_name = "E1,E2,...", value_parser = ranges::milestones)]
    milestones: Option<ranges::Milestones>,
    /// Linear learning-rate warm-up over this many steps [0 <= warmup_steps <= 1000000000].
    #[arg(long, default_value_t = defaults().warmup_steps, value_parser = ranges::warmup_steps)]
    warmup_steps: usize,
    /// The recipe's augmentations to apply: a comma-separated subset of crop (RandomResizedCrop),
    /// jitter (ColorJitter), grey (RandomGrayscale), flip (RandomHorizontalFlip), or none
    /// (the paper's ablation removes them one by one).
    #[arg(
        long,
        value_name = "crop,jitter,grey,flip|none",
        default_value = "crop,jitter,grey,flip"
    )]
    augment: Augmentations,
    /// Temperature [0.025 <= tau <= 100].
    #[arg(long, default_value_t = defaults().loss.tau, value_parser = ranges::tau, allow_negative_numbers = true)]
    tau: f64,
    /// Weight of the negatives [1 <= mu <= 1000].
    #[arg(long, default_value_t = defaults().loss.mu, value_parser = ranges::mu, allow_negative_numbers = true)]
    mu: f64,
    #[arg(long, value_enum, default_value_t = defaults().loss.semantics)]
    grad_semantics: GradSemantics,
    #[command(flatten)]
    negatives: super::loss::NegativeArgs,
    /// How to learn: the instance loss (invaspread), or a baseline of the paper's comparison:
    /// npid (memory bank, full softmax), nce (memory bank, NCE with 4096 noise entries),
    /// exemplar (a classifier with one class per image).
    #[arg(long, value_enum, default_value_t = MethodKind::Invaspread)]
    method: MethodKind,
    /// The loss implementation (default: fused on the CPU, fused-v2 on CUDA).
    #[arg(long, value_enum)]
    loss: Option<LossVersion>,
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    device: Device,
    /// GEMM precision on CUDA; float32 storage and sums in every mode. tf32 is what PyTorch
    /// uses for convolutions by default.
    #[arg(long, value_enum, default_value_t = GemmPrecision::Tf32)]
    precision: GemmPrecision,
    /// Encoder kernel versions on CUDA, as op=version pairs (conv2d=v1,batchnorm=v1); ops not
    /// named run their newest version.
    #[arg(long, value_name = "OP=VERSION,...", default_value = "")]
    kernels: EncoderKernels,
    /// The convolution's version on the CPU: winograd (F(4x4, 3x3) for 3 x 3 stride-1
    /// convolutions, im2col for the rest) or im2col (im2col + GEMM for all, the first version).
    #[arg(long, value_enum, default_value_t = CpuVersion::Winograd)]
    cpu_conv: CpuVersion,
    #[arg(long, default_value_t = defaults().seed)]
    seed: u64,
    /// Output folder: metrics, plot, checkpoints, configuration.
    #[arg(long)]
    out: PathBuf,
    /// Continue the run in --out from its saved state. Its config.json gives every setting;
    /// only --epochs, --steps (to extend the run), --threads and, with --allow-moved-data, --data-dir may differ from it, and any other
    /// flag given must agree with it.
    #[arg(long, conflicts_with = "config")]
    resume: bool,
    /// With --resume: the run's dataset now lies at another path, given by --data-dir (the
    /// same classes, image counts and fingerprint are still required).
    #[arg(long, requires = "resume")]
    allow_moved_data: bool,
    /// kNN neighbours of the per-epoch evaluation [1 <= k <= 100000].
    #[arg(long, default_value_t = defaults().knn.k, value_parser = ranges::k)]
    k: usize,
    /// kNN temperature [0.001 <= sigma <= 100].
    #[arg(long, default_value_t = defaults().knn.sigma, value_parser = ranges::sigma, allow_negative_numbers = true)]
    sigma: f64,
    /// Evaluate kNN every this many epochs; the last epoch is always evaluated
    /// [1 <= eval_every <= 1000000].
    #[arg(long, default_value_t = defaults().knn.every, value_parser = ranges::eval_every)]
    eval_every: usize,
    /// Evaluate on these classes (a class spec as --classes; default: the training classes).
    /// Classes not trained on make an unseen-category run: its per-epoch metric, and the choice
    /// of best.safetensors, is Recall@1 among their test images.
    #[arg(long, value_name = "SPEC")]
    eval_classes: Option<String>,
    /// Skip the kNN on raw pixels printed at the start (about a minute on CIFAR-10).
    #[arg(long)]
    no_pixel_baseline: bool,
    /// Data-parallel runs (`invaspread launch --gpus N -- train ...`): BatchNorm's training
    /// statistics over the global batch (PyTorch's SyncBatchNorm), so that N ranks compute what
    /// one device would; without it each rank normalizes its own images (PyTorch's DDP).
    #[arg(long)]
    sync_bn: bool,
    /// Data-parallel runs: MiB of parameter gradients per all-reduce, each started as soon as
    /// the backward pass has formed them (PyTorch DDP's bucket_cap_mb). It changes when the
    /// sums run, not the run's results [0 < bucket-mb <= 4096].
    #[arg(long, default_value_t = invaspread::dist::gradient_buckets::DEFAULT_BUCKET_MB, value_parser = ranges::bucket_mb)]
    bucket_mb: f64,
}

/// The backend the device and loss flags name.
fn backend_choice(args: &TrainArgs) -> invaspread::Result<BackendChoice> {
    let version = args
        .loss
        .unwrap_or(LossVersion::default_on(args.device))
        .for_device(args.device, "--loss")?;
    Ok(match version {
        LossVersion::Cpu(loss) => BackendChoice::Cpu {
            loss,
            conv: args.cpu_conv,
        },
        LossVersion::Cuda(loss) => BackendChoice::Cuda {
            loss,
            precision: args.precision,
            kernels: args.kernels,
        },
    })
}

/// Writes the flags for which `given` holds into `cfg` (every flag, without a config file).
fn apply_flags(
    cfg: &mut TrainConfig,
    args: &TrainArgs,
    given: &dyn Fn(&str) -> bool,
) -> invaspread::Result<()> {
    let data = args.data.config();
    macro_rules! set {
        ($($id:literal => $field:expr, $value:expr;)+) => {
            $(if given($id) { $field = $value; })+
        };
    }
    set! {
        "dataset" => cfg.data.dataset, data.dataset;
        "data_dir" => cfg.data.data_dir, data.data_dir.clone();
        "image_size" => cfg.data.image_size, data.image_size;
        "on_bad_image" => cfg.data.on_bad_image, data.on_bad_image;
        "stl10_unlabeled" => cfg.data.stl10_unlabeled, data.stl10_unlabeled;
        "follow_links" => cfg.data.follow_links, data.follow_links;
        "classes" => cfg.data.classes, data.classes.clone();
        "eval_classes" => cfg.eval_classes, args.eval_classes.clone();
        "model" => cfg.model, args.model;
        "batch" => cfg.batch, args.batch;
        "lr" => cfg.sgd.lr, args.lr;
        "momentum" => cfg.sgd.momentum, args.momentum;
        "weight_decay" => cfg.sgd.weight_decay, args.weight_decay;
        "nesterov" => cfg.sgd.nesterov, args.nesterov;
        "warmup_steps" => cfg.warmup_steps, args.warmup_steps;
        "augment" => cfg.augment, args.augment;
        "method" => cfg.method, args.method;
        "tau" => cfg.loss.tau, args.tau;
        "mu" => cfg.loss.mu, args.mu;
        "grad_semantics" => cfg.loss.semantics, args.grad_semantics;
        "seed" => cfg.seed, args.seed;
        "k" => cfg.knn.k, args.k;
        "sigma" => cfg.knn.sigma, args.sigma;
        "eval_every" => cfg.knn.every, args.eval_every;
        "no_pixel_baseline" => cfg.knn.pixel_baseline, !args.no_pixel_baseline;
        "sync_bn" => cfg.sync_bn, args.sync_bn;
    }
    if given("negatives") || given("negative_fraction") || given("negative_scale") {
        cfg.loss.negatives = args.negatives.choice();
    }
    // --epochs and --steps replace each other.
    if given("epochs") || given("steps") {
        (cfg.epochs, cfg.steps) = (args.epochs, args.steps);
    }
    if args.milestones.is_some() && matches!(args.schedule, ScheduleArg::Cosine) {
        return Err(Error::invalid(
            "--milestones sets the step schedule's epochs: --schedule cosine has none; give one of the two",
        ));
    }
    if given("schedule") {
        cfg.schedule = match args.schedule {
            ScheduleArg::Step => Schedule::paper_step(),
            ScheduleArg::Cosine => Schedule::Cosine {},
        };
    }
    if given("milestones") {
        if let Some(ranges::Milestones(milestones)) = &args.milestones {
            cfg.schedule = Schedule::Step {
                milestones: milestones.clone(),
                gamma: 0.1,
            };
        }
    }
    if ["device", "loss", "precision", "kernels", "cpu_conv"]
        .iter()
        .any(|id| given(id))
    {
        cfg.backend = backend_choice(args)?;
    }
    Ok(())
}

/// The run's configuration: every flag, or the file's fields overridden by the flags given.
fn train_config(args: &TrainArgs, matches: Option<&ArgMatches>) -> invaspread::Result<TrainConfig> {
    let Some(path) = &args.config else {
        let mut cfg = defaults();
        apply_flags(&mut cfg, args, &|_| true)?;
        return Ok(cfg);
    };
    let mut cfg = config::read(path)?;
    let given = |id: &str| on_command_line(matches, id);
    apply_flags(&mut cfg, args, &given)?;
    Ok(cfg)
}

/// Where each flag lives in config.json; what a resume compares.
const FIELDS: [(&str, &str); 36] = [
    ("dataset", "/data/dataset"),
    ("data_dir", "/data/data_dir"),
    ("image_size", "/data/image_size"),
    ("on_bad_image", "/data/on_bad_image"),
    ("stl10_unlabeled", "/data/stl10_unlabeled"),
    ("follow_links", "/data/follow_links"),
    ("classes", "/data/classes"),
    ("eval_classes", "/eval_classes"),
    ("model", "/model"),
    ("batch", "/batch"),
    ("lr", "/sgd/lr"),
    ("momentum", "/sgd/momentum"),
    ("weight_decay", "/sgd/weight_decay"),
    ("nesterov", "/sgd/nesterov"),
    ("schedule", "/schedule"),
    ("milestones", "/schedule"),
    ("warmup_steps", "/warmup_steps"),
    ("augment", "/augment"),
    ("method", "/method"),
    ("tau", "/loss/tau"),
    ("mu", "/loss/mu"),
    ("grad_semantics", "/loss/grad_semantics"),
    ("negatives", "/loss/negatives"),
    ("negative_fraction", "/loss/negatives"),
    ("negative_scale", "/loss/negatives"),
    ("device", "/backend"),
    ("loss", "/backend"),
    ("precision", "/backend"),
    ("kernels", "/backend"),
    ("cpu_conv", "/backend"),
    ("seed", "/seed"),
    ("k", "/knn/k"),
    ("sigma", "/knn/sigma"),
    ("eval_every", "/knn/every"),
    ("no_pixel_baseline", "/knn/pixel_baseline"),
    ("sync_bn", "/sync_bn"),
];

/// A resumed run's configuration: the run's own config.json, with the flags that may change
/// (--epochs, --steps) applied; any other flag given must agree with it, or the resume is an
/// error naming the flag, the saved value and the given one. Without a config.json (the run
/// died before it was written) the flags make a new run.
fn resume_config(
    args: &TrainArgs,
    matches: Option<&ArgMatches>,
) -> invaspread::Result<TrainConfig> {
    let path = args.out.join("config.json");
    if !path.exists() {
        // A folder that holds a run but not its configuration: the flags' defaults would train
        // another run on top of it (another method, other data) without a word.
        use invaspread::trainer::outputs::{LAST, STATE};
        if let Some(held) = [STATE, LAST, "metrics.csv", "steps.csv"]
            .into_iter()
            .map(|f| args.out.join(f))
            .find(|p| p.exists())
        {
            return Err(Error::bad_file(
                &path,
                format!(
                    "is missing, but {} holds a run ({}): its configuration is unknown, so --resume cannot continue it; restore config.json or start a new run in another --out",
                    args.out.display(),
                    held.display()
                ),
            ));
        }
        // Nothing to resume: a new run, which needs its length like any other.
        if args.epochs.is_none() && args.steps.is_none() && args.config.is_none() {
            return Err(Error::invalid(format!(
                "--resume: {} holds no run (no config.json) to continue; to start one there, give --epochs E or --steps S",
                args.out.display()
            )));
        }
        return train_config(args, matches);
    }
    let saved = config::read(&path)?;
    let given = |id: &str| on_command_line(matches, id);
    let mut cfg = saved.clone();
    apply_flags(&mut cfg, args, &given)?;
    let as_json = |c: &TrainConfig| {
        serde_json::to_value(c).map_err(|e| Error::invalid(format!("config: {e}")))
    };
    let (was, now) = (as_json(&saved)?, as_json(&cfg)?);
    for (flag, field) in FIELDS {
        let (a, b) = (was.pointer(field), now.pointer(field));
        // A moved dataset is found at its new path (its identity is checked in the trainer).
        let may_change = flag == "data_dir" && args.allow_moved_data;
        if given(flag) && a != b && !may_change {
            let show = |v: Option<&serde_json::Value>| v.map_or("none".into(), |v| v.to_string());
            return Err(Error::invalid(format!(
                "--{} gives {} = {}, but the run in {} was started with {}; a resumed run keeps \
                 its configuration (only --epochs, --steps and --threads may change), or start a \
                 new run in another --out",
                flag.replace('_', "-"),
                field.trim_start_matches('/').replace('/', "."),
                show(b),
                args.out.display(),
                show(a)
            )));
        }
    }
    let recorded = saved.recorded.as_ref().map(|r| r.threads);
    let threads = rayon::current_num_threads();
    if let Some(r) = recorded.filter(|&r| r != threads) {
        eprintln!(
            "note: the run used {r} threads, this resume {threads}: it continues correctly, but \
             bit for bit like an uninterrupted run only with --threads {r}"
        );
    }
    Ok(cfg)
}

/// Flags the run's configuration would record but never use: the loss's settings with a
/// baseline method (only the instance loss reads them), a fraction or scale without a
/// selection. Refused, naming the method, rather than recorded as if they mattered.
fn refuse_ignored_flags(cfg: &TrainConfig, matches: Option<&ArgMatches>) -> invaspread::Result<()> {
    let given = |id: &str| on_command_line(matches, id);
    let flag = |id: &str| format!("--{}", id.replace('_', "-"));
    if cfg.method != MethodKind::Invaspread {
        let method = invaspread::names::Named::name(&cfg.method);
        for id in [
            "tau",
            "mu",
            "grad_semantics",
            "negatives",
            "negative_fraction",
            "negative_scale",
            "loss",
        ] {
            if given(id) {
                return Err(Error::invalid(format!(
                    "{} has no effect with --method {method}: only the instance loss (--method invaspread) uses it; leave it out",
                    flag(id)
                )));
            }
        }
    }
    // Flags of one device, or of one kind of dataset.
    let on_cuda = matches!(cfg.backend, BackendChoice::Cuda { .. });
    let (device_only, device) = if on_cuda {
        (&["cpu_conv"][..], "--device cuda")
    } else {
        (&["precision", "kernels"][..], "--device cpu")
    };
    for id in device_only {
        if given(id) {
            return Err(Error::invalid(format!(
                "{} has no effect with {device}: it chooses how the other device computes; leave it out",
                flag(id)
            )));
        }
    }
    use invaspread::data::DatasetKind;
    let dataset = cfg.data.dataset;
    for (id, used_by, which) in [
        (
            "data_dir",
            dataset != DatasetKind::Synthetic,
            "every dataset but synthetic",
        ),
        (
            "stl10_unlabeled",
            dataset == DatasetKind::Stl10,
            "--dataset stl10",
        ),
        (
            "follow_links",
            dataset == DatasetKind::Folder,
            "--dataset folder",
        ),
        (
            "on_bad_image",
            dataset == DatasetKind::Folder,
            "--dataset folder (the only one decoding image files)",
        ),
    ] {
        if given(id) && !used_by {
            return Err(Error::invalid(format!(
                "{} has no effect with --dataset {}: only {which} reads it; leave it out",
                flag(id),
                invaspread::names::Named::name(&dataset)
            )));
        }
    }
    if cfg.loss.negatives == invaspread::loss::Negatives::All {
        for id in ["negative_fraction", "negative_scale"] {
            if given(id) {
                return Err(Error::invalid(format!(
                    "{} has no effect without --negatives hard|easy (all negatives are kept)",
                    flag(id)
                )));
            }
        }
    }
    Ok(())
}

pub fn run(args: TrainArgs, matches: Option<&ArgMatches>) -> invaspread::Result<()> {
    let mut cfg = if args.resume {
        resume_config(&args, matches)?
    } else {
        train_config(&args, matches)?
    };
    refuse_ignored_flags(&cfg, matches)?;
    let group = DistEnv::from_env()?.filter(|env| env.world_size > 1);
    if group.is_none() && on_command_line(matches, "sync_bn") && !args.resume {
        return Err(Error::invalid(
            "--sync-bn has no effect on one process: it syncs BatchNorm across the ranks of `invaspread launch --gpus N -- train ...`; leave it out or launch a group",
        ));
    }
    set_ranks(&mut cfg, &args, group.as_ref())?;
    config::validate(&cfg)?; // a group's settings, before any rank waits for the others
    if matches!(cfg.backend, BackendChoice::Cuda { .. }) {
        // Before minutes of decoding a dataset, not after.
        match &group {
            None => Gpu::require()?,
            Some(env) => Gpu::require_ordinal(env.local_rank)?,
        };
    }
    let lead = group.as_ref().is_none_or(|env| env.rank == 0);
    if let Some(path) = &args.config {
        replay_note(path, &cfg);
    }
    // From here SIGINT and SIGTERM end the process at once, until the first step makes
    // something worth saving (trainer::signals).
    trainer::signals::install()?;
    let ds = Arc::new(data::load(&cfg.data, cfg.seed)?);
    let opts = RunOptions {
        out: args.out.clone(),
        resume: args.resume,
        progress: lead,
        group,
        bucket_mb: args.bucket_mb,
        allow_moved_data: args.allow_moved_data,
    };
    let summary = trainer::train(&cfg, &opts, ds)?;
    let state = if summary.interrupted {
        "stopped"
    } else {
        "done"
    };
    let evaluated = summary
        .metrics
        .iter()
        .rev()
        .find(|m| m.headline().is_some());
    let metric = if summary.unseen {
        "Recall@1 on unseen classes"
    } else {
        "kNN top-1"
    };
    let classes = if cfg.data.classes.is_some() || cfg.eval_classes.is_some() {
        format!(
            " (trained on {}; evaluated on {})",
            summary.classes_trained.join(", "),
            summary.classes_evaluated.join(", ")
        )
    } else {
        String::new()
    };
    let message = match evaluated {
        Some(last) => format!(
            "{state}: epoch {} {metric} {:.2}%{classes}; outputs in {}",
            last.epoch,
            100.0 * last.headline().unwrap_or(0.0),
            args.out.display()
        ),
        None => format!("{state}: outputs in {}", args.out.display()),
    };
    match trainer::signals::received().filter(|_| summary.interrupted) {
        Some(signal) => Err(Error::Interrupted { signal, message }),
        None => {
            if lead {
                eprintln!("{message}");
            }
            Ok(())
        }
    }
}

/// The run's ranks: the launcher's WORLD_SIZE (one without a launcher). A resumed run keeps
/// its number, since per-rank BatchNorm, and the order of every sum, depend on it.
fn set_ranks(
    cfg: &mut TrainConfig,
    args: &TrainArgs,
    group: Option<&DistEnv>,
) -> invaspread::Result<()> {
    let world = group.map_or(1, |env| env.world_size);
    if args.resume && args.out.join("config.json").exists() && cfg.ranks != world {
        return Err(Error::invalid(format!(
            "the run in {} was trained on {} rank(s), and this resume has {world} (WORLD_SIZE): \
             a resumed run keeps its number of ranks (launch it with --gpus {})",
            args.out.display(),
            cfg.ranks,
            cfg.ranks
        )));
    }
    cfg.ranks = world;
    Ok(())
}

/// Says what a replay runs, and warns when the thread count differs from the recorded run's
/// (results reproduce bit for bit only with the same one).
fn replay_note(path: &std::path::Path, cfg: &TrainConfig) {
    eprintln!(
        "replaying {} ({}, {})",
        path.display(),
        cfg.model.name(),
        cfg.backend.describe()
    );
    let recorded = cfg.recorded.as_ref().map(|r| r.threads);
    let threads = rayon::current_num_threads();
    if let Some(r) = recorded.filter(|&r| r != threads) {
        eprintln!(
            "note: the recorded run used {r} threads, this one {threads}: pass --threads {r} for identical results"
        );
    }
}
