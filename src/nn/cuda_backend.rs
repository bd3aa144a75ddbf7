//! The CUDA backend: the graph's buffers live on one GPU and every op is a one-line call into
//! `ops::<op>::cuda` on the GPU's stream, so a training step is queued without waiting (the
//! losses come back asynchronously every few steps, see `trainer`). What the backend itself
//! keeps is state between launches: the convolution's workspace, the SGD pointer table, each
//! loss shape's scratch, the staged uploader, and which kernel version every op runs.
//!
//! Storage and sums are float32; the GEMMs multiply in float32, TF32 or with bfloat16
//! operands ([`GemmPrecision`]). `tests/gpu/nn.rs` runs every op against the CPU backend on a
//! GPU; `tests/emulated/kernels.rs` runs the same launchers on a CPU emulator in CI.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::driver::CudaSlice;
use serde::{Deserialize, Serialize};

use super::backend::{Backend, In, Out, PendingRead};
use super::data_parallel::DataParallel;
use crate::cuda::staging::{read_later, ReadBackPool, Uploader};
use crate::cuda::GemmPrecision;
use crate::cuda::{DevPtr, DevPtrMut, Gpu};
use crate::error::{Error, Result};
use crate::loss::cuda::{validate_for_kernels, CudaLoss, CudaLossVersion};
use crate::loss::LossConfig;
use crate::ops::sgd::{SgdStep, SgdTensor, Tensors};
use crate::ops::topk::Neighbours;
use crate::ops::{
    batchnorm, conv2d, elementwise, linear, normalize_rows, pool, sgd, topk, Grad, Shape4,
};

/// The largest im2col buffer of one group of images, in floats (256 MB).
const CONV_WORKSPACE: usize = 1 << 26;

/// The kernel version each encoder op runs (the newest by default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EncoderKernels {
    pub conv2d: conv2d::Version,
    pub batchnorm: batchnorm::Version,
    pub elementwise: elementwise::Version,
    pub pool: pool::Version,
    pub linear: linear::Version,
    pub sgd: sgd::Version,
    pub topk: topk::Version,
    pub normalize_rows: normalize_rows::Version,
}

impl std::str::FromStr for EncoderKernels {
    type Err = Error;

    /// `op=version` pairs separated by commas (`conv2d=v1,batchnorm=v1`); ops not named keep
    /// the newest version.
    fn from_str(s: &str) -> Result<Self> {
        let mut map = serde_json::Map::new();
        for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (op, version) = pair.split_once('=').ok_or_else(|| {
                Error::invalid(format!(
                    "--kernels {pair:?}: expected op=version, e.g. conv2d=v1"
                ))
            })?;
            map.insert(op.trim().into(), version.trim().into());
        }
        serde_json::from_value(serde_json::Value::Object(map))
            .map_err(|e| Error::invalid(format!("--kernels {}: {e}", crate::error::excerpt(s))))
    }
}

/// The SGD table as last uploaded, and the blocks it spans.
struct SgdTable {
    host: Vec<SgdTensor>,
    device: CudaSlice<SgdTensor>,
    blocks: usize,
}

/// The convolution's scratch, grown on demand and kept.
struct ConvWorkspace {
    col: CudaSlice<f32>,
    gemm: CudaSlice<f32>,
}

/// The kNN search's scratch, grown on demand and kept.
struct KnnScratch {
    sims: CudaSlice<f32>,
    values: CudaSlice<f32>,
    indices: CudaSlice<i32>,
}

/// The CUDA backend; see the module documentation.
pub struct CudaBackend {
    gpu: Arc<Gpu>,
    uploader: Uploader,
    read_backs: ReadBackPool,
    loss_version: CudaLossVersion,
    kernels: EncoderKernels,
    precision: GemmPrecision,
    /// The largest im2col buffer of one group of images, in floats.
    conv_workspace_cap: usize,
    losses: Mutex<HashMap<(usize, usize), CudaLoss>>,
    conv: Mutex<ConvWorkspace>,
    knn: Mutex<Option<KnnScratch>>,
    sgd: Mutex<Option<SgdTable>>,
    data_parallel: Option<DataParallel>,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("gpu", &self.gpu)
            .field("loss_version", &self.loss_version)
            .field("kernels", &self.kernels)
            .field("precision", &self.precision)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> Result<MutexGuard<'_, T>> {
    m.lock()
        .map_err(|_| Error::Cuda("a CUDA backend lock was poisoned".into()))
}

fn dev(s: &CudaSlice<f32>) -> DevPtr<'_, f32> {
    DevPtr::of(s)
}
fn dev_mut(s: &mut CudaSlice<f32>) -> DevPtrMut<'_, f32> {
    DevPtrMut::of(s)
}
fn grad(g: Grad<&mut CudaSlice<f32>>) -> Grad<DevPtrMut<'_, f32>> {
    g.map(dev_mut)
}

impl CudaBackend {
    /// A backend on `gpu` whose loss op runs the `fused-v2` kernels, float32 GEMMs.
    pub fn new(gpu: Arc<Gpu>) -> Result<Self> {
        Self::with_loss_version(gpu, CudaLossVersion::FusedV2)
    }

    /// A backend whose loss op runs the given kernel version (for comparing them in training).
    pub fn with_loss_version(gpu: Arc<Gpu>, loss_version: CudaLossVersion) -> Result<Self> {
        gpu.blas()?; // libcublas is needed by every GEMM: say so now, not mid-step
        let stream = gpu.stream().clone();
        let conv = ConvWorkspace {
            col: stream.alloc_zeros::<f32>(1)?,
            gemm: stream.alloc_zeros::<f32>(1)?,
        };
        Ok(CudaBackend {
            uploader: Uploader::new(gpu.clone())?,
            read_backs: ReadBackPool::default(),
            gpu,
            loss_version,
            kernels: EncoderKernels::default(),
            precision: GemmPrecision::F32,
            conv_workspace_cap: CONV_WORKSPACE,
            losses: Mutex::new(HashMap::new()),
            conv: Mutex::new(conv),
            knn: Mutex::new(None),
            sgd: Mutex::new(None),
            data_parallel: None,
        })
    }

    /// The loss of z on this device alone (one rank's share of the work is all of it).
    fn device_loss(
        &self,
        z: &CudaSlice<f32>,
        (n, d): (usize, usize),
        cfg: &LossConfig,
        loss: &mut CudaSlice<f32>,
        dz: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let mut losses = lock(&self.losses)?;
        let l = match losses.entry((n, d)) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(CudaLoss::new(self.gpu.clone(), self.loss_version, n, d)?)
            }
        };
        l.enqueue(z, Some(dz), cfg)?;
        elementwise::cuda::f64_to_f32(&*self.gpu, DevPtr::of(l.loss_buffer()), dev_mut(loss))
    }

    /// BatchNorm's kernel version: v1's layout of the statistics under `--sync-bn`, whose
    /// kernels share it.
    fn batchnorm_version(&self) -> batchnorm::Version {
        match &self.data_parallel {
            Some(dp) if dp.sync_bn() => batchnorm::Version::V1,
            _ => self.kernels.batchnorm,
        }
    }

    /// The same backend as one rank of a data-parallel group (see [`DataParallel`]).
    pub fn with_data_parallel(mut self, group: DataParallel) -> Self {
        self.data_parallel = Some(group);
        self
    }

    /// The data-parallel group this backend belongs to, if any.
    pub fn data_parallel(&self) -> Option<&DataParallel> {
        self.data_parallel.as_ref()
    }

    /// The same backend with its GEMMs in `precision`.
    pub fn with_gemm_precision(mut self, precision: GemmPrecision) -> Self {
        self.precision = precision;
        self
    }

    /// The same backend with these encoder kernel versions.
    pub fn with_kernels(mut self, kernels: EncoderKernels) -> Self {
        self.kernels = kernels;
        self
    }

    /// The same backend with convolutions split into groups whose im2col buffer holds at most
    /// `floats` (at least one image a group): a small cap runs a small batch in the several
    /// groups a large batch needs at the default 256 MB (tests on the virtual GPU use it).
    pub fn with_conv_workspace_cap(mut self, floats: usize) -> Self {
        self.conv_workspace_cap = floats;
        self
    }

    pub fn gemm_precision(&self) -> GemmPrecision {
        self.precision
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// `len` zeroed floats. An empty buffer is refused: cuMemAlloc documents a zero-byte
    /// allocation as an error, and no op of ours needs one (the tape makes a node's gradient
    /// and scratch only where an op uses them).
    fn alloc(&self, len: usize) -> Result<CudaSlice<f32>> {
        if len == 0 {
            return Err(Error::invalid(
                "internal: an empty device buffer was requested (invaspread makes none)",
            ));
        }
        Ok(self.gpu.stream().alloc_zeros::<f32>(len)?)
    }

    /// The convolution's scratch for `xs` and `conv`, grown when needed.
    fn conv_workspace(
        &self,
        xs: Shape4,
        conv: &conv2d::Conv,
    ) -> Result<(MutexGuard<'_, ConvWorkspace>, (usize, usize))> {
        let lens = conv2d::cuda::workspace_len(xs, conv, self.conv_workspace_cap);
        let mut ws = lock(&self.conv)?;
        let stream = self.gpu.stream();
        if ws.col.len() < lens.0 {
            ws.col = stream.alloc_zeros::<f32>(lens.0)?;
        }
        if ws.gemm.len() < lens.1 {
            ws.gemm = stream.alloc_zeros::<f32>(lens.1)?;
        }
        Ok((ws, lens))
    }
}

/// Exactly the floats of the convolution's groups (a larger workspace kept from another layer
/// must not change the grouping, and so the GEMM shapes).
fn workspace<'a>(
    ws: &'a mut ConvWorkspace,
    (col, gemm): (usize, usize),
) -> Result<conv2d::cuda::Workspace<'a>> {
    let ConvWorkspace { col: c, gemm: g } = ws;
    Ok(conv2d::cuda::Workspace {
        col: DevPtrMut::of(c).into_slice(0..col)?,
        gemm: DevPtrMut::of(g).into_slice(0..gemm)?,
    })
}

impl Backend for CudaBackend {
    type Buffer = CudaSlice<f32>;
    type BnSaved = Option<CudaSlice<f32>>;
    const DTYPE: &'static str = "F32";

    fn zeros(&self, len: usize) -> Result<CudaSlice<f32>> {
        self.alloc(len)
    }
    fn len(&self, buf: &CudaSlice<f32>) -> usize {
        buf.len()
    }
    fn reset(&self, buf: &mut CudaSlice<f32>, len: usize) -> Result<()> {
        if buf.len() != len {
            *buf = self.alloc(len)?;
        } else if len > 0 {
            self.gpu.stream().memset_zeros(buf)?;
        }
        Ok(())
    }
    fn ensure_len(&self, buf: &mut CudaSlice<f32>, len: usize) -> Result<()> {
        if buf.len() != len {
            *buf = self.alloc(len)?;
        }
        Ok(())
    }
    fn upload(&self, host: &[f32], buf: &mut CudaSlice<f32>) -> Result<()> {
        self.ensure_len(buf, host.len())?;
        self.uploader.upload(host, buf)
    }
    fn download(&self, buf: &CudaSlice<f32>) -> Result<Vec<f32>> {
        if buf.is_empty() {
            return Ok(Vec::new());
        }
        Ok(self.gpu.stream().clone_dtoh(buf)?)
    }
    fn download_f64(&self, buf: &CudaSlice<f32>) -> Result<Vec<f64>> {
        Ok(self.download(buf)?.into_iter().map(f64::from).collect())
    }
    fn upload_f64(&self, host: &[f64], buf: &mut CudaSlice<f32>) -> Result<()> {
        let v: Vec<f32> = host.iter().map(|&x| x as f32).collect();
        self.upload(&v, buf)
    }

    fn conv2d_forward(&self, a: conv2d::Forward<In<'_, Self>, Out<'_, Self>>) -> Result<()> {
        let (mut ws, lens) = self.conv_workspace(a.xs, &a.conv)?;
        let mut ws = workspace(&mut ws, lens)?;
        let (g, v, p) = (&*self.gpu, self.kernels.conv2d, self.precision);
        conv2d::cuda::forward(g, v, a.map(dev, dev_mut), &mut ws, p)
    }
    fn conv2d_backward(&self, a: conv2d::Backward<In<'_, Self>, Out<'_, Self>>) -> Result<()> {
        let (mut ws, lens) = self.conv_workspace(a.xs, &a.conv)?;
        let mut ws = workspace(&mut ws, lens)?;
        let (g, v, p) = (&*self.gpu, self.kernels.conv2d, self.precision);
        conv2d::cuda::backward(g, v, a.map(dev, dev_mut), &mut ws, p)
    }
    fn batchnorm_forward(
        &self,
        a: batchnorm::Forward<In<'_, Self>, Out<'_, Self>>,
        saved: &mut Option<CudaSlice<f32>>,
    ) -> Result<()> {
        let v = self.batchnorm_version();
        let len = batchnorm::cuda::saved_len(v, a.xs);
        if saved.as_ref().is_none_or(|s| s.len() != len) {
            *saved = Some(self.gpu.stream().alloc_zeros::<f32>(len)?);
        }
        let saved = saved
            .as_mut()
            .ok_or_else(|| Error::Cuda("batchnorm statistics missing".into()))?;
        if let Some(dp) = self
            .data_parallel
            .as_ref()
            .filter(|dp| dp.sync_bn() && a.training)
        {
            return dp.batchnorm_forward(&self.gpu, a, saved);
        }
        batchnorm::cuda::forward(
            &*self.gpu,
            v,
            a.map(dev, dev_mut),
            &mut DevPtrMut::of(saved),
        )
    }
    fn batchnorm_backward(
        &self,
        a: batchnorm::Backward<In<'_, Self>, Out<'_, Self>>,
        saved: &mut Option<CudaSlice<f32>>,
    ) -> Result<()> {
        let v = self.batchnorm_version();
        let len = batchnorm::cuda::saved_len(v, a.xs);
        let saved = saved
            .as_mut()
            .filter(|s| s.len() == len)
            .ok_or_else(|| Error::Cuda("batchnorm backward before its forward".into()))?;
        if let Some(dp) = self
            .data_parallel
            .as_ref()
            .filter(|dp| dp.sync_bn() && a.training)
        {
            return dp.batchnorm_backward(&self.gpu, a, saved);
        }
        batchnorm::cuda::backward(
            &*self.gpu,
            v,
            a.map(dev, dev_mut),
            &mut DevPtrMut::of(saved),
        )
    }
    fn relu_forward(&self, x: &CudaSlice<f32>, y: &mut CudaSlice<f32>) -> Result<()> {
        elementwise::cuda::relu_forward(&*self.gpu, self.kernels.elementwise, dev(x), dev_mut(y))
    }
    fn relu_backward(
        &self,
        y: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        dx: Grad<&mut CudaSlice<f32>>,
    ) -> Result<()> {
        let v = self.kernels.elementwise;
        elementwise::cuda::relu_backward(&*self.gpu, v, dev(y), dev(dy), grad(dx))
    }
    fn copy_or_add(&self, x: &CudaSlice<f32>, out: Grad<&mut CudaSlice<f32>>) -> Result<()> {
        elementwise::cuda::copy_or_add(&*self.gpu, self.kernels.elementwise, dev(x), grad(out))
    }
    fn axpy(&self, scale: f64, x: &CudaSlice<f32>, out: Grad<&mut CudaSlice<f32>>) -> Result<()> {
        let v = self.kernels.elementwise;
        elementwise::cuda::axpy(&*self.gpu, v, scale, dev(x), grad(out))
    }
    fn avgpool_forward(
        &self,
        x: &CudaSlice<f32>,
        xs: Shape4,
        k: usize,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        pool::cuda::forward(&*self.gpu, self.kernels.pool, dev(x), xs, k, dev_mut(y))
    }
    fn avgpool_backward(
        &self,
        xs: Shape4,
        k: usize,
        dy: &CudaSlice<f32>,
        dx: Grad<&mut CudaSlice<f32>>,
    ) -> Result<()> {
        pool::cuda::backward(&*self.gpu, self.kernels.pool, xs, k, dev(dy), grad(dx))
    }
    fn linear_forward(&self, a: linear::Forward<In<'_, Self>, Out<'_, Self>>) -> Result<()> {
        let (v, p) = (self.kernels.linear, self.precision);
        linear::cuda::forward(&*self.gpu, v, a.map(dev, dev_mut), p)
    }
    fn linear_backward(&self, a: linear::Backward<In<'_, Self>, Out<'_, Self>>) -> Result<()> {
        let (v, p) = (self.kernels.linear, self.precision);
        linear::cuda::backward(&*self.gpu, v, a.map(dev, dev_mut), p)
    }
    fn instance_loss(
        &self,
        z: &CudaSlice<f32>,
        (n, d): (usize, usize),
        cfg: &LossConfig,
        loss: &mut CudaSlice<f32>,
        dz: &mut CudaSlice<f32>,
    ) -> Result<()> {
        validate_for_kernels(cfg)?;
        self.ensure_len(loss, 1)?;
        self.ensure_len(dz, n * d)?;
        match &self.data_parallel {
            None => self.device_loss(z, (n, d), cfg, loss, dz),
            Some(dp) if dp.runs_own_rows(self.loss_version, cfg) => {
                dp.own_rows_loss(&self.gpu, z, (n, d), cfg, loss, dz)
            }
            Some(dp) => dp.gathered_loss(&self.gpu, z, (n, d), dz, |zg, shape, dzg| {
                self.device_loss(zg, shape, cfg, loss, dzg)
            }),
        }
    }
    fn gradients_begin(&self, lens: &[usize]) -> Result<()> {
        match &self.data_parallel {
            None => Ok(()),
            Some(dp) => dp.gradients_begin(&self.gpu, lens),
        }
    }
    fn gradient_final(&self, index: usize, grad: &CudaSlice<f32>) -> Result<()> {
        match &self.data_parallel {
            None => Ok(()),
            Some(dp) => dp.gradient_final(&self.gpu, index, grad),
        }
    }
    fn reduce_gradients(&self, grads: &mut [&mut CudaSlice<f32>]) -> Result<()> {
        match &self.data_parallel {
            None => Ok(()),
            Some(dp) => dp.sum_gradients(&self.gpu, grads),
        }
    }
    fn rank(&self) -> (usize, usize) {
        self.data_parallel
            .as_ref()
            .map_or((0, 1), |dp| (dp.rank(), dp.world_size()))
    }
    fn broadcast(&self, bufs: &mut [&mut CudaSlice<f32>]) -> Result<()> {
        match &self.data_parallel {
            None => Ok(()),
            Some(dp) => dp.broadcast(bufs, 0),
        }
    }
    fn all_gather(&self, local: &CudaSlice<f32>, out: &mut CudaSlice<f32>) -> Result<()> {
        let ranks = self.rank().1;
        self.ensure_len(out, local.len() * ranks)?;
        match &self.data_parallel {
            None => self.copy_into(local, out, 0),
            Some(dp) => dp.all_gather(local, out),
        }
    }
    fn normalize_rows(
        &self,
        x: &CudaSlice<f32>,
        (n, d): (usize, usize),
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.ensure_len(y, n * d)?;
        let mut norms = self.alloc(n)?;
        let v = self.kernels.normalize_rows;
        normalize_rows::cuda::forward(
            &*self.gpu,
            v,
            dev(x),
            dev_mut(y),
            dev_mut(&mut norms),
            (n, d),
        )
    }
    fn copy_prefix(&self, src: &CudaSlice<f32>, dst: &mut CudaSlice<f32>) -> Result<()> {
        let len = dst.len();
        if len > src.len() {
            return Err(Error::invalid(format!(
                "copy_prefix: {len} values from a buffer of {}",
                src.len()
            )));
        }
        if len > 0 {
            self.gpu.stream().memcpy_dtod(&src.slice(0..len), dst)?;
        }
        Ok(())
    }
    fn copy_into(&self, src: &CudaSlice<f32>, dst: &mut CudaSlice<f32>, at: usize) -> Result<()> {
        let len = src.len();
        if at.checked_add(len).is_none_or(|end| end > dst.len()) {
            return Err(Error::invalid(format!(
                "copy_into: {len} elements at {at} of a buffer of {}",
                dst.len()
            )));
        }
        if len == 0 {
            return Ok(());
        }
        let mut to = dst.slice_mut(at..at + len);
        self.gpu.stream().memcpy_dtod(src, &mut to)?;
        Ok(())
    }
    fn sgd_update_all(
        &self,
        params: &mut [Tensors<'_, CudaSlice<f32>>],
        step: &SgdStep,
    ) -> Result<()> {
        let refs: Vec<sgd::cuda::TensorRef<'_>> = params
            .iter()
            .map(|p| sgd::cuda::TensorRef {
                w: dev(p.w),
                g: dev(p.g),
                v: dev(p.v),
            })
            .collect();
        let (host, blocks) = sgd::cuda::table(&refs)?;
        drop(refs);
        let mut cached = lock(&self.sgd)?;
        // The table is uploaded once and again only when a buffer moved (a reallocation).
        if cached.as_ref().is_none_or(|t| t.host != host) {
            let device = self.gpu.stream().clone_htod(&host)?;
            *cached = Some(SgdTable {
                host,
                device,
                blocks,
            });
        }
        let t = cached
            .as_ref()
            .ok_or_else(|| Error::Cuda("SGD table missing".into()))?;
        // SAFETY: the table was built from `params`, whose buffers this call borrows
        // exclusively while the update is queued on the one stream that uses them.
        unsafe {
            sgd::cuda::update_all(
                &*self.gpu,
                self.kernels.sgd,
                DevPtr::of(&t.device),
                t.blocks,
                step,
            )
        }
    }
    fn nearest(
        &self,
        queries: &CudaSlice<f32>,
        keys: &CudaSlice<f32>,
        d: usize,
        k: usize,
    ) -> Result<Neighbours> {
        let (nq, nk) = (queries.len() / d.max(1), keys.len() / d.max(1));
        let k = k.min(nk);
        let rows = topk::cuda::block_rows(nq, nk, topk::cuda::MAX_BLOCK);
        let mut scratch = lock(&self.knn)?;
        let stream = self.gpu.stream();
        let fits = |s: &KnnScratch| s.sims.len() >= rows * nk && s.values.len() >= rows * k;
        if k > 0 && scratch.as_ref().is_none_or(|s| !fits(s)) {
            *scratch = Some(KnnScratch {
                sims: stream.alloc_zeros::<f32>(rows * nk)?,
                values: stream.alloc_zeros::<f32>(rows * k)?,
                indices: stream.alloc_zeros::<i32>(rows * k)?,
            });
        }
        let Some(s) = scratch.as_mut() else {
            return Ok(vec![Vec::new(); nq]);
        };
        let mut s = topk::cuda::Scratch {
            sims: DevPtrMut::of(&mut s.sims),
            values: DevPtrMut::of(&mut s.values),
            indices: DevPtrMut::of(&mut s.indices),
        };
        let v = self.kernels.topk;
        topk::cuda::nearest(&*self.gpu, v, dev(queries), dev(keys), d, k, &mut s)
    }
    fn read_later(&self, buf: &CudaSlice<f32>) -> Result<PendingRead> {
        read_later(&self.gpu, &self.read_backs, buf)
    }
    fn synchronize(&self) -> Result<()> {
        self.gpu.stream().synchronize()?;
        Ok(())
    }
}
