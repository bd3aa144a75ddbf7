//! The linear layer on a [`Queue`]: `bias_rows_v1` + a GEMM forward; two GEMMs and
//! `column_sums_v1` backward (`kernels/linear.cu`).

use super::{Backward, Forward, Version};
use crate::cuda::{
    check_len, to_i32, DevPtr, DevPtrMut, Geometry, Kernel, KernelArgs, Queue, BLOCK,
};
use crate::cuda::{Gemm, GemmPrecision};
use crate::error::Result;

const BIAS_ROWS_V1: Kernel = Kernel::new("linear", "bias_rows_v1");
const COLUMN_SUMS_V1: Kernel = Kernel::new("linear", "column_sums_v1");

/// y = x W^T + b.
pub fn forward(
    q: &impl Queue,
    version: Version,
    a: Forward<DevPtr<'_, f32>, DevPtrMut<'_, f32>>,
    precision: GemmPrecision,
) -> Result<()> {
    let Version::V1 = version;
    let Forward {
        x,
        n,
        w,
        b,
        out,
        mut y,
    } = a;
    let inp = w.len() / out.max(1);
    check_len("linear x", x.len(), n * inp)?;
    check_len("linear b", b.len(), out)?;
    check_len("linear y", y.len(), n * out)?;
    let mut args = KernelArgs::new();
    args.input(b)
        .output(&mut y)
        .value(to_i32("N", n)?)
        .value(to_i32("out", out)?);
    // SAFETY: bias_rows_v1(const float* b, float* y, int rows, int cols); sizes checked.
    unsafe { q.launch(BIAS_ROWS_V1, Geometry::grid_stride(n * out), &mut args) }?;
    // y (N x out) += x (N x in) W^T
    q.gemm(&Gemm {
        trans_a: false,
        trans_b: true,
        m: n,
        n: out,
        k: inp,
        alpha: 1.0,
        a: x,
        lda: inp,
        b: w,
        ldb: inp,
        beta: 1.0,
        c: y,
        ldc: out,
        precision,
    })
}

/// dW += dY^T X, db += column sums of dY, dX (=|+=) dY W.
pub fn backward(
    q: &impl Queue,
    version: Version,
    a: Backward<DevPtr<'_, f32>, DevPtrMut<'_, f32>>,
    precision: GemmPrecision,
) -> Result<()> {
    let Version::V1 = version;
    let Backward {
        x,
        n,
        w,
        out,
        dy,
        dx,
        dw,
        mut db,
    } = a;
    let inp = w.len() / out.max(1);
    check_len("linear x", x.len(), n * inp)?;
    check_len("linear dy", dy.len(), n * out)?;
    check_len("linear dw", dw.len(), out * inp)?;
    check_len("linear db", db.len(), out)?;
    // dW (out x in) += dY^T (out x N) X (N x in)
    q.gemm(&Gemm {
        trans_a: true,
        trans_b: false,
        m: out,
        n: inp,
        k: n,
        alpha: 1.0,
        a: dy,
        lda: out,
        b: x,
        ldb: inp,
        beta: 1.0,
        c: dw,
        ldc: inp,
        precision,
    })?;
    let mut args = KernelArgs::new();
    args.input(dy)
        .output(&mut db)
        .value(to_i32("N", n)?)
        .value(to_i32("out", out)?);
    // SAFETY: column_sums_v1(const float* dy, float* db, int rows, int cols); one thread per
    // column, sizes checked above.
    let grid = Geometry::blocks(out.div_ceil(BLOCK as usize), BLOCK);
    unsafe { q.launch(COLUMN_SUMS_V1, grid, &mut args) }?;
    if let Some(dx) = dx {
        check_len("linear dx", dx.buf.len(), n * inp)?;
        // dX (N x in) = dY (N x out) W (out x in)
        q.gemm(&Gemm {
            trans_a: false,
            trans_b: false,
            m: n,
            n: inp,
            k: out,
            alpha: 1.0,
            a: dy,
            lda: out,
            b: w,
            ldb: inp,
            beta: if dx.accumulate { 1.0 } else { 0.0 },
            c: dx.buf,
            ldc: inp,
            precision,
        })?;
    }
    Ok(())
}
