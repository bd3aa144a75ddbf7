//! The batch worker: for every step from the first one to run, the two augmented views of the
//! step's images (`data::augment`), prepared on a thread one step ahead of the encoder so that
//! augmentation overlaps training. Data order is a seeded shuffle per epoch.

use std::ops::Range;
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use rand::seq::SliceRandom;

use crate::data::augment::{self, Augmentations};
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::rng::rng;

/// The images of `n` in the order of epoch `epoch`.
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rng(seed ^ 0x5eed_0000 ^ ((epoch as u64) << 20)));
    order
}

/// Steps `start..total` of a run, as they are prepared.
pub struct BatchWorker {
    rx: Option<Receiver<(usize, Vec<f32>)>>,
    handle: Option<JoinHandle<()>>,
}

impl BatchWorker {
    /// Starts preparing steps `start..total` of `batch` images, `steps_per_epoch` a pass,
    /// with the augmentations `augment`; of each step's images, only those at the positions
    /// `shard` (a data-parallel rank's share; `0..batch` on one device).
    pub fn spawn(
        ds: Arc<Dataset>,
        augment: Augmentations,
        seed: u64,
        (batch, shard): (usize, Range<usize>),
        steps_per_epoch: usize,
        (start, total): (usize, usize),
    ) -> BatchWorker {
        let (tx, rx) = mpsc::sync_channel::<(usize, Vec<f32>)>(2);
        let aug = augment.config();
        let handle = std::thread::spawn(move || {
            let mut order_epoch = usize::MAX;
            let mut order = Vec::new();
            for step in start..total {
                let epoch = step / steps_per_epoch;
                if epoch != order_epoch {
                    order = epoch_order(ds.training_len(), seed, epoch);
                    order_epoch = epoch;
                }
                let first = (step % steps_per_epoch) * batch;
                let views = augment::two_view_batch(
                    &[&ds.train, &ds.unlabeled],
                    ds.size,
                    &order[first + shard.start..first + shard.end],
                    &aug,
                    seed,
                    epoch as u64,
                );
                if tx.send((step, views)).is_err() {
                    return;
                }
            }
        });
        BatchWorker {
            rx: Some(rx),
            handle: Some(handle),
        }
    }

    /// The views of `step` (N x 3 x H x W, view A rows first), waiting for the worker.
    pub fn next(&self, step: usize) -> Result<Vec<f32>> {
        let rx = self
            .rx
            .as_ref()
            .ok_or_else(|| Error::invalid("the batch worker was stopped"))?;
        let (got, views) = rx
            .recv()
            .map_err(|_| Error::invalid("the batch worker stopped"))?;
        if got != step {
            return Err(Error::invalid(format!(
                "the batch worker sent step {got}, expected {step}"
            )));
        }
        Ok(views)
    }
}

impl Drop for BatchWorker {
    fn drop(&mut self) {
        // Closing the channel ends the worker at its next send.
        drop(self.rx.take());
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
