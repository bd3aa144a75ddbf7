//! The elementwise ops on a [`Queue`] (`kernels/elementwise.cu`): grid-stride launches over
//! the output, every input at least as long.

use super::Version;
use crate::cuda::{check_len, DevPtr, DevPtrMut, Geometry, Kernel, KernelArgs, Queue};
use crate::error::Result;
use crate::ops::Grad;

const RELU_FWD_V1: Kernel = Kernel::new("elementwise", "relu_fwd_v1");
const RELU_BWD_V1: Kernel = Kernel::new("elementwise", "relu_bwd_v1");
const ADD_V1: Kernel = Kernel::new("elementwise", "add_v1");
const AXPY_V1: Kernel = Kernel::new("elementwise", "axpy_v1");
const F64_TO_F32_V1: Kernel = Kernel::new("elementwise", "f64_to_f32_v1");

/// y = max(x, 0).
pub fn relu_forward(
    q: &impl Queue,
    version: Version,
    x: DevPtr<'_, f32>,
    mut y: DevPtrMut<'_, f32>,
) -> Result<()> {
    let Version::V1 = version;
    let len = y.len();
    check_len("relu x", x.len(), len)?;
    let mut args = KernelArgs::new();
    args.input(x).output(&mut y).value(len as i64);
    // SAFETY: relu_fwd_v1(const float* x, float* y, long long len); both hold len floats.
    unsafe { q.launch(RELU_FWD_V1, Geometry::grid_stride(len), &mut args) }
}

/// dx (=|+=) dy where y > 0.
pub fn relu_backward(
    q: &impl Queue,
    version: Version,
    y: DevPtr<'_, f32>,
    dy: DevPtr<'_, f32>,
    mut dx: Grad<DevPtrMut<'_, f32>>,
) -> Result<()> {
    let Version::V1 = version;
    let len = dx.buf.len();
    check_len("relu y", y.len(), len)?;
    check_len("relu dy", dy.len(), len)?;
    let mut args = KernelArgs::new();
    args.input(y)
        .input(dy)
        .output(&mut dx.buf)
        .value(len as i64)
        .value(i32::from(dx.accumulate));
    // SAFETY: relu_bwd_v1(const float* y, const float* dy, float* dx, long long len,
    // int accumulate); every buffer holds len floats.
    unsafe { q.launch(RELU_BWD_V1, Geometry::grid_stride(len), &mut args) }
}

/// out (=|+=) x.
pub fn copy_or_add(
    q: &impl Queue,
    version: Version,
    x: DevPtr<'_, f32>,
    mut out: Grad<DevPtrMut<'_, f32>>,
) -> Result<()> {
    let Version::V1 = version;
    let len = out.buf.len();
    check_len("add x", x.len(), len)?;
    let mut args = KernelArgs::new();
    args.input(x)
        .output(&mut out.buf)
        .value(len as i64)
        .value(i32::from(out.accumulate));
    // SAFETY: add_v1(const float* x, float* out, long long len, int accumulate).
    unsafe { q.launch(ADD_V1, Geometry::grid_stride(len), &mut args) }
}

/// out (=|+=) scale x.
pub fn axpy(
    q: &impl Queue,
    version: Version,
    scale: f64,
    x: DevPtr<'_, f32>,
    mut out: Grad<DevPtrMut<'_, f32>>,
) -> Result<()> {
    let Version::V1 = version;
    let len = out.buf.len();
    check_len("axpy x", x.len(), len)?;
    let mut args = KernelArgs::new();
    args.value(scale as f32)
        .input(x)
        .output(&mut out.buf)
        .value(len as i64)
        .value(i32::from(out.accumulate));
    // SAFETY: axpy_v1(float alpha, const float* x, float* out, long long len, int accumulate).
    unsafe { q.launch(AXPY_V1, Geometry::grid_stride(len), &mut args) }
}

/// out = (float) x, elementwise (the loss's float64 scalar into a float32 node).
pub fn f64_to_f32(q: &impl Queue, x: DevPtr<'_, f64>, mut out: DevPtrMut<'_, f32>) -> Result<()> {
    let len = out.len();
    check_len("f64_to_f32 x", x.len(), len)?;
    let mut args = KernelArgs::new();
    args.input(x).output(&mut out).value(len as i64);
    // SAFETY: f64_to_f32_v1(const double* x, float* out, long long len).
    unsafe { q.launch(F64_TO_F32_V1, Geometry::grid_stride(len), &mut args) }
}
