//! Data-parallel training on the CUDA backend: a [`ProcessGroup`] of R ranks, each with m
//! images of the global batch of M = R m (2M rows), as the layer above a rank's
//! `CudaBackend`. [`DataParallel`] is the trainer's [`Collectives`] and registers itself on
//! the graph ([`Collectives::install`]) as the hooks of the ops that cross devices: the loss
//! ([`LossGroup`]), BatchNorm under `--sync-bn` ([`BatchNormGroup`]) and the parameter
//! gradients ([`GradientHook`]). The backend and the ops know nothing of ranks.
//!
//! The loss. Each rank all-gathers the embeddings of both views in two collectives, view A's
//! rows of every rank into the first M rows and view B's into the last M, so that the gathered
//! matrix is one device's batch of the same images in rank order (image i of rank r is global
//! image r m + i; its partner row is M rows on, as the loss kernels expect). With fused-v2 (the
//! default) each rank then computes the loss rows of its own 2m queries against all 2M keys
//! ([`DataParallel::own_rows_loss`], `loss::cuda::ranks_v1`): its share of the loss (the shares
//! all-gathered and summed in rank order) and the query side of its rows' gradient; both-sides,
//! the key-side terms that its queries give every gathered row are reduce-scattered, so each
//! rank receives the sum over ranks for its own rows (the term lightly issue 1528 lost). The
//! other versions, or a hard/easy selection, run the whole gathered batch's loss on every rank
//! and keep its rows of dL/dz ([`DataParallel::gathered_loss`]: R x the loss's work). Either way
//! L and dL/dz are exactly one device's for the gathered batch, for both gradient semantics
//! (`RankLayout::single_device_rows` places a rank's rows).
//!
//! The gradients. A rank's backward gives the part of dL/dθ that flows through its own images;
//! their sum over ranks is dL/dθ: all-reduced in buckets of `--bucket-mb` while the backward
//! pass goes on ([`GradientBuckets`]). So with the same BatchNorm statistics the update equals
//! one device's; with BatchNorm per device (the default, as PyTorch's DDP without
//! SyncBatchNorm) each rank normalizes its own 2m rows.
//!
//! `--sync-bn` (PyTorch's SyncBatchNorm): the training statistics of every BatchNorm are the
//! global batch's. Each rank's (mean, M2) per channel is all-gathered and merged in rank order
//! (batchnorm_sync_stats_v1), so the forward, the running statistics and, with the backward's
//! (s1, s2) all-reduced before dx, the whole step are one device's on the global batch (the
//! statistics do not depend on the order of the rows). Two collectives per BatchNorm and step.

use std::sync::{Arc, Mutex};

use cudarc::driver::CudaSlice;

use super::collectives::Collectives;
use super::gradient_buckets::GradientBuckets;
use super::nccl::ProcessGroup;
use crate::backend::cuda::{dev, dev_mut};
use crate::backend::{Backend, CudaBackend};
use crate::cuda::{DevPtr, DevPtrMut, Gpu};
use crate::error::{Error, Result};
use crate::loss::cuda::ranks_v1::RankLoss;
use crate::loss::cuda::{CudaLossVersion, LossParams};
use crate::loss::gathered::RankLayout;
use crate::loss::node::{cuda_outputs, LossDevice, LossGroup};
use crate::loss::{LossConfig, Negatives};
use crate::ops::batchnorm::node::{cuda_saved, cuda_saved_for_backward, BatchNormGroup, CudaSaved};
use crate::ops::batchnorm::{self, Version};
use crate::ops::elementwise;
use crate::ops::Grad;
use crate::tape::{GradientHook, Graph};

/// A CUDA rank's membership in a data-parallel group, and the buffers its collectives use.
#[derive(Debug)]
pub struct DataParallel {
    group: Mutex<ProcessGroup>,
    rank: usize,
    world_size: usize,
    sync_bn: bool,
    /// The gathered embeddings and, for a loss of the whole batch, their gradient (2M x d
    /// each), kept between steps.
    gathered: Mutex<[Slot; 2]>,
    /// The loss rows of this rank's own queries (fused-v2's data-parallel form), unless off.
    own_rows: bool,
    rank_loss: Mutex<Option<RankLoss>>,
    /// The parameter gradients, summed in buckets during the backward pass.
    buckets: Mutex<GradientBuckets>,
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

/// A buffer of exactly `len` floats in `slot`, allocated again when `len` changes.
fn exact<'a>(gpu: &Gpu, slot: &'a mut Slot, len: usize) -> Result<&'a mut CudaSlice<f32>> {
    if slot.as_ref().is_none_or(|b| b.len() != len) {
        *slot = Some(gpu.stream().alloc_zeros::<f32>(len)?);
    }
    slot.as_mut()
        .ok_or_else(|| Error::Cuda("a data-parallel buffer vanished".into()))
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
            gathered: Mutex::new([None, None]),
            own_rows: true,
            rank_loss: Mutex::new(None),
            buckets: Mutex::new(GradientBuckets::default()),
            bn_moments: Mutex::new([None, None]),
        }
    }

    /// Gradient buckets of `floats` floats (`--bucket-mb`; [`super::gradient_buckets::cap_floats`]).
    pub fn with_bucket_floats(self, floats: usize) -> Self {
        DataParallel {
            buckets: Mutex::new(GradientBuckets::new(floats)),
            ..self
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

    /// Off: every rank computes the loss of the whole gathered batch with any version (what
    /// `bench-loss --ranks` compares the own rows against).
    pub fn with_own_rows(mut self, on: bool) -> Self {
        self.own_rows = on;
        self
    }

    /// Whether [`DataParallel::own_rows_loss`] runs for `version` and `cfg`: fused-v2, every
    /// negative kept (`loss::cuda::ranks_v1` is built on its tiles), unless turned off.
    pub fn runs_own_rows(&self, version: CudaLossVersion, cfg: &LossConfig) -> bool {
        self.own_rows && version == CudaLossVersion::FusedV2 && cfg.negatives == Negatives::All
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// m (images on this rank) for its `z` and `dz` of n = 2m rows of d, or an error.
    fn images_here(
        z: &CudaSlice<f32>,
        dz: &CudaSlice<f32>,
        (n, d): (usize, usize),
    ) -> Result<usize> {
        if n % 2 != 0 || z.len() < n * d || dz.len() < n * d {
            return Err(Error::invalid(format!(
                "data-parallel loss: {n} x {d} rows (n even, both views) in buffers of {} and {}",
                z.len(),
                dz.len()
            )));
        }
        Ok(n / 2)
    }

    /// Every rank's rows (`z`: m view-A rows, then m view-B rows, d wide) into `zg` in one
    /// device's layout of the global batch: two all-gathers.
    fn gather(
        &self,
        z: &CudaSlice<f32>,
        (m, d): (usize, usize),
        zg: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let (view, half) = (m * d, m * self.world_size * d);
        let mut group = lock(&self.group)?;
        group.all_gather(
            &z.slice(0..view),
            &mut zg.slice_mut(0..half),
            "gathering view A's embeddings",
        )?;
        group.all_gather(
            &z.slice(view..2 * view),
            &mut zg.slice_mut(half..2 * half),
            "gathering view B's embeddings",
        )
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
        let m = Self::images_here(z, dz, (n, d))?;
        let (view, rows) = (m * d, 2 * m * self.world_size);
        let mut gathered = lock(&self.gathered)?;
        let [zg, dzg] = &mut *gathered;
        let zg = exact(gpu, zg, rows * d)?;
        let dzg = exact(gpu, dzg, rows * d)?;
        self.gather(z, (m, d), zg)?;
        loss(zg, (rows, d), dzg)?;
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

    /// The global batch's loss (into `loss`, one float) and this rank's rows of dL/dz from
    /// the loss rows of its own queries alone (`loss::cuda::ranks_v1`): gathers every rank's
    /// rows, runs its 2m query rows against all 2M keys, and both-sides sums the key side over
    /// the ranks in a reduce-scatter; the loss is the ranks' shares, all-gathered and summed
    /// in rank order. [`DataParallel::gathered_loss`]'s result with 1/R of its work.
    pub fn own_rows_loss(
        &self,
        gpu: &Arc<Gpu>,
        z: &CudaSlice<f32>,
        (n, d): (usize, usize),
        cfg: &LossConfig,
        loss: &mut CudaSlice<f32>,
        dz: &mut CudaSlice<f32>,
    ) -> Result<()> {
        crate::loss::cuda::validate_for_kernels(cfg)?;
        let m = Self::images_here(z, dz, (n, d))?;
        let rows = 2 * m * self.world_size;
        let mut gathered = lock(&self.gathered)?;
        let zg = exact(gpu, &mut gathered[0], rows * d)?;
        self.gather(z, (m, d), zg)?;
        let mut slot = lock(&self.rank_loss)?;
        if !slot
            .as_ref()
            .is_some_and(|r| r.fits(self.rank, self.world_size, m, d))
        {
            *slot = Some(RankLoss::new(
                gpu.clone(),
                self.rank,
                self.world_size,
                m,
                d,
            )?);
        }
        let rl = slot
            .as_mut()
            .ok_or_else(|| Error::Cuda("the rank's loss buffers vanished".into()))?;
        let p = LossParams::new(rows, d, cfg, true)?;
        rl.rows(z, zg, &p, dz)?;
        {
            let mut group = lock(&self.group)?;
            if p.both_sides != 0 {
                group.reduce_scatter_sum(
                    &rl.kside,
                    &mut rl.key_own,
                    "summing the key side of every rank's queries",
                )?;
            }
            group.all_gather(
                &rl.share,
                &mut rl.shares,
                "gathering the ranks' shares of the loss",
            )?;
        }
        if p.both_sides != 0 {
            rl.finish(z, dz)?;
        }
        let total = rl.sum()?;
        elementwise::cuda::f64_to_f32(&**gpu, total, DevPtrMut::of(loss).into_slice(0..1)?)
    }

    /// See [`GradientBuckets::begin`].
    pub fn gradients_begin(&self, gpu: &Gpu, lens: &[usize]) -> Result<()> {
        let mut buckets = lock(&self.buckets)?;
        buckets.begin(gpu, &mut *lock(&self.group)?, lens)
    }

    /// See [`GradientBuckets::gradient_final`].
    pub fn gradient_final(&self, gpu: &Gpu, index: usize, grad: &CudaSlice<f32>) -> Result<()> {
        let mut buckets = lock(&self.buckets)?;
        buckets.gradient_final(gpu, &mut *lock(&self.group)?, index, grad)
    }

    /// Replaces every gradient by its sum over the ranks: the buckets the backward pass
    /// queued, the rest, waited for ([`GradientBuckets::finish`]).
    pub fn sum_gradients(&self, gpu: &Gpu, grads: &mut [&mut CudaSlice<f32>]) -> Result<()> {
        let mut buckets = lock(&self.buckets)?;
        buckets.finish(gpu, &mut *lock(&self.group)?, grads)
    }

    /// The all-reduces of parameter gradients the last step queued.
    pub fn gradient_buckets(&self) -> Result<usize> {
        Ok(lock(&self.buckets)?.buckets())
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
    fn sync_batchnorm_forward(
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
    fn sync_batchnorm_backward(
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

/// The loss over the gathered global batch (see the module documentation), in place of the
/// backend's own: one device's L and this rank's rows of its dL/dz.
impl LossGroup<CudaBackend> for DataParallel {
    fn instance_loss(
        &self,
        backend: &CudaBackend,
        z: &CudaSlice<f32>,
        (n, d): (usize, usize),
        cfg: &LossConfig,
        loss: &mut CudaSlice<f32>,
        dz: &mut CudaSlice<f32>,
    ) -> Result<()> {
        cuda_outputs(backend, cfg, (n, d), loss, dz)?;
        let gpu = backend.gpu();
        if self.runs_own_rows(backend.option::<CudaLossVersion>(), cfg) {
            return self.own_rows_loss(gpu, z, (n, d), cfg, loss, dz);
        }
        self.gathered_loss(gpu, z, (n, d), dz, |zg, shape, dzg| {
            backend.instance_loss(zg, shape, cfg, loss, dzg)
        })
    }
}

/// `--sync-bn`: every BatchNorm in v1's layout of the statistics (its kernels share it), the
/// training ones over the global batch.
impl BatchNormGroup<CudaBackend> for DataParallel {
    fn forward(
        &self,
        backend: &CudaBackend,
        a: batchnorm::Forward<&CudaSlice<f32>, &mut CudaSlice<f32>>,
        saved: &mut CudaSaved,
    ) -> Result<()> {
        let saved = cuda_saved(backend, Version::V1, a.xs, saved)?;
        if a.training {
            return self.sync_batchnorm_forward(backend.gpu(), a, saved);
        }
        let gpu = &**backend.gpu();
        batchnorm::cuda::forward(
            gpu,
            Version::V1,
            a.map(dev, dev_mut),
            &mut DevPtrMut::of(saved),
        )
    }
    fn backward(
        &self,
        backend: &CudaBackend,
        a: batchnorm::Backward<&CudaSlice<f32>, &mut CudaSlice<f32>>,
        saved: &mut CudaSaved,
    ) -> Result<()> {
        let saved = cuda_saved_for_backward(Version::V1, a.xs, saved)?;
        if a.training {
            return self.sync_batchnorm_backward(backend.gpu(), a, saved);
        }
        let gpu = &**backend.gpu();
        batchnorm::cuda::backward(
            gpu,
            Version::V1,
            a.map(dev, dev_mut),
            &mut DevPtrMut::of(saved),
        )
    }
}

/// The parameter gradients summed over the ranks in buckets while the backward pass runs.
impl GradientHook<CudaBackend> for DataParallel {
    fn begin(&self, backend: &CudaBackend, lens: &[usize]) -> Result<()> {
        self.gradients_begin(backend.gpu(), lens)
    }
    fn ready(&self, backend: &CudaBackend, index: usize, grad: &CudaSlice<f32>) -> Result<()> {
        self.gradient_final(backend.gpu(), index, grad)
    }
    fn finish(&self, backend: &CudaBackend, grads: &mut [&mut CudaSlice<f32>]) -> Result<()> {
        self.sum_gradients(backend.gpu(), grads)
    }
}

impl Collectives<CudaBackend> for DataParallel {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world_size
    }
    fn all_gather(
        &self,
        backend: &CudaBackend,
        local: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        backend.ensure_len(out, local.len() * self.world_size)?;
        DataParallel::all_gather(self, local, out)
    }
    fn broadcast(&self, _: &CudaBackend, bufs: &mut [&mut CudaSlice<f32>]) -> Result<()> {
        DataParallel::broadcast(self, bufs, 0)
    }
    fn install(self: Arc<Self>, graph: &mut Graph<CudaBackend>) -> Result<()> {
        let loss: Arc<dyn LossGroup<CudaBackend>> = self.clone();
        let grads: Arc<dyn GradientHook<CudaBackend>> = self.clone();
        graph.extensions.insert(loss);
        graph.extensions.insert(grads);
        if self.sync_bn {
            let bn: Arc<dyn BatchNormGroup<CudaBackend>> = self;
            graph.extensions.insert(bn);
        }
        Ok(())
    }
}
