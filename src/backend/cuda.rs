//! The CUDA backend: the graph's buffers live on one GPU and every op is a call into
//! `ops::<op>::cuda` on the GPU's stream (from the op's folder), so a training step is queued
//! without waiting (the losses come back asynchronously every few steps, see `trainer`). What
//! the backend itself keeps is the staged uploader, the pinned read-backs, the GEMM precision,
//! the [`Options`] its ops read (kernel versions, the loss version) and the [`Slots`] they
//! keep state in between launches (the convolution's workspace, the SGD pointer table, each
//! loss shape's scratch).
//!
//! Storage and sums are float32; the GEMMs multiply in float32, TF32 or with bfloat16
//! operands ([`GemmPrecision`]). `tests/gpu/nn.rs` runs every op against the CPU backend on a
//! GPU; `tests/emulated/kernels.rs` runs the same launchers on a CPU emulator in CI.

use std::sync::Arc;

use cudarc::driver::CudaSlice;

use super::{Backend, Options, PendingRead, Slots};
use crate::cuda::staging::{read_later, ReadBackPool, Uploader};
use crate::cuda::{DevPtr, DevPtrMut, GemmPrecision, Gpu};
use crate::error::{Error, Result};

/// The CUDA backend; see the module documentation.
pub struct CudaBackend {
    gpu: Arc<Gpu>,
    uploader: Uploader,
    read_backs: ReadBackPool,
    precision: GemmPrecision,
    options: Options,
    slots: Slots,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("gpu", &self.gpu)
            .field("precision", &self.precision)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// A buffer as a kernel's input.
pub fn dev(s: &CudaSlice<f32>) -> DevPtr<'_, f32> {
    DevPtr::of(s)
}

/// A buffer as a kernel's output.
pub fn dev_mut(s: &mut CudaSlice<f32>) -> DevPtrMut<'_, f32> {
    DevPtrMut::of(s)
}

impl CudaBackend {
    /// A backend on `gpu`: float32 GEMMs, every op's newest kernel version, `fused-v2` loss
    /// kernels ([`Backend::with_option`] chooses others).
    pub fn new(gpu: Arc<Gpu>) -> Result<Self> {
        gpu.blas()?; // libcublas is needed by every GEMM: say so now, not mid-step
        Ok(CudaBackend {
            uploader: Uploader::new(gpu.clone())?,
            read_backs: ReadBackPool::default(),
            gpu,
            precision: GemmPrecision::F32,
            options: Options::default(),
            slots: Slots::default(),
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

    /// The state ops keep on this backend between launches.
    pub fn slots(&self) -> &Slots {
        &self.slots
    }

    /// `len` zeroed floats. An empty buffer is refused: cuMemAlloc documents a zero-byte
    /// allocation as an error, and no op of ours needs one (the tape makes a node's gradient
    /// and scratch only where an op uses them).
    pub fn alloc(&self, len: usize) -> Result<CudaSlice<f32>> {
        if len == 0 {
            return Err(Error::invalid(
                "internal: an empty device buffer was requested (invaspread makes none)",
            ));
        }
        Ok(self.gpu.stream().alloc_zeros::<f32>(len)?)
    }
}

impl Backend for CudaBackend {
    type Buffer = CudaSlice<f32>;
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
    fn read_later(&self, buf: &CudaSlice<f32>) -> Result<PendingRead> {
        read_later(&self.gpu, &self.read_backs, buf)
    }
    fn synchronize(&self) -> Result<()> {
        self.gpu.stream().synchronize()?;
        Ok(())
    }
    fn options(&self) -> &Options {
        &self.options
    }
    fn options_mut(&mut self) -> &mut Options {
        &mut self.options
    }
}
