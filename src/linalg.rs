//! A safe, bounds-checked front to the `gemm` crate's matrix product, for f32 and f64.
//!
//! Matrices are views with explicit row and column strides, so that a transpose is a view
//! (F^T of a row-major F is `MatRef::transposed`) and no copy is made.

use crate::error::{Error, Result};

/// A read-only strided matrix view.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a, T> {
    pub data: &'a [T],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a, T> MatRef<'a, T> {
    /// A row-major `rows x cols` matrix.
    pub fn row_major(data: &'a [T], rows: usize, cols: usize) -> Self {
        MatRef {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose of a row-major `rows x cols` matrix, as a `cols x rows` view.
    pub fn transposed(data: &'a [T], rows: usize, cols: usize) -> Self {
        MatRef {
            data,
            rows: cols,
            cols: rows,
            row_stride: 1,
            col_stride: cols,
        }
    }

    fn check(&self, name: &str) -> Result<()> {
        check_extent(
            name,
            self.data.len(),
            self.rows,
            self.cols,
            self.row_stride,
            self.col_stride,
        )
    }
}

fn check_extent(
    name: &str,
    len: usize,
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
) -> Result<()> {
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let last = (rows - 1) * rs + (cols - 1) * cs;
    if last >= len {
        return Err(Error::invalid(format!(
            "matrix {name} ({rows} x {cols}, strides {rs}, {cs}) reaches element {last} of a buffer of {len}"
        )));
    }
    Ok(())
}

/// The shape of `count` products of an `m x k` by a `k x n` matrix (what an op runs, for floors).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GemmShape {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub count: usize,
}

impl GemmShape {
    /// 2 m n k per product.
    pub fn flops(&self) -> f64 {
        2.0 * (self.m * self.n * self.k * self.count) as f64
    }
}

/// Element types the product is available for.
pub trait GemmScalar: Copy + 'static + Send + Sync {
    const ZERO: Self;
    const ONE: Self;
}
impl GemmScalar for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
}
impl GemmScalar for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
}

/// `c = scale * a b` (or `c += scale * a b` when `accumulate`), with `c` row-major
/// `a.rows x b.cols` of row stride `ldc`. Runs on the calling thread: callers parallelise
/// over blocks with rayon, which keeps each block's result in that thread's cache.
pub fn matmul<T: GemmScalar>(
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    c: &mut [T],
    ldc: usize,
    scale: T,
    accumulate: bool,
) -> Result<()> {
    if a.cols != b.rows {
        return Err(Error::invalid(format!(
            "matmul: {} x {} times {} x {}",
            a.rows, a.cols, b.rows, b.cols
        )));
    }
    a.check("a")?;
    b.check("b")?;
    check_extent("c", c.len(), a.rows, b.cols, ldc, 1)?;
    if a.rows == 0 || b.cols == 0 {
        return Ok(());
    }
    if a.cols == 0 {
        if !accumulate {
            for row in c.chunks_mut(ldc).take(a.rows) {
                row[..b.cols].fill(T::ZERO);
            }
        }
        return Ok(());
    }
    // SAFETY: every element the product touches lies inside the slices, checked above; `c`
    // is exclusively borrowed and cannot overlap `a` or `b`.
    unsafe {
        gemm::gemm(
            a.rows,
            b.cols,
            a.cols,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            T::ONE,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_plain_loop_with_transposes_and_accumulation() {
        let (m, k, n) = (5, 7, 3);
        let a: Vec<f64> = (0..m * k).map(|i| (i as f64 * 0.37).sin()).collect();
        let bt: Vec<f64> = (0..n * k).map(|i| (i as f64 * 0.91).cos()).collect(); // n x k
        let mut c = vec![1.0f64; m * n];
        matmul(
            MatRef::row_major(&a, m, k),
            MatRef::transposed(&bt, n, k),
            &mut c,
            n,
            2.0,
            true,
        )
        .unwrap();
        for i in 0..m {
            for j in 0..n {
                let want: f64 =
                    1.0 + 2.0 * (0..k).map(|l| a[i * k + l] * bt[j * k + l]).sum::<f64>();
                assert!((c[i * n + j] - want).abs() < 1e-12, "c[{i},{j}]");
            }
        }
        let err = matmul(
            MatRef::row_major(&a, m, k),
            MatRef::row_major(&bt, n, k),
            &mut c,
            n,
            1.0,
            false,
        );
        assert!(err.is_err(), "shape mismatch must be an error");
        let mut short = vec![0.0f64; 4];
        assert!(matmul(
            MatRef::row_major(&a, m, k),
            MatRef::transposed(&bt, n, k),
            &mut short,
            n,
            1.0,
            false
        )
        .is_err());
    }
}
