//! What a kernel launch is, written once for every device that runs the kernels: typed device
//! addresses ([`DevPtr`], [`DevPtrMut`]), the argument list in the form `cuLaunchKernel` takes
//! ([`KernelArgs`]), the launch geometry ([`Geometry`]), a row-major GEMM ([`Gemm`]), and the
//! [`Queue`] that executes them.
//!
//! Two queues exist: a real GPU ([`Gpu`](super::Gpu)) and the CPU kernel emulator of the tests
//! (`tests/emulator/`), where device addresses are host addresses. Every op's `cuda.rs` builds
//! its launches from these pieces and is generic over the queue, so the emulated tests run the
//! very launchers a training run uses: geometry and argument lists are written once.

use std::ffi::c_void;
use std::marker::PhantomData;
use std::ops::Range;

use bytemuck::Pod;
use cudarc::driver::CudaSlice;

use crate::error::{Error, Result};

/// Read access to `len` elements of type `T` at a device address, borrowed for `'a`.
#[derive(Debug)]
pub struct DevPtr<'a, T> {
    addr: u64,
    len: usize,
    _mem: PhantomData<&'a [T]>,
}

impl<T> Clone for DevPtr<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for DevPtr<'_, T> {}

/// Write access to `len` elements of type `T` at a device address, borrowed for `'a`.
#[derive(Debug)]
pub struct DevPtrMut<'a, T> {
    addr: u64,
    len: usize,
    _mem: PhantomData<&'a mut [T]>,
}

fn sub_range(what: &str, len: usize, range: &Range<usize>) -> Result<()> {
    if range.start > range.end || range.end > len {
        return Err(Error::invalid(format!(
            "{what}: elements {range:?} of a buffer of {len}"
        )));
    }
    Ok(())
}

impl<'a, T> DevPtr<'a, T> {
    /// The memory of a cudarc slice. The crate turns off cudarc's per-slice event tracking
    /// (see [`Gpu::try_new_ordinal`](super::Gpu::try_new_ordinal)) and orders work itself, so
    /// the raw address is all a launch needs.
    pub fn of(slice: &'a CudaSlice<T>) -> Self {
        use cudarc::driver::DevicePtr;
        let (addr, _no_tracking) = slice.device_ptr(slice.stream());
        DevPtr {
            addr,
            len: slice.len(),
            _mem: PhantomData,
        }
    }

    /// Memory handed in as a raw address (checked by `cuda::foreign`).
    pub(super) fn from_raw(addr: u64, len: usize) -> Self {
        DevPtr {
            addr,
            len,
            _mem: PhantomData,
        }
    }

    /// Host memory as the emulator's device memory (its device addresses are host addresses).
    pub fn host(mem: &'a [T]) -> Self {
        DevPtr {
            addr: mem.as_ptr() as u64,
            len: mem.len(),
            _mem: PhantomData,
        }
    }

    /// No memory: for a parameter the kernel does not touch in this configuration.
    pub fn null() -> Self {
        DevPtr {
            addr: 0,
            len: 0,
            _mem: PhantomData,
        }
    }

    pub fn addr(&self) -> u64 {
        self.addr
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Elements `range` of this memory.
    pub fn slice(self, range: Range<usize>) -> Result<DevPtr<'a, T>> {
        sub_range("DevPtr::slice", self.len, &range)?;
        Ok(DevPtr {
            addr: self.addr + (range.start * size_of::<T>()) as u64,
            len: range.len(),
            _mem: PhantomData,
        })
    }
}

impl<'a, T> DevPtrMut<'a, T> {
    /// Memory handed in as a raw address (checked by `cuda::foreign`).
    pub(super) fn from_raw(addr: u64, len: usize) -> Self {
        DevPtrMut {
            addr,
            len,
            _mem: PhantomData,
        }
    }

    /// The memory of a cudarc slice (see [`DevPtr::of`]).
    pub fn of(slice: &'a mut CudaSlice<T>) -> Self {
        use cudarc::driver::DevicePtrMut;
        let len = slice.len();
        let stream = slice.stream().clone();
        let (addr, _no_tracking) = slice.device_ptr_mut(&stream);
        DevPtrMut {
            addr,
            len,
            _mem: PhantomData,
        }
    }

    /// Host memory as the emulator's device memory.
    pub fn host(mem: &'a mut [T]) -> Self {
        DevPtrMut {
            addr: mem.as_mut_ptr() as u64,
            len: mem.len(),
            _mem: PhantomData,
        }
    }

    /// No memory (see [`DevPtr::null`]).
    pub fn null() -> Self {
        DevPtrMut {
            addr: 0,
            len: 0,
            _mem: PhantomData,
        }
    }

    pub fn addr(&self) -> u64 {
        self.addr
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Read access to the same memory for the whole borrow.
    pub fn into_const(self) -> DevPtr<'a, T> {
        DevPtr {
            addr: self.addr,
            len: self.len,
            _mem: PhantomData,
        }
    }

    /// Read access to the same memory for a shorter borrow.
    pub fn as_const(&self) -> DevPtr<'_, T> {
        DevPtr {
            addr: self.addr,
            len: self.len,
            _mem: PhantomData,
        }
    }

    /// The same access for a shorter borrow (to pass to a launch and keep using afterwards).
    pub fn reborrow(&mut self) -> DevPtrMut<'_, T> {
        DevPtrMut {
            addr: self.addr,
            len: self.len,
            _mem: PhantomData,
        }
    }

    /// Elements `range`, for a shorter borrow.
    pub fn slice_mut(&mut self, range: Range<usize>) -> Result<DevPtrMut<'_, T>> {
        self.reborrow().into_slice(range)
    }

    /// Elements `range`, keeping the whole borrow.
    pub fn into_slice(self, range: Range<usize>) -> Result<DevPtrMut<'a, T>> {
        sub_range("DevPtrMut::into_slice", self.len, &range)?;
        Ok(DevPtrMut {
            addr: self.addr + (range.start * size_of::<T>()) as u64,
            len: range.len(),
            _mem: PhantomData,
        })
    }

    /// Elements `range` for reading, for a shorter borrow.
    pub fn slice(&self, range: Range<usize>) -> Result<DevPtr<'_, T>> {
        self.as_const().slice(range)
    }

    /// The same bytes as elements of `U` (a float64 that travels through a float32
    /// collective as two words): the length in bytes must divide into `U`s at an aligned
    /// address. Kernels see an address only, so no value is reinterpreted on the host.
    pub fn cast<U>(self) -> Result<DevPtrMut<'a, U>> {
        let bytes = self.len * size_of::<T>();
        if !bytes.is_multiple_of(size_of::<U>())
            || !self.addr.is_multiple_of(align_of::<U>() as u64)
        {
            return Err(Error::invalid(format!(
                "DevPtrMut::cast: {bytes} bytes at {:#x} are not whole elements of {} bytes",
                self.addr,
                size_of::<U>()
            )));
        }
        Ok(DevPtrMut {
            addr: self.addr,
            len: bytes / size_of::<U>(),
            _mem: PhantomData,
        })
    }
}

/// Typed pieces cut from one untyped allocation, each aligned to 256 bytes (as cudaMalloc's
/// own allocations are): scratch that is laid out once, allocated once and shared by every
/// device the same way.
///
/// On the virtual GPU each piece is followed by a gap ([`virtual_gpu::carve_gap`]) and reported
/// to its memcheck, so that a kernel running past its piece is caught although it stays inside
/// the allocation. The sizing pass adds the same gaps, so sizes always agree.
///
/// [`virtual_gpu::carve_gap`]: super::virtual_gpu::carve_gap
pub struct Carve<'a> {
    base: u64,
    capacity: usize,
    used: usize,
    _mem: PhantomData<&'a mut [u8]>,
}

const CARVE_ALIGN: usize = 256;

impl<'a> Carve<'a> {
    /// Cuts pieces from `arena`.
    pub fn from(arena: DevPtrMut<'a, u8>) -> Self {
        Carve {
            base: arena.addr,
            capacity: arena.len,
            used: 0,
            _mem: PhantomData,
        }
    }

    /// A carve over no memory that only adds up the bytes asked for (a sizing pass: its
    /// pieces are never handed to a kernel).
    pub fn sizing() -> Carve<'static> {
        Carve {
            base: 0,
            capacity: usize::MAX,
            used: 0,
            _mem: PhantomData,
        }
    }

    /// The next `len` elements of type `T`.
    pub fn take<T>(&mut self, len: usize) -> Result<DevPtrMut<'a, T>> {
        let start = self.used.next_multiple_of(CARVE_ALIGN);
        let bytes = len
            .checked_mul(size_of::<T>())
            .and_then(|b| b.checked_add(start))
            .filter(|&end| end <= self.capacity)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "scratch of {} bytes cannot hold {len} more elements of {} bytes",
                    self.capacity,
                    size_of::<T>()
                ))
            })?;
        self.used = bytes + super::virtual_gpu::carve_gap();
        let addr = self.base + start as u64;
        if self.base != 0 {
            super::virtual_gpu::mark_piece(addr, bytes - start)?;
        }
        Ok(DevPtrMut {
            addr,
            len,
            _mem: PhantomData,
        })
    }

    /// Bytes taken so far.
    pub fn used(&self) -> usize {
        self.used
    }
}

/// A kernel of one of the modules build.rs compiled: `kernels/<module>.cu`, function `name`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Kernel {
    pub module: &'static str,
    pub name: &'static str,
}

impl Kernel {
    pub const fn new(module: &'static str, name: &'static str) -> Self {
        Kernel { module, name }
    }
}

/// A kernel's arguments as `cuLaunchKernel` takes them: one value per parameter, in order.
/// Each value is kept in its own 8-byte-aligned storage, so the pointers handed to the driver
/// (or the emulator, which reads each parameter through its C type) stay valid and aligned.
#[derive(Debug, Default)]
pub struct KernelArgs {
    values: Vec<Box<[u64]>>,
}

impl KernelArgs {
    pub fn new() -> Self {
        KernelArgs::default()
    }

    /// A by-value parameter (an integer, a float, a `#[repr(C)]` parameter struct).
    pub fn value<T: Pod>(&mut self, v: T) -> &mut Self {
        let bytes = bytemuck::bytes_of(&v);
        let mut words = vec![0u64; bytes.len().div_ceil(8).max(1)].into_boxed_slice();
        bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..bytes.len()].copy_from_slice(bytes);
        self.values.push(words);
        self
    }

    /// A `const T*` parameter.
    pub fn input<T>(&mut self, p: DevPtr<'_, T>) -> &mut Self {
        self.value(p.addr)
    }

    /// A `T*` parameter the kernel writes through.
    pub fn output<T>(&mut self, p: &mut DevPtrMut<'_, T>) -> &mut Self {
        self.value(p.addr)
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The parameter pointers, `void** kernelParams` of `cuLaunchKernel`.
    pub fn pointers(&mut self) -> Vec<*mut c_void> {
        self.values
            .iter_mut()
            .map(|v| v.as_mut_ptr() as *mut c_void)
            .collect()
    }
}

/// Threads per block of the grid-stride and per-row launches.
pub const BLOCK: u32 = 256;

/// A launch's grid, its (one-dimensional) blocks and dynamic shared memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub grid: (u32, u32, u32),
    pub block: u32,
    pub shared_bytes: u32,
}

impl Geometry {
    /// `blocks` blocks of `threads` (at least one block).
    pub fn blocks(blocks: usize, threads: u32) -> Self {
        Geometry {
            grid: (blocks.max(1) as u32, 1, 1),
            block: threads,
            shared_bytes: 0,
        }
    }

    /// A grid-stride loop over `total` elements: blocks of [`BLOCK`], at most 2^20 of them.
    pub fn grid_stride(total: usize) -> Self {
        Self::blocks(total.div_ceil(BLOCK as usize).min(1 << 20), BLOCK)
    }

    /// A 2-d grid of `x` by `y` blocks of `threads`.
    pub fn grid_2d(x: usize, y: usize, threads: u32) -> Self {
        Geometry {
            grid: (x.max(1) as u32, y.max(1) as u32, 1),
            block: threads,
            shared_bytes: 0,
        }
    }
}

/// How a GEMM multiplies. Storage and accumulation are float32 in every mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum GemmPrecision {
    /// Full float32 SGEMM (the parity tests use it).
    #[default]
    F32,
    /// TF32 tensor cores on float32 data (10-bit mantissa products, float32 sums); what
    /// PyTorch uses for cuDNN convolutions by default.
    Tf32,
    /// Operands rounded to bfloat16, float32 accumulation (mixed precision).
    Bf16,
}
crate::serde_by_name!(GemmPrecision);

/// Row-major C (m x n) = alpha op(A) op(B) + beta C, where op(A) is m x k and op(B) is k x n;
/// `lda`, `ldb`, `ldc` are row strides of the matrices as stored.
#[derive(Debug)]
pub struct Gemm<'a> {
    pub trans_a: bool,
    pub trans_b: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub alpha: f32,
    pub a: DevPtr<'a, f32>,
    pub lda: usize,
    pub b: DevPtr<'a, f32>,
    pub ldb: usize,
    pub beta: f32,
    pub c: DevPtrMut<'a, f32>,
    pub ldc: usize,
    pub precision: GemmPrecision,
}

/// Elements a row-major `rows` x `cols` matrix with row stride `ld` spans, or an error when
/// the stride is shorter than a row.
fn extent(what: &str, rows: usize, cols: usize, ld: usize) -> Result<usize> {
    if rows == 0 || cols == 0 {
        return Ok(0);
    }
    if ld < cols {
        return Err(Error::invalid(format!(
            "GEMM {what}: row stride {ld} is shorter than its {cols} columns"
        )));
    }
    Ok((rows - 1) * ld + cols)
}

impl Gemm<'_> {
    /// Checks that every operand's buffer holds the matrix its dimensions and stride describe.
    pub fn check(&self) -> Result<()> {
        let (ar, ac) = if self.trans_a {
            (self.k, self.m)
        } else {
            (self.m, self.k)
        };
        let (br, bc) = if self.trans_b {
            (self.n, self.k)
        } else {
            (self.k, self.n)
        };
        for (what, need, have) in [
            ("A", extent("A", ar, ac, self.lda)?, self.a.len()),
            ("B", extent("B", br, bc, self.ldb)?, self.b.len()),
            ("C", extent("C", self.m, self.n, self.ldc)?, self.c.len()),
        ] {
            if have < need {
                return Err(Error::invalid(format!(
                    "GEMM {what}: a buffer of {have} floats, the {}x{}x{} product needs {need}",
                    self.m, self.n, self.k
                )));
            }
        }
        Ok(())
    }

    /// Element (i, l) of op(A) and (l, j) of op(B) as offsets into their buffers.
    pub fn a_index(&self, i: usize, l: usize) -> usize {
        if self.trans_a {
            l * self.lda + i
        } else {
            i * self.lda + l
        }
    }
    pub fn b_index(&self, l: usize, j: usize) -> usize {
        if self.trans_b {
            j * self.ldb + l
        } else {
            l * self.ldb + j
        }
    }
}

/// Something that runs kernels in the order they are queued: a GPU's stream, or the emulator.
pub trait Queue {
    /// Queues `kernel` on a grid of `geometry` with `args`.
    ///
    /// # Safety
    /// `args` holds one value per parameter of the kernel's C signature, in order and of that
    /// parameter's type, and every address in it covers what the kernel reads and writes under
    /// `geometry`, for as long as the queued launch runs.
    unsafe fn launch(
        &self,
        kernel: Kernel,
        geometry: Geometry,
        args: &mut KernelArgs,
    ) -> Result<()>;

    /// Queues a row-major GEMM (its operands' extents are checked against their lengths).
    fn gemm(&self, gemm: &Gemm<'_>) -> Result<()>;

    /// Waits for the queued work, then copies `src` into `dst` (the same length).
    fn read<T: Pod>(&self, src: DevPtr<'_, T>, dst: &mut [T]) -> Result<()>;
}

/// Converts a size to the `int` the kernels take, with an error rather than a silent wrap.
pub fn to_i32(what: &str, value: usize) -> Result<i32> {
    i32::try_from(value).map_err(|_| {
        Error::invalid(format!(
            "{what} = {value} is too large for the CUDA kernels (at most {})",
            i32::MAX
        ))
    })
}

/// Checks that a buffer of `len` elements holds at least the `expected` an op uses.
pub fn check_len(what: &str, len: usize, expected: usize) -> Result<()> {
    if len < expected {
        return Err(Error::invalid(format!(
            "{what}: a buffer of {len} elements, expected at least {expected}"
        )));
    }
    Ok(())
}

/// An NVTX range named after the phase, when libnvToolsExt is there (Nsight shows the name).
pub fn phase(name: &str) -> Option<cudarc::nvtx::safe::Range> {
    static PRESENT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    // SAFETY: only tries to open the library.
    let present = *PRESENT.get_or_init(|| unsafe { cudarc::nvtx::sys::is_culib_present() });
    present.then(|| cudarc::nvtx::safe::scoped_range(name))
}
