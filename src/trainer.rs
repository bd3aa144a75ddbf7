//! The training loop behind `invaspread train`: batches of two augmented views prepared on a
//! worker thread while the encoder trains, a progress bar, kNN on the test split after each
//! epoch, metrics (CSV, JSON, PNG plot), last and best checkpoints, bit-exact resume and a
//! clean stop on Ctrl-C.
//!
//! Everything random is a function of the seed and the step (data order per epoch, each view's
//! augmentation), and the checkpoint holds the rest of the state (parameters, batchnorm
//! statistics, momentum, the step, the epoch's running loss), so a resumed run computes the
//! same losses as an uninterrupted one with the same thread count.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use rand::seq::SliceRandom;

use crate::cuda::Gpu;
use crate::data::augment::{self, AugmentConfig};
use crate::data::{Dataset, Split};
use crate::error::{Error, Result};
use crate::eval;
use crate::loss::cuda::CudaLossVersion;
use crate::loss::LossConfig;
use crate::nn::backend::{Backend, Cpu, PendingRead};
use crate::nn::checkpoint;
use crate::nn::cpu_ops::Shape4;
use crate::nn::cuda_backend::{CudaBackend, GemmPrecision};
use crate::nn::graph::Graph;
use crate::nn::models::{Model, ModelKind};
use crate::nn::optim::{learning_rate, Schedule, Sgd, SgdConfig};
use crate::nn::params::ParamStore;
use crate::nn::train::queue_train_step;
use crate::npy::write_atomically;
use crate::testing::rng;

/// Everything `invaspread train` takes.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub model: ModelKind,
    pub epochs: Option<usize>,
    pub steps: Option<usize>,
    /// Images per step (each gives two views: 2 x batch rows).
    pub batch: usize,
    pub sgd: SgdConfig,
    pub schedule: Schedule,
    pub warmup_steps: usize,
    pub loss: LossConfig,
    /// Where the encoder trains, and which loss implementation it runs.
    pub backend: BackendChoice,
    /// Steps between loss reads (None: every step on the CPU, every
    /// [`CUDA_LOSS_READ_EVERY`] on a GPU). Reads never change what is computed.
    pub loss_read_every: Option<usize>,
    pub seed: u64,
    pub out: PathBuf,
    pub resume: bool,
    pub knn_k: usize,
    pub knn_sigma: f64,
    /// Show a progress bar (off in tests).
    pub progress: bool,
}

/// The device a run trains on and its loss implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendChoice {
    /// The CPU backend (float32); `reference_loss` runs the float64 reference loss instead of
    /// the fused CPU loss.
    Cpu { reference_loss: bool },
    /// The CUDA backend on device 0 with the given loss kernels and GEMM precision.
    Cuda {
        loss: CudaLossVersion,
        precision: GemmPrecision,
    },
}

impl BackendChoice {
    /// How the run's loss is computed, for config.json.
    pub fn describe(&self) -> String {
        match self {
            BackendChoice::Cpu {
                reference_loss: true,
            } => "cpu reference".into(),
            BackendChoice::Cpu {
                reference_loss: false,
            } => "cpu fused".into(),
            BackendChoice::Cuda { loss, precision } => {
                format!("cuda {} {}", loss.name(), precision.name())
            }
        }
    }

    /// Steps between reads of the loss: every step on the CPU (free), every few on a GPU
    /// (each read waits for the device to drain its queue).
    fn loss_read_every(&self) -> usize {
        match self {
            BackendChoice::Cpu { .. } => 1,
            BackendChoice::Cuda { .. } => CUDA_LOSS_READ_EVERY,
        }
    }
}

/// Steps between loss reads on a GPU.
pub const CUDA_LOSS_READ_EVERY: usize = 10;

/// One line of metrics, written after every epoch.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochMetrics {
    pub epoch: usize,
    pub step: usize,
    pub loss: f64,
    pub knn_top1: f64,
    pub lr: f64,
    pub seconds: f64,
}

/// The result of a run.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub metrics: Vec<EpochMetrics>,
    /// Every step's loss of this invocation (a resumed run starts at its first new step).
    pub step_losses: Vec<f64>,
    pub interrupted: bool,
    pub knn_at_start: Option<f64>,
}

const LAST: &str = "last.safetensors";
const LAST_OPT: &str = "last.optimizer.safetensors";
const BEST: &str = "best.safetensors";

/// Set by Ctrl-C; the loop saves and stops at the next step boundary.
pub fn stop_flag() -> Arc<AtomicBool> {
    static FLAG: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();
    FLAG.get_or_init(|| Arc::new(AtomicBool::new(false)))
        .clone()
}

fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rng(seed ^ 0x5eed_0000 ^ ((epoch as u64) << 20)));
    order
}

/// kNN top-1 of the model on the dataset's test split (train split as the memory bank); the
/// embeddings and the neighbour search run on the graph's backend.
pub fn knn_accuracy<B: Backend>(
    graph: &mut Graph<B>,
    model: &Model,
    ds: &Dataset,
    k: usize,
    sigma: f64,
) -> Result<f64> {
    let train = eval::embed(graph, model, &ds.train, ds.size, 256)?;
    let test = eval::embed(graph, model, &ds.test, ds.size, 256)?;
    eval::knn_top1_on(
        &graph.backend,
        &train,
        &ds.train.labels,
        &test,
        &ds.test.labels,
        ds.classes.len(),
        k,
        sigma,
    )
}

/// kNN top-1 on raw pixels (test transform, L2-normalised): the baseline learning must beat.
pub fn raw_pixel_knn(ds: &Dataset, k: usize, sigma: f64) -> Result<f64> {
    // Pixels are projected to 128 dimensions by a fixed random matrix so that the same kNN code
    // applies; random projections keep cosine similarities (Johnson-Lindenstrauss).
    let dim = 3 * ds.size * ds.size;
    let mut r = rng(0xbeef);
    let proj: Vec<f32> = crate::testing::random_matrix(&mut r, 128, dim);
    let project = |split: &Split| -> Result<Vec<f32>> {
        let x = augment::test_batch(split, ds.size, 0..split.len());
        let mut out = vec![0.0f32; split.len() * 128];
        crate::linalg::matmul(
            crate::linalg::MatRef::row_major(&x, split.len(), dim),
            crate::linalg::MatRef::transposed(&proj, 128, dim),
            &mut out,
            128,
            1.0,
            false,
        )?;
        eval::normalise_rows(&mut out, 128);
        Ok(out)
    };
    eval::knn_top1(
        &project(&ds.train)?,
        &ds.train.labels,
        &project(&ds.test)?,
        &ds.test.labels,
        ds.classes.len(),
        k,
        sigma,
    )
}

fn metrics_csv(rows: &[EpochMetrics]) -> String {
    let mut s = String::from("epoch,step,loss,knn_top1,lr,seconds\n");
    for r in rows {
        s.push_str(&format!(
            "{},{},{},{},{},{:.3}\n",
            r.epoch, r.step, r.loss, r.knn_top1, r.lr, r.seconds
        ));
    }
    s
}

fn metrics_json(rows: &[EpochMetrics]) -> String {
    let items: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{{\"epoch\":{},\"step\":{},\"loss\":{},\"knn_top1\":{},\"lr\":{},\"seconds\":{:.3}}}",
                r.epoch, r.step, r.loss, r.knn_top1, r.lr, r.seconds
            )
        })
        .collect();
    format!("[\n  {}\n]\n", items.join(",\n  "))
}

fn parse_metrics_csv(path: &Path) -> Result<Vec<EpochMetrics>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(path, e)),
    };
    text.lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let f: Vec<&str> = line.split(',').collect();
            let bad = || Error::bad_file(path, format!("malformed metrics line {line:?}"));
            if f.len() != 6 {
                return Err(bad());
            }
            Ok(EpochMetrics {
                epoch: f[0].parse().map_err(|_| bad())?,
                step: f[1].parse().map_err(|_| bad())?,
                loss: f[2].parse().map_err(|_| bad())?,
                knn_top1: f[3].parse().map_err(|_| bad())?,
                lr: f[4].parse().map_err(|_| bad())?,
                seconds: f[5].parse().map_err(|_| bad())?,
            })
        })
        .collect()
}

/// A PNG with two panels: the loss per epoch (left) and kNN top-1 per epoch (right), each
/// scaled to its own range; the numbers are in metrics.csv.
pub fn plot_png(rows: &[EpochMetrics], path: &Path) -> Result<()> {
    let (w, h) = (800u32, 300u32);
    let mut img = image::RgbImage::from_pixel(w, h, image::Rgb([255, 255, 255]));
    let panel = |img: &mut image::RgbImage, x0: u32, values: &[f64], colour: [u8; 3]| {
        let (pw, ph, pad) = (380u32, 260u32, 20u32);
        for x in x0 + pad..x0 + pad + pw {
            img.put_pixel(x.min(w - 1), h - pad, image::Rgb([0, 0, 0]));
        }
        for y in pad..h - pad {
            img.put_pixel(x0 + pad, y, image::Rgb([0, 0, 0]));
        }
        if values.is_empty() {
            return;
        }
        let (lo, hi) = values
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
                (a.min(v), b.max(v))
            });
        let span = if hi > lo { hi - lo } else { 1.0 };
        let point = |i: usize, v: f64| {
            let x = x0
                + pad
                + if values.len() > 1 {
                    (i as u32 * (pw - 10)) / (values.len() as u32 - 1)
                } else {
                    pw / 2
                };
            let y = h - pad - 5 - (((v - lo) / span) * f64::from(ph - 20)) as u32;
            (x as i64, y as i64)
        };
        for i in 0..values.len() {
            let (x1, y1) = point(i, values[i]);
            let (x0p, y0p) = if i == 0 {
                (x1, y1)
            } else {
                point(i - 1, values[i - 1])
            };
            let steps = (x1 - x0p).abs().max((y1 - y0p).abs()).max(1);
            for s in 0..=steps {
                let x = x0p + (x1 - x0p) * s / steps;
                let y = y0p + (y1 - y0p) * s / steps;
                for (dx, dy) in [(0, 0), (1, 0), (0, 1)] {
                    let (px, py) = (
                        (x + dx).clamp(0, i64::from(w) - 1) as u32,
                        (y + dy).clamp(0, i64::from(h) - 1) as u32,
                    );
                    img.put_pixel(px, py, image::Rgb(colour));
                }
            }
        }
    };
    panel(
        &mut img,
        0,
        &rows.iter().map(|r| r.loss).collect::<Vec<_>>(),
        [200, 30, 30],
    );
    panel(
        &mut img,
        400,
        &rows.iter().map(|r| r.knn_top1).collect::<Vec<_>>(),
        [30, 60, 200],
    );
    let mut bytes = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .map_err(|e| Error::invalid(format!("encoding the plot: {e}")))?;
    write_atomically(path, &bytes)
}

/// The checkpoint metadata: model, step, the running loss of the current epoch.
fn meta(
    cfg: &TrainConfig,
    ds: &Dataset,
    step: usize,
    epoch_sum: f64,
    epoch_count: usize,
) -> HashMap<String, String> {
    HashMap::from([
        ("model".into(), cfg.model.name().into()),
        ("dataset".into(), ds.name.clone()),
        ("image_size".into(), ds.size.to_string()),
        ("step".into(), step.to_string()),
        ("epoch_loss_sum".into(), format!("{epoch_sum:e}")),
        ("epoch_loss_count".into(), epoch_count.to_string()),
        ("seed".into(), cfg.seed.to_string()),
        ("format".into(), "pt".into()),
    ])
}

fn save<B: Backend>(
    graph: &Graph<B>,
    sgd: &Sgd,
    out: &Path,
    metadata: HashMap<String, String>,
) -> Result<()> {
    checkpoint::save_model(
        &graph.params,
        &graph.backend,
        &out.join(LAST),
        metadata.clone(),
    )?;
    checkpoint::save_optimizer(
        &graph.params,
        sgd,
        &graph.backend,
        &out.join(LAST_OPT),
        metadata,
    )
}

fn write_config(cfg: &TrainConfig, ds: &Dataset, out: &Path) -> Result<()> {
    let text = format!(
        "{{\n  \"model\": \"{}\",\n  \"dataset\": {:?},\n  \"image_size\": {},\n  \"train_images\": {},\n  \"test_images\": {},\n  \"epochs\": {},\n  \"steps\": {},\n  \"batch\": {},\n  \"lr\": {},\n  \"momentum\": {},\n  \"weight_decay\": {},\n  \"nesterov\": {},\n  \"schedule\": {:?},\n  \"warmup_steps\": {},\n  \"tau\": {},\n  \"mu\": {},\n  \"grad_semantics\": \"{}\",\n  \"loss\": \"{}\",\n  \"seed\": {},\n  \"threads\": {},\n  \"knn_k\": {},\n  \"knn_sigma\": {}\n}}\n",
        cfg.model.name(),
        ds.name,
        ds.size,
        ds.train.len(),
        ds.test.len(),
        cfg.epochs.map_or("null".into(), |e| e.to_string()),
        cfg.steps.map_or("null".into(), |s| s.to_string()),
        cfg.batch,
        cfg.sgd.lr,
        cfg.sgd.momentum,
        cfg.sgd.weight_decay,
        cfg.sgd.nesterov,
        format!("{:?}", cfg.schedule),
        cfg.warmup_steps,
        cfg.loss.tau,
        cfg.loss.mu,
        cfg.loss.semantics,
        cfg.backend.describe(),
        cfg.seed,
        rayon::current_num_threads(),
        cfg.knn_k,
        cfg.knn_sigma
    );
    write_atomically(&out.join("config.json"), text.as_bytes())
}

/// The losses of a window of steps, on their way back from the device.
struct LossWindow {
    steps: Vec<usize>,
    read: PendingRead,
}

impl LossWindow {
    /// Waits for the copy, checks every loss, adds them up and appends them to `log`
    /// (steps.csv); returns the last one.
    fn collect(
        self,
        losses: &mut Vec<f64>,
        sum: &mut f64,
        count: &mut usize,
        log: &mut StepLog,
    ) -> Result<f64> {
        let values = (self.read)()?;
        let mut last = f64::NAN;
        for (&step, &loss) in self.steps.iter().zip(&values) {
            if !loss.is_finite() {
                return Err(Error::invalid(format!(
                    "the loss became {loss} at step {step}; lower --lr or raise --tau"
                )));
            }
            losses.push(loss);
            *sum += loss;
            *count += 1;
            last = loss;
            log.line(step + 1, loss)?;
        }
        Ok(last)
    }
}

/// `steps.csv` in the output folder: `step,loss` for every step (steps counted from 1, as in
/// metrics.csv), appended as losses arrive; a resumed run first drops the lines after its
/// checkpoint's step.
struct StepLog {
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
}

impl StepLog {
    /// Opens the log for a run resuming after `start` steps (0: a new file), keeping the lines
    /// of steps 1..=start only.
    fn open(out: &Path, start: usize) -> Result<StepLog> {
        let path = out.join("steps.csv");
        let mut text = String::from("step,loss\n");
        if start > 0 {
            if let Ok(old) = std::fs::read_to_string(&path) {
                for line in old.lines().skip(1) {
                    let step = line.split(',').next().and_then(|s| s.parse::<usize>().ok());
                    if step.is_some_and(|s| s <= start) {
                        text.push_str(line);
                        text.push('\n');
                    }
                }
            }
        }
        write_atomically(&path, text.as_bytes())?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        Ok(StepLog {
            path,
            file: std::io::BufWriter::new(file),
        })
    }

    fn line(&mut self, step: usize, loss: f64) -> Result<()> {
        use std::io::Write;
        writeln!(self.file, "{step},{loss}").map_err(|e| Error::io(&self.path, e))
    }

    fn flush(&mut self) -> Result<()> {
        use std::io::Write;
        self.file.flush().map_err(|e| Error::io(&self.path, e))
    }
}

/// Trains as configured; see the module documentation.
pub fn train(cfg: &TrainConfig, ds: Arc<Dataset>) -> Result<TrainSummary> {
    match cfg.backend {
        BackendChoice::Cpu { reference_loss } => {
            let backend: Cpu<f32> = if reference_loss {
                Cpu::with_reference_loss()
            } else {
                Cpu::new()
            };
            train_on(cfg, ds, backend)
        }
        BackendChoice::Cuda { loss, precision } => {
            crate::loss::cuda::validate_for_kernels(&cfg.loss)?;
            let gpu = Arc::new(Gpu::require()?);
            if cfg.progress {
                eprintln!(
                    "training on {} ({} loss kernels, {} GEMMs)",
                    gpu.name()?,
                    loss.name(),
                    precision.name()
                );
            }
            let backend = CudaBackend::with_loss_version(gpu, loss)?.with_gemm_precision(precision);
            train_on(cfg, ds, backend)
        }
    }
}

fn train_on<B: Backend>(cfg: &TrainConfig, ds: Arc<Dataset>, backend: B) -> Result<TrainSummary> {
    cfg.loss.validate()?;
    if cfg.batch < 2 {
        return Err(Error::invalid(format!(
            "--batch {}: expected at least 2 images (4 rows)",
            cfg.batch
        )));
    }
    let steps_per_epoch = ds.training_len() / cfg.batch;
    if steps_per_epoch == 0 {
        return Err(Error::invalid(format!(
            "--batch {} is larger than the {} training images",
            cfg.batch,
            ds.train.len()
        )));
    }
    let total_steps = match (cfg.steps, cfg.epochs) {
        (Some(s), _) => s,
        (None, Some(e)) => e * steps_per_epoch,
        (None, None) => return Err(Error::invalid("give --epochs E or --steps S")),
    };
    std::fs::create_dir_all(&cfg.out).map_err(|e| Error::io(&cfg.out, e))?;
    let mut store = ParamStore::default();
    let model = Model::new(cfg.model, &mut store, &backend, cfg.seed)?;
    let mut graph = Graph::new(backend, store);
    let mut sgd = Sgd::new(cfg.sgd);

    let last = cfg.out.join(LAST);
    let (mut start, mut epoch_sum, mut epoch_count, mut metrics) =
        (0usize, 0.0f64, 0usize, Vec::new());
    if cfg.resume {
        let m = checkpoint::load_model(&mut graph.params, &graph.backend, &last)?;
        checkpoint::load_optimizer(
            &mut graph.params,
            &mut sgd,
            &graph.backend,
            &cfg.out.join(LAST_OPT),
        )?;
        if m.get("model").map(String::as_str) != Some(cfg.model.name()) {
            return Err(Error::bad_file(
                &last,
                format!("holds model {:?}, not {}", m.get("model"), cfg.model.name()),
            ));
        }
        let field = |k: &str| {
            m.get(k)
                .cloned()
                .ok_or_else(|| Error::bad_file(&last, format!("metadata has no {k}")))
        };
        let bad = |k: &str| Error::bad_file(&last, format!("metadata {k} is not a number"));
        start = field("step")?.parse().map_err(|_| bad("step"))?;
        epoch_sum = field("epoch_loss_sum")?
            .parse()
            .map_err(|_| bad("epoch_loss_sum"))?;
        epoch_count = field("epoch_loss_count")?
            .parse()
            .map_err(|_| bad("epoch_loss_count"))?;
        metrics = parse_metrics_csv(&cfg.out.join("metrics.csv"))?;
    } else if last.exists() {
        return Err(Error::invalid(format!(
            "{} already holds a run ({}); pass --resume to continue it or choose another --out",
            cfg.out.display(),
            last.display()
        )));
    }
    write_config(cfg, &ds, &cfg.out)?;

    let mut summary = TrainSummary {
        metrics: Vec::new(),
        step_losses: Vec::new(),
        interrupted: false,
        knn_at_start: None,
    };
    if total_steps == 0 || start == 0 {
        let knn = knn_accuracy(&mut graph, &model, &ds, cfg.knn_k, cfg.knn_sigma)?;
        summary.knn_at_start = Some(knn);
        if cfg.progress {
            let raw = raw_pixel_knn(&ds, cfg.knn_k, cfg.knn_sigma)?;
            eprintln!(
                "kNN top-1 at initialisation: {:.2}% (raw pixels: {:.2}%)",
                100.0 * knn,
                100.0 * raw
            );
        }
    }
    if total_steps == 0 {
        save(&graph, &sgd, &cfg.out, meta(cfg, &ds, 0, 0.0, 0))?;
        summary.metrics = metrics;
        return Ok(summary);
    }

    // Batches are prepared on a worker thread, one step ahead of the encoder.
    let (tx, rx) = mpsc::sync_channel::<(usize, Vec<f32>)>(2);
    let producer = {
        let (ds, aug, seed, batch) = (ds.clone(), AugmentConfig::recipe(), cfg.seed, cfg.batch);
        std::thread::spawn(move || {
            let mut order_epoch = usize::MAX;
            let mut order = Vec::new();
            for step in start..total_steps {
                let epoch = step / steps_per_epoch;
                if epoch != order_epoch {
                    order = epoch_order(ds.training_len(), seed, epoch);
                    order_epoch = epoch;
                }
                let i = step % steps_per_epoch;
                let views = augment::two_view_batch(
                    &[&ds.train, &ds.unlabeled],
                    ds.size,
                    &order[i * batch..(i + 1) * batch],
                    &aug,
                    seed,
                    epoch as u64,
                );
                if tx.send((step, views)).is_err() {
                    return;
                }
            }
        })
    };

    let stop = stop_flag();
    let bar = if cfg.progress {
        let bar = indicatif::ProgressBar::new((total_steps - start) as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
            )
            .map_err(|e| Error::invalid(e.to_string()))?,
        );
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let shape = Shape4 {
        n: 2 * cfg.batch,
        c: 3,
        h: ds.size,
        w: ds.size,
    };
    let run_start = Instant::now();
    let mut best = metrics
        .iter()
        .map(|m: &EpochMetrics| m.knn_top1)
        .fold(f64::NEG_INFINITY, f64::max);
    // Each step's loss stays on the device, in `history`, until it is read every few steps.
    let read_every = cfg
        .loss_read_every
        .unwrap_or_else(|| cfg.backend.loss_read_every())
        .max(1);
    let mut history = graph.backend.zeros(read_every)?;
    let mut pending: Vec<usize> = Vec::with_capacity(read_every);
    let mut in_flight: Option<LossWindow> = None;
    let mut step_log = StepLog::open(&cfg.out, start)?;
    let mut last_loss: Option<f64> = None;
    let (mut window, mut data_s) = (Instant::now(), 0.0f64);
    for step in start..total_steps {
        let wait = Instant::now();
        let (got, views) = rx
            .recv()
            .map_err(|_| Error::invalid("the batch worker stopped"))?;
        debug_assert_eq!(got, step);
        data_s += wait.elapsed().as_secs_f64();
        let lr = learning_rate(
            cfg.sgd.lr,
            &cfg.schedule,
            step,
            total_steps,
            steps_per_epoch,
            cfg.warmup_steps,
        );
        let loss = queue_train_step(&mut graph, &model, &mut sgd, &views, shape, &cfg.loss, lr)?;
        graph.record_scalar(loss, &mut history, pending.len())?;
        pending.push(step);

        let end_of_epoch = (step + 1) % steps_per_epoch == 0 || step + 1 == total_steps;
        let stopping = stop.load(Ordering::SeqCst) && step + 1 < total_steps;
        if pending.len() == read_every || end_of_epoch || stopping {
            // Start copying this window's losses back; collect the previous window's, whose
            // copy has long finished (so the host waits for the device only at the epoch's end).
            let read = graph.backend.read_later(&history)?;
            let steps = pending.len();
            let elapsed = window.elapsed().as_secs_f64();
            bar.set_message(format!(
                "loss {}  {:.0} img/s  data wait {:.1} ms/step",
                last_loss.map_or("-".into(), |l| format!("{l:.4}")),
                (cfg.batch * steps) as f64 / elapsed,
                1e3 * data_s / steps as f64
            ));
            if let Some(previous) = in_flight.replace(LossWindow {
                steps: std::mem::take(&mut pending),
                read,
            }) {
                let n = previous.steps.len() as u64;
                last_loss = Some(previous.collect(
                    &mut summary.step_losses,
                    &mut epoch_sum,
                    &mut epoch_count,
                    &mut step_log,
                )?);
                bar.inc(n);
            }
            if end_of_epoch || stopping {
                if let Some(window) = in_flight.take() {
                    let n = window.steps.len() as u64;
                    last_loss = Some(window.collect(
                        &mut summary.step_losses,
                        &mut epoch_sum,
                        &mut epoch_count,
                        &mut step_log,
                    )?);
                    bar.inc(n);
                }
                step_log.flush()?;
            }
            (window, data_s) = (Instant::now(), 0.0);
        }
        if end_of_epoch {
            let knn = knn_accuracy(&mut graph, &model, &ds, cfg.knn_k, cfg.knn_sigma)?;
            let row = EpochMetrics {
                epoch: step / steps_per_epoch + 1,
                step: step + 1,
                loss: epoch_sum / epoch_count.max(1) as f64,
                knn_top1: knn,
                lr,
                seconds: run_start.elapsed().as_secs_f64(),
            };
            let line = format!(
                "epoch {:>3}  step {:>6}  loss {:.4}  kNN top-1 {:.2}%  lr {:.4}  {:.0} s",
                row.epoch,
                row.step,
                row.loss,
                100.0 * knn,
                lr,
                row.seconds
            );
            if cfg.progress {
                bar.suspend(|| eprintln!("{line}"));
            }
            metrics.push(row.clone());
            summary.metrics.push(row);
            (epoch_sum, epoch_count) = (0.0, 0);
            save(&graph, &sgd, &cfg.out, meta(cfg, &ds, step + 1, 0.0, 0))?;
            if knn > best {
                best = knn;
                checkpoint::save_model(
                    &graph.params,
                    &graph.backend,
                    &cfg.out.join(BEST),
                    meta(cfg, &ds, step + 1, 0.0, 0),
                )?;
            }
            write_atomically(
                &cfg.out.join("metrics.csv"),
                metrics_csv(&metrics).as_bytes(),
            )?;
            write_atomically(
                &cfg.out.join("metrics.json"),
                metrics_json(&metrics).as_bytes(),
            )?;
            plot_png(&metrics, &cfg.out.join("metrics.png"))?;
            window = Instant::now(); // the kNN is not training time
        }
        if stopping {
            save(
                &graph,
                &sgd,
                &cfg.out,
                meta(cfg, &ds, step + 1, epoch_sum, epoch_count),
            )?;
            bar.suspend(|| {
                eprintln!(
                    "interrupted: saved step {} to {}; continue with --resume",
                    step + 1,
                    last.display()
                )
            });
            summary.interrupted = true;
            break;
        }
    }
    bar.finish_and_clear();
    drop(rx);
    let _ = producer.join();
    Ok(summary)
}
