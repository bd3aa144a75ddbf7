//! Data-parallel training on the CUDA backend: what a [`CudaBackend`](super::cuda_backend)
//! does differently when it belongs to a [`ProcessGroup`] of R ranks, each with m images of the
//! global batch of M = R m (2M rows).
//!
//! The loss. Each rank all-gathers the embeddings of both views in two collectives, view A's
//! rows of every rank into the first M rows and view B's into the last M, so that the gathered
//! matrix is one device's batch of the same images in rank order (image i of rank r is global
//! image r m + i; its partner row is M rows on, as the loss kernels expect). Every rank then runs
//! the chosen loss version on all 2M rows and keeps its own rows of dL/dz: A at r m, B at
//! M + r m. L and dL/dz are then exactly one device's for the gathered batch, for both gradient
//! semantics (the key side's terms of a rank's rows, formed from every rank's queries, come with
//! the full gradient; no reduce-scatter is needed because no rank's share is left out), at the
//! price of R x the loss's work per rank (O(N^2 d), small beside the encoder's). The loss rows of
//! one rank's queries with a reduce-scatter of the key side is `loss::gathered::rank_step`
//! (CPU, tested); its kernels are not written yet.
//!
//! The gradients. A rank's backward gives the part of dL/dθ that flows through its own images;
//! their sum over ranks, one all-reduce of every gradient packed into one buffer before the
//! update, is dL/dθ. So with the same BatchNorm statistics the update equals one device's; with
//! BatchNorm per device (the default, as PyTorch's DDP without SyncBatchNorm) each rank
//! normalizes its own 2m rows.

use std::sync::Mutex;

use cudarc::driver::CudaSlice;

use crate::cuda::Gpu;
use crate::dist::nccl::ProcessGroup;
use crate::error::{Error, Result};

/// A CUDA backend's membership in a data-parallel group, and the buffers its collectives use.
#[derive(Debug)]
pub struct DataParallel {
    group: Mutex<ProcessGroup>,
    rank: usize,
    world_size: usize,
    /// The gathered embeddings and their gradient (2M x d each), kept between steps.
    gathered: Mutex<Option<(CudaSlice<f32>, CudaSlice<f32>)>>,
    /// Every parameter gradient packed together for the one all-reduce.
    bucket: Mutex<Option<CudaSlice<f32>>>,
}

fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>> {
    m.lock()
        .map_err(|_| Error::Cuda("a data-parallel lock was poisoned".into()))
}

/// A buffer of at least `len` floats in `slot`, allocated once and grown on demand.
fn sized<'a>(
    gpu: &Gpu,
    slot: &'a mut Option<CudaSlice<f32>>,
    len: usize,
) -> Result<&'a mut CudaSlice<f32>> {
    if slot.as_ref().is_none_or(|b| b.len() < len) {
        *slot = Some(gpu.stream().alloc_zeros::<f32>(len)?);
    }
    slot.as_mut()
        .ok_or_else(|| Error::Cuda("a data-parallel buffer vanished".into()))
}

impl DataParallel {
    pub fn new(group: ProcessGroup) -> Self {
        DataParallel {
            rank: group.rank(),
            world_size: group.world_size(),
            group: Mutex::new(group),
            gathered: Mutex::new(None),
            bucket: Mutex::new(None),
        }
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// The global batch's loss from this rank's `z` (n = 2m rows of d, view A first): gathers
    /// every rank's rows, runs `loss` on the (2M, d) matrix (it writes dL/dz of all rows into
    /// its second argument), and copies this rank's rows of that gradient into `dz`.
    pub fn gathered_loss(
        &self,
        gpu: &Gpu,
        z: &CudaSlice<f32>,
        (n, d): (usize, usize),
        dz: &mut CudaSlice<f32>,
        loss: impl FnOnce(&CudaSlice<f32>, (usize, usize), &mut CudaSlice<f32>) -> Result<()>,
    ) -> Result<()> {
        if n % 2 != 0 || z.len() < n * d || dz.len() < n * d {
            return Err(Error::invalid(format!(
                "data-parallel loss: {n} x {d} rows (n even, both views) in buffers of {} and {}",
                z.len(),
                dz.len()
            )));
        }
        let m = n / 2;
        let images = m * self.world_size;
        let (view, global) = (m * d, 2 * images * d);
        let mut gathered = lock(&self.gathered)?;
        if gathered.as_ref().is_none_or(|(g, _)| g.len() != global) {
            let stream = gpu.stream();
            *gathered = Some((
                stream.alloc_zeros::<f32>(global)?,
                stream.alloc_zeros::<f32>(global)?,
            ));
        }
        let (zg, dzg) = gathered
            .as_mut()
            .ok_or_else(|| Error::Cuda("the gathered batch vanished".into()))?;
        {
            let mut group = lock(&self.group)?;
            let half = images * d;
            group.all_gather(
                &z.slice(0..view),
                &mut zg.slice_mut(0..half),
                "gathering view A's embeddings",
            )?;
            group.all_gather(
                &z.slice(view..2 * view),
                &mut zg.slice_mut(half..2 * half),
                "gathering view B's embeddings",
            )?;
        }
        loss(zg, (2 * images, d), dzg)?;
        let stream = gpu.stream();
        let own_a = self.rank * view;
        let own_b = images * d + own_a;
        stream.memcpy_dtod(&dzg.slice(own_a..own_a + view), &mut dz.slice_mut(0..view))?;
        stream.memcpy_dtod(
            &dzg.slice(own_b..own_b + view),
            &mut dz.slice_mut(view..2 * view),
        )?;
        Ok(())
    }

    /// Replaces every gradient by its sum over the ranks: packed into one buffer, one
    /// all-reduce, unpacked (one bucket; not overlapped with the backward pass).
    pub fn sum_gradients(&self, gpu: &Gpu, grads: &mut [&mut CudaSlice<f32>]) -> Result<()> {
        let total: usize = grads.iter().map(|g| g.len()).sum();
        if total == 0 {
            return Ok(());
        }
        let mut slot = lock(&self.bucket)?;
        let bucket = sized(gpu, &mut slot, total)?;
        let stream = gpu.stream();
        let mut at = 0;
        for g in grads.iter() {
            stream.memcpy_dtod(&**g, &mut bucket.slice_mut(at..at + g.len()))?;
            at += g.len();
        }
        lock(&self.group)?.all_reduce_sum(
            &mut bucket.slice_mut(0..total),
            "summing the parameter gradients",
        )?;
        let mut at = 0;
        for g in grads.iter_mut() {
            let len = g.len();
            stream.memcpy_dtod(&bucket.slice(at..at + len), &mut **g)?;
            at += len;
        }
        Ok(())
    }

    /// Rank `root`'s values of every buffer on every rank (the initial parameters, so that all
    /// ranks start from the same point whatever their seeds).
    pub fn broadcast(&self, buffers: &mut [&mut CudaSlice<f32>], root: usize) -> Result<()> {
        let mut group = lock(&self.group)?;
        for b in buffers.iter_mut() {
            group.broadcast(&mut **b, root, "broadcasting the parameters")?;
        }
        Ok(())
    }
}
