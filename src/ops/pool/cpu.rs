//! Average pooling on the CPU, float64 window sums, rayon over planes.

use rayon::prelude::*;

use crate::ops::{Grad, Shape4};
use crate::simd::CpuFloat;

/// y = the k x k means of x.
pub fn forward<T: CpuFloat>(x: &[T], xs: Shape4, k: usize, y: &mut [T]) {
    let ys = super::out_shape(xs, k);
    let scale = 1.0 / (k * k) as f64;
    y.par_chunks_mut(ys.h * ys.w)
        .zip(x.par_chunks(xs.h * xs.w))
        .for_each(|(yp, xp)| {
            for oy in 0..ys.h {
                for ox in 0..ys.w {
                    let mut s = 0.0f64;
                    for i in 0..k {
                        for j in 0..k {
                            s += xp[(oy * k + i) * xs.w + ox * k + j].into();
                        }
                    }
                    yp[oy * ys.w + ox] = T::of(s * scale);
                }
            }
        });
}

/// dx (=|+=) the pooled gradient spread evenly over each window.
pub fn backward<T: CpuFloat>(xs: Shape4, k: usize, dy: &[T], dx: Grad<&mut [T]>) {
    let Grad {
        buf: dx,
        accumulate,
    } = dx;
    let (hy, wy) = (xs.h / k, xs.w / k);
    let scale = T::of(1.0 / (k * k) as f64);
    dx.par_chunks_mut(xs.h * xs.w)
        .zip(dy.par_chunks(hy * wy))
        .for_each(|(dxp, dyp)| {
            for oy in 0..hy {
                for ox in 0..wy {
                    let g = dyp[oy * wy + ox] * scale;
                    for i in 0..k {
                        for j in 0..k {
                            let idx = (oy * k + i) * xs.w + ox * k + j;
                            dxp[idx] = if accumulate { dxp[idx] + g } else { g };
                        }
                    }
                }
            }
        });
}
