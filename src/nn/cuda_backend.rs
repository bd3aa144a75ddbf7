//! The CUDA backend: the graph's buffers live on one GPU and every op is a kernel launch on the
//! GPU's stream, so a training step is queued without waiting (the losses come back
//! asynchronously every few steps, see `trainer`). Kernels are in kernels/ (table in
//! kernels/README.md):
//!
//! | op | how |
//! |---|---|
//! | conv2d forward / both backwards | `im2col_v1` per group of images + cuBLAS SGEMM, `bcp_to_cbp_v1` / `cbp_to_bcp_v1` between NCHW and the GEMM layout, `col2im_v1` (no atomics) |
//! | batchnorm2d train / eval, forward / backward | `batchnorm.cu`: one block per channel for the statistics (float32, fixed-order reductions), elementwise apply and dx |
//! | relu, add, copy, axpy | `elementwise.cu` |
//! | average pooling | `pool.cu` |
//! | linear | `bias_rows_v1` + SGEMM forward; SGEMMs and `column_sums_v1` backward |
//! | instance loss | `loss::cuda::CudaLoss` (fused-v2 by default), the scalar copied into the node on the device |
//! | SGD | `sgd_multi_tensor_v1`: every parameter in one launch from a table of device pointers |
//! | kNN | an SGEMM per block of queries against the bank, then `topk_rows_v1` |
//!
//! Repeated host-to-device copies (the training batch) go through page-locked (pinned) staging
//! buffers on a second, copy stream, two per size used in turn, so an upload neither waits for
//! the GPU to drain nor takes time on the compute stream: the host only waits for the copy made
//! from the same staging buffer two uploads earlier, and the compute stream waits (an event)
//! only for its own batch. One-off uploads (parameters at creation) are plain copies.
//!
//! Storage and sums are float32; the GEMMs multiply in float32, TF32 or with bfloat16
//! operands ([`GemmPrecision`]). `tests/gpu_nn.rs` runs every op against the CPU backend on a
//! GPU; `tests/emulated_kernels.rs` runs the kernels' sources on a CPU emulator in CI.

// Kernels take their buffers and geometry explicitly, like the CPU ones.
#![allow(clippy::too_many_arguments)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{
    CudaEvent, CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DeviceRepr,
    LaunchConfig, PinnedHostSlice, PushKernelArg,
};

use super::backend::{Backend, PendingRead, BN_EPS, BN_MOMENTUM};
use super::cpu_ops::{Conv, Shape4};
use super::params::Param;
use crate::cuda::{to_i32, Gpu};
use crate::error::{Error, Result};
use crate::loss::cuda::{validate_for_kernels, CudaLoss, CudaLossVersion};
use crate::loss::LossConfig;

const BLOCK: u32 = 256;
/// Threads per block of the per-channel batchnorm reductions (BN_THREADS in batchnorm.cu).
const BN_THREADS: u32 = 512;
/// Elements per block of the multi-tensor SGD (SGD_CHUNK in sgd.cu).
pub const SGD_CHUNK: usize = 1024;
/// The largest im2col buffer of one group of images, in floats (256 MB).
const CONV_WORKSPACE: usize = 1 << 26;
/// The largest similarity block of the kNN, in floats (512 MB).
const KNN_BLOCK: usize = 1 << 27;

/// A convolution's geometry for one group of images, passed by value to the kernels of
/// kernels/conv_im2col.cu (the same fields in the same order as its `ConvGeom`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ConvGeom {
    images: i32,
    c_in: i32,
    h: i32,
    w: i32,
    c_out: i32,
    k: i32,
    stride: i32,
    pad: i32,
    h_out: i32,
    w_out: i32,
}

// SAFETY: #[repr(C)] plain old data laid out as the CUDA struct.
unsafe impl DeviceRepr for ConvGeom {}

impl ConvGeom {
    /// The geometry of `conv` on `images` images of input shape `xs` (its `n` is ignored).
    pub fn new(xs: Shape4, conv: &Conv, images: usize) -> Result<ConvGeom> {
        let ys = conv.out_shape(xs);
        Ok(ConvGeom {
            images: to_i32("images", images)?,
            c_in: to_i32("C_in", conv.c_in)?,
            h: to_i32("H", xs.h)?,
            w: to_i32("W", xs.w)?,
            c_out: to_i32("C_out", conv.c_out)?,
            k: to_i32("k", conv.k)?,
            stride: to_i32("stride", conv.stride)?,
            pad: to_i32("pad", conv.pad)?,
            h_out: to_i32("H_out", ys.h)?,
            w_out: to_i32("W_out", ys.w)?,
        })
    }
}

/// One parameter in the table of `sgd_multi_tensor_v1` (the same layout as `SgdTensor` in
/// kernels/sgd.cu): device addresses of the weights, gradient and momentum, the length, and
/// the first of the tensor's `len.div_ceil(SGD_CHUNK)` blocks.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SgdTensor {
    pub w: u64,
    pub g: u64,
    pub v: u64,
    pub len: i64,
    pub first_block: i64,
}

// SAFETY: #[repr(C)] plain old data (device addresses as integers).
unsafe impl DeviceRepr for SgdTensor {}

/// The update's hyper-parameters, passed by value to `sgd_multi_tensor_v1` (the same fields
/// in the same order as `SgdParams` in kernels/sgd.cu).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct SgdParams {
    lr: f32,
    momentum: f32,
    weight_decay: f32,
    nesterov: i32,
    first: i32,
    tensors: i32,
}

// SAFETY: #[repr(C)] plain old data.
unsafe impl DeviceRepr for SgdParams {}

impl SgdParams {
    /// PyTorch's SGD with these settings over `tensors` table entries.
    pub fn new(
        lr: f64,
        momentum: f64,
        weight_decay: f64,
        nesterov: bool,
        first: bool,
        tensors: usize,
    ) -> Result<SgdParams> {
        Ok(SgdParams {
            lr: lr as f32,
            momentum: momentum as f32,
            weight_decay: weight_decay as f32,
            nesterov: nesterov as i32,
            first: first as i32,
            tensors: to_i32("parameter tensors", tensors)?,
        })
    }
}

/// How the backend's GEMMs (convolutions, linear layers, kNN) multiply. Storage, activations
/// and accumulation stay float32 in every mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GemmPrecision {
    /// Full float32 SGEMM (the default; the parity tests use it).
    F32,
    /// TF32 tensor cores on float32 data (10-bit mantissa products, float32 sums); what
    /// PyTorch uses for cuDNN convolutions by default.
    Tf32,
    /// Operands rounded to bfloat16, float32 accumulation (mixed precision).
    Bf16,
}

impl GemmPrecision {
    pub fn name(self) -> &'static str {
        match self {
            GemmPrecision::F32 => "f32",
            GemmPrecision::Tf32 => "tf32",
            GemmPrecision::Bf16 => "bf16",
        }
    }
}

/// bfloat16 copies of a GEMM's two operands.
struct Bf16Operands {
    a: CudaSlice<u16>,
    b: CudaSlice<u16>,
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

/// The CUDA backend; see the module documentation.
pub struct CudaBackend {
    gpu: Arc<Gpu>,
    /// Host-to-device copies, overlapping the compute stream's kernels.
    copy_stream: Arc<CudaStream>,
    blas: CudaBlas,
    loss_version: CudaLossVersion,
    losses: Mutex<HashMap<(usize, usize), CudaLoss>>,
    conv: Mutex<ConvWorkspace>,
    staging: Mutex<HashMap<usize, Staging>>,
    /// Upload lengths seen once (see `upload_staged`).
    seen_lengths: Mutex<std::collections::HashSet<usize>>,
    sgd: Mutex<Option<SgdTable>>,
    precision: GemmPrecision,
    bf16: Mutex<Option<Bf16Operands>>,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("gpu", &self.gpu)
            .field("loss_version", &self.loss_version)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> Result<MutexGuard<'_, T>> {
    m.lock()
        .map_err(|_| Error::Cuda("a CUDA backend lock was poisoned".into()))
}

/// A grid-stride launch over `total` elements.
fn grid_stride(total: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            total.div_ceil(BLOCK as usize).clamp(1, 1 << 20) as u32,
            1,
            1,
        ),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn blocks_of(blocks: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks.max(1) as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn cublas_err(e: cudarc::cublas::result::CublasError) -> Error {
    Error::Cuda(format!("cuBLAS SGEMM: {e:?}"))
}

fn check_len(what: &str, len: usize, expected: usize) -> Result<()> {
    if len < expected {
        return Err(Error::invalid(format!(
            "{what}: a buffer of {len} floats, expected at least {expected}"
        )));
    }
    Ok(())
}

impl CudaBackend {
    /// A backend on `gpu` whose loss op runs the `fused-v2` kernels.
    pub fn new(gpu: Arc<Gpu>) -> Result<Self> {
        Self::with_loss_version(gpu, CudaLossVersion::FusedV2)
    }

    /// A backend whose loss op runs the given kernel version (for comparing them in training).
    pub fn with_loss_version(gpu: Arc<Gpu>, loss_version: CudaLossVersion) -> Result<Self> {
        // SAFETY: only tries to open the library.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(Error::Cuda(
                "libcublas was not found (add its folder to LD_LIBRARY_PATH)".into(),
            ));
        }
        let stream = gpu.stream().clone();
        let blas =
            CudaBlas::new(stream.clone()).map_err(|e| Error::Cuda(format!("cuBLAS: {e:?}")))?;
        let conv = ConvWorkspace {
            col: stream.alloc_zeros::<f32>(1)?,
            gemm: stream.alloc_zeros::<f32>(1)?,
        };
        let copy_stream = gpu.context().new_stream()?;
        Ok(CudaBackend {
            gpu,
            copy_stream,
            blas,
            loss_version,
            losses: Mutex::new(HashMap::new()),
            conv: Mutex::new(conv),
            staging: Mutex::new(HashMap::new()),
            seen_lengths: Mutex::new(std::collections::HashSet::new()),
            sgd: Mutex::new(None),
            precision: GemmPrecision::F32,
            bf16: Mutex::new(None),
        })
    }

    /// The same backend with its GEMMs in `precision`.
    pub fn with_gemm_precision(mut self, precision: GemmPrecision) -> Self {
        self.precision = precision;
        self
    }

    pub fn gemm_precision(&self) -> GemmPrecision {
        self.precision
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// `len` zeroed floats (the driver refuses a zero-byte allocation: cudarc's null slice).
    fn alloc(&self, len: usize) -> Result<CudaSlice<f32>> {
        let stream = self.gpu.stream();
        Ok(if len == 0 {
            stream.null::<f32>()?
        } else {
            stream.alloc_zeros::<f32>(len)?
        })
    }

    fn function(&self, module: &'static str, name: &str) -> Result<CudaFunction> {
        self.gpu.function(module, name)
    }

    /// Row-major C (m x n) = alpha op(A) op(B) + beta C, where op(A) is m x k and op(B) is
    /// k x n; `lda`, `ldb`, `ldc` are row strides. cuBLAS is column-major, where a row-major
    /// matrix is its transpose, so it computes C^T = op(B)^T op(A)^T with the operands swapped.
    fn gemm(
        &self,
        trans_a: bool,
        trans_b: bool,
        dims: (usize, usize, usize),
        alpha: f32,
        a: &impl DevicePtr<f32>,
        lda: usize,
        b: &impl DevicePtr<f32>,
        ldb: usize,
        beta: f32,
        c: &mut impl cudarc::driver::DevicePtrMut<f32>,
        ldc: usize,
    ) -> Result<()> {
        let p = self.precision;
        self.gemm_in(
            p, trans_a, trans_b, dims, alpha, a, lda, b, ldb, beta, c, ldc,
        )
    }

    /// [`Self::gemm`] in a given precision (the kNN search always multiplies in float32).
    fn gemm_in(
        &self,
        precision: GemmPrecision,
        trans_a: bool,
        trans_b: bool,
        (m, n, k): (usize, usize, usize),
        alpha: f32,
        a: &impl DevicePtr<f32>,
        lda: usize,
        b: &impl DevicePtr<f32>,
        ldb: usize,
        beta: f32,
        c: &mut impl cudarc::driver::DevicePtrMut<f32>,
        ldc: usize,
    ) -> Result<()> {
        let cfg = cublas_config(trans_a, trans_b, (m, n, k), alpha, lda, ldb, beta, ldc)?;
        if precision == GemmPrecision::F32 {
            // SAFETY: the callers pass buffers holding the matrices these dimensions and
            // strides describe (their lengths are checked before the call).
            return unsafe { self.blas.gemm(cfg, b, a, c) }.map_err(cublas_err);
        }
        self.gemm_ex(precision, cfg, b, a, c)
    }

    /// cublasGemmEx for the TF32 and bf16 modes, operands as [`Self::gemm`] passes them to
    /// cuBLAS (already swapped).
    fn gemm_ex(
        &self,
        precision: GemmPrecision,
        cfg: GemmConfig<f32>,
        a: &impl DevicePtr<f32>,
        b: &impl DevicePtr<f32>,
        c: &mut impl cudarc::driver::DevicePtrMut<f32>,
    ) -> Result<()> {
        use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cudaDataType};
        use std::ffi::c_void;
        let stream = self.gpu.stream().clone();
        let mut ops = lock(&self.bf16)?;
        let (a_ptr, b_ptr, in_type, compute) = match precision {
            GemmPrecision::Bf16 => {
                if ops
                    .as_ref()
                    .is_none_or(|o| o.a.len() < a.len() || o.b.len() < b.len())
                {
                    let (la, lb) = (
                        a.len().max(ops.as_ref().map_or(0, |o| o.a.len())),
                        b.len().max(ops.as_ref().map_or(0, |o| o.b.len())),
                    );
                    *ops = Some(Bf16Operands {
                        a: stream.alloc_zeros::<u16>(la.max(1))?,
                        b: stream.alloc_zeros::<u16>(lb.max(1))?,
                    });
                }
                let o = ops
                    .as_mut()
                    .ok_or_else(|| Error::Cuda("bf16 operands missing".into()))?;
                self.to_bf16(a, &mut o.a)?;
                self.to_bf16(b, &mut o.b)?;
                let (pa, _) = o.a.device_ptr(&stream);
                let (pb, _) = o.b.device_ptr(&stream);
                (
                    pa,
                    pb,
                    cudaDataType::CUDA_R_16BF,
                    cublasComputeType_t::CUBLAS_COMPUTE_32F,
                )
            }
            _ => {
                let (pa, _) = a.device_ptr(&stream);
                let (pb, _) = b.device_ptr(&stream);
                (
                    pa,
                    pb,
                    cudaDataType::CUDA_R_32F,
                    cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
                )
            }
        };
        let (pc, _rc) = c.device_ptr_mut(&stream);
        // SAFETY: as in `gemm`; the bf16 copies hold the operands' full extents, and alpha and
        // beta are float32 as CUBLAS_COMPUTE_32F* requires.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                cfg.transa,
                cfg.transb,
                cfg.m,
                cfg.n,
                cfg.k,
                &cfg.alpha as *const f32 as *const c_void,
                a_ptr as *const c_void,
                in_type,
                cfg.lda,
                b_ptr as *const c_void,
                in_type,
                cfg.ldb,
                &cfg.beta as *const f32 as *const c_void,
                pc as *mut c_void,
                cudaDataType::CUDA_R_32F,
                cfg.ldc,
                compute,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(cublas_err)
    }

    /// bf16 copy of every element of `x` into the front of `out`.
    fn to_bf16(&self, x: &impl DevicePtr<f32>, out: &mut CudaSlice<u16>) -> Result<()> {
        let len = x.len();
        let stream = self.gpu.stream().clone();
        let func = self.function("elementwise", "f32_to_bf16_v1")?;
        let (px, _rx) = x.device_ptr(&stream);
        let n = len as i64;
        let mut l = stream.launch_builder(&func);
        l.arg(&px).arg(&mut *out).arg(&n);
        // SAFETY: f32_to_bf16_v1(const float* x, unsigned short* y, long long len); x holds
        // len floats and out at least len (grown by the caller).
        unsafe { l.launch(grid_stride(len)) }?;
        Ok(())
    }

    /// Copies `host` to `dst` (see [`Staging`]): queued on both streams, the host waits only
    /// for the copy that used the same staging buffers two uploads earlier.
    fn upload_staged(&self, host: &[f32], dst: &mut CudaSlice<f32>) -> Result<()> {
        let len = host.len();
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
            std::collections::hash_map::Entry::Vacant(e) => {
                let ctx = self.gpu.context();
                // SAFETY: the memory is written below before any copy reads it.
                let pinned = || unsafe { ctx.alloc_pinned::<f32>(len) };
                let event = || ctx.new_event(None);
                let device = || compute.alloc_zeros::<f32>(len);
                // The device buffers are allocated on the compute stream: make the copy stream
                // see the allocations before it writes into them.
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
                e.insert(staged)
            }
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

    /// The convolution's scratch, grown to at least `col` and `gemm` floats.
    fn conv_workspace(&self, col: usize, gemm: usize) -> Result<MutexGuard<'_, ConvWorkspace>> {
        let mut ws = lock(&self.conv)?;
        let stream = self.gpu.stream();
        if ws.col.len() < col {
            ws.col = stream.alloc_zeros::<f32>(col)?;
        }
        if ws.gemm.len() < gemm {
            ws.gemm = stream.alloc_zeros::<f32>(gemm)?;
        }
        Ok(ws)
    }

    /// Images per GEMM so that the column buffer stays within [`CONV_WORKSPACE`].
    fn conv_group(xs: Shape4, conv: &Conv) -> usize {
        let ys = conv.out_shape(xs);
        let per_image = conv.patch().max(conv.c_out) * ys.h * ys.w;
        (CONV_WORKSPACE / per_image.max(1)).clamp(1, xs.n.max(1))
    }

    fn im2col(
        &self,
        x: &CudaView<'_, f32>,
        geom: &ConvGeom,
        col: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let total = (geom.c_in * geom.k * geom.k) as usize
            * (geom.images * geom.h_out * geom.w_out) as usize;
        let func = self.function("conv_im2col", "im2col_v1")?;
        let mut l = self.gpu.stream().launch_builder(&func);
        l.arg(x).arg(geom).arg(col);
        // SAFETY: im2col_v1(const float* x, ConvGeom g, float* col); x holds the group's
        // images and col at least K x B P floats (checked by the caller).
        unsafe { l.launch(grid_stride(total)) }?;
        Ok(())
    }

    /// `bcp_to_cbp_v1` (NCHW [B][C][P] into the GEMM layout [C][B P]) or `cbp_to_bcp_v1`
    /// (back), as `kernel` names.
    fn permute(
        &self,
        kernel: &str,
        src: &CudaView<'_, f32>,
        dst: &mut CudaViewMut<'_, f32>,
        dims: (usize, usize, usize),
    ) -> Result<()> {
        let total = dims.0 * dims.1 * dims.2;
        check_len(kernel, src.len(), total)?;
        check_len(kernel, dst.len(), total)?;
        let func = self.function("conv_im2col", kernel)?;
        let (b, c, p) = (
            to_i32("B", dims.0)?,
            to_i32("C", dims.1)?,
            to_i32("P", dims.2)?,
        );
        let mut l = self.gpu.stream().launch_builder(&func);
        l.arg(src).arg(dst).arg(&b).arg(&c).arg(&p);
        // SAFETY: (const float* src, float* dst, int b, int c, int p); both hold B C P floats.
        unsafe { l.launch(grid_stride(total)) }?;
        Ok(())
    }

    fn elementwise(
        &self,
        name: &str,
        inputs: &[&CudaSlice<f32>],
        out: &mut CudaSlice<f32>,
        accumulate: Option<bool>,
    ) -> Result<()> {
        let len = out.len();
        for x in inputs {
            check_len(name, x.len(), len)?;
        }
        let func = self.function("elementwise", name)?;
        let n = len as i64;
        let acc = accumulate.map(i32::from);
        let mut l = self.gpu.stream().launch_builder(&func);
        for x in inputs {
            l.arg(*x);
        }
        l.arg(out).arg(&n);
        if let Some(acc) = &acc {
            l.arg(acc);
        }
        // SAFETY: the elementwise kernels take (inputs..., out, long long len[, int accumulate])
        // and every buffer holds at least len floats.
        unsafe { l.launch(grid_stride(len)) }?;
        Ok(())
    }

    /// Updates every tensor in `table` in one launch.
    fn sgd_launch(&self, table: &CudaSlice<SgdTensor>, blocks: usize, p: SgdParams) -> Result<()> {
        let func = self.function("sgd", "sgd_multi_tensor_v1")?;
        let mut l = self.gpu.stream().launch_builder(&func);
        l.arg(table).arg(&p);
        // SAFETY: the table's pointers address live parameter, gradient and momentum buffers
        // of the stated lengths (the caller builds it from them), and `blocks` is the sum of
        // their chunk counts.
        unsafe { l.launch(blocks_of(blocks, BLOCK)) }?;
        Ok(())
    }

    fn sgd_table(
        &self,
        tensors: &[(&CudaSlice<f32>, &CudaSlice<f32>, &CudaSlice<f32>)],
    ) -> (Vec<SgdTensor>, usize) {
        let stream = self.gpu.stream();
        let mut table = Vec::with_capacity(tensors.len());
        let mut blocks = 0usize;
        for (w, g, v) in tensors {
            let (wp, _r1) = w.device_ptr(stream);
            let (gp, _r2) = g.device_ptr(stream);
            let (vp, _r3) = v.device_ptr(stream);
            table.push(SgdTensor {
                w: wp,
                g: gp,
                v: vp,
                len: w.len() as i64,
                first_block: blocks as i64,
            });
            blocks += w.len().div_ceil(SGD_CHUNK);
        }
        (table, blocks)
    }
}

/// cuBLAS's column-major call for the row-major product C (m x n) = alpha op(A) op(B) + beta C
/// (op(A) m x k, op(B) k x n, row strides lda, ldb, ldc). A row-major matrix is, to cuBLAS,
/// its transpose, so the call computes C^T = op(B)^T op(A)^T: the operands swap places (pass
/// B's buffer first), and so do their transposition flags and m and n.
pub(crate) fn cublas_config(
    trans_a: bool,
    trans_b: bool,
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    lda: usize,
    ldb: usize,
    beta: f32,
    ldc: usize,
) -> Result<GemmConfig<f32>> {
    let op = |t: bool| {
        if t {
            cublasOperation_t::CUBLAS_OP_T
        } else {
            cublasOperation_t::CUBLAS_OP_N
        }
    };
    Ok(GemmConfig {
        transa: op(trans_b),
        transb: op(trans_a),
        m: to_i32("GEMM n", n)?,
        n: to_i32("GEMM m", m)?,
        k: to_i32("GEMM k", k)?,
        alpha,
        lda: to_i32("GEMM ldb", ldb)?,
        ldb: to_i32("GEMM lda", lda)?,
        beta,
        ldc: to_i32("GEMM ldc", ldc)?,
    })
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        // Staging buffers are shared by both streams: nothing may be in flight when they go.
        let _ = self.copy_stream.synchronize();
        let _ = self.gpu.stream().synchronize();
    }
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
        if host.is_empty() {
            return Ok(());
        }
        self.upload_staged(host, buf)
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

    fn conv2d_forward(
        &self,
        x: &CudaSlice<f32>,
        xs: Shape4,
        w: &CudaSlice<f32>,
        conv: &Conv,
        y: &mut CudaSlice<f32>,
    ) -> Result<Shape4> {
        let ys = conv.out_shape(xs);
        let (k, p) = (conv.patch(), ys.h * ys.w);
        check_len("conv2d x", x.len(), xs.len())?;
        check_len("conv2d w", w.len(), conv.c_out * k)?;
        check_len("conv2d y", y.len(), ys.len())?;
        let group = Self::conv_group(xs, conv);
        let mut ws = self.conv_workspace(k * group * p, conv.c_out * group * p)?;
        let ConvWorkspace { col, gemm } = &mut *ws;
        let mut n0 = 0;
        while n0 < xs.n {
            let b = group.min(xs.n - n0);
            let geom = ConvGeom::new(xs, conv, b)?;
            let xg = x.slice(n0 * xs.image()..(n0 + b) * xs.image());
            self.im2col(&xg, &geom, col)?;
            let ld = b * p;
            // Y' (C_out x B P) = W (C_out x K) col (K x B P); operands as exact views (the
            // workspace may be larger than this group, and bf16 mode converts whole operands).
            self.gemm(
                false,
                false,
                (conv.c_out, ld, k),
                1.0,
                w,
                k,
                &col.slice(0..k * ld),
                ld,
                0.0,
                &mut gemm.slice_mut(0..conv.c_out * ld),
                ld,
            )?;
            let mut yg = y.slice_mut(n0 * ys.image()..(n0 + b) * ys.image());
            self.permute(
                "cbp_to_bcp_v1",
                &gemm.slice(0..conv.c_out * ld),
                &mut yg,
                (b, conv.c_out, p),
            )?;
            n0 += b;
        }
        Ok(ys)
    }

    fn conv2d_backward(
        &self,
        x: &CudaSlice<f32>,
        xs: Shape4,
        w: &CudaSlice<f32>,
        conv: &Conv,
        dy: &CudaSlice<f32>,
        mut dx: Option<&mut CudaSlice<f32>>,
        dx_accumulate: bool,
        dw: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let ys = conv.out_shape(xs);
        let (k, p) = (conv.patch(), ys.h * ys.w);
        check_len("conv2d x", x.len(), xs.len())?;
        check_len("conv2d dy", dy.len(), ys.len())?;
        check_len("conv2d dw", dw.len(), conv.c_out * k)?;
        if let Some(dx) = &dx {
            check_len("conv2d dx", dx.len(), xs.len())?;
        }
        let group = Self::conv_group(xs, conv);
        let mut ws = self.conv_workspace(k * group * p, conv.c_out * group * p)?;
        let ConvWorkspace { col, gemm } = &mut *ws;
        let func = self.function("conv_im2col", "col2im_v1")?;
        let mut n0 = 0;
        while n0 < xs.n {
            let b = group.min(xs.n - n0);
            let geom = ConvGeom::new(xs, conv, b)?;
            let ld = b * p;
            let xg = x.slice(n0 * xs.image()..(n0 + b) * xs.image());
            self.im2col(&xg, &geom, col)?;
            let dyg = dy.slice(n0 * ys.image()..(n0 + b) * ys.image());
            self.permute(
                "bcp_to_cbp_v1",
                &dyg,
                &mut gemm.slice_mut(0..conv.c_out * ld),
                (b, conv.c_out, p),
            )?;
            // dW (C_out x K) += dY' (C_out x B P) col^T
            let dy_g = gemm.slice(0..conv.c_out * ld);
            self.gemm(
                false,
                true,
                (conv.c_out, k, ld),
                1.0,
                &dy_g,
                ld,
                &col.slice(0..k * ld),
                ld,
                1.0,
                dw,
                k,
            )?;
            if let Some(dx) = dx.as_deref_mut() {
                // dcol (K x B P) = W^T dY', written over col (its last reader is queued above).
                self.gemm(
                    true,
                    false,
                    (k, ld, conv.c_out),
                    1.0,
                    w,
                    k,
                    &dy_g,
                    ld,
                    0.0,
                    &mut col.slice_mut(0..k * ld),
                    ld,
                )?;
                let mut dxg: CudaViewMut<'_, f32> =
                    dx.slice_mut(n0 * xs.image()..(n0 + b) * xs.image());
                let acc = i32::from(dx_accumulate);
                let mut l = self.gpu.stream().launch_builder(&func);
                l.arg(&*col).arg(&geom).arg(&mut dxg).arg(&acc);
                // SAFETY: col2im_v1(const float* col, ConvGeom g, float* dx, int accumulate);
                // col holds K x B P floats, dxg the group's B C_in H W.
                unsafe { l.launch(grid_stride(b * xs.image())) }?;
            }
            n0 += b;
        }
        Ok(())
    }

    fn batchnorm_forward(
        &self,
        x: &CudaSlice<f32>,
        xs: Shape4,
        gamma: &CudaSlice<f32>,
        beta: &CudaSlice<f32>,
        running_mean: &mut CudaSlice<f32>,
        running_var: &mut CudaSlice<f32>,
        training: bool,
        saved: &mut Option<CudaSlice<f32>>,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let (n, c, hw) = (
            to_i32("N", xs.n)?,
            to_i32("C", xs.c)?,
            to_i32("HW", xs.h * xs.w)?,
        );
        check_len("batchnorm x", x.len(), xs.len())?;
        check_len("batchnorm y", y.len(), xs.len())?;
        for (what, b) in [
            ("gamma", gamma),
            ("beta", beta),
            ("running_mean", &*running_mean),
            ("running_var", &*running_var),
        ] {
            check_len(what, b.len(), xs.c)?;
        }
        let stream = self.gpu.stream().clone();
        if saved.as_ref().is_none_or(|s| s.len() != 4 * xs.c) {
            *saved = Some(stream.alloc_zeros::<f32>(4 * xs.c)?);
        }
        let saved = saved
            .as_mut()
            .ok_or_else(|| Error::Cuda("batchnorm statistics missing".into()))?;
        let eps = BN_EPS as f32;
        if training {
            let momentum = BN_MOMENTUM as f32;
            let func = self.function("batchnorm", "batchnorm_train_stats_v1")?;
            let mut l = stream.launch_builder(&func);
            l.arg(x).arg(&n).arg(&c).arg(&hw).arg(&momentum).arg(&eps);
            l.arg(&mut *saved).arg(running_mean).arg(running_var);
            // SAFETY: the kernel's signature; one block per channel, buffers checked above.
            unsafe { l.launch(blocks_of(xs.c, BN_THREADS)) }?;
        } else {
            let func = self.function("batchnorm", "batchnorm_eval_stats_v1")?;
            let mut l = stream.launch_builder(&func);
            l.arg(&*running_mean)
                .arg(&*running_var)
                .arg(&c)
                .arg(&eps)
                .arg(&mut *saved);
            // SAFETY: the kernel's signature; one thread per channel.
            unsafe { l.launch(blocks_of(xs.c.div_ceil(BLOCK as usize), BLOCK)) }?;
        }
        let func = self.function("batchnorm", "batchnorm_apply_v1")?;
        let mut l = stream.launch_builder(&func);
        l.arg(x)
            .arg(gamma)
            .arg(beta)
            .arg(&*saved)
            .arg(&n)
            .arg(&c)
            .arg(&hw)
            .arg(y);
        // SAFETY: the kernel's signature; x and y hold N C H W floats.
        unsafe { l.launch(grid_stride(xs.len())) }?;
        Ok(())
    }

    fn batchnorm_backward(
        &self,
        x: &CudaSlice<f32>,
        xs: Shape4,
        gamma: &CudaSlice<f32>,
        _running_mean: &CudaSlice<f32>,
        _running_var: &CudaSlice<f32>,
        training: bool,
        saved: &mut Option<CudaSlice<f32>>,
        dy: &CudaSlice<f32>,
        dx: Option<&mut CudaSlice<f32>>,
        dx_accumulate: bool,
        dgamma: &mut CudaSlice<f32>,
        dbeta: &mut CudaSlice<f32>,
    ) -> Result<()> {
        // The forward left mean and 1/std in `saved` (the running ones in eval mode).
        let (n, c, hw) = (
            to_i32("N", xs.n)?,
            to_i32("C", xs.c)?,
            to_i32("HW", xs.h * xs.w)?,
        );
        check_len("batchnorm dy", dy.len(), xs.len())?;
        let saved = saved
            .as_mut()
            .filter(|s| s.len() == 4 * xs.c)
            .ok_or_else(|| Error::Cuda("batchnorm backward before its forward".into()))?;
        let stream = self.gpu.stream().clone();
        let func = self.function("batchnorm", "batchnorm_bwd_reduce_v1")?;
        let mut l = stream.launch_builder(&func);
        l.arg(x)
            .arg(dy)
            .arg(&n)
            .arg(&c)
            .arg(&hw)
            .arg(&mut *saved)
            .arg(dgamma)
            .arg(dbeta);
        // SAFETY: the kernel's signature; one block per channel.
        unsafe { l.launch(blocks_of(xs.c, BN_THREADS)) }?;
        if let Some(dx) = dx {
            check_len("batchnorm dx", dx.len(), xs.len())?;
            let (tr, acc) = (i32::from(training), i32::from(dx_accumulate));
            let func = self.function("batchnorm", "batchnorm_bwd_dx_v1")?;
            let mut l = stream.launch_builder(&func);
            l.arg(x)
                .arg(dy)
                .arg(gamma)
                .arg(&*saved)
                .arg(&n)
                .arg(&c)
                .arg(&hw)
                .arg(&tr);
            l.arg(dx).arg(&acc);
            // SAFETY: the kernel's signature; N C H W elements.
            unsafe { l.launch(grid_stride(xs.len())) }?;
        }
        Ok(())
    }

    fn relu_forward(&self, x: &CudaSlice<f32>, y: &mut CudaSlice<f32>) -> Result<()> {
        self.elementwise("relu_fwd_v1", &[x], y, None)
    }
    fn relu_backward(
        &self,
        y: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
        accumulate: bool,
    ) -> Result<()> {
        self.elementwise("relu_bwd_v1", &[y, dy], dx, Some(accumulate))
    }
    fn add_into(&self, x: &CudaSlice<f32>, out: &mut CudaSlice<f32>) -> Result<()> {
        self.elementwise("add_v1", &[x], out, Some(true))
    }
    fn copy_or_add(
        &self,
        x: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        accumulate: bool,
    ) -> Result<()> {
        self.elementwise("add_v1", &[x], out, Some(accumulate))
    }
    fn avgpool_forward(
        &self,
        x: &CudaSlice<f32>,
        xs: Shape4,
        k: usize,
        y: &mut CudaSlice<f32>,
    ) -> Result<Shape4> {
        let ys = Shape4 {
            n: xs.n,
            c: xs.c,
            h: xs.h / k,
            w: xs.w / k,
        };
        check_len("avgpool x", x.len(), xs.len())?;
        check_len("avgpool y", y.len(), ys.len())?;
        let (planes, h, w, ki) = (
            to_i32("N C", xs.n * xs.c)?,
            to_i32("H", xs.h)?,
            to_i32("W", xs.w)?,
            to_i32("k", k)?,
        );
        let func = self.function("pool", "avgpool_fwd_v1")?;
        let mut l = self.gpu.stream().launch_builder(&func);
        l.arg(x).arg(&planes).arg(&h).arg(&w).arg(&ki).arg(y);
        // SAFETY: the kernel's signature; sizes checked above.
        unsafe { l.launch(grid_stride(ys.len())) }?;
        Ok(ys)
    }
    fn avgpool_backward(
        &self,
        xs: Shape4,
        k: usize,
        dy: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
        accumulate: bool,
    ) -> Result<()> {
        check_len("avgpool dy", dy.len(), xs.len() / (k * k))?;
        check_len("avgpool dx", dx.len(), xs.len())?;
        let (planes, h, w, ki) = (
            to_i32("N C", xs.n * xs.c)?,
            to_i32("H", xs.h)?,
            to_i32("W", xs.w)?,
            to_i32("k", k)?,
        );
        let acc = i32::from(accumulate);
        let func = self.function("pool", "avgpool_bwd_v1")?;
        let mut l = self.gpu.stream().launch_builder(&func);
        l.arg(dy)
            .arg(&planes)
            .arg(&h)
            .arg(&w)
            .arg(&ki)
            .arg(dx)
            .arg(&acc);
        // SAFETY: the kernel's signature; sizes checked above.
        unsafe { l.launch(grid_stride(xs.len())) }?;
        Ok(())
    }
    fn linear_forward(
        &self,
        x: &CudaSlice<f32>,
        n: usize,
        w: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        out: usize,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let inp = w.len() / out.max(1);
        check_len("linear x", x.len(), n * inp)?;
        check_len("linear b", b.len(), out)?;
        check_len("linear y", y.len(), n * out)?;
        let (rows, cols) = (to_i32("N", n)?, to_i32("out", out)?);
        let func = self.function("elementwise", "bias_rows_v1")?;
        let mut l = self.gpu.stream().launch_builder(&func);
        l.arg(b).arg(&mut *y).arg(&rows).arg(&cols);
        // SAFETY: bias_rows_v1(const float* b, float* y, int rows, int cols); sizes checked.
        unsafe { l.launch(grid_stride(n * out)) }?;
        // y (N x out) += x (N x in) W^T
        self.gemm(false, true, (n, out, inp), 1.0, x, inp, w, inp, 1.0, y, out)
    }
    fn linear_backward(
        &self,
        x: &CudaSlice<f32>,
        n: usize,
        w: &CudaSlice<f32>,
        out: usize,
        dy: &CudaSlice<f32>,
        dx: Option<&mut CudaSlice<f32>>,
        dx_accumulate: bool,
        dw: &mut CudaSlice<f32>,
        db: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let inp = w.len() / out.max(1);
        check_len("linear x", x.len(), n * inp)?;
        check_len("linear dy", dy.len(), n * out)?;
        check_len("linear dw", dw.len(), out * inp)?;
        check_len("linear db", db.len(), out)?;
        // dW (out x in) += dY^T (out x N) X (N x in)
        self.gemm(
            true,
            false,
            (out, inp, n),
            1.0,
            dy,
            out,
            x,
            inp,
            1.0,
            dw,
            inp,
        )?;
        let (rows, cols) = (to_i32("N", n)?, to_i32("out", out)?);
        let func = self.function("elementwise", "column_sums_v1")?;
        let mut l = self.gpu.stream().launch_builder(&func);
        l.arg(dy).arg(db).arg(&rows).arg(&cols);
        // SAFETY: column_sums_v1(const float* dy, float* db, int rows, int cols); one thread
        // per column.
        unsafe { l.launch(blocks_of(out.div_ceil(BLOCK as usize), BLOCK)) }?;
        if let Some(dx) = dx {
            check_len("linear dx", dx.len(), n * inp)?;
            let beta = if dx_accumulate { 1.0 } else { 0.0 };
            // dX (N x in) = dY (N x out) W (out x in)
            self.gemm(
                false,
                false,
                (n, inp, out),
                1.0,
                dy,
                out,
                w,
                inp,
                beta,
                dx,
                inp,
            )?;
        }
        Ok(())
    }
    fn instance_loss(
        &self,
        z: &CudaSlice<f32>,
        n: usize,
        d: usize,
        cfg: &LossConfig,
        loss: &mut CudaSlice<f32>,
        dz: &mut CudaSlice<f32>,
    ) -> Result<()> {
        validate_for_kernels(cfg)?;
        self.ensure_len(loss, 1)?;
        self.ensure_len(dz, n * d)?;
        let mut losses = lock(&self.losses)?;
        let l = match losses.entry((n, d)) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(CudaLoss::new(self.gpu.clone(), self.loss_version, n, d)?)
            }
        };
        l.enqueue(z, Some(dz), cfg)?;
        let func = self.function("elementwise", "f64_to_f32_v1")?;
        let one = 1i64;
        let mut b = self.gpu.stream().launch_builder(&func);
        b.arg(l.loss_buffer()).arg(loss).arg(&one);
        // SAFETY: f64_to_f32_v1(const double* x, float* out, long long len); one element each.
        unsafe { b.launch(grid_stride(1)) }?;
        Ok(())
    }
    fn axpy(
        &self,
        scale: f64,
        src: &CudaSlice<f32>,
        dst: &mut CudaSlice<f32>,
        accumulate: bool,
    ) -> Result<()> {
        check_len("axpy", src.len(), dst.len())?;
        let len = dst.len();
        let (alpha, n, acc) = (scale as f32, len as i64, i32::from(accumulate));
        let func = self.function("elementwise", "axpy_v1")?;
        let mut l = self.gpu.stream().launch_builder(&func);
        l.arg(&alpha).arg(src).arg(dst).arg(&n).arg(&acc);
        // SAFETY: axpy_v1(float alpha, const float* x, float* out, long long len, int acc).
        unsafe { l.launch(grid_stride(len)) }?;
        Ok(())
    }
    fn copy_scalar(&self, src: &CudaSlice<f32>, dst: &mut CudaSlice<f32>, at: usize) -> Result<()> {
        if src.is_empty() || at >= dst.len() {
            return Err(Error::invalid(format!(
                "copy_scalar: element {at} of a buffer of {}",
                dst.len()
            )));
        }
        let from = src.slice(0..1);
        let mut to = dst.slice_mut(at..at + 1);
        self.gpu.stream().memcpy_dtod(&from, &mut to)?;
        Ok(())
    }
    fn sgd_update(
        &self,
        w: &mut CudaSlice<f32>,
        g: &CudaSlice<f32>,
        v: &mut CudaSlice<f32>,
        lr: f64,
        momentum: f64,
        weight_decay: f64,
        nesterov: bool,
        first: bool,
    ) -> Result<()> {
        check_len("sgd gradient", g.len(), w.len())?;
        check_len("sgd momentum", v.len(), w.len())?;
        let (table, blocks) = self.sgd_table(&[(&*w, g, &*v)]);
        let device = self.gpu.stream().clone_htod(&table)?;
        let p = SgdParams::new(lr, momentum, weight_decay, nesterov, first, 1)?;
        self.sgd_launch(&device, blocks, p)
    }
    fn sgd_update_all(
        &self,
        params: &mut [Param<Self>],
        lr: f64,
        momentum: f64,
        weight_decay: f64,
        nesterov: bool,
        first: bool,
    ) -> Result<()> {
        if params.is_empty() {
            return Ok(());
        }
        for p in params.iter() {
            check_len(&p.name, p.grad.len(), p.value.len())?;
            check_len(&p.name, p.momentum.len(), p.value.len())?;
        }
        let list: Vec<_> = params
            .iter()
            .map(|p| (&p.value, &p.grad, &p.momentum))
            .collect();
        let (host, blocks) = self.sgd_table(&list);
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
        let p = SgdParams::new(lr, momentum, weight_decay, nesterov, first, params.len())?;
        self.sgd_launch(&t.device, t.blocks, p)
    }
    fn nearest(
        &self,
        queries: &[f32],
        keys: &[f32],
        d: usize,
        k: usize,
    ) -> Result<Vec<Vec<(f32, usize)>>> {
        if d == 0 || queries.len() % d != 0 || keys.len() % d != 0 {
            return Err(Error::invalid(format!(
                "kNN: {} query and {} key values are not rows of {d}",
                queries.len(),
                keys.len()
            )));
        }
        let (nq, nk) = (queries.len() / d, keys.len() / d);
        let k = k.min(nk);
        if k == 0 || nq == 0 {
            return Ok(vec![Vec::new(); nq]);
        }
        let stream = self.gpu.stream().clone();
        let keys_dev = stream.clone_htod(keys)?;
        let rows_per_block = (KNN_BLOCK / nk).clamp(1, nq);
        let mut sims = stream.alloc_zeros::<f32>(rows_per_block * nk)?;
        let mut top_val = stream.alloc_zeros::<f32>(rows_per_block * k)?;
        let mut top_idx = stream.alloc_zeros::<i32>(rows_per_block * k)?;
        let func = self.function("topk", "topk_rows_v1")?;
        let (cols, ki) = (to_i32("bank size", nk)?, to_i32("k", k)?);
        let mut out = Vec::with_capacity(nq);
        let mut q0 = 0;
        while q0 < nq {
            let rows = rows_per_block.min(nq - q0);
            let q_dev = stream.clone_htod(&queries[q0 * d..(q0 + rows) * d])?;
            // S (rows x nk) = Q K^T, in float32 whatever the training GEMMs use.
            self.gemm_in(
                GemmPrecision::F32,
                false,
                true,
                (rows, nk, d),
                1.0,
                &q_dev,
                d,
                &keys_dev,
                d,
                0.0,
                &mut sims,
                nk,
            )?;
            let rows_i = to_i32("queries", rows)?;
            let mut l = stream.launch_builder(&func);
            l.arg(&sims)
                .arg(&rows_i)
                .arg(&cols)
                .arg(&ki)
                .arg(&mut top_val)
                .arg(&mut top_idx);
            // SAFETY: topk_rows_v1(const float* s, int rows, int cols, int k, float* val,
            // int* idx); s holds rows x cols, the outputs rows x k, 1 <= k <= cols.
            unsafe { l.launch(blocks_of(rows, BLOCK)) }?;
            let vals = stream.clone_dtoh(&top_val)?;
            let idx = stream.clone_dtoh(&top_idx)?;
            for r in 0..rows {
                let mut row: Vec<(f32, usize)> = vals[r * k..(r + 1) * k]
                    .iter()
                    .zip(&idx[r * k..(r + 1) * k])
                    .map(|(&s, &j)| (s, j as usize))
                    .collect();
                row.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
                out.push(row);
            }
            q0 += rows;
        }
        Ok(out)
    }
    fn read_later(&self, buf: &CudaSlice<f32>) -> Result<PendingRead> {
        let len = buf.len();
        if len == 0 {
            return Ok(Box::new(|| Ok(Vec::new())));
        }
        let ctx = self.gpu.context();
        // SAFETY: the copy below writes every element before the closure reads them.
        // (Not write-combined: the host reads this memory.)
        let mut host = unsafe { ctx.alloc_pinned_with_flags::<f32>(len, 0) }?;
        let done = ctx.new_event(None)?;
        let stream = self.gpu.stream();
        stream.memcpy_dtoh(buf, &mut host)?;
        done.record(stream)?;
        Ok(Box::new(move || {
            done.synchronize()?;
            Ok(host.as_slice()?.iter().map(|&v| f64::from(v)).collect())
        }))
    }
    fn synchronize(&self) -> Result<()> {
        self.gpu.stream().synchronize()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// cuBLAS's SGEMM as its documentation defines it: column-major, element (i, j) of a
    /// matrix with leading dimension ld at i + j ld; C (m x n) = alpha op(A) op(B) + beta C.
    fn column_major_sgemm(cfg: &GemmConfig<f32>, a: &[f32], b: &[f32], c: &mut [f32]) {
        let t = |op: cublasOperation_t| op == cublasOperation_t::CUBLAS_OP_T;
        let (m, n, k) = (cfg.m as usize, cfg.n as usize, cfg.k as usize);
        let (lda, ldb, ldc) = (cfg.lda as usize, cfg.ldb as usize, cfg.ldc as usize);
        let at = |i: usize, l: usize| {
            if t(cfg.transa) {
                a[l + i * lda]
            } else {
                a[i + l * lda]
            }
        };
        let bt = |l: usize, j: usize| {
            if t(cfg.transb) {
                b[j + l * ldb]
            } else {
                b[l + j * ldb]
            }
        };
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..k)
                    .map(|l| f64::from(at(i, l)) * f64::from(bt(l, j)))
                    .sum();
                let c_ij = &mut c[i + j * ldc];
                *c_ij = (f64::from(cfg.alpha) * s + f64::from(cfg.beta) * f64::from(*c_ij)) as f32;
            }
        }
    }

    #[test]
    fn the_cublas_call_computes_the_row_major_product() {
        let (m, n, k) = (5usize, 7usize, 3usize);
        let mut r = crate::testing::rng(11);
        for trans_a in [false, true] {
            for trans_b in [false, true] {
                // Row-major storage with padded row strides, as the views of a workspace.
                let (a_rows, a_cols) = if trans_a { (k, m) } else { (m, k) };
                let (b_rows, b_cols) = if trans_b { (n, k) } else { (k, n) };
                let (lda, ldb, ldc) = (a_cols + 2, b_cols + 1, n + 3);
                let a = crate::testing::random_matrix(&mut r, a_rows, lda);
                let b = crate::testing::random_matrix(&mut r, b_rows, ldb);
                let c0 = crate::testing::random_matrix(&mut r, m, ldc);
                let a_ij = |i: usize, l: usize| {
                    if trans_a {
                        a[l * lda + i]
                    } else {
                        a[i * lda + l]
                    }
                };
                let b_ij = |l: usize, j: usize| {
                    if trans_b {
                        b[j * ldb + l]
                    } else {
                        b[l * ldb + j]
                    }
                };
                let (alpha, beta) = (0.75f32, -0.5f32);
                let cfg =
                    cublas_config(trans_a, trans_b, (m, n, k), alpha, lda, ldb, beta, ldc).unwrap();
                let mut c = c0.clone();
                column_major_sgemm(&cfg, &b, &a, &mut c); // operands swapped, as gemm_in does
                for i in 0..m {
                    for j in 0..n {
                        let s: f64 = (0..k)
                            .map(|l| f64::from(a_ij(i, l)) * f64::from(b_ij(l, j)))
                            .sum();
                        let want =
                            f64::from(alpha) * s + f64::from(beta) * f64::from(c0[i * ldc + j]);
                        let got = f64::from(c[i * ldc + j]);
                        assert!(
                            (got - want).abs() < 1e-5,
                            "trans {trans_a} {trans_b} C[{i}][{j}]: {got} vs {want}"
                        );
                    }
                    // The padding past column n is untouched.
                    assert_eq!(
                        c[i * ldc + n..(i + 1) * ldc],
                        c0[i * ldc + n..(i + 1) * ldc]
                    );
                }
            }
        }
    }
}
