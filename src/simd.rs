//! Float types the CPU paths are generic over (f32 and f64), with their SIMD vectors from the
//! `wide` crate (f32x8, f64x4: exp and ln within about 1 ulp), and row helpers that handle the
//! tail of a row so callers only write the per-vector math.

use std::ops::{Add, Div, Mul, Sub};

use wide::{f32x8, f64x4};

use crate::linalg::GemmScalar;

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

macro_rules! impl_cpu_float {
    ($t:ty, $v:ty, $lanes:expr, $name:expr) => {
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
                <$v>::splat(x)
            }
            #[inline(always)]
            fn load(s: &[Self]) -> Self::V {
                let arr: [$t; $lanes] = s[..$lanes].try_into().expect("load takes LANES elements");
                <$v>::new(arr)
            }
            #[inline(always)]
            fn store(v: Self::V, s: &mut [Self]) {
                s[..$lanes].copy_from_slice(&v.to_array());
            }
            #[inline(always)]
            fn exp(v: Self::V) -> Self::V {
                v.exp()
            }
            #[inline(always)]
            fn ln(v: Self::V) -> Self::V {
                v.ln()
            }
            #[inline(always)]
            fn ln_one_minus(q: Self::V) -> Self::V {
                let small = q.simd_lt(<$v>::splat(1.0 / 1024.0));
                let series = <$v>::splat(0.0)
                    - (q + q * q * (<$v>::splat(0.5) + q * <$v>::splat(1.0 / 3.0)));
                let arg = small.select(<$v>::splat(0.5), <$v>::splat(1.0) - q);
                small.select(series, arg.ln())
            }
            #[inline(always)]
            fn max(a: Self::V, b: Self::V) -> Self::V {
                a.max(b)
            }
            #[inline(always)]
            fn sum_f64(v: Self::V) -> f64 {
                v.to_array().iter().map(|&x| f64::from(x)).sum()
            }
            #[inline(always)]
            fn max_lane(v: Self::V) -> Self {
                v.to_array().into_iter().fold(<$t>::NEG_INFINITY, <$t>::max)
            }
        }
    };
}
impl_cpu_float!(f32, f32x8, 8, "float32");
impl_cpu_float!(f64, f64x4, 4, "float64");

/// Applies `f` to a row in place, a vector at a time; the tail is padded with `pad`.
#[inline]
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
#[inline]
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
#[inline]
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
#[inline]
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
        check::<f32>();
        check::<f64>();
    }
}
