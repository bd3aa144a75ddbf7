//! `invaspread._native`: the crate's instance loss for the Python package (`invaspread.torch`
//! wraps it in a `torch.autograd.Function`).
//!
//! Tensors arrive as DLPack capsules (`torch.utils.dlpack.to_dlpack`), so a contiguous CPU
//! tensor is read where it lies and the gradient is written straight into a tensor PyTorch
//! allocated: no copy either way. Every property of a capsule (device, dtype, rank, shape,
//! strides) is checked here before a byte is read, and every error is a Python exception with
//! the crate's message. The loss runs with the GIL released.
//!
//! CPU tensors go through the fused CPU loss (`instance_loss`); CUDA tensors through the
//! crate's kernels on PyTorch's current stream (`cuda_plan`, then `instance_loss_cuda`, on
//! device addresses: `loss::cuda::foreign`).

use std::ffi::{c_void, CStr};

use invaspread::loss::{self, GradSemantics, LossConfig, NegativeScale, Negatives};
use invaspread::names::Device;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use invaspread::cuda::Gpu;
use invaspread::loss::cuda::foreign::{self, ForeignBuffers, MatmulPrecision};
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
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
const DL_UINT: u8 = 1;
const DL_FLOAT: u8 = 2;

/// The element type of a tensor the loss takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dtype {
    F32,
    F64,
}

/// Where a tensor lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    Cpu,
    Cuda(i32),
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Place::Cpu => write!(f, "cpu"),
            Place::Cuda(id) => write!(f, "cuda:{id}"),
        }
    }
}

/// A checked view of a capsule's dense, row-major tensor: its first element's address (a
/// host address on the CPU, a device address on CUDA), place, element type and shape.
struct Dense {
    data: *mut u8,
    place: Place,
    code: u8,
    bits: u8,
    shape: Vec<usize>,
}

impl Dense {
    fn elements(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A checked view of a capsule's 2-d, row-major float tensor.
struct Matrix {
    data: *mut u8,
    place: Place,
    dtype: Dtype,
    rows: usize,
    cols: usize,
}

impl Matrix {
    fn bytes(&self) -> usize {
        self.rows * self.cols * if self.dtype == Dtype::F32 { 4 } else { 8 }
    }
}

/// Reads and checks the DLPack tensor of `capsule` (`what` names it in errors): its name,
/// device, lanes, shape, strides (dense row-major), size and alignment.
fn dense(capsule: &Bound<'_, PyCapsule>, what: &str) -> PyResult<Dense> {
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
    let place = match t.device.device_type {
        DL_CPU => Place::Cpu,
        DL_CUDA => Place::Cuda(t.device.device_id),
        other => {
            return Err(PyValueError::new_err(format!(
                "{what} is on DLPack device type {other}: expected a CPU or CUDA tensor"
            )))
        }
    };
    if t.dtype.lanes != 1 || t.dtype.bits % 8 != 0 || t.dtype.bits == 0 {
        return Err(PyTypeError::new_err(format!(
            "{what} has DLPack dtype (code {}, {} bits, {} lanes): expected one value per element",
            t.dtype.code, t.dtype.bits, t.dtype.lanes
        )));
    }
    let ndim = usize::try_from(t.ndim)
        .ok()
        .filter(|&n| n <= 8)
        .ok_or_else(|| PyValueError::new_err(format!("{what} has {} dimensions", t.ndim)))?;
    // SAFETY: shape holds ndim entries; strides, when not null, too.
    let raw_shape: &[i64] = if ndim == 0 {
        &[]
    } else {
        unsafe { std::slice::from_raw_parts(t.shape, ndim) }
    };
    let shape = raw_shape
        .iter()
        .map(|&s| usize::try_from(s))
        .collect::<Result<Vec<usize>, _>>()
        .map_err(|_| {
            PyValueError::new_err(format!(
                "{what} has shape {raw_shape:?}: expected non-negative sizes"
            ))
        })?;
    let item = usize::from(t.dtype.bits / 8);
    let elements = shape
        .iter()
        .try_fold(1usize, |acc, &s| acc.checked_mul(s))
        .filter(|&n| {
            n.checked_mul(item)
                .is_some_and(|b| b <= isize::MAX as usize)
        })
        .ok_or_else(|| {
            PyValueError::new_err(format!("{what} of shape {raw_shape:?} is too large"))
        })?;
    // An empty tensor has no layout to check (its size is refused where it matters).
    if !t.strides.is_null() && elements > 0 {
        // SAFETY: see above.
        let strides = unsafe { std::slice::from_raw_parts(t.strides, ndim) };
        let mut expected = 1i64;
        for k in (0..ndim).rev() {
            if shape[k] > 1 && strides[k] != expected {
                let kind = if ndim == 2 { "matrix" } else { "tensor" };
                return Err(PyValueError::new_err(format!(
                    "{what} has strides {strides:?} for shape {raw_shape:?}: expected a contiguous row-major {kind} (call .contiguous())"
                )));
            }
            expected *= raw_shape[k];
        }
    }
    let offset = usize::try_from(t.byte_offset).map_err(|_| {
        PyValueError::new_err(format!(
            "{what}: byte offset {} is too large",
            t.byte_offset
        ))
    })?;
    if t.data.is_null() && elements > 0 {
        return Err(PyValueError::new_err(format!("{what} has no data")));
    }
    // DLPack's first element is data + byte_offset; on CUDA it is an address, never touched
    // here.
    let data = (t.data as *mut u8).wrapping_add(offset);
    if !(data as usize).is_multiple_of(item) {
        return Err(PyValueError::new_err(format!(
            "{what}: data not aligned to its dtype"
        )));
    }
    Ok(Dense {
        data,
        place,
        code: t.dtype.code,
        bits: t.dtype.bits,
        shape,
    })
}

/// [`dense`], then a 2-d float32/float64 matrix.
fn matrix(capsule: &Bound<'_, PyCapsule>, what: &str) -> PyResult<Matrix> {
    let t = dense(capsule, what)?;
    let dtype = match (t.code, t.bits) {
        (DL_FLOAT, 32) => Dtype::F32,
        (DL_FLOAT, 64) => Dtype::F64,
        (code, bits) => {
            return Err(PyTypeError::new_err(format!(
                "{what} has DLPack dtype (code {code}, {bits} bits, 1 lanes): expected float32 or float64"
            )))
        }
    };
    let &[rows, cols] = t.shape.as_slice() else {
        return Err(PyValueError::new_err(format!(
            "{what} has {} dimensions: expected an N x d matrix",
            t.shape.len()
        )));
    };
    Ok(Matrix {
        data: t.data,
        place: t.place,
        dtype,
        rows,
        cols,
    })
}

/// `grad` checked against `z`: the same place, shape and dtype, and memory of its own.
fn gradient_for(z: &Matrix, grad: &Bound<'_, PyCapsule>) -> PyResult<Matrix> {
    let out = matrix(grad, "grad")?;
    if (out.place, out.rows, out.cols, out.dtype) != (z.place, z.rows, z.cols, z.dtype) {
        return Err(PyValueError::new_err(format!(
            "grad is {} x {} {:?} on {}, z {} x {} {:?} on {}: expected the same shape, dtype and device",
            out.rows, out.cols, out.dtype, out.place, z.rows, z.cols, z.dtype, z.place
        )));
    }
    let (a, b, bytes) = (z.data as usize, out.data as usize, z.bytes());
    if bytes > 0 && a < b + bytes && b < a + bytes {
        return Err(PyValueError::new_err(
            "grad shares memory with z: expected a tensor of its own",
        ));
    }
    Ok(out)
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
    if input.place != Place::Cpu {
        return Err(PyValueError::new_err(format!(
            "z is on {}: this entry point takes CPU tensors (invaspread.torch sends CUDA tensors to instance_loss_cuda)",
            input.place
        )));
    }
    let output = grad.map(|g| gradient_for(&input, g)).transpose()?;
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

/// The crate's view of CUDA device `ordinal` (its primary context, PyTorch's too), made on the
/// first call and kept: its kernel modules are loaded once per process.
fn gpu_of(ordinal: i32) -> PyResult<Arc<Gpu>> {
    static GPUS: Mutex<Option<HashMap<i32, Arc<Gpu>>>> = Mutex::new(None);
    match invaspread::cuda::virtual_gpu::selection().map_err(value_error)? {
        invaspread::cuda::virtual_gpu::Selection::Virtual | invaspread::cuda::virtual_gpu::Selection::None => {
            return Err(PyRuntimeError::new_err(format!(
                "INVASPREAD_GPU={}: a PyTorch CUDA tensor lives on a real GPU, which this setting keeps the crate from using; unset it (or set it to real)",
                std::env::var("INVASPREAD_GPU").unwrap_or_default()
            )))
        }
        _ => {}
    }
    let mut gpus = GPUS
        .lock()
        .map_err(|_| PyRuntimeError::new_err("the GPU cache is poisoned by an earlier panic"))?;
    let gpus = gpus.get_or_insert_with(HashMap::new);
    if let Some(gpu) = gpus.get(&ordinal) {
        return Ok(gpu.clone());
    }
    let index = usize::try_from(ordinal)
        .map_err(|_| PyValueError::new_err(format!("CUDA device {ordinal}")))?;
    let gpu = match Gpu::try_new_ordinal(index) {
        Ok(Some(gpu)) => Arc::new(gpu),
        Ok(None) => {
            return Err(PyRuntimeError::new_err(format!(
                "cuda:{ordinal}: the CUDA driver the crate loaded reports no such device"
            )))
        }
        Err(e) => return Err(PyRuntimeError::new_err(e.to_string())),
    };
    gpus.insert(ordinal, gpu.clone());
    Ok(gpu)
}

/// The CUDA version a call runs (`version`, or the default for the card's compute capability
/// and PyTorch's float32 matmul precision) and the bytes of scratch it needs for N x d; the
/// settings are checked here, before anything is allocated.
#[pyfunction]
#[pyo3(signature = (n, d, *, tau, mu, semantics, negatives, fraction, scale, version, capability, precision))]
#[allow(clippy::too_many_arguments)] // the loss's settings, as the Python op's keywords
fn cuda_plan(
    n: usize,
    d: usize,
    tau: f64,
    mu: f64,
    semantics: &str,
    negatives: &str,
    fraction: f64,
    scale: &str,
    version: Option<&str>,
    capability: (i32, i32),
    precision: &str,
) -> PyResult<(String, usize)> {
    let cfg = config(tau, mu, semantics, negatives, fraction, scale).map_err(value_error)?;
    loss::cuda::validate_for_kernels(&cfg).map_err(value_error)?;
    let version = match version {
        None => {
            let precision = MatmulPrecision::parse(precision).map_err(value_error)?;
            foreign::default_version(&cfg, capability, precision)
        }
        Some(name) => cuda_version(name)?,
    };
    loss::LossVersion::Cuda(version)
        .supports(&cfg)
        .map_err(value_error)?;
    let bytes = foreign::scratch_bytes(version, n, d).map_err(value_error)?;
    Ok((loss::LossVersion::Cuda(version).to_string(), bytes))
}

/// A CUDA version of the registry by name, or an error listing those that run on a stream
/// handed in.
fn cuda_version(name: &str) -> PyResult<loss::CudaLossVersion> {
    let runs_here = || {
        loss::LossVersion::on(Device::Cuda)
            .filter(|v| *v != loss::LossVersion::Cuda(loss::CudaLossVersion::UnfusedCublas))
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match invaspread::names::parse::<loss::LossVersion>("version", name) {
        Ok(loss::LossVersion::Cuda(loss::CudaLossVersion::UnfusedCublas)) => {
            Err(PyValueError::new_err(format!(
                "version \"unfused-cublas\" runs on the crate's own stream only (its cuBLAS handle), not on PyTorch's; on CUDA tensors the versions are {}",
                runs_here()
            )))
        }
        Ok(loss::LossVersion::Cuda(v)) => Ok(v),
        Ok(loss::LossVersion::Cpu(_)) => Err(PyValueError::new_err(format!(
            "version {name:?} runs on CPU tensors; z is on CUDA, where the versions are {}",
            runs_here()
        ))),
        Err(e) => Err(value_error(e)),
    }
}

/// Queues the loss of `z` (N x d float32 on a CUDA device) on PyTorch's stream `stream` of that
/// device: the loss into `loss` (one float64), dL/dz into `grad` when given; `scratch` (uint8,
/// zeroed, at least `cuda_plan`'s bytes) is the version's working memory. Every tensor is on
/// z's device; nothing is copied to the host or waited for.
#[pyfunction]
#[pyo3(signature = (z, grad, scratch, loss, *, stream, tau, mu, semantics, negatives, fraction, scale, version))]
#[allow(clippy::too_many_arguments)] // the buffers and the loss's settings
fn instance_loss_cuda(
    py: Python<'_>,
    z: &Bound<'_, PyCapsule>,
    grad: Option<&Bound<'_, PyCapsule>>,
    scratch: &Bound<'_, PyCapsule>,
    loss: &Bound<'_, PyCapsule>,
    stream: u64,
    tau: f64,
    mu: f64,
    semantics: &str,
    negatives: &str,
    fraction: f64,
    scale: &str,
    version: &str,
) -> PyResult<()> {
    let cfg = config(tau, mu, semantics, negatives, fraction, scale).map_err(value_error)?;
    let version = cuda_version(version)?;
    let input = matrix(z, "z")?;
    let Place::Cuda(ordinal) = input.place else {
        return Err(PyValueError::new_err(
            "z is on the CPU: instance_loss_cuda takes CUDA tensors",
        ));
    };
    if input.dtype != Dtype::F32 {
        return Err(PyTypeError::new_err(
            "z is float64 on CUDA: the CUDA versions compute in float32 (pass z.float(), or a CPU tensor for float64)",
        ));
    }
    let output = grad.map(|g| gradient_for(&input, g)).transpose()?;
    let work = dense(scratch, "scratch")?;
    let sum = dense(loss, "loss")?;
    for (what, t, code, bits) in [
        ("scratch", &work, DL_UINT, 8u8),
        ("loss", &sum, DL_FLOAT, 64),
    ] {
        if t.place != input.place || (t.code, t.bits) != (code, bits) {
            return Err(PyValueError::new_err(format!(
                "{what} is (code {}, {} bits) on {}: expected (code {code}, {bits} bits) on {}",
                t.code, t.bits, t.place, input.place
            )));
        }
    }
    if sum.elements() != 1 {
        return Err(PyValueError::new_err(format!(
            "loss has shape {:?}: expected one element",
            sum.shape
        )));
    }
    let gpu = gpu_of(ordinal)?;
    let bufs = ForeignBuffers {
        z: input.data as u64,
        dz: output.as_ref().map(|o| o.data as u64),
        scratch: work.data as u64,
        scratch_len: work.elements(),
        loss: sum.data as u64,
    };
    let shape = (input.rows, input.cols);
    // SAFETY: every address is a tensor of z's device checked above (and again by the crate to
    // be device memory), alive for the call (the caller holds the capsules) and afterwards in
    // stream order (PyTorch's caching allocator reuses memory freed on a stream only for that
    // stream's later work); `stream` is PyTorch's current stream of that device, a stream of
    // its primary context, which `gpu` uses too.
    py.detach(|| unsafe { foreign::enqueue_on_stream(&gpu, stream, version, shape, &cfg, bufs) })
        .map_err(value_error)
}

/// The crate's version, the names of the CPU loss versions.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(instance_loss, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_plan, m)?)?;
    m.add_function(wrap_pyfunction!(instance_loss_cuda, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    let versions: Vec<String> = loss::LossVersion::on(Device::Cpu)
        .map(|v| v.to_string())
        .collect();
    m.add("CPU_VERSIONS", versions)?;
    let versions: Vec<String> = loss::LossVersion::on(Device::Cuda)
        .filter(|v| *v != loss::LossVersion::Cuda(loss::CudaLossVersion::UnfusedCublas))
        .map(|v| v.to_string())
        .collect();
    m.add("CUDA_VERSIONS", versions)?;
    Ok(())
}
