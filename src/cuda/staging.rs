//! Host-device copies that do not stall the GPU's stream: staged uploads through page-locked
//! (pinned) buffers on a second, copy stream, and read-backs collected later.
//!
//! Repeated uploads (the training batch) go through two pinned staging buffers per length,
//! used in turn, so an upload neither waits for the GPU to drain nor takes time on the compute
//! stream: the host only waits for the copy made from the same staging buffer two uploads
//! earlier, and the compute stream waits (an event) only for its own batch. One-off uploads
//! (parameters at creation) are plain copies. Read-backs reuse their pinned buffers
//! ([`ReadBackPool`]).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, PinnedHostSlice};

use super::Gpu;
use crate::error::{Error, Result};

/// A read-back in flight: call it for the values.
pub type PendingRead = Box<dyn FnOnce() -> Result<Vec<f64>> + Send>;

/// Host-to-device staging for uploads of one length: two pinned host buffers and two device
/// buffers, used in turn. The copy stream moves pinned[i] to device[i] while the compute stream
/// may still be running the previous step; the compute stream then waits for that copy and
/// moves device[i] into the destination (a device-to-device copy, microseconds).
struct Staging {
    pinned: [PinnedHostSlice<f32>; 2],
    device: [CudaSlice<f32>; 2],
    /// Recorded on the copy stream after pinned[i] -> device[i].
    copied: [CudaEvent; 2],
    /// Recorded on the compute stream after device[i] -> destination.
    consumed: [CudaEvent; 2],
    next: usize,
}

/// Uploads into a GPU's buffers; see the module documentation.
pub struct Uploader {
    gpu: Arc<Gpu>,
    /// Host-to-device copies, overlapping the compute stream's kernels.
    copy_stream: Arc<CudaStream>,
    staging: Mutex<HashMap<usize, Staging>>,
    /// Upload lengths seen once (see [`Uploader::upload`]).
    seen_lengths: Mutex<HashSet<usize>>,
}

fn lock<T>(m: &Mutex<T>) -> Result<MutexGuard<'_, T>> {
    m.lock()
        .map_err(|_| Error::Cuda("a staging lock was poisoned".into()))
}

impl Uploader {
    pub fn new(gpu: Arc<Gpu>) -> Result<Uploader> {
        let copy_stream = gpu.context().new_stream()?;
        Ok(Uploader {
            gpu,
            copy_stream,
            staging: Mutex::new(HashMap::new()),
            seen_lengths: Mutex::new(HashSet::new()),
        })
    }

    /// Copies `host` into `dst` (the same length): queued on both streams, the host waits
    /// only for the copy that used the same staging buffers two uploads earlier.
    pub fn upload(&self, host: &[f32], dst: &mut CudaSlice<f32>) -> Result<()> {
        let len = host.len();
        if len == 0 {
            return Ok(());
        }
        let compute = self.gpu.stream();
        let mut staging = lock(&self.staging)?;
        // A length seen for the first time (parameters at creation, a checkpoint's tensors)
        // is copied directly from pageable memory; staging buffers are made for lengths that
        // come back (the training batch every step).
        if !staging.contains_key(&len) && lock(&self.seen_lengths)?.insert(len) {
            compute.memcpy_htod(host, dst)?;
            return Ok(());
        }
        let s = match staging.entry(len) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(self.new_staging(len)?),
        };
        let i = s.next;
        s.next ^= 1;
        // pinned[i] and device[i] were last read by the copy two uploads ago.
        s.copied[i].synchronize()?;
        s.pinned[i].as_mut_slice()?.copy_from_slice(host);
        self.copy_stream.wait(&s.consumed[i])?;
        self.copy_stream
            .memcpy_htod(&s.pinned[i], &mut s.device[i])?;
        s.copied[i].record(&self.copy_stream)?;
        compute.wait(&s.copied[i])?;
        compute.memcpy_dtod(&s.device[i], dst)?;
        s.consumed[i].record(compute)?;
        Ok(())
    }

    fn new_staging(&self, len: usize) -> Result<Staging> {
        let ctx = self.gpu.context();
        let compute = self.gpu.stream();
        // SAFETY: the memory is written by `upload` before any copy reads it.
        let pinned = || unsafe { ctx.alloc_pinned::<f32>(len) };
        let event = || ctx.new_event(None);
        let device = || compute.alloc_zeros::<f32>(len);
        // The device buffers are allocated on the compute stream: make the copy stream see the
        // allocations before it writes into them.
        let ready = event()?;
        let staged = Staging {
            pinned: [pinned()?, pinned()?],
            device: [device()?, device()?],
            copied: [event()?, event()?],
            consumed: [event()?, event()?],
            next: 0,
        };
        ready.record(compute)?;
        self.copy_stream.wait(&ready)?;
        Ok(staged)
    }
}

impl Drop for Uploader {
    fn drop(&mut self) {
        // Staging buffers are shared by both streams: nothing may be in flight when they go.
        let _ = self.copy_stream.synchronize();
        let _ = self.gpu.stream().synchronize();
    }
}

/// Pinned host buffers of finished read-backs, kept for the next ones: page-locked memory is
/// slow to allocate, and freeing it (cuMemFreeHost) synchronises the device, which a read-back
/// queued every few training steps must never do. Buffers are kept by length; a run reads back
/// buffers of one or two lengths, so the pool stays a few buffers long.
#[derive(Clone, Default)]
pub struct ReadBackPool {
    free: Arc<Mutex<Vec<PinnedHostSlice<f32>>>>,
}

impl ReadBackPool {
    /// Buffers kept at most; beyond, a returned buffer is freed.
    const KEEP: usize = 8;

    fn take(&self, len: usize) -> Option<PinnedHostSlice<f32>> {
        let mut free = self.free.lock().ok()?;
        let i = free.iter().position(|b| b.len() == len)?;
        Some(free.swap_remove(i))
    }

    fn give(&self, buf: PinnedHostSlice<f32>) {
        if let Ok(mut free) = self.free.lock() {
            if free.len() < Self::KEEP {
                free.push(buf);
            }
        }
    }

    /// Buffers waiting for reuse.
    pub fn kept(&self) -> usize {
        self.free.lock().map_or(0, |f| f.len())
    }
}

/// Starts reading `buf` back without waiting for the device: the returned closure waits for
/// the copy (and only it), gives the values and returns its pinned buffer to `pool`.
pub fn read_later(gpu: &Gpu, pool: &ReadBackPool, buf: &CudaSlice<f32>) -> Result<PendingRead> {
    let len = buf.len();
    if len == 0 {
        return Ok(Box::new(|| Ok(Vec::new())));
    }
    let ctx = gpu.context();
    let mut host = match pool.take(len) {
        Some(kept) => kept,
        // SAFETY: the copy below writes every element before the closure reads them.
        // (Not write-combined: the host reads this memory.)
        None => unsafe { ctx.alloc_pinned_with_flags::<f32>(len, 0) }?,
    };
    let done = ctx.new_event(None)?;
    let stream = gpu.stream();
    stream.memcpy_dtoh(buf, &mut host)?;
    done.record(stream)?;
    let pool = pool.clone();
    Ok(Box::new(move || {
        done.synchronize()?;
        let values = host.as_slice()?.iter().map(|&v| f64::from(v)).collect();
        pool.give(host);
        Ok(values)
    }))
}
