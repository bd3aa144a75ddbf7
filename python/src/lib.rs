//! `invaspread._native`: the crate's instance loss for the Python package (`invaspread.torch`
//! wraps it in a `torch.autograd.Function`).
//!
//! Tensors arrive as DLPack capsules (`torch.utils.dlpack.to_dlpack`), so a contiguous CPU
//! tensor is read where it lies and the gradient is written straight into a tensor PyTorch
//! allocated: no copy either way. Every property of a capsule (device, dtype, rank, shape,
//! strides) is checked here before a byte is read, and every error is a Python exception with
//! the crate's message. The loss runs with the GIL released.
//!
//! Only CPU tensors run here; a CUDA tensor is refused with a message saying so (the CUDA
//! kernels are not reachable from this module yet).

use std::ffi::{c_void, CStr};

use invaspread::loss::{self, GradSemantics, LossConfig, NegativeScale, Negatives};
use invaspread::names::Device;
use pyo3::exceptions::{PyNotImplementedError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyCapsule;

/// DLPack's device (dlpack.h, v0.8 / 1.0 layout).
#[repr(C)]
#[derive(Clone, Copy)]
struct DlDevice {
    device_type: i32,
    device_id: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct DlDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

#[repr(C)]
struct DlTensor {
    data: *mut c_void,
    device: DlDevice,
    ndim: i32,
    dtype: DlDataType,
    shape: *const i64,
    strides: *const i64,
    byte_offset: u64,
}

/// The unversioned DLManagedTensor of a `"dltensor"` capsule: the tensor comes first.
#[repr(C)]
struct DlManagedTensor {
    dl_tensor: DlTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DlManagedTensor)>,
}

const DL_CPU: i32 = 1;
const DL_CUDA: i32 = 2;
const DL_FLOAT: u8 = 2;

/// The element type of a tensor the loss takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dtype {
    F32,
    F64,
}

/// A checked view of a capsule's 2-d, row-major, CPU float tensor.
struct Matrix {
    data: *mut u8,
    dtype: Dtype,
    rows: usize,
    cols: usize,
}

/// Reads and checks the DLPack tensor of `capsule` (`what` names it in errors).
fn matrix(capsule: &Bound<'_, PyCapsule>, what: &str) -> PyResult<Matrix> {
    const NAME: &CStr = c"dltensor";
    let name = capsule.name()?;
    // SAFETY: the name pointer, when present, is the NUL-terminated string the capsule holds.
    let named_right = name.is_some_and(|n| unsafe { n.as_cstr() } == NAME);
    if !named_right {
        return Err(PyTypeError::new_err(format!(
            "{what}: expected a DLPack capsule named \"dltensor\" (torch.utils.dlpack.to_dlpack), not a used or other capsule"
        )));
    }
    // SAFETY: a "dltensor" capsule holds a DLManagedTensor, alive while the capsule is (the
    // caller holds it for the whole call).
    let managed =
        unsafe { &*(capsule.pointer_checked(Some(NAME))?.as_ptr() as *const DlManagedTensor) };
    let t = &managed.dl_tensor;
    match t.device.device_type {
        DL_CPU => {}
        DL_CUDA => {
            return Err(PyNotImplementedError::new_err(format!(
                "{what} is on cuda:{}: this build of invaspread runs the loss on CPU tensors only (the CUDA kernels are not yet reachable from Python); move the tensor to the CPU",
                t.device.device_id
            )))
        }
        other => {
            return Err(PyValueError::new_err(format!(
                "{what} is on DLPack device type {other}: expected a CPU tensor"
            )))
        }
    }
    let dtype = match (t.dtype.code, t.dtype.bits, t.dtype.lanes) {
        (DL_FLOAT, 32, 1) => Dtype::F32,
        (DL_FLOAT, 64, 1) => Dtype::F64,
        (code, bits, lanes) => {
            return Err(PyTypeError::new_err(format!(
                "{what} has DLPack dtype (code {code}, {bits} bits, {lanes} lanes): expected float32 or float64"
            )))
        }
    };
    if t.ndim != 2 {
        return Err(PyValueError::new_err(format!(
            "{what} has {} dimensions: expected an N x d matrix",
            t.ndim
        )));
    }
    // SAFETY: shape holds ndim = 2 entries; strides, when not null, too.
    let shape = unsafe { std::slice::from_raw_parts(t.shape, 2) };
    let (rows, cols) = match (usize::try_from(shape[0]), usize::try_from(shape[1])) {
        (Ok(r), Ok(c)) => (r, c),
        _ => {
            return Err(PyValueError::new_err(format!(
                "{what} has shape {shape:?}: expected non-negative sizes"
            )))
        }
    };
    // An empty matrix has no layout to check (its size is refused by the loss).
    if !t.strides.is_null() && rows > 0 && cols > 0 {
        // SAFETY: see above.
        let strides = unsafe { std::slice::from_raw_parts(t.strides, 2) };
        let row_major = (rows <= 1 || strides[0] == shape[1]) && (cols <= 1 || strides[1] == 1);
        if !row_major {
            return Err(PyValueError::new_err(format!(
                "{what} has strides {strides:?} for shape {shape:?}: expected a contiguous row-major matrix (call .contiguous())"
            )));
        }
    }
    let bytes = match dtype {
        Dtype::F32 => 4,
        Dtype::F64 => 8,
    };
    rows.checked_mul(cols)
        .and_then(|n| n.checked_mul(bytes))
        .filter(|&n| n <= isize::MAX as usize)
        .ok_or_else(|| PyValueError::new_err(format!("{what} of shape {shape:?} is too large")))?;
    let offset = usize::try_from(t.byte_offset).map_err(|_| {
        PyValueError::new_err(format!(
            "{what}: byte offset {} is too large",
            t.byte_offset
        ))
    })?;
    if t.data.is_null() && rows * cols > 0 {
        return Err(PyValueError::new_err(format!("{what} has no data")));
    }
    // SAFETY: data + byte_offset is the first element (DLPack's definition).
    let data = unsafe { (t.data as *mut u8).add(offset) };
    if data as usize % bytes != 0 {
        return Err(PyValueError::new_err(format!(
            "{what}: data not aligned to its dtype"
        )));
    }
    Ok(Matrix {
        data,
        dtype,
        rows,
        cols,
    })
}

/// The loss's settings from the op's arguments, checked by the crate.
fn config(
    tau: f64,
    mu: f64,
    semantics: &str,
    negatives: &str,
    fraction: f64,
    scale: &str,
) -> invaspread::Result<LossConfig> {
    let semantics: GradSemantics = invaspread::names::parse("semantics", semantics)?;
    let scale: NegativeScale = invaspread::names::parse("scale", scale)?;
    let negatives = match negatives {
        "all" => {
            if fraction != 1.0 {
                return Err(invaspread::Error::invalid(format!(
                    "fraction = {fraction} is given with negatives = \"all\": a fraction selects hard or easy negatives (negatives=\"hard\" or \"easy\")"
                )));
            }
            Negatives::All
        }
        "hard" => Negatives::hard(fraction).with_scale(scale),
        "easy" => Negatives::easy(fraction).with_scale(scale),
        other => {
            return Err(invaspread::Error::invalid(format!(
                "negatives {other:?} is not one of all, hard, easy"
            )))
        }
    };
    let cfg = LossConfig {
        tau,
        mu,
        semantics,
        negatives,
    };
    cfg.validate()?;
    Ok(cfg)
}

fn value_error(e: invaspread::Error) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// The loss of `z` (N x d), and dL/dz written into `grad` (a tensor of z's shape and dtype)
/// when given; `normalized`: the rows are already of unit length (dL/df then).
///
/// `version`: None (the fused loss in z's dtype: `fused` for float32, `fused-f64` for float64)
/// or a CPU version of the crate's registry; `reference` reads either dtype and computes in
/// float64.
#[pyfunction]
#[pyo3(signature = (z, grad, *, tau, mu, semantics, negatives, fraction, scale, normalized, version=None))]
#[allow(clippy::too_many_arguments)] // the loss's settings, as the Python op's keywords
fn instance_loss(
    py: Python<'_>,
    z: &Bound<'_, PyCapsule>,
    grad: Option<&Bound<'_, PyCapsule>>,
    tau: f64,
    mu: f64,
    semantics: &str,
    negatives: &str,
    fraction: f64,
    scale: &str,
    normalized: bool,
    version: Option<&str>,
) -> PyResult<f64> {
    let cfg = config(tau, mu, semantics, negatives, fraction, scale).map_err(value_error)?;
    let input = matrix(z, "z")?;
    let version = match version {
        None if input.dtype == Dtype::F64 => loss::CpuLossVersion::FusedF64,
        None => loss::CpuLossVersion::Fused,
        Some(name) => {
            let v: loss::LossVersion =
                invaspread::names::parse("version", name).map_err(value_error)?;
            match v {
                loss::LossVersion::Cpu(v) => v,
                loss::LossVersion::Cuda(_) => {
                    return Err(PyValueError::new_err(format!(
                        "version {name:?} runs on CUDA tensors; z is on the CPU, where the versions are {}",
                        loss::LossVersion::on(Device::Cpu)
                            .map(|v| v.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )))
                }
            }
        }
    };
    let output = match grad {
        Some(g) => {
            let out = matrix(g, "grad")?;
            if (out.rows, out.cols, out.dtype) != (input.rows, input.cols, input.dtype) {
                return Err(PyValueError::new_err(format!(
                    "grad is {} x {} {:?}, z {} x {} {:?}: expected the same shape and dtype",
                    out.rows, out.cols, out.dtype, input.rows, input.cols, input.dtype
                )));
            }
            let overlap = {
                let bytes = input.rows * input.cols * if input.dtype == Dtype::F32 { 4 } else { 8 };
                let (a, b) = (input.data as usize, out.data as usize);
                bytes > 0 && a < b + bytes && b < a + bytes
            };
            if overlap {
                return Err(PyValueError::new_err(
                    "grad shares memory with z: expected a tensor of its own",
                ));
            }
            Some(out)
        }
        None => None,
    };
    match input.dtype {
        Dtype::F32 => in_place::<f32>(py, &input, output.as_ref(), &cfg, normalized, version),
        Dtype::F64 => in_place::<f64>(py, &input, output.as_ref(), &cfg, normalized, version),
    }
    .map_err(value_error)
}

/// [`run`] on the matrices where they lie, with the GIL released.
fn in_place<T: invaspread::simd::CpuFloat>(
    py: Python<'_>,
    input: &Matrix,
    output: Option<&Matrix>,
    cfg: &LossConfig,
    normalized: bool,
    version: loss::CpuLossVersion,
) -> invaspread::Result<f64> {
    let (n, d) = (input.rows, input.cols);
    // SAFETY: checked by `matrix` and the caller: n x d elements of T, aligned, alive while the
    // capsules are (the caller holds them), and the gradient does not overlap the input.
    let z = unsafe { std::slice::from_raw_parts(input.data as *const T, n * d) };
    let g = output.map(|o| unsafe { std::slice::from_raw_parts_mut(o.data as *mut T, n * d) });
    py.detach(|| run(z, g, n, d, cfg, normalized, version))
}

/// The loss of `z` in the chosen version, its gradient into `grad`.
fn run<T: invaspread::simd::CpuFloat>(
    z: &[T],
    grad: Option<&mut [T]>,
    n: usize,
    d: usize,
    cfg: &LossConfig,
    normalized: bool,
    version: loss::CpuLossVersion,
) -> invaspread::Result<f64> {
    let with_grad = grad.is_some();
    let single = std::mem::size_of::<T>() == 4;
    let (value, g): (f64, Option<Vec<T>>) = match version {
        loss::CpuLossVersion::Reference => {
            if normalized {
                return Err(invaspread::Error::invalid(
                    "version \"reference\" takes raw embeddings: use normalized=False or a fused version",
                ));
            }
            let out = loss::reference::instance_loss(z, n, d, cfg, with_grad)?;
            let g = out.grad_z.map(|g| g.into_iter().map(|x| T::of(x)).collect());
            (out.loss, g)
        }
        loss::CpuLossVersion::Fused if !single => {
            return Err(invaspread::Error::invalid(
                "version \"fused\" runs in float32: give a float32 z, or version \"fused-f64\" for float64",
            ))
        }
        loss::CpuLossVersion::FusedF64 if single => {
            return Err(invaspread::Error::invalid(
                "version \"fused-f64\" runs in float64: give a float64 z, or version \"fused\" for float32",
            ))
        }
        loss::CpuLossVersion::Fused | loss::CpuLossVersion::FusedF64 => {
            let out = if normalized {
                loss::cpu::instance_loss_normalized(z, n, d, cfg, with_grad)?
            } else {
                loss::cpu::instance_loss(z, n, d, cfg, with_grad)?
            };
            (out.loss, out.grad_z)
        }
    };
    if let (Some(dst), Some(src)) = (grad, g) {
        dst.copy_from_slice(&src);
    }
    Ok(value)
}

/// The crate's version, the names of the CPU loss versions.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(instance_loss, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    let versions: Vec<String> = loss::LossVersion::on(Device::Cpu)
        .map(|v| v.to_string())
        .collect();
    m.add("CPU_VERSIONS", versions)?;
    Ok(())
}
