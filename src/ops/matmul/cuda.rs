//! `matmul_v1` on a [`Queue`] (`kernels/matmul.cu`): 64 x 64 output tiles, K in chunks of 32.

use super::Strides;
use crate::cuda::{
    check_len, to_i32, DevPtr, DevPtrMut, Geometry, Kernel, KernelArgs, Queue, BLOCK,
};
use crate::error::Result;

const MATMUL_V1: Kernel = Kernel::new("matmul", "matmul_v1");
const TILE: usize = 64;

/// C = alpha A B + beta C (beta = 0 never reads C).
pub fn matmul_v1(
    q: &impl Queue,
    s: &Strides,
    alpha: f32,
    a: DevPtr<'_, f32>,
    b: DevPtr<'_, f32>,
    beta: f32,
    mut c: DevPtrMut<'_, f32>,
) -> Result<()> {
    let (ea, eb, ec) = s.extents();
    check_len("matmul A", a.len(), ea)?;
    check_len("matmul B", b.len(), eb)?;
    check_len("matmul C", c.len(), ec)?;
    let mut args = KernelArgs::new();
    args.value(to_i32("M", s.m)?)
        .value(to_i32("N", s.n)?)
        .value(to_i32("K", s.k)?)
        .input(a)
        .value(s.a_rs as i64)
        .value(s.a_cs as i64)
        .input(b)
        .value(s.b_rs as i64)
        .value(s.b_cs as i64)
        .output(&mut c)
        .value(s.ldc as i64)
        .value(alpha)
        .value(beta);
    let grid = Geometry::grid_2d(s.n.div_ceil(TILE), s.m.div_ceil(TILE), BLOCK);
    // SAFETY: matmul_v1(int M, int N, int K, const float* A, long long a_rs, long long a_cs,
    // const float* B, long long b_rs, long long b_cs, float* C, long long ldc, float alpha,
    // float beta); the strides address inside the buffers (extents checked above).
    unsafe { q.launch(MATMUL_V1, grid, &mut args) }
}
