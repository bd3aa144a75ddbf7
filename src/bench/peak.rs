//! The machine's peak floating-point rate, measured: an FMA-bound microbenchmark on every
//! thread at once, per precision, with the widest vector instructions the CPU has (chosen at
//! run time, whatever the binary was compiled for). `bench-loss` and `bench-train` print each
//! figure's share of it, so a figure says how far it is from the cores, not only from the gemm
//! crate's rate on its shapes (the floors of `bench::floor`).
//!
//! Each thread runs [`CHAINS`] independent chains of `acc = acc * a + b` on registers (enough
//! chains to cover the FMA latency, 4 cycles, on two FMA ports: 8 are needed, 12 leave
//! margin), so nothing but the FMA units bounds it. One FMA is 2 FLOPs a lane. Without FMA
//! (SSE2 only) it is a multiply and an add, 2 FLOPs a lane too, on separate ports.

use std::time::Instant;

use rayon::prelude::*;

/// Independent accumulation chains per thread.
pub const CHAINS: usize = 12;
/// Iterations of every chain per call (FLOPs per call = 2 x lanes x CHAINS x this).
const STEPS: usize = 4096;
const MIN_SECONDS: f64 = 0.05;
const REPEATS: usize = 3;

/// The peak of one precision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Peak {
    /// FLOP/s over every thread.
    pub flops: f64,
    /// The instructions it used ("avx512f", "avx2+fma", "sse2", "scalar").
    pub isa: &'static str,
    pub threads: usize,
}

/// The float32 and float64 peaks of this machine.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FmaPeak {
    pub f32: Peak,
    pub f64: Peak,
}

impl FmaPeak {
    /// Measures both (about 0.5 s).
    pub fn measure() -> FmaPeak {
        FmaPeak {
            f32: measure_one(Precision::F32),
            f64: measure_one(Precision::F64),
        }
    }

    /// The peak of `dtype` ("float32" or "float64", NumPy's names as `CpuFloat::NAME`).
    pub fn of(&self, dtype: &str) -> Peak {
        if dtype == "float64" {
            self.f64
        } else {
            self.f32
        }
    }

    /// One line for a table's notes.
    pub fn describe(&self) -> String {
        format!(
            "FMA peak of this machine (measured, {} threads, FMA chains on registers): float32 \
             {:.1} GFLOP/s ({}), float64 {:.1} GFLOP/s ({})",
            self.f32.threads,
            self.f32.flops / 1e9,
            self.f32.isa,
            self.f64.flops / 1e9,
            self.f64.isa
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Precision {
    F32,
    F64,
}

/// The widest kernel this CPU runs, its name and its FLOPs per call.
fn kernel(p: Precision) -> (&'static str, fn() -> f64, f64) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            let lanes = if p == Precision::F32 { 16.0 } else { 8.0 };
            let f: fn() -> f64 = match p {
                Precision::F32 => || unsafe { x86::avx512_f32() },
                Precision::F64 => || unsafe { x86::avx512_f64() },
            };
            return ("avx512f", f, flops_per_call(lanes));
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            let lanes = if p == Precision::F32 { 8.0 } else { 4.0 };
            let f: fn() -> f64 = match p {
                Precision::F32 => || unsafe { x86::avx2_f32() },
                Precision::F64 => || unsafe { x86::avx2_f64() },
            };
            return ("avx2+fma", f, flops_per_call(lanes));
        }
        let lanes = if p == Precision::F32 { 4.0 } else { 2.0 };
        let f: fn() -> f64 = match p {
            Precision::F32 => || unsafe { x86::sse2_f32() },
            Precision::F64 => || unsafe { x86::sse2_f64() },
        };
        ("sse2", f, flops_per_call(lanes))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let f: fn() -> f64 = match p {
            Precision::F32 => scalar_f32,
            Precision::F64 => scalar_f64,
        };
        ("scalar", f, flops_per_call(1.0))
    }
}

fn flops_per_call(lanes: f64) -> f64 {
    2.0 * lanes * (CHAINS * STEPS) as f64
}

fn measure_one(p: Precision) -> Peak {
    let (isa, f, flops) = kernel(p);
    let threads = rayon::current_num_threads().max(1);
    let mut best = 0.0f64;
    let mut sink = 0.0f64;
    for _ in 0..REPEATS {
        let mut reps = 1usize;
        loop {
            let start = Instant::now();
            let s: f64 = (0..threads)
                .into_par_iter()
                .map(|_| (0..reps).map(|_| f()).sum::<f64>())
                .sum();
            let secs = start.elapsed().as_secs_f64();
            sink += s;
            if secs >= MIN_SECONDS {
                best = best.max(flops * (reps * threads) as f64 / secs);
                break;
            }
            reps *= 2;
        }
    }
    std::hint::black_box(sink);
    Peak {
        flops: best,
        isa,
        threads,
    }
}

/// The chains' constants: a multiplier just below 1 and a small addend keep every value finite
/// and normal for any number of steps (the fixed point is b / (1 - a)).
const A: f64 = 0.999_999;
const B: f64 = 1e-7;

#[cfg(not(target_arch = "x86_64"))]
macro_rules! scalar_chains {
    ($name:ident, $t:ty) => {
        fn $name() -> f64 {
            let (a, b) = (std::hint::black_box(A as $t), std::hint::black_box(B as $t));
            let mut acc = [0.0 as $t; CHAINS];
            for (i, x) in acc.iter_mut().enumerate() {
                *x = i as $t;
            }
            for _ in 0..STEPS {
                for x in acc.iter_mut() {
                    *x = x.mul_add(a, b);
                }
            }
            acc.iter().map(|&x| x as f64).sum()
        }
    };
}
#[cfg(not(target_arch = "x86_64"))]
scalar_chains!(scalar_f32, f32);
#[cfg(not(target_arch = "x86_64"))]
scalar_chains!(scalar_f64, f64);

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! One function per instruction set, each compiled for it (`target_feature`) and called only
    //! where the CPU has it (checked by the caller at run time).
    use super::{A, B, CHAINS, STEPS};
    use std::arch::x86_64::*;

    /// `CHAINS` accumulators of type `$v`, each `acc = step(acc, a, b)` `STEPS` times; the sum
    /// of every lane at the end (so that nothing is optimised away).
    macro_rules! chains {
        ($name:ident, $feature:literal, $v:ty, $t:ty, $set1:ident, $step:ident, $store:ident, $lanes:expr) => {
            #[target_feature(enable = $feature)]
            pub(crate) unsafe fn $name() -> f64 {
                let a = $set1(std::hint::black_box(A as $t));
                let b = $set1(std::hint::black_box(B as $t));
                let mut acc: [$v; CHAINS] = [$set1(0.0); CHAINS];
                for (i, x) in acc.iter_mut().enumerate() {
                    *x = $set1(i as $t);
                }
                for _ in 0..STEPS {
                    // Unrolled by the compiler: CHAINS is a constant.
                    for x in acc.iter_mut() {
                        *x = $step(*x, a, b);
                    }
                }
                let mut total = 0.0f64;
                for x in acc {
                    let mut lanes = [0.0 as $t; $lanes];
                    // SAFETY: `lanes` holds one vector's elements; an unaligned store.
                    unsafe { $store(lanes.as_mut_ptr(), x) };
                    total += lanes.iter().map(|&l| l as f64).sum::<f64>();
                }
                total
            }
        };
    }

    /// SSE2 has no FMA: a multiply, then an add (SSE2 is in every x86-64 CPU).
    #[inline]
    #[target_feature(enable = "sse2")]
    fn mul_add_ps(x: __m128, a: __m128, b: __m128) -> __m128 {
        _mm_add_ps(_mm_mul_ps(x, a), b)
    }
    #[inline]
    #[target_feature(enable = "sse2")]
    fn mul_add_pd(x: __m128d, a: __m128d, b: __m128d) -> __m128d {
        _mm_add_pd(_mm_mul_pd(x, a), b)
    }

    #[rustfmt::skip]
    mod kernels {
        use super::*;
        chains!(avx512_f32, "avx512f", __m512, f32, _mm512_set1_ps, _mm512_fmadd_ps, _mm512_storeu_ps, 16);
        chains!(avx512_f64, "avx512f", __m512d, f64, _mm512_set1_pd, _mm512_fmadd_pd, _mm512_storeu_pd, 8);
        chains!(avx2_f32, "avx2,fma", __m256, f32, _mm256_set1_ps, _mm256_fmadd_ps, _mm256_storeu_ps, 8);
        chains!(avx2_f64, "avx2,fma", __m256d, f64, _mm256_set1_pd, _mm256_fmadd_pd, _mm256_storeu_pd, 4);
        chains!(sse2_f32, "sse2", __m128, f32, _mm_set1_ps, mul_add_ps, _mm_storeu_ps, 4);
        chains!(sse2_f64, "sse2", __m128d, f64, _mm_set1_pd, mul_add_pd, _mm_storeu_pd, 2);
    }
    pub(super) use kernels::*;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_this_cpu_runs_computes_the_chains_value() {
        // The chains' closed form: x_k = a^k x_0 + b (1 - a^k) / (1 - a), summed over the
        // chains' starts 0..CHAINS and every lane; each kernel (the one chosen and the narrower
        // ones the CPU also runs) must give it, so none is optimised into something else.
        let ak = A.powi(STEPS as i32);
        let per_lane: f64 = (0..CHAINS)
            .map(|i| ak * i as f64 + B * (1.0 - ak) / (1.0 - A))
            .sum();
        // (name, kernel, lanes, relative bound)
        type Case = (&'static str, fn() -> f64, f64, f64);
        let mut kernels: Vec<Case> = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            kernels.push(("sse2 f32", || unsafe { x86::sse2_f32() }, 4.0, 2e-3));
            kernels.push(("sse2 f64", || unsafe { x86::sse2_f64() }, 2.0, 1e-9));
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                kernels.push(("avx2 f32", || unsafe { x86::avx2_f32() }, 8.0, 2e-3));
                kernels.push(("avx2 f64", || unsafe { x86::avx2_f64() }, 4.0, 1e-9));
            }
            if std::is_x86_feature_detected!("avx512f") {
                kernels.push(("avx512 f32", || unsafe { x86::avx512_f32() }, 16.0, 2e-3));
                kernels.push(("avx512 f64", || unsafe { x86::avx512_f64() }, 8.0, 1e-9));
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            kernels.push(("scalar f32", scalar_f32, 1.0, 1e-3));
            kernels.push(("scalar f64", scalar_f64, 1.0, 1e-9));
        }
        for (name, f, lanes, tol) in kernels {
            let want = per_lane * lanes;
            let got = f();
            assert!((got - want).abs() <= tol * want, "{name}: {got} vs {want}");
        }
    }

    #[test]
    fn the_peak_is_measured_for_both_precisions() {
        let p = FmaPeak::measure();
        assert!(p.f32.flops > 0.0 && p.f64.flops > 0.0, "{p:?}");
        assert_eq!(p.f32.isa, p.f64.isa);
        assert!(p.describe().contains("GFLOP/s"));
    }
}
