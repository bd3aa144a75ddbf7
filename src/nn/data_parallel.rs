//! Data-parallel training on the CUDA backend: what a `CudaBackend`
//! does differently when it belongs to a [`ProcessGroup`] of R ranks, each with m images of the
//! global batch of M = R m (2M rows).
//!
//! The loss. Each rank all-gathers the embeddings of both views in two collectives, view A's
//! rows of every rank into the first M rows and view B's into the last M, so that the gathered
//! matrix is one device's batch of the same images in rank order (image i of rank r is global
//! image r m + i; its partner row is M rows on, as the loss kernels expect). Every rank then runs
//! the chosen loss version on all 2M rows and keeps its own rows of dL/dz: A at r m, B at
//! M + r m (`RankLayout::single_device_rows`). L and dL/dz are then exactly one device's for the
//! gathered batch, for both gradient semantics (the key side's terms of a rank's rows, formed
//! from every rank's queries, come with the full gradient; no reduce-scatter is needed because
//! no rank's share is left out), at the price of R x the loss's work per rank (O(N^2 d), small
//! beside the encoder's). The loss rows of one rank's queries with a reduce-scatter of the key
//! side is `loss::gathered::rank_step` (CPU, tested); its kernels are not written yet.
//!
//! The gradients. A rank's backward gives the part of dL/dθ that flows through its own images;
//! their sum over ranks, one all-reduce of every gradient packed into one buffer before the
//! update, is dL/dθ. So with the same BatchNorm statistics the update equals one device's; with
//! BatchNorm per device (the default, as PyTorch's DDP without SyncBatchNorm) each rank
//! normalizes its own 2m rows.
//!
//! `--sync-bn` (PyTorch's SyncBatchNorm): the training statistics of every BatchNorm are the
//! global batch's. Each rank's (mean, M2) per channel is all-gathered and merged in rank order
//! (batchnorm_sync_stats_v1), so the forward, the running statistics and, with the backward's
//! (s1, s2) all-reduced before dx, the whole step are one device's on the global batch (the
//! statistics do not depend on the order of the rows). Two collectives per BatchNorm and step.

use std::sync::Mutex;

use cudarc::driver::CudaSlice;

use crate::cuda::{DevPtr, DevPtrMut, Gpu};
use crate::dist::nccl::ProcessGroup;
use crate::error::{Error, Result};
use crate::loss::gathered::RankLayout;
use crate::ops::batchnorm::{self, Version};
use crate::ops::Grad;

/// A CUDA backend's membership in a data-parallel group, and the buffers its collectives use.
#[derive(Debug)]
pub struct DataParallel {
    group: Mutex<ProcessGroup>,
    rank: usize,
    world_size: usize,
    sync_bn: bool,
    /// The gathered embeddings and their gradient (2M x d each), kept between steps.
    gathered: Mutex<Option<(CudaSlice<f32>, CudaSlice<f32>)>>,
    /// Every parameter gradient packed together for the one all-reduce.
    bucket: Mutex<Slot>,
    /// `--sync-bn`: a rank's (mean, M2) per channel, and every rank's gathered, sized for the
    /// widest BatchNorm so far.
    bn_moments: Mutex<[Slot; 2]>,
}

/// A device buffer allocated on first use ([`sized`]).
type Slot = Option<CudaSlice<f32>>;

fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>> {
    m.lock()
        .map_err(|_| Error::Cuda("a data-parallel lock was poisoned".into()))
}

/// A buffer of at least `len` floats in `slot`, allocated once and grown on demand.
fn sized<'a>(gpu: &Gpu, slot: &'a mut Slot, len: usize) -> Result<&'a mut CudaSlice<f32>> {
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
            sync_bn: false,
            group: Mutex::new(group),
            gathered: Mutex::new(None),
            bucket: Mutex::new(None),
            bn_moments: Mutex::new([None, None]),
        }
    }

    /// With `--sync-bn`: BatchNorm's training statistics over the global batch.
    pub fn with_sync_bn(mut self, sync_bn: bool) -> Self {
        self.sync_bn = sync_bn;
        self
    }

    pub fn sync_bn(&self) -> bool {
        self.sync_bn
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
        let layout = RankLayout::new(&vec![m; self.world_size])?;
        for (v, own) in layout.single_device_rows(self.rank).into_iter().enumerate() {
            stream.memcpy_dtod(
                &dzg.slice(own.start * d..own.end * d),
                &mut dz.slice_mut(v * view..(v + 1) * view),
            )?;
        }
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

    /// Every rank's `local`, concatenated in rank order into the first R x len(local) of `out`.
    pub fn all_gather(&self, local: &CudaSlice<f32>, out: &mut CudaSlice<f32>) -> Result<()> {
        let len = local.len() * self.world_size;
        if out.len() < len {
            return Err(Error::invalid(format!(
                "data-parallel all-gather: {} x {} floats into a buffer of {}",
                self.world_size,
                local.len(),
                out.len()
            )));
        }
        lock(&self.group)?.all_gather(local, &mut out.slice_mut(0..len), "gathering a buffer")
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

/// The buffers of a BatchNorm call as the CUDA backend passes them.
type BnForward<'a> = batchnorm::Forward<&'a CudaSlice<f32>, &'a mut CudaSlice<f32>>;
type BnBackward<'a> = batchnorm::Backward<&'a CudaSlice<f32>, &'a mut CudaSlice<f32>>;

impl DataParallel {
    /// `--sync-bn`'s training forward: this rank's moments, gathered, merged into `saved` (v1's
    /// layout, 4 C) and the running statistics, then the affine apply.
    pub fn batchnorm_forward(
        &self,
        gpu: &Gpu,
        a: BnForward<'_>,
        saved: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let (own, all) = (2 * a.xs.c, 2 * a.xs.c * self.world_size);
        let mut slots = lock(&self.bn_moments)?;
        let [moments, gathered] = &mut *slots;
        let moments = sized(gpu, moments, own)?;
        let gathered = sized(gpu, gathered, all)?;
        batchnorm::cuda::sync_moments(
            gpu,
            DevPtr::of(a.x),
            a.xs,
            &mut DevPtrMut::of(moments).slice_mut(0..own)?,
        )?;
        lock(&self.group)?.all_gather(
            &moments.slice(0..own),
            &mut gathered.slice_mut(0..all),
            "gathering BatchNorm's moments",
        )?;
        batchnorm::cuda::sync_stats(
            gpu,
            DevPtr::of(gathered).slice(0..all)?,
            self.world_size,
            a.xs,
            &mut DevPtrMut::of(saved),
            &mut DevPtrMut::of(a.running_mean),
            &mut DevPtrMut::of(a.running_var),
        )?;
        batchnorm::cuda::apply(
            gpu,
            Version::V1,
            DevPtr::of(a.x),
            DevPtr::of(a.gamma),
            DevPtr::of(a.beta),
            DevPtr::of(saved),
            a.xs,
            &mut DevPtrMut::of(a.y),
        )
    }

    /// `--sync-bn`'s training backward: v1's reduction (dgamma, dbeta take this rank's sums;
    /// the gradient all-reduce adds the ranks' up), its (s1, s2) summed over ranks, then dx.
    pub fn batchnorm_backward(
        &self,
        gpu: &Gpu,
        a: BnBackward<'_>,
        saved: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let (x, dy, gamma, xs) = (a.x, a.dy, a.gamma, a.xs);
        let mut reduce = a;
        let dx = reduce.dx.take();
        batchnorm::cuda::backward(
            gpu,
            Version::V1,
            reduce.map(DevPtr::of, DevPtrMut::of),
            &mut DevPtrMut::of(saved),
        )?;
        let c = xs.c;
        lock(&self.group)?.all_reduce_sum(
            &mut saved.slice_mut(2 * c..4 * c),
            "summing BatchNorm's backward sums",
        )?;
        match dx {
            None => Ok(()),
            Some(dx) => batchnorm::cuda::sync_dx(
                gpu,
                DevPtr::of(x),
                DevPtr::of(dy),
                DevPtr::of(gamma),
                DevPtr::of(saved),
                xs,
                self.world_size,
                Grad::new(DevPtrMut::of(dx.buf), dx.accumulate),
            ),
        }
    }
}
