//! One training run: [`Run::start`] checks the configuration, builds the model and, with
//! `--resume`, loads the run's state; [`Run::train`] evaluates the initial network, then runs
//! the steps, with the end of every epoch (kNN, metrics, checkpoints) and a clean stop on a
//! signal as their own steps.
//!
//! The run's state is one file, `state.safetensors` (model, momentum, every step's loss, the
//! position and the metrics history), committed in one atomic rename at every save
//! (`Run::commit`). A resume reads that file alone; every other file is derived from it and
//! rewritten on resume (`last.safetensors` and its optimizer file, metrics.*, steps.csv), and
//! `best.safetensors` is written before the commit that records it. So whatever moment a run
//! dies at, a resume ends in the same files as a run that never stopped, and a full disk leaves
//! the last committed state in place.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::batches::epoch_order;
use super::batches::BatchWorker;
use super::evaluate::{class_split, describe_classes, describe_evaluation};
use super::evaluate::{evaluate_until, raw_pixel_knn, EvalSet, Evaluation};
use super::lock::RunLock;
use super::losses::{EpochLoss, LossReader};
use super::outputs::{self, EpochMetrics, StepLog, BEST, LAST, LAST_OPT, STATE};
use super::{config, ranks, stop_flag, RunOptions, TrainConfig, TrainSummary};
use crate::data::Dataset;
use crate::dist::collectives::Collectives;
use crate::error::{Error, Result};
use crate::names::Named;
use crate::nn::checkpoint;
use crate::nn::models::Model;
use crate::nn::optim::{learning_rate, Sgd};
use crate::nn::step::{queue_method_step, queue_train_step};
use crate::nn::Encoder;
use crate::ops::Shape4;
use crate::tape::params::ParamStore;
use crate::tape::Graph;

/// A run in progress; see the module documentation.
pub struct Run<'a, B: Encoder> {
    cfg: &'a TrainConfig,
    /// This process alone, or its data-parallel group: who writes, which images are its share,
    /// what the ranks share.
    group: Arc<dyn Collectives<B>>,
    opts: &'a RunOptions,
    /// The training images (of the training classes).
    ds: Arc<Dataset>,
    /// What the epochs are evaluated on.
    eval: EvalSet,
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
    /// The losses of the steps before `start` (from the saved state).
    history: Vec<f64>,
    /// The step being run (0-based), for the report of a divergence.
    at_step: usize,
    /// The step of the last committed state, if any.
    committed: Option<usize>,
    summary: TrainSummary,
    /// A baseline's state (the memory bank, the classifier); None for the method itself.
    method: Option<crate::methods::MethodState>,
    /// The network at initialisation is still to be evaluated (epoch 0 of the metrics).
    initial_evaluation_due: bool,
    /// This process's claim on `--out`, held until the run is dropped (rank 0 alone of a
    /// data-parallel group writes there; the others hold none).
    _lock: Option<RunLock>,
}

/// Claims `--out` for this process (creating it) and removes what an interrupted write left.
fn claim(opts: &RunOptions) -> Result<RunLock> {
    std::fs::create_dir_all(&opts.out).map_err(|e| Error::io(&opts.out, e))?;
    let lock = RunLock::acquire(&opts.out)?;
    let leftovers = crate::durable::remove_leftovers(&opts.out)?;
    if leftovers > 0 && opts.progress {
        eprintln!(
            "removed {leftovers} temporary file(s) of an interrupted write in {}",
            opts.out.display()
        );
    }
    Ok(lock)
}

impl<'a, B: Encoder> Run<'a, B> {
    /// Checks the configuration, builds the model on `backend` and, when resuming, loads the
    /// last checkpoint; writes config.json.
    pub fn start(
        cfg: &'a TrainConfig,
        opts: &'a RunOptions,
        ds: Arc<Dataset>,
        backend: B,
        group: Arc<dyn Collectives<B>>,
    ) -> Result<Self> {
        config::validate(cfg)?;
        cfg.loss.validate()?;
        let (ds, eval) = class_split(cfg, &ds)?;
        if opts.progress && (cfg.data.classes.is_some() || cfg.eval_classes.is_some()) {
            eprintln!("{}", describe_classes(&ds, &eval));
        }
        let (steps_per_epoch, total_steps) = config::step_counts(cfg, &ds)?;
        let lead = group.rank() == 0;
        let lock = if lead { Some(claim(opts)?) } else { None };
        let mut store = ParamStore::default();
        let model = Model::new(cfg.model, &mut store, &backend, cfg.seed)?;
        let method = crate::methods::MethodState::new(
            cfg.method,
            ds.training_len(),
            crate::nn::models::EMBED_DIM,
            cfg.seed,
        )?;
        let mut graph = Graph::new(backend, store);
        group.clone().install(&mut graph)?;
        let mut run = Run {
            cfg,
            group,
            opts,
            ds,
            eval,
            graph,
            model,
            sgd: Sgd::new(cfg.sgd),
            steps_per_epoch,
            total_steps,
            start: 0,
            epoch: EpochLoss::default(),
            metrics: Vec::new(),
            history: Vec::new(),
            at_step: 0,
            committed: None,
            summary: TrainSummary {
                metrics: Vec::new(),
                step_losses: Vec::new(),
                interrupted: false,
                knn_at_start: None,
                classes_trained: Vec::new(),
                classes_evaluated: Vec::new(),
                unseen: false,
            },
            method,
            initial_evaluation_due: false,
            _lock: lock,
        };
        if lead {
            run.open_outputs()?;
        }
        run.initial_evaluation_due = run.start == 0 && !run.metrics.iter().any(|m| m.epoch == 0);
        run.share_with_ranks()?;
        if lead && run.start > 0 {
            run.write_derived()?; // whatever a crash after the last commit left unwritten
        }
        Ok(run)
    }

    /// Rank 0's part of the start (the whole of it on one device): resumes the state in
    /// `--out` or checks that it holds none, then writes config.json.
    fn open_outputs(&mut self) -> Result<()> {
        let (cfg, opts) = (self.cfg, self.opts);
        let (state, last) = (opts.out.join(STATE), opts.out.join(LAST));
        if opts.resume {
            if state.exists() {
                self.resume(&state)?;
            } else if last.exists() {
                self.resume_legacy(&last)?;
            } else if opts.progress {
                eprintln!(
                    "{} holds no saved state yet: starting the run from the beginning",
                    opts.out.display()
                );
            }
        } else if let Some(held) = [&state, &last].into_iter().find(|p| p.exists()) {
            return Err(Error::invalid(format!(
                "{} already holds a run ({}); pass --resume to continue it or choose another --out",
                opts.out.display(),
                held.display()
            )));
        }
        if self.start > self.total_steps {
            return Err(Error::invalid(format!(
                "the run in {} has done {} steps, and these settings end it after {}: a resumed \
                 run can only be extended (raise --epochs or --steps)",
                opts.out.display(),
                self.start,
                self.total_steps
            )));
        }
        config::write(cfg, &self.ds, &opts.out)
    }

    /// In a data-parallel group, rank 0's position and state on every rank (ranks::share_state);
    /// nothing on one device.
    fn share_with_ranks(&mut self) -> Result<()> {
        let (b, group) = (&self.graph.backend, &*self.group);
        if group.world_size() == 1 {
            return Ok(());
        }
        let mut position = [
            self.start as u64,
            self.epoch.count as u64,
            self.sgd.step,
            u64::from(self.initial_evaluation_due),
        ];
        ranks::broadcast_u64(group, b, &mut position)?;
        let [start, count, sgd_step, initial] = position;
        let too_large = |v: u64| Error::invalid(format!("rank 0 sent a position of {v}"));
        self.start = usize::try_from(start).map_err(|_| too_large(start))?;
        self.epoch.count = usize::try_from(count).map_err(|_| too_large(count))?;
        self.sgd.step = sgd_step;
        self.initial_evaluation_due = initial != 0;
        ranks::share_state(group, &self.graph.backend, &mut self.graph.params)
    }

    /// Loads the model, the optimizer, the position, the metrics and every step's loss from
    /// the run's state file.
    fn resume(&mut self, state: &Path) -> Result<()> {
        let (g, sgd) = (&mut self.graph, &mut self.sgd);
        let (m, losses) = checkpoint::load_run_state(&mut g.params, sgd, &g.backend, state)?;
        self.position(state, &m)?;
        if losses.len() != self.start {
            return Err(Error::bad_file(
                state,
                format!("holds {} step losses for step {}", losses.len(), self.start),
            ));
        }
        self.history = losses;
        self.committed = Some(self.start);
        if let Some(method) = &mut self.method {
            let extra = checkpoint::load_extra_tensors(state)?;
            let get = |name: &str| extra.get(name).cloned();
            method
                .restore(&get)
                .map_err(|e| Error::bad_file(state, e.to_string()))?;
        }
        let metrics = m
            .get("metrics")
            .ok_or_else(|| Error::bad_file(state, "metadata has no metrics"))?;
        self.metrics = serde_json::from_str(metrics)
            .map_err(|e| Error::bad_file(state, format!("metrics: {e}")))?;
        Ok(())
    }

    /// The model name, step and current epoch's running loss from a saved file's metadata.
    fn position(
        &mut self,
        path: &Path,
        m: &std::collections::HashMap<String, String>,
    ) -> Result<()> {
        let model = self.cfg.model.name();
        if m.get("model") != Some(&model) {
            return Err(Error::bad_file(
                path,
                format!("holds model {:?}, not {model}", m.get("model")),
            ));
        }
        self.start = checkpoint::integer(path, m, "step")?;
        let sum = m
            .get("epoch_loss_sum")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| Error::bad_file(path, "metadata epoch_loss_sum is not a number"))?;
        self.epoch = EpochLoss {
            sum,
            count: checkpoint::integer(path, m, "epoch_loss_count")?,
        };
        Ok(())
    }

    /// A run written before the state file existed: `last.safetensors` and its optimizer
    /// file, which must be of the same step (two files renamed one after the other can be
    /// from different saves if the writer died between the renames), and steps.csv.
    fn resume_legacy(&mut self, last: &Path) -> Result<()> {
        let m = checkpoint::load_model(&mut self.graph.params, &self.graph.backend, last)?;
        let opt = self.opts.out.join(LAST_OPT);
        let (g, sgd) = (&mut self.graph, &mut self.sgd);
        checkpoint::load_optimizer(&mut g.params, sgd, &g.backend, &opt)?;
        self.position(last, &m)?;
        if self.sgd.step != self.start as u64 {
            return Err(Error::bad_file(
                &opt,
                format!(
                    "is from step {} but {} from step {}: a save was interrupted between them; \
                     the run cannot be resumed from this pair",
                    self.sgd.step,
                    last.display(),
                    self.start
                ),
            ));
        }
        self.metrics = outputs::parse_metrics_csv(&self.opts.out.join("metrics.csv"))?;
        let log = std::fs::read_to_string(self.opts.out.join("steps.csv")).unwrap_or_default();
        self.history = log
            .lines()
            .skip(1)
            .filter_map(|l| l.split_once(',').and_then(|(_, v)| v.parse().ok()))
            .take(self.start)
            .collect();
        if self.history.len() != self.start {
            return Err(Error::bad_file(
                &self.opts.out.join("steps.csv"),
                format!(
                    "holds {} step losses, the checkpoint is at step {}",
                    self.history.len(),
                    self.start
                ),
            ));
        }
        Ok(())
    }

    /// Commits the state after `step` steps (the current epoch's running loss in `epoch`), and
    /// `best.safetensors` first when `best` (see the module documentation); then the derived
    /// files.
    fn commit(&mut self, step: usize, epoch: EpochLoss, best: bool) -> Result<()> {
        if !self.lead() {
            self.committed = Some(step);
            return Ok(());
        }
        let (out, g) = (&self.opts.out, &self.graph);
        let mut meta = outputs::meta(self.cfg, &self.ds, step, epoch.sum, epoch.count);
        let losses: Vec<f64> = self
            .history
            .iter()
            .chain(&self.summary.step_losses)
            .copied()
            .collect();
        if losses.len() != step {
            return Err(Error::invalid(format!(
                "internal: {} losses collected at step {step}",
                losses.len()
            )));
        }
        if best {
            checkpoint::save_model(&g.params, &g.backend, &out.join(BEST), meta.clone())?;
        }
        let metrics = serde_json::to_string(&self.metrics)
            .map_err(|e| Error::invalid(format!("serialising the metrics: {e}")))?;
        meta.insert("metrics".into(), metrics);
        let extra = self
            .method
            .as_ref()
            .map(|m| m.tensors())
            .unwrap_or_default();
        checkpoint::save_run_state(
            &g.params,
            &self.sgd,
            &g.backend,
            &losses,
            &extra,
            &out.join(STATE),
            meta,
        )?;
        self.committed = Some(step);
        self.write_derived()
    }

    /// The files derived from the state: last.safetensors (+ its optimizer file) and metrics.*.
    fn write_derived(&self) -> Result<()> {
        if !self.lead() {
            return Ok(());
        }
        let meta = outputs::meta(
            self.cfg,
            &self.ds,
            self.current_step(),
            self.epoch.sum,
            self.epoch.count,
        );
        outputs::save_last(&self.graph, &self.sgd, &self.opts.out, meta)?;
        outputs::write_metrics(&self.metrics, &self.opts.out)
    }

    /// The learning rate of `step` (0-based) under the schedule and warm-up.
    fn lr_at(&self, step: usize) -> f64 {
        let cfg = self.cfg;
        learning_rate(
            cfg.sgd.lr,
            &cfg.schedule,
            step,
            self.total_steps,
            self.steps_per_epoch,
            cfg.warmup_steps,
        )
    }

    /// Rank 0 of a data-parallel group, or the one device: the process that writes.
    fn lead(&self) -> bool {
        self.group.rank() == 0
    }

    /// Whether to stop after `step`: on a signal, unless it is the last step. A data-parallel
    /// group decides together, at `sync_point`s only (loss reads: the host waits there anyway).
    fn stop_after(&self, step: usize, sync_point: bool) -> Result<bool> {
        let wanted = stop_flag().load(Ordering::SeqCst) && step + 1 < self.total_steps;
        if self.group.world_size() == 1 {
            return Ok(wanted);
        }
        Ok(sync_point && ranks::any_rank(&*self.group, &self.graph.backend, wanted)?)
    }

    /// Steps done so far.
    fn current_step(&self) -> usize {
        self.history.len() + self.summary.step_losses.len()
    }

    /// Runs the configured steps; see the module documentation.
    pub fn train(mut self) -> Result<TrainSummary> {
        self.summary.classes_trained = self.ds.classes.clone();
        self.summary.classes_evaluated = self.eval.ds.classes.clone();
        self.summary.unseen = self.eval.unseen;
        if self.initial_evaluation_due {
            self.initial_evaluation()?;
        }
        if self.total_steps == 0 {
            self.commit(0, EpochLoss::default(), false)?;
            return Ok(self.summary);
        }
        self.run_steps()?;
        Ok(self.summary)
    }

    /// kNN of the initialised network, the metrics' epoch 0 (and, with progress shown and the
    /// baseline asked for, kNN of raw pixels).
    fn initial_evaluation(&mut self) -> Result<()> {
        let never = || false;
        let (g, m, set) = (&mut self.graph, &self.model, &self.eval);
        let evaluation = evaluate_until(&*self.group, g, m, set, &self.cfg.knn, &never)?
            .ok_or_else(|| Error::invalid("internal: an evaluation stopped unasked"))?;
        if let Evaluation::Knn(knn) = evaluation {
            self.summary.knn_at_start = Some(knn);
        }
        let row = EpochMetrics::new(0, 0, None, Some(evaluation), self.lr_at(0), 0.0);
        self.metrics.push(row.clone());
        self.summary.metrics.push(row);
        if self.opts.progress {
            let pixels = if self.cfg.knn.pixel_baseline && !self.eval.unseen {
                let raw = raw_pixel_knn(&self.eval.ds, &self.cfg.knn)?;
                format!(" (raw pixels: {:.2}%)", 100.0 * raw.top1)
            } else {
                String::new()
            };
            eprintln!(
                "{} at initialisation{pixels}",
                describe_evaluation(&evaluation)
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

    /// [`Run::steps`], with a value that turned NaN or infinite (the loss, the encoder's output,
    /// a parameter) reported as the run's divergence: its step, the state kept, what to change.
    fn run_steps(&mut self) -> Result<()> {
        match self.steps() {
            Err(Error::NonFinite(what)) => {
                let kept = match self.committed {
                    Some(step) => format!(
                        "{} still holds step {step}",
                        self.opts.out.join(STATE).display()
                    ),
                    None => "no state had been saved yet".into(),
                };
                let sgd = &self.cfg.sgd;
                Err(Error::invalid(format!(
                    "training diverged at step {}: {what}. Nothing of it was saved: {kept}. \
                     Start a new run with a lower --lr (this one {}), --momentum ({}) or \
                     --weight-decay ({})",
                    self.at_step + 1,
                    sgd.lr,
                    sgd.momentum,
                    sgd.weight_decay
                )))
            }
            other => other,
        }
    }

    /// Steps `start..total`: each queued on the backend, its loss read back in windows.
    fn steps(&mut self) -> Result<()> {
        // From the first step on, a signal stops the run after a step and saves it.
        super::signals::set_saving(true);
        let (cfg, ds) = (self.cfg, self.ds.clone());
        let shard = ranks::shard(cfg.batch, (self.group.rank(), self.group.world_size()));
        let worker = BatchWorker::spawn(
            ds.clone(),
            cfg.augment,
            cfg.seed,
            (cfg.batch, shard.clone()),
            self.steps_per_epoch,
            (self.start, self.total_steps),
        );
        let bar = self.progress_bar()?;
        let shape = Shape4 {
            n: 2 * shard.len(),
            c: 3,
            h: ds.size,
            w: ds.size,
        };
        let run_start = Instant::now();
        let read_every = cfg
            .loss_read_every
            .unwrap_or_else(|| cfg.backend.loss_read_every());
        let mut reader = LossReader::new(&self.graph.backend, read_every)?;
        let mut log = if self.lead() {
            StepLog::open(&self.opts.out, &self.history)?
        } else {
            StepLog::discard()
        };
        // A run stopped during an epoch's evaluation saved the epoch with its loss still open
        // (count > 0 at the epoch's boundary): that evaluation comes first.
        let boundary = self.start % self.steps_per_epoch == 0 || self.start == self.total_steps;
        if self.start > 0 && self.epoch.count > 0 && boundary {
            let step = self.start - 1;
            let lr = self.lr_at(step);
            if !self.end_of_epoch(step, lr, run_start, &bar)? {
                bar.finish_and_clear();
                return Ok(());
            }
        }
        let mut last_loss: Option<f64> = None;
        let mut order: (usize, Vec<usize>) = (usize::MAX, Vec::new());
        let (mut window, mut data_s) = (Instant::now(), 0.0f64);
        for step in self.start..self.total_steps {
            self.at_step = step;
            let wait = Instant::now();
            let views = {
                let _range = crate::cuda::phase("data wait");
                worker.next(step)?
            };
            data_s += wait.elapsed().as_secs_f64();
            let lr = self.lr_at(step);
            let (graph, model, sgd) = (&mut self.graph, &self.model, &mut self.sgd);
            let loss = match &mut self.method {
                None => queue_train_step(graph, model, sgd, &views, shape, &cfg.loss, lr)?,
                Some(method) => {
                    // A baseline sees view A of each image, and needs the images' indices.
                    let epoch = step / self.steps_per_epoch;
                    if order.0 != epoch {
                        order = (epoch, epoch_order(ds.training_len(), cfg.seed, epoch));
                    }
                    let i = step % self.steps_per_epoch;
                    let indices = &order.1[i * cfg.batch..(i + 1) * cfg.batch];
                    let one_view = Shape4 {
                        n: cfg.batch,
                        ..shape
                    };
                    let view = &views[..one_view.len()];
                    queue_method_step(graph, model, sgd, method, view, one_view, indices, lr)?
                }
            };
            reader.record(&self.graph, loss, step)?;

            let end_of_epoch =
                (step + 1) % self.steps_per_epoch == 0 || step + 1 == self.total_steps;
            let stopping = self.stop_after(step, reader.window_full() || end_of_epoch)?;
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
                if !self.end_of_epoch(step, lr, run_start, &bar)? {
                    break; // a signal during the evaluation: saved with it pending
                }
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

    /// After the last step of an epoch: kNN (on the epochs `--eval-every` picks and the last),
    /// the metrics row, checkpoints, metrics files. A signal during the evaluation stops it:
    /// the epoch's steps are committed with the evaluation pending (the epoch's loss not yet
    /// closed), which `--resume` runs first; then false.
    fn end_of_epoch(
        &mut self,
        step: usize,
        lr: f64,
        run_start: Instant,
        bar: &indicatif::ProgressBar,
    ) -> Result<bool> {
        let epoch = step / self.steps_per_epoch + 1;
        let evaluation = if self.cfg.knn.evaluates(epoch, step + 1 == self.total_steps) {
            super::signals::hook_at_evaluation();
            let stop = stop_flag();
            let stopped = || stop.load(Ordering::SeqCst);
            let (g, m, set) = (&mut self.graph, &self.model, &self.eval);
            let Some(evaluation) =
                evaluate_until(&*self.group, g, m, set, &self.cfg.knn, &stopped)?
            else {
                self.commit(step + 1, self.epoch, false)?;
                bar.suspend(|| {
                    eprintln!(
                        "interrupted during the evaluation of epoch {epoch}: saved step {}; \
                         --resume evaluates it first",
                        step + 1
                    )
                });
                self.summary.interrupted = true;
                return Ok(false);
            };
            Some(evaluation)
        } else {
            None
        };
        let seconds = run_start.elapsed().as_secs_f64();
        let loss = Some(self.epoch.mean());
        let row = EpochMetrics::new(epoch, step + 1, loss, evaluation, lr, seconds);
        if self.opts.progress {
            let knn_text = evaluation.map_or("not evaluated".into(), |e| describe_evaluation(&e));
            let line = format!(
                "epoch {:>3}  step {:>6}  loss {:.4}  {knn_text}  lr {:.4}  {:.0} s",
                row.epoch,
                row.step,
                self.epoch.mean(),
                lr,
                row.seconds
            );
            bar.suspend(|| eprintln!("{line}"));
        }
        // The best of the trained epochs (the initialised network's row is not a candidate).
        let best = self
            .metrics
            .iter()
            .filter(|m| m.epoch > 0)
            .filter_map(|m| m.headline())
            .fold(f64::NEG_INFINITY, f64::max);
        let is_best = evaluation.is_some_and(|e| e.headline() > best);
        self.metrics.push(row.clone());
        self.summary.metrics.push(row);
        self.epoch = EpochLoss::default();
        self.commit(step + 1, EpochLoss::default(), is_best)?;
        Ok(true)
    }

    /// After a step with Ctrl-C pressed: saves the position mid-epoch and says how to go on.
    fn stop(&mut self, step: usize, bar: &indicatif::ProgressBar) -> Result<()> {
        self.commit(step + 1, self.epoch, false)?;
        let last = self.opts.out.join(LAST);
        self.summary.interrupted = true;
        if !self.lead() {
            return Ok(());
        }
        bar.suspend(|| {
            eprintln!(
                "interrupted: saved step {} to {}; continue with --resume",
                step + 1,
                last.display()
            )
        });
        Ok(())
    }
}
