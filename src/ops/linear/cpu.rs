//! The linear layer on the CPU: GEMMs through [`crate::linalg`], float64 bias sums.

use super::{Backward, Forward};
use crate::error::{Error, Result};
use crate::linalg::{matmul, MatRef};
use crate::simd::CpuFloat;

/// Input features: W's columns.
fn in_features(w_len: usize, out: usize) -> Result<usize> {
    if out == 0 || !w_len.is_multiple_of(out) {
        return Err(Error::invalid(format!(
            "linear: {w_len} weights are not rows of {out} outputs"
        )));
    }
    Ok(w_len / out)
}

/// y = x w^T + b; x is N x in, w is out x in.
pub fn forward<T: CpuFloat>(a: Forward<&[T], &mut [T]>) -> Result<()> {
    let Forward { x, n, w, b, out, y } = a;
    let inp = in_features(w.len(), out)?;
    matmul(
        MatRef::row_major(x, n, inp),
        MatRef::transposed(w, out, inp),
        y,
        out,
        T::ONE,
        false,
    )?;
    for row in y.chunks_mut(out) {
        for (o, &bias) in row.iter_mut().zip(b) {
            *o = *o + bias;
        }
    }
    Ok(())
}

/// dw += dy^T x, db += column sums of dy, dx (=|+=) dy w (when given).
pub fn backward<T: CpuFloat>(a: Backward<&[T], &mut [T]>) -> Result<()> {
    let Backward {
        x,
        n,
        w,
        out,
        dy,
        dx,
        dw,
        db,
    } = a;
    let inp = in_features(w.len(), out)?;
    matmul(
        MatRef::transposed(dy, n, out),
        MatRef::row_major(x, n, inp),
        dw,
        inp,
        T::ONE,
        true,
    )?;
    for j in 0..out {
        let s: f64 = (0..n).map(|i| dy[i * out + j].into()).sum();
        db[j] = T::of(db[j].into() + s);
    }
    if let Some(dx) = dx {
        matmul(
            MatRef::row_major(dy, n, out),
            MatRef::row_major(w, out, inp),
            dx.buf,
            inp,
            T::ONE,
            dx.accumulate,
        )?;
    }
    Ok(())
}
