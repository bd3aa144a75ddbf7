//! Row L2-normalisation, f_a = z_a / max(||z_a||, eps), forward and backward.
//!
//! CPU: float32 storage, float64 accumulation. CUDA: `kernels/normalize_rows.cu`
//! (`normalize_rows_fwd_v1`, `normalize_rows_bwd_v1`), one warp per row.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use rayon::prelude::*;

use crate::cuda::{to_i32, Gpu};
use crate::error::{Error, Result};
use crate::loss::NORM_EPS;
use crate::simd::CpuFloat;

/// Forward on the CPU: returns (f, norms) for an N x d row-major `z`; `norms` are unclamped.
/// float64 accumulation whatever `T` is.
pub fn forward_cpu<T: CpuFloat>(z: &[T], n: usize, d: usize) -> Result<(Vec<T>, Vec<T>)> {
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
pub fn backward_cpu<T: CpuFloat>(
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

const ROWS_PER_BLOCK: u32 = 8;

fn launch_config(n: i32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((n as u32).div_ceil(ROWS_PER_BLOCK).max(1), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Forward on the GPU (`normalize_rows_fwd_v1`): writes f (N x d) and norms (N).
pub fn forward_cuda(
    gpu: &Gpu,
    z: &CudaSlice<f32>,
    f: &mut CudaSlice<f32>,
    norms: &mut CudaSlice<f32>,
    n: usize,
    d: usize,
) -> Result<()> {
    check_len("z", z.len(), n, d)?;
    check_len("f", f.len(), n, d)?;
    check_len("norms", norms.len(), n, 1)?;
    let (n32, d32) = (to_i32("N", n)?, to_i32("d", d)?);
    if n == 0 {
        return Ok(());
    }
    let func = gpu.function("normalize_rows", "normalize_rows_fwd_v1")?;
    let mut launch = gpu.stream().launch_builder(&func);
    launch.arg(z).arg(f).arg(norms).arg(&n32).arg(&d32);
    // SAFETY: the argument list matches the kernel's signature and every buffer holds N x d
    // (or N) floats, checked above.
    unsafe { launch.launch(launch_config(n32)) }?;
    Ok(())
}

/// Backward on the GPU (`normalize_rows_bwd_v1`): dz from df, f and norms.
pub fn backward_cuda(
    gpu: &Gpu,
    f: &CudaSlice<f32>,
    norms: &CudaSlice<f32>,
    grad_f: &CudaSlice<f32>,
    grad_z: &mut CudaSlice<f32>,
    n: usize,
    d: usize,
) -> Result<()> {
    check_len("f", f.len(), n, d)?;
    check_len("norms", norms.len(), n, 1)?;
    check_len("grad_f", grad_f.len(), n, d)?;
    check_len("grad_z", grad_z.len(), n, d)?;
    let (n32, d32) = (to_i32("N", n)?, to_i32("d", d)?);
    if n == 0 {
        return Ok(());
    }
    let func = gpu.function("normalize_rows", "normalize_rows_bwd_v1")?;
    let mut launch = gpu.stream().launch_builder(&func);
    launch
        .arg(f)
        .arg(norms)
        .arg(grad_f)
        .arg(grad_z)
        .arg(&n32)
        .arg(&d32);
    // SAFETY: as in forward_cuda.
    unsafe { launch.launch(launch_config(n32)) }?;
    Ok(())
}

fn check_len(name: &str, len: usize, n: usize, d: usize) -> Result<()> {
    if len != n * d {
        return Err(Error::invalid(format!(
            "{name} has {len} elements, expected {n} x {d} = {}",
            n * d
        )));
    }
    Ok(())
}
