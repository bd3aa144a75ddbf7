//! The evaluations of a run: the initialised network's (the metrics' epoch 0), and the end of
//! every epoch (kNN on the epochs `--eval-every` picks and the last, the metrics row, the
//! commit, best.safetensors when it is the best so far), and the stop on a signal.

use std::sync::atomic::Ordering;
use std::time::Instant;

use super::Run;
use crate::error::{Error, Result};
use crate::nn::Encoder;
use crate::trainer::evaluate::{describe_evaluation, evaluate_until, raw_pixel_knn, Evaluation};
use crate::trainer::losses::EpochLoss;
use crate::trainer::outputs::EpochMetrics;
use crate::trainer::stop_flag;

impl<B: Encoder> Run<'_, B> {
    /// kNN of the initialised network, the metrics' epoch 0 (and, with progress shown and the
    /// baseline asked for, kNN of raw pixels).
    pub(super) fn initial_evaluation(&mut self) -> Result<()> {
        let never = || false;
        let (l, set) = (&mut self.learner, &self.eval);
        let knn = &self.cfg.knn;
        let evaluation = evaluate_until(&*self.group, &mut l.graph, &l.model, set, knn, &never)?
            .ok_or_else(|| Error::invalid("internal: an evaluation stopped unasked"))?;
        if let Evaluation::Knn(knn) = evaluation {
            self.summary.knn_at_start = Some(knn);
        }
        let row = EpochMetrics::new(0, 0, None, Some(evaluation), self.lr_at(0), 0.0);
        self.at.metrics.push(row.clone());
        self.summary.metrics.push(row);
        if self.opts.progress {
            let pixels = if self.cfg.knn.pixel_baseline && !self.eval.unseen {
                let raw = raw_pixel_knn(&self.eval.ds, &self.cfg.knn)?;
                format!(" (raw pixels: {:.2}%)", 100.0 * raw.top1)
            } else {
                String::new()
            };
            self.report.line(&format!(
                "{} at initialisation{pixels}",
                describe_evaluation(&evaluation)
            ));
        }
        Ok(())
    }

    /// After the last step of an epoch: kNN (on the epochs `--eval-every` picks and the last),
    /// the metrics row, checkpoints, metrics files. A signal during the evaluation stops it:
    /// the epoch's steps are committed with the evaluation pending (the epoch's loss not yet
    /// closed), which `--resume` runs first; then false.
    pub(super) fn end_of_epoch(
        &mut self,
        step: usize,
        lr: f64,
        run_start: Instant,
    ) -> Result<bool> {
        let epoch = step / self.steps_per_epoch + 1;
        let evaluation = if self.cfg.knn.evaluates(epoch, step + 1 == self.total_steps) {
            crate::trainer::signals::hook_at_evaluation();
            let stop = stop_flag();
            let stopped = || stop.load(Ordering::SeqCst);
            let (l, set, knn) = (&mut self.learner, &self.eval, &self.cfg.knn);
            let group = &*self.group;
            let Some(evaluation) =
                evaluate_until(group, &mut l.graph, &l.model, set, knn, &stopped)?
            else {
                self.commit(step + 1, self.at.epoch, false)?;
                self.report.always(&format!(
                    "interrupted during the evaluation of epoch {epoch}: saved step {}; \
                     --resume evaluates it first",
                    step + 1
                ));
                self.summary.interrupted = true;
                return Ok(false);
            };
            Some(evaluation)
        } else {
            None
        };
        let seconds = run_start.elapsed().as_secs_f64();
        let loss = Some(self.at.epoch.mean());
        let row = EpochMetrics::new(epoch, step + 1, loss, evaluation, lr, seconds);
        let knn_text = evaluation.map_or("not evaluated".into(), |e| describe_evaluation(&e));
        self.report.line(&format!(
            "epoch {:>3}  step {:>6}  loss {:.4}  {knn_text}  lr {:.4}  {:.0} s",
            row.epoch,
            row.step,
            self.at.epoch.mean(),
            lr,
            row.seconds
        ));
        // The best of the trained epochs (the initialised network's row is not a candidate).
        let best = self
            .at
            .metrics
            .iter()
            .filter(|m| m.epoch > 0)
            .filter_map(|m| m.headline())
            .fold(f64::NEG_INFINITY, f64::max);
        let is_best = evaluation.is_some_and(|e| e.headline() > best);
        self.at.metrics.push(row.clone());
        self.summary.metrics.push(row);
        // A run that --steps ends inside an epoch records that epoch's row so far, and keeps
        // its running loss: extended by a resume, the epoch is finished and its row replaced
        // (Run::open_outputs), as in a run that never stopped there.
        if (step + 1).is_multiple_of(self.steps_per_epoch) {
            self.at.epoch = EpochLoss::default();
        }
        self.commit(step + 1, self.at.epoch, is_best)?;
        Ok(true)
    }

    /// After a step with Ctrl-C pressed: saves the position mid-epoch and says how to go on.
    pub(super) fn stop(&mut self, step: usize) -> Result<()> {
        self.commit(step + 1, self.at.epoch, false)?;
        self.summary.interrupted = true;
        if self.files.writes() {
            self.report.always(&format!(
                "interrupted: saved step {} to {}; continue with --resume",
                step + 1,
                self.files.last().display()
            ));
        }
        Ok(())
    }
}
