//! The elementwise ops on the CPU, over chunks of 4096 elements on rayon's threads.

use rayon::prelude::*;

use crate::ops::Grad;
use crate::simd::CpuFloat;

/// y = max(x, 0).
pub fn relu_forward<T: CpuFloat>(x: &[T], y: &mut [T]) {
    y.par_chunks_mut(4096)
        .zip(x.par_chunks(4096))
        .for_each(|(yc, xc)| {
            for (o, &v) in yc.iter_mut().zip(xc) {
                *o = if v > T::ZERO { v } else { T::ZERO };
            }
        });
}

/// dx (=|+=) dy where y > 0, else 0 (y is the forward's output).
pub fn relu_backward<T: CpuFloat>(y: &[T], dy: &[T], dx: Grad<&mut [T]>) {
    let Grad {
        buf: dx,
        accumulate,
    } = dx;
    dx.par_chunks_mut(4096)
        .zip(dy.par_chunks(4096))
        .zip(y.par_chunks(4096))
        .for_each(|((dc, gc), yc)| {
            for ((d, &g), &v) in dc.iter_mut().zip(gc).zip(yc) {
                let pass = if v > T::ZERO { g } else { T::ZERO };
                *d = if accumulate { *d + pass } else { pass };
            }
        });
}

/// out (=|+=) x.
pub fn copy_or_add<T: CpuFloat>(x: &[T], out: Grad<&mut [T]>) {
    if out.accumulate {
        add_into(x, out.buf);
    } else {
        out.buf.copy_from_slice(x);
    }
}

/// out += x (elementwise).
pub fn add_into<T: CpuFloat>(x: &[T], out: &mut [T]) {
    out.par_chunks_mut(4096)
        .zip(x.par_chunks(4096))
        .for_each(|(oc, xc)| {
            for (o, &v) in oc.iter_mut().zip(xc) {
                *o = *o + v;
            }
        });
}

/// out (=|+=) scale x.
pub fn axpy<T: CpuFloat>(scale: f64, x: &[T], out: Grad<&mut [T]>) {
    let s = T::of(scale);
    for (d, &v) in out.buf.iter_mut().zip(x) {
        *d = if out.accumulate { *d + s * v } else { s * v };
    }
}
