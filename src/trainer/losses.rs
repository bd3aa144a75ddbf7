//! The losses of a training run on their way back from the device. Each step's loss is copied
//! (on the device) into a history of `read_every` slots; when the window is full, at an
//! epoch's end or at a stop, the history's copy to the host starts and the previous window's,
//! long finished, is collected. So on a GPU the host waits for the device only at an epoch's
//! end, and what is computed never depends on when it is read.

use super::outputs::StepLog;
use crate::backend::{Backend, PendingRead};
use crate::error::{Error, Result};
use crate::tape::{Graph, Var};

/// The losses of a window of steps, being copied back.
struct LossWindow {
    steps: Vec<usize>,
    read: PendingRead,
}

/// The epoch's running loss: its sum and count (saved in checkpoints mid-epoch).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EpochLoss {
    pub sum: f64,
    pub count: usize,
}

impl EpochLoss {
    pub fn mean(&self) -> f64 {
        self.sum / self.count.max(1) as f64
    }
}

/// Where the run's losses wait on the device, and the window in flight.
pub struct LossReader<B: Backend> {
    history: B::Buffer,
    read_every: usize,
    pending: Vec<usize>,
    in_flight: Option<LossWindow>,
}

/// What collecting a window gave.
pub struct Collected {
    /// Steps whose losses arrived.
    pub steps: usize,
    /// The last of them.
    pub last: f64,
}

impl<B: Backend> LossReader<B> {
    pub fn new(backend: &B, read_every: usize) -> Result<Self> {
        let read_every = read_every.max(1);
        Ok(LossReader {
            history: backend.zeros(read_every)?,
            read_every,
            pending: Vec::with_capacity(read_every),
            in_flight: None,
        })
    }

    /// Records the loss node of `step` (no wait).
    pub fn record(&mut self, graph: &Graph<B>, loss: Var, step: usize) -> Result<()> {
        graph.record_scalar(loss, &mut self.history, self.pending.len())?;
        self.pending.push(step);
        Ok(())
    }

    /// Whether the window is full.
    pub fn window_full(&self) -> bool {
        self.pending.len() == self.read_every
    }

    /// Steps recorded since the last [`LossReader::flush`].
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Starts copying this window back and collects the previous one; with `drain` (an epoch's
    /// end, a stop) also waits for this one. Losses are checked, added to `epoch` and logged.
    pub fn flush(
        &mut self,
        backend: &B,
        drain: bool,
        epoch: &mut EpochLoss,
        losses: &mut Vec<f64>,
        log: &mut StepLog,
    ) -> Result<Option<Collected>> {
        let read = backend.read_later(&self.history)?;
        let window = LossWindow {
            steps: std::mem::take(&mut self.pending),
            read,
        };
        let mut got = None;
        if let Some(previous) = self.in_flight.replace(window) {
            got = Some(collect(previous, epoch, losses, log)?);
        }
        if drain {
            if let Some(window) = self.in_flight.take() {
                let c = collect(window, epoch, losses, log)?;
                got = Some(Collected {
                    steps: c.steps + got.as_ref().map_or(0, |g| g.steps),
                    last: c.last,
                });
            }
            log.flush()?;
        }
        Ok(got)
    }
}

/// Waits for a window's copy, checks every loss, adds them up and logs them.
fn collect(
    w: LossWindow,
    epoch: &mut EpochLoss,
    losses: &mut Vec<f64>,
    log: &mut StepLog,
) -> Result<Collected> {
    let values = (w.read)()?;
    let mut last = f64::NAN;
    for (&step, &loss) in w.steps.iter().zip(&values) {
        if !loss.is_finite() {
            return Err(Error::NonFinite(format!(
                "the loss is {loss} at step {}",
                step + 1
            )));
        }
        losses.push(loss);
        epoch.sum += loss;
        epoch.count += 1;
        last = loss;
        log.line(step + 1, loss)?;
    }
    Ok(Collected {
        steps: w.steps.len(),
        last,
    })
}
