//! Floors on the CPU: the least time a version could take on the machine it runs on, from rates
//! measured there and then. A version's floor is the time its matrix products would take at
//! the rate the `gemm` crate reaches on exactly those shapes (each thread running its own
//! product, as the ops do), plus, for the loss, its exponentials and logarithms at the rates
//! of our SIMD `exp` and `ln_one_minus`.
//! Everything else (im2col, transforms, batchnorm, memory traffic) counts as overhead: the
//! ratio of a measured time to its floor says how much of it there is.

use std::collections::HashMap;
use std::time::Instant;

use rayon::prelude::*;

use crate::error::Result;
use crate::linalg::{matmul, GemmShape, MatRef};
use crate::loss::GradSemantics;
use crate::simd::CpuFloat;

/// Measured rates, each measured once per shape and element type.
#[derive(Debug, Default)]
pub struct Rates {
    gemm: HashMap<(usize, usize, usize, &'static str), f64>,
    /// (function, element type) -> elements per second.
    simd: HashMap<(&'static str, &'static str), f64>,
    /// The machine's FMA peak, measured on first use.
    peak: Option<super::peak::FmaPeak>,
}

/// At least this long per measurement, and the best of [`REPEATS`].
const MIN_SECONDS: f64 = 0.02;
const REPEATS: usize = 3;

/// Runs `f` once per thread at the same time (on all of rayon's threads) until `MIN_SECONDS`
/// have passed; the best of [`REPEATS`] of (work per second) where `f` does `work` units.
fn parallel_rate(work: f64, f: impl Fn() -> Result<()> + Sync) -> Result<f64> {
    let threads = rayon::current_num_threads().max(1);
    let mut best = 0.0f64;
    for _ in 0..REPEATS {
        let mut reps = 1usize;
        loop {
            let start = Instant::now();
            (0..threads)
                .into_par_iter()
                .try_for_each(|_| (0..reps).try_for_each(|_| f()))?;
            let s = start.elapsed().as_secs_f64();
            if s >= MIN_SECONDS {
                best = best.max(work * (reps * threads) as f64 / s);
                break;
            }
            reps *= 2;
        }
    }
    Ok(best)
}

impl Rates {
    /// The machine's FMA peak per precision, every thread busy ([`super::peak`]).
    pub fn fma_peak(&mut self) -> super::peak::FmaPeak {
        *self.peak.get_or_insert_with(super::peak::FmaPeak::measure)
    }

    /// FLOP/s of `gemm` on `m x k` times `k x n` in T, all threads each running one product.
    /// Both operands are row-major here: a version whose operands are transposed or strided
    /// (the loss's F^T, Winograd's kernels) pays the difference in packing, and it shows in
    /// its ratio to the floor.
    pub fn gemm<T: CpuFloat>(&mut self, m: usize, n: usize, k: usize) -> Result<f64> {
        if let Some(&r) = self.gemm.get(&(m, n, k, T::NAME)) {
            return Ok(r);
        }
        let a: Vec<T> = (0..m * k).map(|i| T::of((i % 13) as f64 * 0.01)).collect();
        let b: Vec<T> = (0..k * n).map(|i| T::of((i % 7) as f64 * 0.01)).collect();
        let flops = 2.0 * (m * n * k) as f64;
        let rate = parallel_rate(flops, || {
            let mut c = vec![T::ZERO; m * n];
            matmul(
                MatRef::row_major(&a, m, k),
                MatRef::row_major(&b, k, n),
                &mut c,
                n,
                T::ONE,
                false,
            )
        })?;
        self.gemm.insert((m, n, k, T::NAME), rate);
        Ok(rate)
    }

    /// Exponentials per second of the SIMD `exp` in T (an L1-resident row), all threads.
    pub fn exp<T: CpuFloat>(&mut self) -> Result<f64> {
        let input = |i: usize| -((i % 100) as f64) * 0.01;
        self.simd_rate::<T>("exp", input, T::exp)
    }

    /// Logarithms ln(1 - q) per second of the SIMD `ln_one_minus` in T, all threads.
    pub fn ln<T: CpuFloat>(&mut self) -> Result<f64> {
        let input = |i: usize| (i % 100) as f64 * 0.009;
        self.simd_rate::<T>("ln", input, T::ln_one_minus)
    }

    /// Elements per second of `f` over an L1-resident row of `input(i)` in T, all threads.
    fn simd_rate<T: CpuFloat>(
        &mut self,
        name: &'static str,
        input: impl Fn(usize) -> f64 + Sync,
        f: impl Fn(T::V) -> T::V + Sync,
    ) -> Result<f64> {
        if let Some(&r) = self.simd.get(&(name, T::NAME)) {
            return Ok(r);
        }
        const LEN: usize = 4096;
        let rate = parallel_rate(LEN as f64, || {
            let mut row: Vec<T> = (0..LEN).map(|i| T::of(input(i))).collect();
            // At the level the loss runs at (simd::dispatch), as the loss's rows are.
            crate::simd::dispatch(
                #[inline(always)]
                || crate::simd::map_row(&mut row, T::ZERO, &f),
            );
            std::hint::black_box(&row);
            Ok(())
        })?;
        self.simd.insert((name, T::NAME), rate);
        Ok(rate)
    }

    /// Seconds the products `shapes` take at the measured rates.
    pub fn gemm_seconds<T: CpuFloat>(&mut self, shapes: &[GemmShape]) -> Result<f64> {
        let mut s = 0.0;
        for g in shapes {
            s += g.flops() / self.gemm::<T>(g.m, g.n, g.k)?;
        }
        Ok(s)
    }

    /// The fused CPU loss's floor: its useful products in blocks of `row_block` query rows
    /// (a block's N x d similarity product, and per gradient pass one more of the same size),
    /// N^2 exponentials and N^2 logarithms (every negative's log(1 - Q_ab)).
    pub fn loss_seconds<T: CpuFloat>(
        &mut self,
        (n, d, row_block): (usize, usize, usize),
        with_grad: bool,
        semantics: GradSemantics,
    ) -> Result<f64> {
        let passes = match (with_grad, semantics) {
            (false, _) => 1,
            (true, GradSemantics::QueryOnly) => 2,
            (true, GradSemantics::BothSides) => 3,
        };
        let blocks = n.div_ceil(row_block);
        let block = GemmShape {
            m: row_block.min(n),
            n,
            k: d,
            count: blocks * passes,
        };
        let gemm = self.gemm_seconds::<T>(&[block])?;
        let pairs = (n * n) as f64;
        Ok(gemm + pairs / self.exp::<T>()? + pairs / self.ln::<T>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_positive_and_a_larger_product_takes_longer() {
        let mut r = Rates::default();
        let mut seconds = |m, n, k, count| {
            let shape = GemmShape { m, n, k, count };
            r.gemm_seconds::<f32>(&[shape]).unwrap()
        };
        let (small, large) = (seconds(16, 16, 16, 1), seconds(64, 256, 64, 4));
        assert!(small > 0.0 && large > small, "{small} {large}");
        assert!(r.exp::<f32>().unwrap() > 0.0 && r.ln::<f64>().unwrap() > 0.0);
    }
}
