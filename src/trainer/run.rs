//! One training run: [`Run::start`] checks the configuration, builds the model and, with
//! `--resume`, loads the last checkpoint; [`Run::train`] evaluates the initial network, then
//! runs the steps, with the end of every epoch (kNN, metrics, checkpoints) and a clean stop on
//! Ctrl-C as their own steps.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::batches::BatchWorker;
use super::evaluate::{knn_accuracy, raw_pixel_knn};
use super::lock::RunLock;
use super::losses::{EpochLoss, LossReader};
use super::outputs::{self, EpochMetrics, StepLog, BEST, LAST, LAST_OPT};
use super::{config, stop_flag, RunOptions, TrainConfig, TrainSummary};
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::names::Named;
use crate::nn::backend::Backend;
use crate::nn::checkpoint;
use crate::nn::graph::Graph;
use crate::nn::models::Model;
use crate::nn::optim::{learning_rate, Sgd};
use crate::nn::params::ParamStore;
use crate::nn::step::queue_train_step;
use crate::ops::Shape4;

/// A run in progress; see the module documentation.
pub struct Run<'a, B: Backend> {
    cfg: &'a TrainConfig,
    opts: &'a RunOptions,
    ds: Arc<Dataset>,
    graph: Graph<B>,
    model: Model,
    sgd: Sgd,
    steps_per_epoch: usize,
    total_steps: usize,
    /// The first step this invocation runs (the checkpoint's step when resuming).
    start: usize,
    epoch: EpochLoss,
    /// Every epoch's row so far, earlier invocations' included.
    metrics: Vec<EpochMetrics>,
    summary: TrainSummary,
    /// This process's claim on `--out`, held until the run is dropped.
    _lock: RunLock,
}

/// Steps per epoch and in all, or an error naming the flag at fault.
fn step_counts(cfg: &TrainConfig, ds: &Dataset) -> Result<(usize, usize)> {
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
        (None, Some(e)) => e.checked_mul(steps_per_epoch).ok_or_else(|| {
            Error::invalid(format!(
                "--epochs {e} x {steps_per_epoch} steps per epoch overflows the step count"
            ))
        })?,
        (None, None) => return Err(Error::invalid("give --epochs E or --steps S")),
    };
    Ok((steps_per_epoch, total_steps))
}

impl<'a, B: Backend> Run<'a, B> {
    /// Checks the configuration, builds the model on `backend` and, when resuming, loads the
    /// last checkpoint; writes config.json.
    pub fn start(
        cfg: &'a TrainConfig,
        opts: &'a RunOptions,
        ds: Arc<Dataset>,
        backend: B,
    ) -> Result<Self> {
        config::validate(cfg)?;
        cfg.loss.validate()?;
        let (steps_per_epoch, total_steps) = step_counts(cfg, &ds)?;
        std::fs::create_dir_all(&opts.out).map_err(|e| Error::io(&opts.out, e))?;
        let lock = RunLock::acquire(&opts.out)?;
        let mut store = ParamStore::default();
        let model = Model::new(cfg.model, &mut store, &backend, cfg.seed)?;
        let mut run = Run {
            cfg,
            opts,
            ds,
            graph: Graph::new(backend, store),
            model,
            sgd: Sgd::new(cfg.sgd),
            steps_per_epoch,
            total_steps,
            start: 0,
            epoch: EpochLoss::default(),
            metrics: Vec::new(),
            summary: TrainSummary {
                metrics: Vec::new(),
                step_losses: Vec::new(),
                interrupted: false,
                knn_at_start: None,
            },
            _lock: lock,
        };
        let last = opts.out.join(LAST);
        if opts.resume {
            run.resume(&last)?;
        } else if last.exists() {
            return Err(Error::invalid(format!(
                "{} already holds a run ({}); pass --resume to continue it or choose another --out",
                opts.out.display(),
                last.display()
            )));
        }
        config::write(cfg, &run.ds, &opts.out)?;
        Ok(run)
    }

    /// Loads the model, the optimizer and the position of the run from `last`.
    fn resume(&mut self, last: &Path) -> Result<()> {
        let m = checkpoint::load_model(&mut self.graph.params, &self.graph.backend, last)?;
        let opt = self.opts.out.join(LAST_OPT);
        checkpoint::load_optimizer(
            &mut self.graph.params,
            &mut self.sgd,
            &self.graph.backend,
            &opt,
        )?;
        let model = self.cfg.model.name();
        if m.get("model") != Some(&model) {
            return Err(Error::bad_file(
                last,
                format!("holds model {:?}, not {model}", m.get("model")),
            ));
        }
        let field = |k: &str| {
            m.get(k)
                .ok_or_else(|| Error::bad_file(last, format!("metadata has no {k}")))
        };
        let bad = |k: &str| Error::bad_file(last, format!("metadata {k} is not a number"));
        self.start = field("step")?.parse().map_err(|_| bad("step"))?;
        self.epoch = EpochLoss {
            sum: field("epoch_loss_sum")?
                .parse()
                .map_err(|_| bad("epoch_loss_sum"))?,
            count: field("epoch_loss_count")?
                .parse()
                .map_err(|_| bad("epoch_loss_count"))?,
        };
        self.metrics = outputs::parse_metrics_csv(&self.opts.out.join("metrics.csv"))?;
        Ok(())
    }

    /// Runs the configured steps; see the module documentation.
    pub fn train(mut self) -> Result<TrainSummary> {
        if self.total_steps == 0 || self.start == 0 {
            self.initial_evaluation()?;
        }
        if self.total_steps == 0 {
            let meta = outputs::meta(self.cfg, &self.ds, 0, 0.0, 0);
            outputs::save_last(&self.graph, &self.sgd, &self.opts.out, meta)?;
            self.summary.metrics = self.metrics;
            return Ok(self.summary);
        }
        self.run_steps()?;
        Ok(self.summary)
    }

    /// kNN of the initialised network (and, with progress shown, of raw pixels).
    fn initial_evaluation(&mut self) -> Result<()> {
        let knn = knn_accuracy(&mut self.graph, &self.model, &self.ds, &self.cfg.knn)?;
        self.summary.knn_at_start = Some(knn);
        if self.opts.progress {
            let raw = raw_pixel_knn(&self.ds, &self.cfg.knn)?;
            eprintln!(
                "kNN top-1 at initialisation: {:.2}% (raw pixels: {:.2}%)",
                100.0 * knn,
                100.0 * raw
            );
        }
        Ok(())
    }

    fn progress_bar(&self) -> Result<indicatif::ProgressBar> {
        if !self.opts.progress {
            return Ok(indicatif::ProgressBar::hidden());
        }
        let bar = indicatif::ProgressBar::new((self.total_steps - self.start) as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
            )
            .map_err(|e| Error::invalid(e.to_string()))?,
        );
        Ok(bar)
    }

    /// Steps `start..total`: each queued on the backend, its loss read back in windows.
    fn run_steps(&mut self) -> Result<()> {
        // From the first step on, a signal stops the run after a step and saves it.
        super::signals::set_saving(true);
        let (cfg, ds) = (self.cfg, self.ds.clone());
        let worker = BatchWorker::spawn(
            ds.clone(),
            cfg.seed,
            cfg.batch,
            self.steps_per_epoch,
            (self.start, self.total_steps),
        );
        let stop = stop_flag();
        let bar = self.progress_bar()?;
        let shape = Shape4 {
            n: 2 * cfg.batch,
            c: 3,
            h: ds.size,
            w: ds.size,
        };
        let run_start = Instant::now();
        let read_every = cfg
            .loss_read_every
            .unwrap_or_else(|| cfg.backend.loss_read_every());
        let mut reader = LossReader::new(&self.graph.backend, read_every)?;
        let mut log = StepLog::open(&self.opts.out, self.start)?;
        let mut last_loss: Option<f64> = None;
        let (mut window, mut data_s) = (Instant::now(), 0.0f64);
        for step in self.start..self.total_steps {
            let wait = Instant::now();
            let views = worker.next(step)?;
            data_s += wait.elapsed().as_secs_f64();
            let lr = learning_rate(
                cfg.sgd.lr,
                &cfg.schedule,
                step,
                self.total_steps,
                self.steps_per_epoch,
                cfg.warmup_steps,
            );
            let (graph, model, sgd) = (&mut self.graph, &self.model, &mut self.sgd);
            let loss = queue_train_step(graph, model, sgd, &views, shape, &cfg.loss, lr)?;
            reader.record(&self.graph, loss, step)?;

            let end_of_epoch =
                (step + 1) % self.steps_per_epoch == 0 || step + 1 == self.total_steps;
            let stopping = stop.load(Ordering::SeqCst) && step + 1 < self.total_steps;
            if reader.window_full() || end_of_epoch || stopping {
                let steps = reader.pending();
                let elapsed = window.elapsed().as_secs_f64();
                bar.set_message(format!(
                    "loss {}  {:.0} img/s  data wait {:.1} ms/step",
                    last_loss.map_or("-".into(), |l| format!("{l:.4}")),
                    (cfg.batch * steps) as f64 / elapsed,
                    1e3 * data_s / steps as f64
                ));
                let losses = &mut self.summary.step_losses;
                let drain = end_of_epoch || stopping;
                let backend = &self.graph.backend;
                if let Some(c) = reader.flush(backend, drain, &mut self.epoch, losses, &mut log)? {
                    last_loss = Some(c.last);
                    bar.inc(c.steps as u64);
                }
                (window, data_s) = (Instant::now(), 0.0);
            }
            if end_of_epoch {
                self.end_of_epoch(step, lr, run_start, &bar)?;
                window = Instant::now(); // the kNN is not training time
            }
            if stopping {
                self.stop(step, &bar)?;
                break;
            }
        }
        bar.finish_and_clear();
        Ok(())
    }

    /// After the last step of an epoch: kNN, the metrics row, checkpoints, metrics files.
    fn end_of_epoch(
        &mut self,
        step: usize,
        lr: f64,
        run_start: Instant,
        bar: &indicatif::ProgressBar,
    ) -> Result<()> {
        let knn = knn_accuracy(&mut self.graph, &self.model, &self.ds, &self.cfg.knn)?;
        let row = EpochMetrics {
            epoch: step / self.steps_per_epoch + 1,
            step: step + 1,
            loss: self.epoch.mean(),
            knn_top1: knn,
            lr,
            seconds: run_start.elapsed().as_secs_f64(),
        };
        if self.opts.progress {
            let line = format!(
                "epoch {:>3}  step {:>6}  loss {:.4}  kNN top-1 {:.2}%  lr {:.4}  {:.0} s",
                row.epoch,
                row.step,
                row.loss,
                100.0 * knn,
                lr,
                row.seconds
            );
            bar.suspend(|| eprintln!("{line}"));
        }
        let best = self
            .metrics
            .iter()
            .map(|m| m.knn_top1)
            .fold(f64::NEG_INFINITY, f64::max);
        self.metrics.push(row.clone());
        self.summary.metrics.push(row);
        self.epoch = EpochLoss::default();
        let out = &self.opts.out;
        let meta = outputs::meta(self.cfg, &self.ds, step + 1, 0.0, 0);
        outputs::save_last(&self.graph, &self.sgd, out, meta.clone())?;
        if knn > best {
            let (params, backend) = (&self.graph.params, &self.graph.backend);
            checkpoint::save_model(params, backend, &out.join(BEST), meta)?;
        }
        outputs::write_metrics(&self.metrics, out)
    }

    /// After a step with Ctrl-C pressed: saves the position mid-epoch and says how to go on.
    fn stop(&mut self, step: usize, bar: &indicatif::ProgressBar) -> Result<()> {
        let meta = outputs::meta(
            self.cfg,
            &self.ds,
            step + 1,
            self.epoch.sum,
            self.epoch.count,
        );
        outputs::save_last(&self.graph, &self.sgd, &self.opts.out, meta)?;
        let last = self.opts.out.join(LAST);
        bar.suspend(|| {
            eprintln!(
                "interrupted: saved step {} to {}; continue with --resume",
                step + 1,
                last.display()
            )
        });
        self.summary.interrupted = true;
        Ok(())
    }
}
