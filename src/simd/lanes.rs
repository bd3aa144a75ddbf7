//! The vector types (plain arrays, every operation a loop over the lanes, always inlined) and
//! the per-lane exp and ln that the compiler vectorises for the level `simd::dispatch` chose.

use std::ops::{Add, Div, Mul, Sub};

/// 8 lanes of f32.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C, align(32))]
pub struct F32x8(pub [f32; 8]);

/// 4 lanes of f64.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C, align(32))]
pub struct F64x4(pub [f64; 4]);

macro_rules! lanewise {
    ($v:ident, $t:ty, $lanes:expr) => {
        impl $v {
            #[inline(always)]
            pub fn to_array(self) -> [$t; $lanes] {
                self.0
            }
            #[inline(always)]
            pub(super) fn map(self, f: impl Fn($t) -> $t) -> Self {
                let mut r = self.0;
                for x in r.iter_mut() {
                    *x = f(*x);
                }
                $v(r)
            }
            #[inline(always)]
            pub(super) fn zip(self, o: Self, f: impl Fn($t, $t) -> $t) -> Self {
                let mut r = self.0;
                for i in 0..$lanes {
                    r[i] = f(r[i], o.0[i]);
                }
                $v(r)
            }
        }
        impl Add for $v {
            type Output = Self;
            #[inline(always)]
            fn add(self, o: Self) -> Self {
                self.zip(o, |a, b| a + b)
            }
        }
        impl Sub for $v {
            type Output = Self;
            #[inline(always)]
            fn sub(self, o: Self) -> Self {
                self.zip(o, |a, b| a - b)
            }
        }
        impl Mul for $v {
            type Output = Self;
            #[inline(always)]
            fn mul(self, o: Self) -> Self {
                self.zip(o, |a, b| a * b)
            }
        }
        impl Div for $v {
            type Output = Self;
            #[inline(always)]
            fn div(self, o: Self) -> Self {
                self.zip(o, |a, b| a / b)
            }
        }
    };
}
lanewise!(F32x8, f32, 8);
lanewise!(F64x4, f64, 4);

/// Per-lane exp and ln of one float type, branch-free (selects only), so that a loop over lanes
/// vectorises. `$u`/`$i`: the same-width unsigned and signed integers; `$mbits`: mantissa bits;
/// `$bias`: the exponent bias; `$exp_terms`/`$ln_terms`: the polynomials' coefficients.
macro_rules! lane_math {
    ($t:ty, $u:ty, $i:ty, $mbits:expr, $bias:expr, $lo:expr, $hi:expr, $ln2_hi:expr, $ln2_lo:expr,
     exp: [$($e:expr),*], ln: [$($l:expr),*], $exp_fn:ident, $ln_fn:ident) => {
        /// e^x: x = n ln2 + r (|r| <= ln2 / 2, Cody-Waite), e^r by its Taylor polynomial, 2^n
        /// from the exponent bits in two halves (each a normal number). Below the smallest
        /// normal result 0, above the largest inf, NaN as NaN.
        #[inline(always)]
        pub fn $exp_fn(x: $t) -> $t {
            // 1.5 x 2^mbits: adding it rounds to an integer held in the low mantissa bits.
            const MAGIC: $t = 1.5 * (1u64 << $mbits) as $t;
            let xc = if x < $lo { $lo } else if x > $hi { $hi } else { x };
            let t = xc * std::f64::consts::LOG2_E as $t + MAGIC;
            let n = t - MAGIC;
            let ni = (t.to_bits() as $i).wrapping_sub(MAGIC.to_bits() as $i);
            let r = xc - n * $ln2_hi - n * $ln2_lo;
            // Horner from the highest term: 1 + r + r^2/2! + ...
            let mut p: $t = 0.0;
            $( p = p * r + $e; )*
            // n in two halves, h1 = round(n / 2) by the same rounding trick (an arithmetic shift
            // of 64-bit lanes has no AVX2 instruction).
            let h1 = ((n * 0.5 + MAGIC).to_bits() as $i).wrapping_sub(MAGIC.to_bits() as $i);
            let h2 = ni - h1;
            let s1 = <$t>::from_bits(((h1 + $bias) as $u) << $mbits);
            let s2 = <$t>::from_bits(((h2 + $bias) as $u) << $mbits);
            let y = p * s1 * s2;
            let y = if x < $lo { 0.0 } else { y };
            if x > $hi { <$t>::INFINITY } else { y }
        }

        /// ln x: x = 2^e m with m in [sqrt(1/2), sqrt(2)), ln m = 2 atanh(s), s = (m - 1) / (m + 1)
        /// (|s| < 0.172) by its odd series; subnormal x scaled first. ln 0 = -inf, ln of a negative
        /// or NaN is NaN, ln inf = inf.
        #[inline(always)]
        pub fn $ln_fn(x: $t) -> $t {
            const SCALE_BITS: u32 = $mbits;
            let tiny = x < <$t>::MIN_POSITIVE;
            let xs = if tiny { x * (1u64 << SCALE_BITS) as $t } else { x };
            let bits = xs.to_bits();
            let mut e = ((bits >> $mbits) as $i & (2 * $bias + 1)) - $bias;
            let mask: $u = (1 << $mbits) - 1;
            let mut m = <$t>::from_bits((bits & mask) | (($bias as $u) << $mbits));
            let big = m > std::f64::consts::SQRT_2 as $t;
            m = if big { m * 0.5 } else { m };
            e += big as $i;
            e -= if tiny { SCALE_BITS as $i } else { 0 };
            let s = (m - 1.0) / (m + 1.0);
            let s2 = s * s;
            let mut p: $t = 0.0;
            $( p = p * s2 + $l; )*
            // e as a float through the exponent trick (no int-to-float instruction of this width
            // exists below AVX-512 DQ): MAGIC + e held exactly in the mantissa, minus MAGIC.
            const MAGIC: $t = 1.5 * (1u64 << $mbits) as $t;
            let ef = <$t>::from_bits((MAGIC.to_bits() as $i).wrapping_add(e) as $u) - MAGIC;
            let y = ef * $ln2_hi + (ef * $ln2_lo + 2.0 * s * p);
            let y = if x == 0.0 { <$t>::NEG_INFINITY } else { y };
            let y = if x == <$t>::INFINITY { x } else { y };
            if x < 0.0 || x.is_nan() { <$t>::NAN } else { y }
        }
    };
}

// f32: e^r to r^7/7! (|r| <= 0.347: the next term 3e-9), ln's series to s^9/9 (the next 2e-10).
lane_math!(f32, u32, i32, 23, 127, -87.33654f32, 88.72283f32, 0.693_359_4f32, -2.121_944_4e-4f32,
    exp: [1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0],
    ln: [1.0 / 9.0, 1.0 / 7.0, 1.0 / 5.0, 1.0 / 3.0, 1.0],
    exp_f32, ln_f32);
// f64: e^r to r^13/13! (the next 1e-18), ln's series to s^23/23 (the next 4e-20).
lane_math!(f64, u64, i64, 52, 1023, -708.3964185322641f64, 709.782712893384f64,
    6.931_457_519_531_25e-1f64, 1.428_606_820_309_417_2e-6f64,
    exp: [1.0 / 6227020800.0, 1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0,
          1.0 / 362880.0, 1.0 / 40320.0, 1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0,
          1.0 / 6.0, 0.5, 1.0, 1.0],
    ln: [1.0 / 23.0, 1.0 / 21.0, 1.0 / 19.0, 1.0 / 17.0, 1.0 / 15.0, 1.0 / 13.0, 1.0 / 11.0,
         1.0 / 9.0, 1.0 / 7.0, 1.0 / 5.0, 1.0 / 3.0, 1.0],
    exp_f64, ln_f64);
