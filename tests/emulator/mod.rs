//! The CPU kernel emulator as a [`Queue`]: kernels launched by the crate's own launchers
//! (`ops::<op>::cuda`, `loss::cuda`) run their unchanged sources (the virtual GPU's kernel
//! library, vgpu/kernels.cpp on vgpu/engine.cpp, with its racecheck), GEMMs are computed on the host in
//! float64 (with the operand rounding of the TF32 and bf16 modes), and reads are copies.
//! Device addresses are host addresses: every `DevPtr` handed to it comes from
//! `DevPtr::host`.

use std::ffi::{c_char, c_void, CString};
use std::sync::OnceLock;

use invaspread::cuda::{DevPtr, DevPtrMut, Geometry, Kernel, KernelArgs, Queue};
use invaspread::cuda::{Gemm, GemmPrecision};
use invaspread::{Error, Result};

#[path = "../../vgpu/build_vgpu.rs"]
#[allow(dead_code)]
pub mod build_vgpu;
pub use build_vgpu::kernel_names;

type LaunchFn = unsafe extern "C" fn(*const c_char, u32, u32, u32, *mut *mut c_void) -> i32;

pub struct Emulator {
    launch: LaunchFn,
}

// SAFETY: the library's entry point is a plain function, and it serialises launches itself.
unsafe impl Sync for Emulator {}
unsafe impl Send for Emulator {}

fn build() -> Option<Emulator> {
    // The virtual GPU's kernel library (vgpu/, built by build.rs): every kernels/*.cu on the
    // engine, exported as `emu_launch` for this synchronous, host-memory use.
    let dir = invaspread::cuda::virtual_gpu::library_dir().ok()?;
    let lib = std::path::Path::new(&dir).join("libvgpu_kernels.so");
    let path = CString::new(lib.to_str().unwrap()).unwrap();
    // SAFETY: dlopen/dlsym of the library build.rs built; the symbol has the LaunchFn signature
    // (vgpu/engine.cpp). The handle is never closed (the tests hold the function for good).
    // RTLD_LOCAL: its engine is this process's own copy, apart from the virtual GPU's.
    unsafe {
        let handle = libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
        assert!(!handle.is_null(), "dlopen of the kernel emulator failed");
        let sym = libc::dlsym(handle, c"emu_launch".as_ptr());
        assert!(!sym.is_null(), "emu_launch missing");
        Some(Emulator {
            launch: std::mem::transmute::<*mut c_void, LaunchFn>(sym),
        })
    }
}

/// The emulator, or None after printing `SKIPPED (no C++ compiler): test`.
pub fn emulator(test: &str) -> Option<&'static Emulator> {
    static EMU: OnceLock<Option<Emulator>> = OnceLock::new();
    let e = EMU.get_or_init(build).as_ref();
    if e.is_none() {
        eprintln!("SKIPPED (no C++ compiler, so no virtual GPU kernel library): {test}");
    }
    e
}

/// TF32 keeps 10 mantissa bits: round to nearest, ties away from zero (cvt.rna.tf32.f32).
fn tf32(x: f32) -> f32 {
    if !x.is_finite() {
        return x;
    }
    f32::from_bits((x.to_bits() + 0x1000) & !0x1fff)
}

/// bf16 keeps 7: round to nearest even, as `f32_to_bf16_v1` and the `half` crate.
fn bf16(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

/// `len` elements at `ptr`, or none (a null pointer is allowed for an empty operand).
///
/// # Safety
/// Unless `len` is 0, `ptr` addresses `len` live elements.
unsafe fn host_slice<'a, T>(ptr: *const T, len: usize) -> &'a [T] {
    if len == 0 {
        &[]
    } else {
        // SAFETY: the caller's guarantee.
        unsafe { std::slice::from_raw_parts(ptr, len) }
    }
}

impl Queue for Emulator {
    unsafe fn launch(
        &self,
        kernel: Kernel,
        geometry: Geometry,
        args: &mut KernelArgs,
    ) -> Result<()> {
        if geometry.grid.2 != 1 || geometry.shared_bytes != 0 {
            return Err(Error::invalid(format!(
                "{}: the emulator runs 2-d grids without dynamic shared memory, got {geometry:?}",
                kernel.name
            )));
        }
        let name = CString::new(kernel.name).expect("kernel names have no NUL");
        let mut params = args.pointers();
        // SAFETY: the launcher's contract (Queue::launch) holds for the emulator too: one
        // pointer per parameter, to a value of its C type; addresses are host memory.
        let rc = unsafe {
            (self.launch)(
                name.as_ptr(),
                geometry.grid.0,
                geometry.grid.1,
                geometry.block,
                params.as_mut_ptr(),
            )
        };
        match rc {
            0 => {}
            1 => {
                return Err(Error::invalid(format!(
                    "no kernel {} in the emulator",
                    kernel.name
                )))
            }
            3 => {
                return Err(Error::invalid(format!(
                    "{}: a block of {} threads exceeds its __launch_bounds__",
                    kernel.name, geometry.block
                )))
            }
            _ => {
                return Err(Error::invalid(format!(
                    "{}: the emulator's racecheck failed (see stderr)",
                    kernel.name
                )))
            }
        }
        Ok(())
    }

    fn gemm(&self, g: &Gemm<'_>) -> Result<()> {
        g.check()?;
        let round: fn(f32) -> f32 = match g.precision {
            GemmPrecision::F32 => |x| x,
            GemmPrecision::Tf32 => tf32,
            GemmPrecision::Bf16 => bf16,
        };
        if g.m == 0 || g.n == 0 {
            return Ok(());
        }
        // SAFETY: the tests make every address from host memory (DevPtr::host) of the lengths
        // `check` has just compared with the product's extents.
        let (a, b, c) = unsafe {
            (
                host_slice(g.a.addr() as *const f32, g.a.len()),
                host_slice(g.b.addr() as *const f32, g.b.len()),
                std::slice::from_raw_parts_mut(g.c.addr() as *mut f32, g.c.len()),
            )
        };
        for i in 0..g.m {
            for j in 0..g.n {
                let s: f64 = (0..g.k)
                    .map(|l| {
                        let x = round(a[g.a_index(i, l)]);
                        let y = round(b[g.b_index(l, j)]);
                        f64::from(x) * f64::from(y)
                    })
                    .sum();
                let out = &mut c[i * g.ldc + j];
                let old = if g.beta == 0.0 { 0.0 } else { f64::from(*out) };
                *out = (f64::from(g.alpha) * s + f64::from(g.beta) * old) as f32;
            }
        }
        Ok(())
    }

    fn read<T: bytemuck::Pod>(&self, src: DevPtr<'_, T>, dst: &mut [T]) -> Result<()> {
        assert_eq!(src.len(), dst.len(), "read lengths");
        // SAFETY: host memory of src.len() elements (DevPtr::host), launches are synchronous.
        let host = unsafe { host_slice(src.addr() as *const T, src.len()) };
        dst.copy_from_slice(host);
        Ok(())
    }
}

/// The emulator as a device of the op bodies (tests/common/op_cases.rs): buffers are host
/// vectors, launches synchronous.
impl crate::common::op_cases::TestDevice for Emulator {
    type Q = Emulator;
    type Buf<T: crate::common::op_cases::Elem> = Vec<T>;
    fn queue(&self) -> &Emulator {
        self
    }
    fn upload<T: crate::common::op_cases::Elem>(&self, host: &[T]) -> Vec<T> {
        host.to_vec()
    }
    fn download<T: crate::common::op_cases::Elem>(&self, buf: &Vec<T>) -> Vec<T> {
        buf.clone()
    }
    fn ptr<T: crate::common::op_cases::Elem>(buf: &Vec<T>) -> DevPtr<'_, T> {
        DevPtr::host(buf)
    }
    fn ptr_mut<T: crate::common::op_cases::Elem>(buf: &mut Vec<T>) -> DevPtrMut<'_, T> {
        DevPtrMut::host(buf)
    }
}
