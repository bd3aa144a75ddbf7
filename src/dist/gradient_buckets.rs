//! The parameter gradients of a data-parallel backward pass, summed over the ranks in buckets
//! while the pass goes on (PyTorch DDP's `bucket_cap_mb`).
//!
//! The tape reports each gradient when it is final
//! ([`crate::tape::GradientHook::ready`]: the last layers' first). It is copied into
//! one device buffer, packed in that order, and whenever at least `cap` floats (at most 1 MiB
//! for the first bucket, as in DDP) are packed and not yet summed, their all-reduce is queued
//! on a stream of its own that waits for the copies: the device sums one bucket while it
//! computes the gradients of the layers below. Before the update, [`GradientBuckets::finish`]
//! queues the rest, waits under the group's watchdog and copies the sums back.
//!
//! Every rank runs the same tape, so every rank packs the same gradients in the same order and
//! queues the same all-reduces, as NCCL needs. The sums are per element, so the bucket
//! boundaries change no value on the virtual GPU, whose NCCL adds in rank order (a test
//! resumes a run with other buckets and ends bit for bit where the run did); NCCL picks its
//! algorithm, and so the order of the additions, by message size, so there the cap may change
//! the last bit of a sum.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};

use super::nccl::ProcessGroup;
use crate::cuda::Gpu;
use crate::error::{Error, Result};

/// PyTorch DDP's default `bucket_cap_mb`.
pub const DEFAULT_BUCKET_MB: f64 = 25.0;

/// The first bucket of a pass holds at most 1 MiB (DDP's first bucket), so that the first
/// all-reduce starts after the last layers rather than after 25 MiB of the pass.
const FIRST_BUCKET_FLOATS: usize = 1 << 18;

/// The floats of a bucket of `mb` MiB (at least one), as `--bucket-mb` gives it; an error
/// naming the flag outside its range ([`crate::limits::BUCKET_MB`]).
pub fn cap_floats(mb: f64) -> Result<usize> {
    Ok(floats_in(crate::limits::BUCKET_MB.check(mb)?))
}

/// The float32 values in `mb` MiB, at least one.
fn floats_in(mb: f64) -> usize {
    ((mb * 1024.0 * 1024.0 / 4.0) as usize).max(1)
}

/// One backward pass's packing, and the buffers kept between passes.
#[derive(Debug)]
pub struct GradientBuckets {
    /// Floats of packed gradients that trigger an all-reduce.
    cap: usize,
    /// Every gradient of the pass, in the order they became final.
    packed_grads: Option<CudaSlice<f32>>,
    /// Where parameter i's gradient lies in `packed_grads` this pass: (start, length).
    placed: Vec<Option<(usize, usize)>>,
    /// Floats packed so far, and the prefix of them whose all-reduce is queued.
    packed: usize,
    queued: usize,
    /// All-reduces queued this pass.
    buckets: usize,
    /// The pass began ([`GradientBuckets::begin`]) and its sums were not taken yet.
    open: bool,
    /// Where the all-reduces run, made on first use.
    stream: Option<Arc<CudaStream>>,
}

impl Default for GradientBuckets {
    /// Buckets of [`DEFAULT_BUCKET_MB`].
    fn default() -> Self {
        GradientBuckets::new(floats_in(DEFAULT_BUCKET_MB))
    }
}

impl GradientBuckets {
    pub fn new(cap: usize) -> Self {
        GradientBuckets {
            cap: cap.max(1),
            packed_grads: None,
            placed: Vec::new(),
            packed: 0,
            queued: 0,
            buckets: 0,
            open: false,
            stream: None,
        }
    }

    /// All-reduces the last pass queued (for the tests and messages).
    pub fn buckets(&self) -> usize {
        self.buckets
    }

    /// A pass over gradients of `lens` floats each begins. A pass whose sums were never
    /// taken is waited for first, so that no all-reduce still reads the buffer it refills.
    pub fn begin(&mut self, gpu: &Gpu, group: &mut ProcessGroup, lens: &[usize]) -> Result<()> {
        if self.open {
            self.wait(gpu, group)?;
        }
        let total: usize = lens.iter().sum();
        if self.packed_grads.as_ref().is_none_or(|b| b.len() < total) {
            self.packed_grads = Some(gpu.stream().alloc_zeros::<f32>(total.max(1))?);
        }
        self.placed.clear();
        self.placed.resize(lens.len(), None);
        (self.packed, self.queued, self.buckets) = (0, 0, 0);
        self.open = true;
        Ok(())
    }

    /// Parameter `index`'s gradient is final: packed, and a bucket queued when `cap` floats
    /// wait. Outside a pass (a backward without [`GradientBuckets::begin`]) nothing happens.
    pub fn gradient_final(
        &mut self,
        gpu: &Gpu,
        group: &mut ProcessGroup,
        index: usize,
        grad: &CudaSlice<f32>,
    ) -> Result<()> {
        if !self.open {
            return Ok(());
        }
        self.pack(gpu, index, grad)?;
        let cap = match self.buckets {
            0 => self.cap.min(FIRST_BUCKET_FLOATS),
            _ => self.cap,
        };
        if self.packed - self.queued >= cap {
            self.queue_bucket(gpu, group)?;
        }
        Ok(())
    }

    /// Every gradient of `grads` (in the store's order) replaced by its sum over the ranks:
    /// those not packed yet (never reported, or no pass begun) packed now, the last bucket
    /// queued, the watchdog's wait, the sums copied back.
    pub fn finish(
        &mut self,
        gpu: &Gpu,
        group: &mut ProcessGroup,
        grads: &mut [&mut CudaSlice<f32>],
    ) -> Result<()> {
        let lens: Vec<usize> = grads.iter().map(|g| g.len()).collect();
        let same_pass = self.open
            && self.placed.len() == lens.len()
            && self
                .placed
                .iter()
                .zip(&lens)
                .all(|(p, &len)| p.is_none_or(|(_, l)| l == len));
        if !same_pass {
            self.begin(gpu, group, &lens)?;
        }
        for (i, g) in grads.iter().enumerate() {
            if self.placed[i].is_none() {
                self.pack(gpu, i, g)?;
            }
        }
        if self.packed > self.queued {
            self.queue_bucket(gpu, group)?;
        }
        self.wait(gpu, group)?;
        let stream = gpu.stream();
        let packed = self.buffer()?;
        for (g, place) in grads.iter_mut().zip(&self.placed) {
            if let Some((at, len)) = *place {
                stream.memcpy_dtod(&packed.slice(at..at + len), &mut **g)?;
            }
        }
        Ok(())
    }

    fn buffer(&self) -> Result<&CudaSlice<f32>> {
        self.packed_grads
            .as_ref()
            .ok_or_else(|| Error::Cuda("the gradient buckets' buffer vanished".into()))
    }

    fn pack(&mut self, gpu: &Gpu, index: usize, grad: &CudaSlice<f32>) -> Result<()> {
        let (at, len, params) = (self.packed, grad.len(), self.placed.len());
        let slot = self.placed.get_mut(index).ok_or_else(|| {
            Error::invalid(format!(
                "gradient buckets: parameter {index} reported, but the pass has {params} parameters"
            ))
        })?;
        if slot.is_some() {
            return Err(Error::invalid(format!(
                "gradient buckets: parameter {index}'s gradient reported twice in one pass"
            )));
        }
        let packed = self
            .packed_grads
            .as_mut()
            .filter(|b| b.len() >= at + len)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "gradient buckets: parameter {index}'s {len} floats overflow the pass's \
                     {} packed so far",
                    at
                ))
            })?;
        gpu.stream()
            .memcpy_dtod(grad, &mut packed.slice_mut(at..at + len))?;
        *slot = Some((at, len));
        self.packed += len;
        Ok(())
    }

    /// Queues the all-reduce of the packed floats not yet summed, on the buckets' stream
    /// after the copies queued on the device's stream so far.
    fn queue_bucket(&mut self, gpu: &Gpu, group: &mut ProcessGroup) -> Result<()> {
        let stream = match &self.stream {
            Some(s) => s.clone(),
            None => {
                let s = gpu.context().new_stream()?;
                self.stream = Some(s.clone());
                s
            }
        };
        stream.join(gpu.stream())?;
        let (from, to) = (self.queued, self.packed);
        let packed = self
            .packed_grads
            .as_mut()
            .ok_or_else(|| Error::Cuda("the gradient buckets' buffer vanished".into()))?;
        group.queue_all_reduce_sum(
            &stream,
            &mut packed.slice_mut(from..to),
            "summing a bucket of parameter gradients",
        )?;
        self.queued = to;
        self.buckets += 1;
        Ok(())
    }

    /// Waits (under the watchdog) for the queued all-reduces; the device's stream then
    /// continues after them. Closes the pass.
    fn wait(&mut self, gpu: &Gpu, group: &mut ProcessGroup) -> Result<()> {
        self.open = false;
        if let (Some(stream), true) = (&self.stream, self.buckets > 0) {
            group.wait_on(stream, "summing the parameter gradients")?;
            gpu.stream().join(stream)?;
        }
        Ok(())
    }
}
