//! A handwritten tiled float32 matrix product, C = alpha A B + beta C with A (M x K) and B
//! (K x N) given by element strides, so that A B^T and A^T B are the same kernel. It is the
//! eager baseline of the `unfused` loss; its CPU counterpart is [`crate::linalg::matmul`].

pub mod cuda;

/// The strided operands of one product: A(i, k) = a[i a_rs + k a_cs], B(k, j) = b[k b_rs +
/// j b_cs], C row-major with row stride `ldc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Strides {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a_rs: usize,
    pub a_cs: usize,
    pub b_rs: usize,
    pub b_cs: usize,
    pub ldc: usize,
}

impl Strides {
    /// Elements each of A, B and C spans.
    pub fn extents(&self) -> (usize, usize, usize) {
        let span = |r: usize, rs: usize, c: usize, cs: usize| {
            if r == 0 || c == 0 {
                0
            } else {
                (r - 1) * rs + (c - 1) * cs + 1
            }
        };
        (
            span(self.m, self.a_rs, self.k, self.a_cs),
            span(self.k, self.b_rs, self.n, self.b_cs),
            span(self.m, self.ldc, self.n, 1),
        )
    }
}
