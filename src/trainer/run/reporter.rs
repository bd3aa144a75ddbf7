//! What a run shows its user: the progress bar of the steps (the loss, images/s and the data
//! wait of the last window) and a line for each phase, printed above the bar. Off in tests and
//! on every rank but 0 (then nothing is printed).

use indicatif::{ProgressBar, ProgressStyle};

use crate::error::{Error, Result};

/// See the module documentation.
pub(super) struct Reporter {
    shown: bool,
    bar: ProgressBar,
}

impl Reporter {
    /// A reporter that prints when `shown`.
    pub fn new(shown: bool) -> Reporter {
        Reporter {
            shown,
            bar: ProgressBar::hidden(),
        }
    }

    /// A line for the user, above the bar.
    pub fn line(&self, text: &str) {
        if self.shown {
            self.bar.suspend(|| eprintln!("{text}"));
        }
    }

    /// A line printed whether or not progress is shown (where a run stopped and what to do).
    pub fn always(&self, text: &str) {
        self.bar.suspend(|| eprintln!("{text}"));
    }

    /// Starts the bar over `steps` steps.
    pub fn start_steps(&mut self, steps: usize) -> Result<()> {
        if !self.shown {
            return Ok(());
        }
        self.bar = ProgressBar::new(steps as u64);
        self.bar.set_style(
            ProgressStyle::with_template(
                "{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
            )
            .map_err(|e| Error::invalid(e.to_string()))?,
        );
        Ok(())
    }

    /// The last window of `steps` steps of `images` images each in `seconds`, `data_s` of it
    /// waiting for batches; `last_loss` the newest loss read back.
    pub fn window(
        &self,
        last_loss: Option<f64>,
        images: usize,
        steps: usize,
        seconds: f64,
        data_s: f64,
    ) {
        self.bar.set_message(format!(
            "loss {}  {:.0} img/s  data wait {:.1} ms/step",
            last_loss.map_or("-".into(), |l| format!("{l:.4}")),
            (images * steps) as f64 / seconds,
            1e3 * data_s / steps as f64
        ));
    }

    /// `steps` more steps have their losses.
    pub fn advance(&self, steps: usize) {
        self.bar.inc(steps as u64);
    }

    /// The steps are over (or stopped).
    pub fn finish_steps(&self) {
        self.bar.finish_and_clear();
    }
}
