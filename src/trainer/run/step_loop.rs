//! The steps of a run: each step's batch from the batch worker (two augmented views of its
//! images, prepared one step ahead), the method's step queued on the backend, the losses read
//! back in windows, the end of an epoch, and a stop on a signal.

use std::time::Instant;

use super::Run;
use crate::error::{Error, Result};
use crate::methods;
use crate::nn::Encoder;
use crate::ops::Shape4;
use crate::tape::Var;
use crate::trainer::batches::{epoch_order, BatchWorker};
use crate::trainer::losses::LossReader;
use crate::trainer::outputs::StepLog;
use crate::trainer::ranks;

/// The images of one epoch in their order (the method's indices of a step's images).
struct EpochOrder {
    epoch: usize,
    order: Vec<usize>,
}

/// The step loop's timing of the current loss window: its start, and the time spent waiting
/// for batches in it.
struct Window {
    start: Instant,
    data_s: f64,
}

impl<B: Encoder> Run<'_, B> {
    /// [`Run::steps`], with a value that turned NaN or infinite (the loss, the encoder's output,
    /// a parameter) reported as the run's divergence: its step, the state kept, what to change.
    pub(super) fn run_steps(&mut self) -> Result<()> {
        match self.steps() {
            Err(Error::NonFinite(what)) => {
                let kept = match self.at.committed {
                    Some(step) => {
                        format!("{} still holds step {step}", self.files.state().display())
                    }
                    None => "no state had been saved yet".into(),
                };
                let sgd = &self.cfg.sgd;
                Err(Error::invalid(format!(
                    "training diverged at step {}: {what}. Nothing of it was saved: {kept}. \
                     Start a new run with a lower --lr (this one {}), --momentum ({}) or \
                     --weight-decay ({})",
                    self.at.at_step + 1,
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
        crate::trainer::signals::set_saving(true);
        let (cfg, ds) = (self.cfg, self.ds.clone());
        let shard = ranks::shard(cfg.batch, (self.group.rank(), self.group.world_size()));
        let (start, total) = (self.at.start, self.total_steps);
        let worker = BatchWorker::spawn(
            ds.clone(),
            cfg.augment,
            cfg.seed,
            (cfg.batch, shard.clone()),
            self.steps_per_epoch,
            (start, total),
        );
        self.report.start_steps(total - start)?;
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
        let mut reader = LossReader::new(&self.learner.graph.backend, read_every)?;
        let mut log = match self.files.writes() {
            true => StepLog::open(&self.opts.out, &self.at.history)?,
            false => StepLog::discard(),
        };
        // A run stopped during an epoch's evaluation saved the epoch with its loss still open
        // (count > 0 at the epoch's boundary, no row for it yet): that evaluation comes first.
        // (A run that --steps ended inside an epoch keeps its loss open too, with its row.)
        let boundary = start % self.steps_per_epoch == 0 || start == total;
        let has_row = self.at.metrics.iter().any(|m| m.step == start);
        if start > 0 && self.at.epoch.count > 0 && boundary && !has_row {
            let step = start - 1;
            if !self.end_of_epoch(step, self.lr_at(step), run_start)? {
                self.report.finish_steps();
                return Ok(());
            }
        }
        let mut last_loss: Option<f64> = None;
        let mut order = EpochOrder {
            epoch: usize::MAX,
            order: Vec::new(),
        };
        let mut window = Window {
            start: Instant::now(),
            data_s: 0.0,
        };
        for step in start..total {
            self.at.at_step = step;
            let loss = self.queue_step(step, &worker, shape, &mut order, &mut window)?;
            reader.record(&self.learner.graph, loss, step)?;
            let end_of_epoch = (step + 1) % self.steps_per_epoch == 0 || step + 1 == total;
            let stopping = self.stop_after(step, reader.window_full() || end_of_epoch)?;
            if reader.window_full() || end_of_epoch || stopping {
                let steps = reader.pending();
                let seconds = window.start.elapsed().as_secs_f64();
                self.report
                    .window(last_loss, cfg.batch, steps, seconds, window.data_s);
                let (losses, drain) = (&mut self.summary.step_losses, end_of_epoch || stopping);
                let backend = &self.learner.graph.backend;
                if let Some(c) =
                    reader.flush(backend, drain, &mut self.at.epoch, losses, &mut log)?
                {
                    last_loss = Some(c.last);
                    self.report.advance(c.steps);
                }
                window = Window {
                    start: Instant::now(),
                    data_s: 0.0,
                };
            }
            if end_of_epoch {
                if !self.end_of_epoch(step, self.lr_at(step), run_start)? {
                    break; // a signal during the evaluation: saved with it pending
                }
                window.start = Instant::now(); // the kNN is not training time
            }
            if stopping {
                self.stop(step)?;
                break;
            }
        }
        self.report.finish_steps();
        Ok(())
    }

    /// Queues step `step`: its batch from `worker`, the method's step on it; its loss node.
    fn queue_step(
        &mut self,
        step: usize,
        worker: &BatchWorker,
        shape: Shape4,
        order: &mut EpochOrder,
        window: &mut Window,
    ) -> Result<Var> {
        let (cfg, ds) = (self.cfg, &self.ds);
        let wait = Instant::now();
        let views = {
            let _range = crate::cuda::phase("data wait");
            worker.next(step)?
        };
        window.data_s += wait.elapsed().as_secs_f64();
        let lr = self.lr_at(step);
        // The images of the step, in the epoch's seeded order (what a baseline indexes its
        // state by; the instance loss needs none).
        let epoch = step / self.steps_per_epoch;
        if order.epoch != epoch {
            *order = EpochOrder {
                epoch,
                order: epoch_order(ds.training_len(), cfg.seed, epoch),
            };
        }
        let i = step % self.steps_per_epoch;
        let indices = &order.order[i * cfg.batch..(i + 1) * cfg.batch];
        let l = &mut self.learner;
        methods::queue_step(
            &mut *l.method,
            &mut l.graph,
            &l.model,
            &mut l.sgd,
            &views,
            shape,
            indices,
            lr,
        )
    }
}
