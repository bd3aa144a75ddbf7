//! The CUDA runtime: a device handle that never panics when CUDA is missing, and a lazily filled
//! cache of the kernel modules that build.rs compiled and embedded.
//!
//! libcuda is opened at run time (cudarc's dynamic loading), so nothing CUDA is needed to build,
//! link or run on a machine without a GPU; [`Gpu::try_new`] then answers `Ok(None)`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};
use cudarc::nvrtc::Ptx;

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
        // (nn::cuda_backend). Without this, a second stream would make cudarc record and wait
        // on events around every kernel argument of every launch.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        Ok(Some(Gpu {
            ctx,
            stream,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
        }))
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

/// Converts a size to the `int` the kernels take, with an error rather than a silent wrap.
pub(crate) fn to_i32(what: &str, value: usize) -> Result<i32> {
    i32::try_from(value).map_err(|_| {
        Error::invalid(format!(
            "{what} = {value} is too large for the CUDA kernels (at most {})",
            i32::MAX
        ))
    })
}
