//! One training run, in parts with one job each:
//!
//! | part | its job |
//! |---|---|
//! | this file | [`Run::start`] (the configuration checked, the model, the method and the group's hooks built, the state resumed or the folder claimed) and [`Run::train`] |
//! | `checkpointer` | the run's files: the claim on `--out`, the atomic commits of `state.safetensors`, the files derived from it, resume |
//! | `reporter` | what the user sees: the progress bar and the lines of each phase |
//! | `step_loop` | the steps: batches in, steps queued, losses read back in windows, stops |
//! | `epoch_end` | the initial evaluation and the end of an epoch (kNN, the metrics row, the commit) |
//!
//! The run's state is one file, `state.safetensors` (model, momentum, every step's loss, the
//! position and the metrics history, the method's state), committed in one atomic rename at
//! every save. A resume reads that file alone; every other file is derived from it and
//! rewritten on resume (`last.safetensors` and its optimizer file, metrics.*, steps.csv), and
//! `best.safetensors` is written before the commit that records it. So whatever moment a run
//! dies at, a resume ends in the same files as a run that never stopped, and a full disk leaves
//! the last committed state in place.

mod checkpointer;
mod epoch_end;
mod reporter;
mod step_loop;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::evaluate::{class_split, describe_classes, EvalSet};
use super::losses::EpochLoss;
use super::outputs::EpochMetrics;
use super::{config, ranks, stop_flag, RunOptions, TrainConfig, TrainSummary};
use crate::data::Dataset;
use crate::dist::collectives::Collectives;
use crate::error::{Error, Result};
use crate::methods::{self, Method};
use crate::nn::models::{Model, EMBED_DIM};
use crate::nn::optim::{learning_rate, Sgd};
use crate::nn::Encoder;
use crate::tape::{Graph, ParamStore};
use checkpointer::Checkpointer;
use reporter::Reporter;

/// What trains: the graph (backend, parameters, tape), the model, the optimiser, the method.
struct Learner<B: Encoder> {
    graph: Graph<B>,
    model: Model,
    sgd: Sgd,
    method: Box<dyn Method<B>>,
}

/// Where the run stands.
#[derive(Debug, Clone, Default)]
struct Position {
    /// The first step this invocation runs (the checkpoint's step when resuming).
    start: usize,
    /// The current epoch's running loss.
    epoch: EpochLoss,
    /// Every epoch's row so far, earlier invocations' included.
    metrics: Vec<EpochMetrics>,
    /// The losses of the steps before `start` (from the saved state).
    history: Vec<f64>,
    /// The step being run (0-based), for the report of a divergence.
    at_step: usize,
    /// The step of the last committed state, if any.
    committed: Option<usize>,
    /// The network at initialisation is still to be evaluated (epoch 0 of the metrics).
    initial_evaluation_due: bool,
}

/// A run in progress; see the module documentation.
pub struct Run<'a, B: Encoder> {
    cfg: &'a TrainConfig,
    opts: &'a RunOptions,
    /// This process alone, or its data-parallel group: who writes, which images are its share,
    /// what the ranks share.
    group: Arc<dyn Collectives<B>>,
    /// The training images (of the training classes).
    ds: Arc<Dataset>,
    /// What the epochs are evaluated on.
    eval: EvalSet,
    steps_per_epoch: usize,
    total_steps: usize,
    learner: Learner<B>,
    at: Position,
    files: Checkpointer,
    report: Reporter,
    summary: TrainSummary,
}

impl<'a, B: Encoder> Run<'a, B> {
    /// Checks the configuration, builds the model and the method on `backend` (the group's
    /// hooks registered on its graph) and, when resuming, loads the run's state; writes
    /// config.json.
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
        let report = Reporter::new(opts.progress);
        if cfg.data.classes.is_some() || cfg.eval_classes.is_some() {
            report.line(&describe_classes(&ds, &eval));
        }
        let (steps_per_epoch, total_steps) = config::step_counts(cfg, &ds)?;
        let files = Checkpointer::claim(opts, group.rank() == 0, &report)?;
        let mut store = ParamStore::default();
        let model = Model::new(cfg.model, &mut store, &backend, cfg.seed)?;
        let method = methods::build(cfg.method, cfg.loss, ds.training_len(), EMBED_DIM, cfg.seed)?;
        let mut graph = Graph::new(backend, store);
        group.clone().install(&mut graph)?;
        let mut run = Run {
            cfg,
            opts,
            group,
            ds,
            eval,
            steps_per_epoch,
            total_steps,
            learner: Learner {
                graph,
                model,
                sgd: Sgd::new(cfg.sgd),
                method,
            },
            at: Position::default(),
            files,
            report,
            summary: TrainSummary {
                metrics: Vec::new(),
                step_losses: Vec::new(),
                interrupted: false,
                knn_at_start: None,
                classes_trained: Vec::new(),
                classes_evaluated: Vec::new(),
                unseen: false,
            },
        };
        let deferred_config = match run.files.writes() {
            true => run.open_outputs()?,
            false => None,
        };
        let at = &mut run.at;
        at.initial_evaluation_due = at.start == 0 && !at.metrics.iter().any(|m| m.epoch == 0);
        run.share_with_ranks()?;
        if run.files.writes() && run.at.start > 0 {
            run.write_derived()?; // whatever a crash after the last commit left unwritten
        }
        if let Some(recorded) = deferred_config {
            // Only now: a resume that fails before this point (a full disk, a bad file) leaves
            // the run's config.json as it was.
            config::write(cfg, recorded, &opts.out)?;
        }
        Ok(run)
    }

    /// Rank 0's part of the start (the whole of it on one device): resumes the state in
    /// `--out` or checks that it holds none and writes config.json. A resume returns the
    /// facts for config.json instead, which [`Run::start`] writes at its end (the dataset's
    /// fingerprint is computed once).
    fn open_outputs(&mut self) -> Result<Option<config::Recorded>> {
        let (cfg, opts) = (self.cfg, self.opts);
        let recorded = config::Recorded::of(cfg, &self.ds);
        if opts.resume {
            self.check_same_data(&recorded)?;
            self.files
                .resume(cfg, &mut self.learner, &mut self.at, &self.report)?;
            // The run's own files, read to resume, are rewritten from here on.
            crate::files::forget_inputs_in(&opts.out);
            // Extended past the end of a run that stopped inside an epoch: that epoch's row
            // was of its steps so far; the epoch finishes now and writes its row then.
            if self.at.start < self.total_steps {
                let per_epoch = self.steps_per_epoch;
                self.at.metrics.retain(|m| m.step % per_epoch == 0);
            }
        } else {
            self.files.check_new()?;
        }
        if self.at.start > self.total_steps {
            return Err(Error::invalid(format!(
                "the run in {} has done {} steps, and these settings end it after {}: a resumed \
                 run can only be extended (raise --epochs or --steps)",
                opts.out.display(),
                self.at.start,
                self.total_steps
            )));
        }
        if opts.resume {
            return Ok(Some(recorded));
        }
        config::write(cfg, recorded, &opts.out)?;
        Ok(None)
    }

    /// A resume continues on the data the run started on: the dataset its config.json records
    /// (name, absolute path, classes, size, image counts, fingerprint) must be the one loaded,
    /// or the saved steps and epochs would mean other images. `--allow-moved-data` accepts
    /// another path to the same data.
    fn check_same_data(&self, now: &config::Recorded) -> Result<()> {
        let Some(was) = &self.cfg.recorded else {
            return Ok(()); // no config.json yet: nothing was trained
        };
        let changes = was.changes(now, self.opts.allow_moved_data);
        if changes.is_empty() {
            return Ok(());
        }
        let moved_only = was.changes(now, true).is_empty();
        let advice = if moved_only {
            "if it is the same data in a new place, pass --allow-moved-data"
        } else {
            "resume with the data the run started on, or start a new run in another --out"
        };
        Err(Error::invalid(format!(
            "--resume: the dataset of the run in {} has changed ({}): {advice}",
            self.opts.out.display(),
            changes.join("; ")
        )))
    }

    /// In a data-parallel group, rank 0's position and state on every rank (ranks::share_state);
    /// nothing on one device.
    fn share_with_ranks(&mut self) -> Result<()> {
        let (b, group) = (&self.learner.graph.backend, &*self.group);
        if group.world_size() == 1 {
            return Ok(());
        }
        let mut position = [
            self.at.start as u64,
            self.at.epoch.count as u64,
            self.learner.sgd.step,
            u64::from(self.at.initial_evaluation_due),
        ];
        ranks::broadcast_u64(group, b, &mut position)?;
        let [start, count, sgd_step, initial] = position;
        let too_large = |v: u64| Error::invalid(format!("rank 0 sent a position of {v}"));
        self.at.start = usize::try_from(start).map_err(|_| too_large(start))?;
        self.at.epoch.count = usize::try_from(count).map_err(|_| too_large(count))?;
        self.learner.sgd.step = sgd_step;
        self.at.initial_evaluation_due = initial != 0;
        let g = &mut self.learner.graph;
        ranks::share_state(group, &g.backend, &mut g.params)
    }

    /// Every step's loss so far, earlier invocations' included.
    fn losses(&self) -> Vec<f64> {
        let done = &self.summary.step_losses;
        self.at.history.iter().chain(done).copied().collect()
    }

    /// Commits the state after `step` steps (the current epoch's running loss in `epoch`), and
    /// `best.safetensors` first when `best`; then the derived files.
    fn commit(&mut self, step: usize, epoch: EpochLoss, best: bool) -> Result<()> {
        let losses = self.losses();
        let (cfg, ds) = (self.cfg, &*self.ds);
        self.files.commit(
            cfg,
            ds,
            &self.learner,
            &self.at.metrics,
            &losses,
            (step, epoch),
            best,
        )?;
        self.at.committed = Some(step);
        self.write_derived()
    }

    /// The files derived from the state: last.safetensors (+ its optimizer file) and metrics.*.
    fn write_derived(&self) -> Result<()> {
        let position = (self.current_step(), self.at.epoch);
        self.files.write_derived(
            self.cfg,
            &self.ds,
            &self.learner,
            &self.at.metrics,
            position,
        )
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

    /// Whether to stop after `step`: on a signal, unless it is the last step. A data-parallel
    /// group decides together, at `sync_point`s only (loss reads: the host waits there anyway).
    fn stop_after(&self, step: usize, sync_point: bool) -> Result<bool> {
        let wanted = stop_flag().load(Ordering::SeqCst) && step + 1 < self.total_steps;
        if self.group.world_size() == 1 {
            return Ok(wanted);
        }
        let backend = &self.learner.graph.backend;
        Ok(sync_point && ranks::any_rank(&*self.group, backend, wanted)?)
    }

    /// Steps done so far.
    fn current_step(&self) -> usize {
        self.at.history.len() + self.summary.step_losses.len()
    }

    /// Runs the configured steps; see the module documentation.
    pub fn train(mut self) -> Result<TrainSummary> {
        self.summary.classes_trained = self.ds.classes.clone();
        self.summary.classes_evaluated = self.eval.ds.classes.clone();
        self.summary.unseen = self.eval.unseen;
        if self.at.initial_evaluation_due {
            self.initial_evaluation()?;
        }
        if self.total_steps == 0 {
            self.commit(0, EpochLoss::default(), false)?;
            return Ok(self.summary);
        }
        self.run_steps()?;
        Ok(self.summary)
    }
}
