//! The CUDA runtime, and nothing of any op: the device and its module cache, how a launch is
//! described and queued, the one cuBLAS front, and staged host-device copies.
//!
//! | module | what it holds |
//! |---|---|
//! | this file | [`Gpu`]: a device handle that never panics when CUDA is missing, its stream, a lazily filled cache of the kernel modules build.rs compiled and embedded, and its [`Queue`] implementation |
//! | [`launch`] | [`DevPtr`]/[`DevPtrMut`], [`KernelArgs`], [`Geometry`], a row-major [`Gemm`] in a [`GemmPrecision`], the [`Queue`] trait (a GPU or the tests' emulator), size checks, NVTX phases |
//! | [`foreign`] | [`ForeignStream`]: launches on a stream and memory another runtime owns (PyTorch's current stream, for the Python op) |
//! | [`blas`] | the cuBLAS front: one handle per GPU, the tested row-major to column-major mapping, bf16 operand conversion |
//! | [`staging`] | pinned staged uploads on a copy stream, asynchronous read-backs |
//! | [`virtual_gpu`] | `INVASPREAD_GPU`: a real GPU, the virtual one (vgpu/, the CUDA path on the CPU), or none |
//!
//! libcuda is opened at run time (cudarc's dynamic loading), so nothing CUDA is needed to build,
//! link or run on a machine without a GPU; [`Gpu::try_new`] then answers `Ok(None)`.

pub mod blas;
pub mod foreign;
pub mod launch;
pub mod staging;
pub mod virtual_gpu;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};
use cudarc::nvrtc::Ptx;

pub use foreign::ForeignStream;
pub use launch::{
    check_len, phase, to_i32, Carve, DevPtr, DevPtrMut, Gemm, GemmPrecision, Geometry, Kernel,
    KernelArgs, Queue, BLOCK,
};

use crate::error::{Error, Result};

/// What build.rs compiled: the modules, the nvcc targets and ptxas's report.
pub mod kernels {
    include!(concat!(env!("OUT_DIR"), "/kernels_generated.rs"));
}

/// One CUDA device with its context, a stream, and the modules loaded on it so far.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    /// Kernel handles already looked up (a training step launches a few hundred).
    functions: Mutex<HashMap<(&'static str, String), CudaFunction>>,
    /// The cuBLAS handle, made on the first GEMM.
    blas: OnceLock<blas::Blas>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("ordinal", &self.ctx.ordinal())
            .finish_non_exhaustive()
    }
}

/// Runs a cudarc call that may panic (cudarc panics when libcuda lacks a symbol it expects)
/// and turns the panic into an error.
fn guarded<T>(what: &str, call: impl FnOnce() -> T + std::panic::UnwindSafe) -> Result<T> {
    std::panic::catch_unwind(call).map_err(|payload| {
        let msg = payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".into());
        Error::Cuda(format!("{what}: {msg}"))
    })
}

/// The number of CUDA devices: `Ok(0)` when libcuda is absent or reports no device.
pub fn device_count() -> Result<usize> {
    if !virtual_gpu::prepare()? {
        return Ok(0);
    }
    // SAFETY: only tries to open the shared library, no symbol is called.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Ok(0);
    }
    match guarded("loading libcuda", CudaContext::device_count)? {
        Ok(count) => Ok(count.max(0) as usize),
        Err(e) if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_NO_DEVICE => Ok(0),
        Err(e) => Err(Error::Cuda(format!("cuInit/cuDeviceGetCount failed: {e}"))),
    }
}

/// The CUDA version the driver supports, as (major, minor), when libcuda is present.
pub fn driver_version() -> Option<(i32, i32)> {
    if device_count().is_err() || !unsafe { cudarc::driver::sys::is_culib_present() } {
        return None;
    }
    let mut version = 0i32;
    // SAFETY: cuDriverGetVersion writes one int and needs no initialisation.
    let status = guarded("cuDriverGetVersion", move || unsafe {
        cudarc::driver::sys::cuDriverGetVersion(&mut version as *mut i32);
        version
    });
    status
        .ok()
        .filter(|&v| v > 0)
        .map(|v| (v / 1000, (v % 1000) / 10))
}

impl Gpu {
    /// Device 0, or `Ok(None)` when there is no libcuda or no device. Never panics.
    pub fn try_new() -> Result<Option<Gpu>> {
        Self::try_new_ordinal(0)
    }

    /// The device with the given ordinal, or `Ok(None)` when it does not exist.
    pub fn try_new_ordinal(ordinal: usize) -> Result<Option<Gpu>> {
        if ordinal >= device_count()? {
            return Ok(None);
        }
        let ctx = guarded("creating a CUDA context", move || CudaContext::new(ordinal))??;
        // SAFETY: this crate orders its work itself: everything runs on `stream`, except the
        // CUDA backend's copy stream, which synchronises with it through explicit events
        // (cuda::staging). Without this, a second stream would make cudarc record and wait
        // on events around every kernel argument of every launch.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        Ok(Some(Gpu {
            ctx,
            stream,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            blas: OnceLock::new(),
        }))
    }

    /// Device `ordinal` (a data-parallel rank's `LOCAL_RANK`), or an error naming it and the
    /// devices there are.
    pub fn require_ordinal(ordinal: usize) -> Result<Gpu> {
        if ordinal == 0 {
            return Self::require();
        }
        if !kernels::BUILT {
            return Err(Error::KernelsNotBuilt(kernels::NOT_BUILT_REASON));
        }
        match Self::try_new_ordinal(ordinal)? {
            Some(gpu) => Ok(gpu),
            None => Err(Error::NoDevice(format!(
                "device {ordinal} was asked for (LOCAL_RANK), the CUDA driver reports {} \
                 (ordinals from 0); on the virtual GPU, INVASPREAD_VGPU_DEVICES sets how many",
                device_count()?
            ))),
        }
    }

    /// Like [`Gpu::try_new`], but no device is an error saying why (for `--device cuda`).
    pub fn require() -> Result<Gpu> {
        if !kernels::BUILT {
            return Err(Error::KernelsNotBuilt(kernels::NOT_BUILT_REASON));
        }
        match Self::try_new()? {
            Some(gpu) => Ok(gpu),
            None if unsafe { cudarc::driver::sys::is_culib_present() } => {
                Err(Error::NoDevice("the CUDA driver reports no device".into()))
            }
            None => Err(Error::NoDevice(
                "libcuda (the NVIDIA driver) was not found".into(),
            )),
        }
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Whether this is the virtual GPU (`INVASPREAD_GPU=virtual`), not a real one.
    pub fn is_virtual(&self) -> bool {
        virtual_gpu::is_active()
    }

    /// The stream every launch of this crate goes to.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The device's name, e.g. "NVIDIA H100 80GB HBM3".
    pub fn name(&self) -> Result<String> {
        Ok(self.ctx.name()?)
    }

    /// (major, minor) compute capability.
    pub fn compute_capability(&self) -> Result<(i32, i32)> {
        Ok(self.ctx.compute_capability()?)
    }

    /// Total device memory in bytes.
    pub fn total_memory(&self) -> Result<usize> {
        Ok(self.ctx.total_mem()?)
    }

    /// A kernel from the module compiled from `kernels/<module>.cu`, loading the module on
    /// first use; handles are cached.
    pub fn function(&self, module: &'static str, name: &str) -> Result<CudaFunction> {
        if !kernels::BUILT {
            return Err(Error::KernelsNotBuilt(kernels::NOT_BUILT_REASON));
        }
        let cache = || {
            self.functions
                .lock()
                .map_err(|_| Error::Cuda("function cache poisoned".into()))
        };
        let key = (module, name.to_string());
        if let Some(f) = cache()?.get(&key) {
            return Ok(f.clone());
        }
        let f = self.load_function(module, name)?;
        cache()?.insert(key, f.clone());
        Ok(f)
    }

    fn load_function(&self, module: &'static str, name: &str) -> Result<CudaFunction> {
        let loaded = {
            let mut cache = self
                .modules
                .lock()
                .map_err(|_| Error::Cuda("module cache poisoned".into()))?;
            match cache.get(module) {
                Some(m) => m.clone(),
                None => {
                    let image = kernels::MODULES
                        .iter()
                        .find(|(stem, _)| *stem == module)
                        .map(|(_, image)| *image)
                        .ok_or_else(|| {
                            Error::Cuda(format!("no kernel module kernels/{module}.cu was built"))
                        })?;
                    let m = self
                        .ctx
                        .load_module(Ptx::from_binary(image.to_vec()))
                        .map_err(|e| {
                            Error::Cuda(format!("loading module kernels/{module}.cu: {e}"))
                        })?;
                    cache.insert(module, m.clone());
                    m
                }
            }
        };
        loaded
            .load_function(name)
            .map_err(|e| Error::Cuda(format!("kernel {name} in kernels/{module}.cu: {e}")))
    }
}

impl Gpu {
    /// The cuBLAS front on this GPU's stream (made on first use).
    pub fn blas(&self) -> Result<&blas::Blas> {
        if let Some(b) = self.blas.get() {
            return Ok(b);
        }
        let made = blas::Blas::new(self)?;
        Ok(self.blas.get_or_init(|| made))
    }
}

impl Gpu {
    /// Queues `kernel` on `stream`, a stream of this GPU's context (its own, or a
    /// [`ForeignStream`]'s).
    ///
    /// # Safety
    /// As [`Queue::launch`]; `stream` is a live stream of this context.
    unsafe fn launch_on(
        &self,
        stream: cudarc::driver::sys::CUstream,
        kernel: Kernel,
        geometry: Geometry,
        args: &mut KernelArgs,
    ) -> Result<()> {
        let f = self.function(kernel.module, kernel.name)?;
        self.ctx.bind_to_thread()?;
        let mut params = args.pointers();
        // SAFETY: the caller guarantees that `args` matches the kernel's signature, that the
        // memory it addresses is live and that the stream belongs to this context.
        unsafe {
            cudarc::driver::result::launch_kernel(
                f.cu_function(),
                geometry.grid,
                (geometry.block, 1, 1),
                geometry.shared_bytes,
                stream,
                &mut params,
            )
        }
        .map_err(|e| Error::Cuda(format!("launching {}: {e}", kernel.name)))
    }
}

impl Queue for Gpu {
    unsafe fn launch(
        &self,
        kernel: Kernel,
        geometry: Geometry,
        args: &mut KernelArgs,
    ) -> Result<()> {
        // SAFETY: the caller's guarantees; the stream is this GPU's own.
        unsafe { self.launch_on(self.stream.cu_stream(), kernel, geometry, args) }
    }

    fn gemm(&self, gemm: &Gemm<'_>) -> Result<()> {
        self.blas()?.gemm(self, gemm)
    }

    fn read<T: bytemuck::Pod>(&self, src: DevPtr<'_, T>, dst: &mut [T]) -> Result<()> {
        if src.len() != dst.len() {
            return Err(Error::invalid(format!(
                "reading {} device elements into {} host ones",
                src.len(),
                dst.len()
            )));
        }
        if dst.is_empty() {
            return Ok(());
        }
        self.ctx.bind_to_thread()?;
        // SAFETY: src addresses `dst.len()` live elements of T on this device; the host slice
        // is borrowed until the stream has finished the copy (synchronised below).
        unsafe {
            cudarc::driver::result::memcpy_dtoh_async(dst, src.addr(), self.stream.cu_stream())
        }?;
        self.stream.synchronize()?;
        Ok(())
    }
}
