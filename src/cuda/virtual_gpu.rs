//! Which CUDA device this process uses: a real one, the virtual GPU, or none.
//!
//! `INVASPREAD_GPU` selects, before the first CUDA call:
//!
//! | value | device |
//! |---|---|
//! | unset, `auto` | a real GPU when the NVIDIA driver reports one, else none |
//! | `virtual` | the virtual GPU: the CUDA path of this crate, unchanged, on the CPU (vgpu/) |
//! | `real` | a real GPU only (the virtual one is never used) |
//! | `none` | no GPU, even when one is present |
//!
//! The virtual GPU is a stand-in libcuda.so, libcublas.so and libnccl.so built by build.rs from
//! vgpu/; they are loaded here by absolute path, so cudarc's own `dlopen("libcuda.so")` (and
//! "libnccl.so") then resolves to them (the dynamic loader matches an already loaded library by
//! its SONAME) and every driver call of the crate goes to them. It runs the kernels of kernels/ through the CPU emulator with a memcheck and
//! a racecheck; see README.md, "The virtual GPU".

use std::sync::OnceLock;

use crate::error::{Error, Result};

mod generated {
    include!(concat!(env!("OUT_DIR"), "/vgpu_generated.rs"));
}

/// What `INVASPREAD_GPU` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection {
    Auto,
    Virtual,
    Real,
    None,
}

/// `INVASPREAD_GPU`, parsed; an unknown value is an error naming the variable.
pub fn selection() -> Result<Selection> {
    let value = std::env::var("INVASPREAD_GPU").unwrap_or_default();
    match value.trim() {
        "" | "auto" => Ok(Selection::Auto),
        "virtual" => Ok(Selection::Virtual),
        "real" => Ok(Selection::Real),
        "none" => Ok(Selection::None),
        other => Err(Error::invalid(format!(
            "INVASPREAD_GPU={other:?}: expected one of auto, virtual, real, none"
        ))),
    }
}

/// The folder the virtual GPU's libraries are loaded from: `INVASPREAD_VGPU_DIR` when set
/// (another build of them: one with AddressSanitizer, or the copy in a device bundle), else the
/// one build.rs made; or why there is none.
pub fn library_dir() -> std::result::Result<String, String> {
    match std::env::var("INVASPREAD_VGPU_DIR") {
        Ok(dir) if !dir.is_empty() => Ok(dir),
        _ => generated::DIR
            .map(str::to_string)
            .map_err(|e| format!("the virtual GPU was not built ({e})")),
    }
}

static LOADED: OnceLock<std::result::Result<(), String>> = OnceLock::new();

/// The stand-in driver's `vgpu_mark_piece` (vgpu/driver.cpp), resolved when it is loaded.
type MarkPieceFn = unsafe extern "C" fn(u64, usize) -> i32;
static MARK_PIECE: OnceLock<MarkPieceFn> = OnceLock::new();

/// Bytes left free after each piece of a [`Carve`](super::Carve) on the virtual GPU: a kernel
/// that runs a little past its piece then touches no piece, which the memcheck reports (on a
/// real GPU, 0: the layout is the tight one).
pub fn carve_gap() -> usize {
    if is_active() {
        256
    } else {
        0
    }
}

/// Tells the virtual GPU's memcheck that `[addr, addr + bytes)` is one piece of scratch carved
/// from a larger allocation, so that accesses are checked against the piece rather than the
/// whole allocation (which an overrun into the next piece, or the padding, stays inside). Does
/// nothing on a real GPU.
pub(crate) fn mark_piece(addr: u64, bytes: usize) -> Result<()> {
    let Some(mark) = MARK_PIECE.get().filter(|_| is_active()) else {
        return Ok(());
    };
    // SAFETY: the stand-in's own function (vgpu/driver.cpp), which takes the range by value and
    // only records it.
    if unsafe { mark(addr, bytes) } == 0 {
        Ok(())
    } else {
        Err(Error::Cuda(format!(
            "virtual GPU: the carved piece of {bytes} bytes at {addr:#x} is not inside a live allocation"
        )))
    }
}

/// Whether this process runs on the virtual GPU (it was selected and loaded).
pub fn is_active() -> bool {
    LOADED.get().is_some_and(|r| r.is_ok())
}

/// Loads the virtual GPU when `INVASPREAD_GPU=virtual` (once; before any cudarc call), and says
/// whether CUDA may be used at all (`false` for `none`).
pub(crate) fn prepare() -> Result<bool> {
    match selection()? {
        Selection::None => Ok(false),
        Selection::Auto | Selection::Real => Ok(true),
        Selection::Virtual => {
            LOADED
                .get_or_init(load)
                .clone()
                .map_err(|e| Error::NoDevice(format!("INVASPREAD_GPU=virtual: {e}")))?;
            Ok(true)
        }
    }
}

fn load() -> std::result::Result<(), String> {
    let dir = library_dir()?;
    let dir = dir.as_str();
    // libcuda first: libcublas.so and libnccl.so need it (and resolve it by SONAME once it is
    // loaded).
    for name in ["libcuda.so", "libcublas.so", "libnccl.so"] {
        let path = std::path::Path::new(dir).join(name);
        let c = std::ffi::CString::new(path.to_string_lossy().as_bytes())
            .map_err(|_| format!("{}: a NUL in the path", path.display()))?;
        // SAFETY: dlopen of a library this crate built; its initialisers only set up globals.
        // The handle is kept for the process's lifetime (never dlclose'd).
        let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
        if handle.is_null() {
            // SAFETY: dlerror returns a thread-local C string or null.
            let why = unsafe {
                let e = libc::dlerror();
                if e.is_null() {
                    "unknown error".to_string()
                } else {
                    std::ffi::CStr::from_ptr(e).to_string_lossy().into_owned()
                }
            };
            return Err(format!("loading {}: {why}", path.display()));
        }
        if name == "libcuda.so" {
            // SAFETY: dlsym on the handle just opened; the symbol, when present, has the
            // MarkPieceFn signature (vgpu/driver.cpp).
            let sym = unsafe { libc::dlsym(handle, c"vgpu_mark_piece".as_ptr()) };
            if sym.is_null() {
                return Err(format!(
                    "{} has no vgpu_mark_piece: an old build",
                    path.display()
                ));
            }
            // SAFETY: as above; a function pointer of that signature.
            let _ = MARK_PIECE
                .set(unsafe { std::mem::transmute::<*mut libc::c_void, MarkPieceFn>(sym) });
        }
    }
    Ok(())
}
