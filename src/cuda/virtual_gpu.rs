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
//! The virtual GPU is a stand-in libcuda.so and libcublas.so built by build.rs from vgpu/; it is
//! loaded here by absolute path, so cudarc's own `dlopen("libcuda.so")` then resolves to it (the
//! dynamic loader matches an already loaded library by its SONAME) and every driver call of the
//! crate goes to it. It runs the kernels of kernels/ through the CPU emulator with a memcheck and
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

/// The folder with the virtual GPU's libraries, or why it was not built.
pub fn library_dir() -> std::result::Result<&'static str, &'static str> {
    generated::DIR
}

static LOADED: OnceLock<std::result::Result<(), String>> = OnceLock::new();

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
    // INVASPREAD_VGPU_DIR: another build of the libraries (a sanitized one, while debugging it).
    let dir = match std::env::var("INVASPREAD_VGPU_DIR") {
        Ok(dir) if !dir.is_empty() => dir,
        _ => library_dir()
            .map_err(|e| format!("the virtual GPU was not built ({e})"))?
            .to_string(),
    };
    let dir = dir.as_str();
    // libcuda first: libcublas.so needs it (and resolves it by SONAME once it is loaded).
    for name in ["libcuda.so", "libcublas.so"] {
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
    }
    Ok(())
}
