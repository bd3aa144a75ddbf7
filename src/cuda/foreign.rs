//! Launches on memory and a stream that another runtime owns: PyTorch's tensors and its current
//! stream, for the Python op (`python/`).
//!
//! PyTorch's CUDA runtime works in each device's primary context, which is also the context
//! cudarc retains for a [`Gpu`], so a device address PyTorch allocated is valid in the Gpu's
//! context and its streams are streams of that context. What this module adds to a [`Gpu`] is
//! a [`Queue`] that launches on a stream handed in as a raw handle (the Gpu's module cache,
//! context and error handling stay the Gpu's), and [`foreign_ptr`]/[`foreign_ptr_mut`], the
//! typed views of memory handed in as raw addresses, each checked to be device memory.
//!
//! Nothing here allocates, copies to the host, or synchronises: the caller's stream orders the
//! work with everything else the caller queued, as a PyTorch op's kernels are ordered.

use cudarc::driver::sys::CUstream;

use super::launch::{DevPtr, DevPtrMut, Gemm, Geometry, Kernel, KernelArgs, Queue};
use super::Gpu;
use crate::error::{Error, Result};

/// A [`Queue`] on `gpu` whose launches go to a stream another runtime created in the same
/// (primary) context.
pub struct ForeignStream<'g> {
    gpu: &'g Gpu,
    stream: CUstream,
}

impl<'g> ForeignStream<'g> {
    /// Launches of `gpu`'s kernels on the stream with raw handle `stream` (0: the legacy
    /// default stream; PyTorch's `torch.cuda.current_stream().cuda_stream`).
    ///
    /// # Safety
    /// `stream` is 0 or a live stream of `gpu`'s context (the device's primary context), and
    /// stays live while this queue is used.
    pub unsafe fn new(gpu: &'g Gpu, stream: u64) -> Self {
        ForeignStream {
            gpu,
            stream: stream as usize as CUstream,
        }
    }

    pub fn gpu(&self) -> &Gpu {
        self.gpu
    }
}

impl Queue for ForeignStream<'_> {
    unsafe fn launch(
        &self,
        kernel: Kernel,
        geometry: Geometry,
        args: &mut KernelArgs,
    ) -> Result<()> {
        // SAFETY: the caller's guarantees for `args`; `new`'s for the stream.
        unsafe { self.gpu.launch_on(self.stream, kernel, geometry, args) }
    }

    fn gemm(&self, _gemm: &Gemm<'_>) -> Result<()> {
        // The crate's cuBLAS handle is bound to the Gpu's own stream; rebinding it to a caller's
        // stream per call would race with the crate's own GEMMs.
        Err(Error::invalid(
            "a cuBLAS product (the unfused-cublas version) runs on the crate's own stream only, \
             not on a stream handed in: choose a version without cuBLAS",
        ))
    }

    fn read<T: bytemuck::Pod>(&self, _src: DevPtr<'_, T>, _dst: &mut [T]) -> Result<()> {
        // A read-back would synchronise the caller's stream behind its back.
        Err(Error::invalid(
            "reading device memory back on a stream handed in is not done: the caller reads \
             its own tensors",
        ))
    }
}

/// Checks that `[addr, addr + bytes)` starts in device memory of the current context (not
/// host memory, not nothing), aligned for `align` bytes; `what` names it in errors.
fn check_device_memory(what: &str, addr: u64, bytes: usize, align: usize) -> Result<()> {
    if bytes == 0 {
        return Ok(());
    }
    if addr == 0 {
        return Err(Error::invalid(format!(
            "{what}: a null device address for {bytes} bytes"
        )));
    }
    if !addr.is_multiple_of(align as u64) {
        return Err(Error::invalid(format!(
            "{what}: device address {addr:#x} is not aligned to {align} bytes"
        )));
    }
    let mut memory_type = 0u32;
    // SAFETY: writes one unsigned int; any address may be asked about.
    let status = unsafe {
        cudarc::driver::sys::cuPointerGetAttribute(
            (&mut memory_type as *mut u32).cast(),
            cudarc::driver::sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
            addr,
        )
    };
    let device = cudarc::driver::sys::CUmemorytype::CU_MEMORYTYPE_DEVICE as u32;
    if status != cudarc::driver::sys::CUresult::CUDA_SUCCESS || memory_type != device {
        return Err(Error::invalid(format!(
            "{what}: address {addr:#x} is not device memory of this GPU's context \
             ({status:?}, memory type {memory_type})"
        )));
    }
    Ok(())
}

/// Read access to `len` elements of `T` at device address `addr`, checked to be device memory
/// of `gpu`'s context.
///
/// # Safety
/// `addr` addresses `len` live elements of `T` on `gpu`'s device for `'a`, not written while
/// the queued work reads them.
pub unsafe fn foreign_ptr<'a, T>(
    gpu: &Gpu,
    what: &str,
    addr: u64,
    len: usize,
) -> Result<DevPtr<'a, T>> {
    gpu.context().bind_to_thread()?;
    check_device_memory(what, addr, len * size_of::<T>(), align_of::<T>())?;
    Ok(DevPtr::from_raw(addr, len))
}

/// Write access to `len` elements of `T` at device address `addr`, checked as [`foreign_ptr`].
///
/// # Safety
/// As [`foreign_ptr`], and nothing else reads or writes the memory while the queued work
/// writes it.
pub unsafe fn foreign_ptr_mut<'a, T>(
    gpu: &Gpu,
    what: &str,
    addr: u64,
    len: usize,
) -> Result<DevPtrMut<'a, T>> {
    gpu.context().bind_to_thread()?;
    check_device_memory(what, addr, len * size_of::<T>(), align_of::<T>())?;
    Ok(DevPtrMut::from_raw(addr, len))
}
