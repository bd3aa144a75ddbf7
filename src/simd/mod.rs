//! Float types the CPU paths are generic over (f32 and f64), their SIMD vectors (8 x f32,
//! 4 x f64) with exp and ln, row helpers that handle the tail of a row so callers only write the
//! per-vector math, and the run-time choice of instructions ([`dispatch`]).
//!
//! The vectors are plain arrays whose every operation is a loop over the lanes, always inlined:
//! the compiler turns them into whatever vector instructions the function they land in is
//! compiled for. [`dispatch`] runs a closure inside a function compiled for AVX-512, for AVX2
//! with FMA, or for the x86-64 baseline (SSE2), whichever the CPU has, checked at run time: so
//! one binary runs on any x86-64 CPU and uses the widest instructions it finds, and the
//! repository's build configuration names no target CPU. The hot loops (the loss's rows, the
//! Winograd transforms) call it once per block of work, so the check costs nothing.
//!
//! exp and ln are written here, branch-free per lane (range reduction to 2^n e^r and
//! 2^e m, then polynomials), so that they vectorise as the rest does: within 2 ulp for f32 and
//! 4 ulp for f64 over the range the loss uses (tests below and in `tests/cpu/`).

use std::ops::{Add, Div, Mul, Sub};
use std::sync::OnceLock;

use crate::linalg::GemmScalar;

/// The instructions a [`dispatch`]ed closure is compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// x86-64's baseline (SSE2), or the target's own on other architectures.
    Baseline,
    /// AVX2 and FMA (x86-64-v3).
    Avx2Fma,
    /// AVX-512 F and VL (with AVX2 and FMA).
    Avx512,
}

impl Level {
    pub fn name(self) -> &'static str {
        match self {
            Level::Baseline => "baseline",
            Level::Avx2Fma => "avx2+fma",
            Level::Avx512 => "avx512f",
        }
    }

    /// Whether this CPU runs code of this level.
    pub fn is_available(self) -> bool {
        match self {
            Level::Baseline => true,
            #[cfg(target_arch = "x86_64")]
            Level::Avx2Fma => {
                std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => {
                std::is_x86_feature_detected!("avx512f") && Level::Avx2Fma.is_available()
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// Every level this CPU runs, lowest first.
    pub fn available() -> Vec<Level> {
        [Level::Baseline, Level::Avx2Fma, Level::Avx512]
            .into_iter()
            .filter(|l| l.is_available())
            .collect()
    }

    /// The highest level this CPU runs (detected once).
    pub fn detected() -> Level {
        static DETECTED: OnceLock<Level> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            Level::available()
                .into_iter()
                .last()
                .unwrap_or(Level::Baseline)
        })
    }
}

/// 0: none; else 1 + the level [`force_level`] set.
static FORCED: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Makes [`dispatch`] run every closure at `level` (where the CPU has it) instead of the highest,
/// process-wide; `None` undoes it. For tests and comparisons: every level computes the same
/// bits (no operation is contracted into an FMA, and every reduction keeps its order), so
/// another thread's results do not change meanwhile, only its speed.
pub fn force_level(level: Option<Level>) {
    let code = match level {
        None => 0,
        Some(Level::Baseline) => 1,
        Some(Level::Avx2Fma) => 2,
        Some(Level::Avx512) => 3,
    };
    FORCED.store(code, std::sync::atomic::Ordering::Relaxed);
}

/// The level [`dispatch`] runs at now.
pub fn current_level() -> Level {
    match FORCED.load(std::sync::atomic::Ordering::Relaxed) {
        1 => Level::Baseline,
        2 => Level::Avx2Fma,
        3 => Level::Avx512,
        _ => Level::detected(),
    }
}

/// Runs `f` compiled for the highest [`Level`] this CPU has (or the one [`force_level`] set).
#[inline(always)]
pub fn dispatch<R>(f: impl FnOnce() -> R) -> R {
    with_level(current_level(), f)
}

/// Runs `f` compiled for `level`, or for the baseline where this CPU lacks `level` (tests run
/// every available level on the same inputs). `f`, and what it calls with `#[inline(always)]`,
/// is inlined into a function compiled for the level.
#[inline(always)]
pub fn with_level<R>(level: Level, f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        if level == Level::Avx512 && level.is_available() {
            // SAFETY: the CPU has AVX-512 F and VL, AVX2 and FMA (checked just above).
            return unsafe { on_avx512(f) };
        }
        if level == Level::Avx2Fma && level.is_available() {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            return unsafe { on_avx2(f) };
        }
    }
    let _ = level;
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
unsafe fn on_avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn on_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// f32 or f64 on the CPU: scalar conversions, a SIMD vector type and its math.
pub trait CpuFloat:
    GemmScalar
    + Default
    + PartialOrd
    + Into<f64>
    + std::fmt::Debug
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
{
    /// The SIMD vector of this type.
    type V: Copy
        + Add<Output = Self::V>
        + Sub<Output = Self::V>
        + Mul<Output = Self::V>
        + Div<Output = Self::V>;
    /// Elements per vector.
    const LANES: usize;
    /// Rounds an f64 to this type.
    fn of(x: f64) -> Self;
    fn splat(x: Self) -> Self::V;
    /// Loads exactly `LANES` elements.
    fn load(s: &[Self]) -> Self::V;
    /// Stores exactly `LANES` elements.
    fn store(v: Self::V, s: &mut [Self]);
    fn exp(v: Self::V) -> Self::V;
    fn ln(v: Self::V) -> Self::V;
    /// ln(1 - q) for 0 <= q < 1. Below q = 2^-10 by its series -q - q^2/2 - q^3/3 (relative
    /// error under 1e-9): `ln` near 1 squares its tiny mantissa offset into float32 denormals,
    /// each a microcode assist of ~100 cycles (the fused f32 loss at N = 16,384 spent 70% of
    /// its time there and ran slower than float64).
    fn ln_one_minus(q: Self::V) -> Self::V;
    fn max(a: Self::V, b: Self::V) -> Self::V;
    /// The lanes' sum, in f64.
    fn sum_f64(v: Self::V) -> f64;
    /// The lanes' maximum.
    fn max_lane(v: Self::V) -> Self;
    /// The dtype's name as NumPy spells it.
    const NAME: &'static str;
}

mod lanes;
pub use lanes::{exp_f32, exp_f64, ln_f32, ln_f64, F32x8, F64x4};

macro_rules! impl_cpu_float {
    ($t:ty, $v:ident, $lanes:expr, $name:expr, $exp:ident, $ln:ident) => {
        impl CpuFloat for $t {
            type V = $v;
            const LANES: usize = $lanes;
            const NAME: &'static str = $name;
            #[inline(always)]
            fn of(x: f64) -> Self {
                x as $t
            }
            #[inline(always)]
            fn splat(x: Self) -> Self::V {
                $v([x; $lanes])
            }
            #[inline(always)]
            fn load(s: &[Self]) -> Self::V {
                let arr: [$t; $lanes] = s[..$lanes].try_into().expect("load takes LANES elements");
                $v(arr)
            }
            #[inline(always)]
            fn store(v: Self::V, s: &mut [Self]) {
                s[..$lanes].copy_from_slice(&v.0);
            }
            #[inline(always)]
            fn exp(v: Self::V) -> Self::V {
                v.map($exp)
            }
            #[inline(always)]
            fn ln(v: Self::V) -> Self::V {
                v.map($ln)
            }
            #[inline(always)]
            fn ln_one_minus(q: Self::V) -> Self::V {
                q.map(|q| {
                    let small = q < 1.0 / 1024.0;
                    let series = -(q + q * q * (0.5 + q * (1.0 / 3.0)));
                    let arg = if small { 0.5 } else { 1.0 - q };
                    let ln = $ln(arg);
                    if small {
                        series
                    } else {
                        ln
                    }
                })
            }
            #[inline(always)]
            fn max(a: Self::V, b: Self::V) -> Self::V {
                // NaN in a lane of `a` or `b` gives the other (as wide's max did).
                a.zip(b, |x, y| if x > y || y.is_nan() { x } else { y })
            }
            #[inline(always)]
            fn sum_f64(v: Self::V) -> f64 {
                v.0.iter().map(|&x| f64::from(x)).sum()
            }
            #[inline(always)]
            fn max_lane(v: Self::V) -> Self {
                v.0.into_iter().fold(<$t>::NEG_INFINITY, <$t>::max)
            }
        }
    };
}
impl_cpu_float!(f32, F32x8, 8, "float32", exp_f32, ln_f32);
impl_cpu_float!(f64, F64x4, 4, "float64", exp_f64, ln_f64);

/// Applies `f` to a row in place, a vector at a time; the tail is padded with `pad`.
#[inline(always)]
pub fn map_row<T: CpuFloat>(row: &mut [T], pad: T, f: impl Fn(T::V) -> T::V) {
    let mut chunks = row.chunks_exact_mut(T::LANES);
    for c in &mut chunks {
        T::store(f(T::load(c)), c);
    }
    let tail = chunks.into_remainder();
    if !tail.is_empty() {
        let mut buf = [pad; 8];
        buf[..tail.len()].copy_from_slice(tail);
        T::store(f(T::load(&buf)), &mut buf);
        let n = tail.len();
        tail.copy_from_slice(&buf[..n]);
    }
}

/// Like [`map_row`], with the same positions of three side rows loaded beside the row.
#[inline(always)]
pub fn map_row_with<T: CpuFloat>(
    row: &mut [T],
    side: [&[T]; 3],
    f: impl Fn(T::V, [T::V; 3]) -> T::V,
) {
    let n = row.len();
    let whole = n - n % T::LANES;
    let mut i = 0;
    while i < whole {
        let v = f(T::load(&row[i..]), side.map(|s| T::load(&s[i..])));
        T::store(v, &mut row[i..]);
        i += T::LANES;
    }
    if whole < n {
        let pad = |s: &[T]| {
            let mut buf = [T::ONE; 8];
            buf[..n - whole].copy_from_slice(&s[whole..]);
            buf
        };
        let (mut buf, sides) = (pad(row), side.map(pad));
        T::store(f(T::load(&buf), sides.map(|s| T::load(&s))), &mut buf);
        row[whole..].copy_from_slice(&buf[..n - whole]);
    }
}

/// Sums `f` over a row into `K` f64 totals; tail lanes beyond the row are not counted.
#[inline(always)]
pub fn sum_row<T: CpuFloat, const K: usize>(row: &[T], f: impl Fn(T::V) -> [T::V; K]) -> [f64; K] {
    // Vectors are added in T for up to FLUSH vectors, then folded into f64: accurate enough
    // (at most FLUSH terms per lane in T) and far cheaper than widening every element.
    const FLUSH: usize = 32;
    let mut total = [0.0f64; K];
    let zero = T::splat(T::ZERO);
    let mut acc = [zero; K];
    let mut chunks = row.chunks_exact(T::LANES);
    for (i, c) in (&mut chunks).enumerate() {
        let terms = f(T::load(c));
        for k in 0..K {
            acc[k] = acc[k] + terms[k];
        }
        if (i + 1) % FLUSH == 0 {
            for k in 0..K {
                total[k] += T::sum_f64(acc[k]);
                acc[k] = zero;
            }
        }
    }
    for k in 0..K {
        total[k] += T::sum_f64(acc[k]);
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        let mut buf = [T::ZERO; 8];
        buf[..tail.len()].copy_from_slice(tail);
        let terms = f(T::load(&buf));
        let mut lanes = [T::ZERO; 8];
        for k in 0..K {
            T::store(terms[k], &mut lanes);
            total[k] += lanes[..tail.len()].iter().map(|&x| x.into()).sum::<f64>();
        }
    }
    total
}

/// The maximum of a row.
#[inline(always)]
pub fn row_max<T: CpuFloat>(row: &[T]) -> T {
    let mut best = T::splat(T::of(f64::NEG_INFINITY));
    let mut chunks = row.chunks_exact(T::LANES);
    for c in &mut chunks {
        best = T::max(best, T::load(c));
    }
    let mut m = T::max_lane(best);
    for &x in chunks.remainder() {
        if x > m {
            m = x;
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check<T: CpuFloat>() {
        for n in [1usize, 7, 8, 9, 33, 300] {
            let mut row: Vec<T> = (0..n).map(|i| T::of((i as f64 * 0.7).sin())).collect();
            let orig = row.clone();
            let [s, s2] = sum_row(&row, |v| [v, v * v]);
            let want: f64 = orig.iter().map(|&x| x.into()).sum();
            let want2: f64 = orig.iter().map(|&x| x.into() * x.into()).sum();
            assert!(
                (s - want).abs() < 1e-5 && (s2 - want2).abs() < 1e-5,
                "{} n={n}",
                T::NAME
            );
            let m: f64 = row_max(&row).into();
            assert_eq!(
                m,
                orig.iter()
                    .map(|&x| x.into())
                    .fold(f64::NEG_INFINITY, f64::max)
            );
            let mut ln1m: Vec<T> = orig
                .iter()
                .map(|&x| T::of(0.5 * (x.into() + 1.0) * 0.99))
                .collect();
            for (i, q) in ln1m.iter_mut().enumerate() {
                if i % 2 == 0 {
                    *q = T::of(1e-6 * i as f64); // the series' side
                }
            }
            let qs = ln1m.clone();
            map_row(&mut ln1m, T::ZERO, T::ln_one_minus);
            for (got, q) in ln1m.iter().zip(&qs) {
                let (got, q): (f64, f64) = ((*got).into(), (*q).into());
                let want = (-q).ln_1p();
                // Through ln(1 - q), float32 loses 1 - q's rounding (6e-8) against a small result;
                // the series keeps the relative precision.
                let tol = if q < 1.0 / 1024.0 {
                    1e-6 * want.abs()
                } else {
                    1e-7 + 1e-6 * want.abs()
                };
                assert!(
                    (got - want).abs() <= tol,
                    "{} ln(1 - {q}): {got} vs {want}",
                    T::NAME
                );
            }
            map_row(&mut row, T::ZERO, |v| T::exp(v));
            for (x, o) in row.iter().zip(&orig) {
                let (x, o): (f64, f64) = ((*x).into(), (*o).into());
                assert!((x - o.exp()).abs() < 1e-6 * o.exp(), "{} exp", T::NAME);
            }
            let side: Vec<T> = (0..n).map(|i| T::of(i as f64)).collect();
            let mut r2 = orig.clone();
            map_row_with(&mut r2, [&side, &side, &side], |v, [a, b, c]| v + a * b - c);
            for i in 0..n {
                let want = orig[i].into() + (i * i) as f64 - i as f64;
                assert!(
                    (r2[i].into() - want).abs() < 1e-6 * want.abs().max(1.0),
                    "{} map_row_with",
                    T::NAME
                );
            }
        }
    }

    #[test]
    fn helpers_handle_tails_for_f32_and_f64() {
        for level in Level::available() {
            with_level(level, || {
                check::<f32>();
                check::<f64>();
            });
        }
    }

    /// Inputs across the ranges exp and ln meet, and their edges.
    fn inputs() -> Vec<f64> {
        let mut x: Vec<f64> = (0..4000).map(|i| -100.0 + 0.05 * i as f64).collect();
        x.extend([
            0.0, -0.0, 1e-300, 1e-40, 1e-45, 1.0, 2.0, 0.5, 1e30, -1.0, -1e-30,
        ]);
        x.extend([
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::NAN,
            700.0,
            709.0,
            710.0,
            -745.0,
        ]);
        x.extend([88.0, 88.7, 89.0, -87.3, -87.4, -103.0]);
        x
    }

    fn lanes<T: CpuFloat>(x: &[f64], f: impl Fn(T::V) -> T::V) -> Vec<f64> {
        let mut row: Vec<T> = x.iter().map(|&v| T::of(v)).collect();
        map_row(&mut row, T::ONE, f);
        row.into_iter().map(|v| v.into()).collect()
    }

    fn same_bits(a: &[f64], b: &[f64]) -> bool {
        a.iter()
            .zip(b)
            .all(|(x, y)| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()))
    }

    #[test]
    fn exp_and_ln_are_within_their_bounds_and_the_same_on_every_level() {
        let x = inputs();
        let ulps = |got: f64, want: f64, eps: f64, min: f64| -> f64 {
            if want.is_nan() {
                return if got.is_nan() { 0.0 } else { f64::INFINITY };
            }
            if want.is_infinite() || got.is_infinite() {
                return if got == want { 0.0 } else { f64::INFINITY };
            }
            if want.abs() < min {
                return if got.abs() < min { 0.0 } else { f64::INFINITY };
            }
            (got - want).abs() / (want.abs() * eps)
        };
        let mut baseline: Option<[Vec<f64>; 4]> = None;
        for level in Level::available() {
            let got = with_level(level, || {
                [
                    lanes::<f32>(&x, <f32 as CpuFloat>::exp),
                    lanes::<f32>(&x, <f32 as CpuFloat>::ln),
                    lanes::<f64>(&x, <f64 as CpuFloat>::exp),
                    lanes::<f64>(&x, <f64 as CpuFloat>::ln),
                ]
            });
            for (i, &v) in x.iter().enumerate() {
                let v32 = f64::from(v as f32);
                let cases = [
                    (
                        got[0][i],
                        f64::from(v32.exp() as f32),
                        f64::from(f32::EPSILON),
                        f64::from(f32::MIN_POSITIVE),
                        2.0,
                    ),
                    (got[1][i], v32.ln(), f64::from(f32::EPSILON), 0.0, 2.0),
                    (got[2][i], v.exp(), f64::EPSILON, f64::MIN_POSITIVE, 4.0),
                    (got[3][i], v.ln(), f64::EPSILON, 0.0, 4.0),
                ];
                for (k, (g, want, eps, min, bound)) in cases.into_iter().enumerate() {
                    // Results below the smallest normal number may be 0 (no subnormal output);
                    // ln of 1 + tiny is compared absolutely (its relative error is of no use).
                    let want = if want.abs() < min { 0.0 } else { want };
                    let err = if k % 2 == 1 && want.abs() < 1e-3 && want.is_finite() {
                        (g - want).abs() / eps
                    } else {
                        ulps(g, want, eps, min)
                    };
                    assert!(
                        err <= bound,
                        "{} case {k} at {v}: {g} vs {want} ({err} ulp)",
                        level.name()
                    );
                }
            }
            match &baseline {
                None => baseline = Some(got),
                Some(b) => {
                    for k in 0..4 {
                        assert!(
                            same_bits(&b[k], &got[k]),
                            "{}: case {k} differs from the baseline",
                            level.name()
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn the_fused_loss_is_the_same_bits_on_every_level() {
        use crate::loss::{GradSemantics, LossConfig, Negatives};
        let (n, d) = (134usize, 19usize);
        let z: Vec<f32> = (0..n * d)
            .map(|i| ((i as f64 * 0.37).sin() * 2.0) as f32)
            .collect();
        let z64: Vec<f64> = z.iter().map(|&v| f64::from(v)).collect();
        for cfg in [
            LossConfig::default(),
            LossConfig {
                semantics: GradSemantics::BothSides,
                negatives: Negatives::hard(0.3),
                ..LossConfig::default()
            },
        ] {
            let mut first: Option<(u64, Vec<u32>, u64, Vec<u64>)> = None;
            for level in Level::available() {
                force_level(Some(level));
                let a = crate::loss::cpu::instance_loss(&z, n, d, &cfg, true);
                let b = crate::loss::cpu::instance_loss(&z64, n, d, &cfg, true);
                force_level(None);
                let (a, b) = (a.unwrap(), b.unwrap());
                let got = (
                    a.loss.to_bits(),
                    a.grad_z.unwrap().iter().map(|g| g.to_bits()).collect(),
                    b.loss.to_bits(),
                    b.grad_z.unwrap().iter().map(|g| g.to_bits()).collect(),
                );
                match &first {
                    None => first = Some(got),
                    Some(f) => assert!(
                        *f == got,
                        "{} {cfg:?}: differs from the baseline",
                        level.name()
                    ),
                }
            }
        }
    }
}
