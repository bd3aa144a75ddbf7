//! Row normalization on the CPU: float32 or float64 storage, float64 accumulation, rayon
//! over rows.

use rayon::prelude::*;

use super::{check_len, NORM_EPS};
use crate::error::Result;
use crate::simd::CpuFloat;

/// Forward on the CPU: returns (f, norms) for an N x d row-major `z`; `norms` are unclamped.
/// float64 accumulation whatever `T` is.
pub fn forward<T: CpuFloat>(z: &[T], n: usize, d: usize) -> Result<(Vec<T>, Vec<T>)> {
    check_len("z", z.len(), n, d)?;
    let mut f = vec![T::ZERO; n * d];
    let mut norms = vec![T::ZERO; n];
    if d == 0 {
        return Ok((f, norms));
    }
    f.par_chunks_mut(d)
        .zip(z.par_chunks(d))
        .zip(norms.par_iter_mut())
        .for_each(|((fr, zr), norm)| {
            let sumsq: f64 = zr.iter().map(|&x| x.into() * x.into()).sum();
            let n64 = sumsq.sqrt();
            let inv = 1.0 / n64.max(NORM_EPS);
            for (o, &x) in fr.iter_mut().zip(zr) {
                *o = T::of(x.into() * inv);
            }
            *norm = T::of(n64);
        });
    Ok((f, norms))
}

/// Backward on the CPU: dL/dz from dL/df, the forward's `f` and `norms`.
pub fn backward<T: CpuFloat>(
    f: &[T],
    norms: &[T],
    grad_f: &[T],
    n: usize,
    d: usize,
) -> Result<Vec<T>> {
    check_len("f", f.len(), n, d)?;
    check_len("grad_f", grad_f.len(), n, d)?;
    check_len("norms", norms.len(), n, 1)?;
    let mut grad_z = vec![T::ZERO; n * d];
    if d == 0 {
        return Ok(grad_z);
    }
    grad_z.par_chunks_mut(d).enumerate().for_each(|(a, out)| {
        let (fa, ga) = (&f[a * d..(a + 1) * d], &grad_f[a * d..(a + 1) * d]);
        let norm: f64 = norms[a].into();
        if norm > NORM_EPS {
            let dot: f64 = fa.iter().zip(ga).map(|(&x, &y)| x.into() * y.into()).sum();
            for ((o, &g), &x) in out.iter_mut().zip(ga).zip(fa) {
                *o = T::of((g.into() - x.into() * dot) / norm);
            }
        } else {
            for (o, &g) in out.iter_mut().zip(ga) {
                *o = T::of(g.into() / NORM_EPS);
            }
        }
    });
    Ok(grad_z)
}
