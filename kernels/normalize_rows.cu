// Row L2-normalization, forward and backward: the first and last step of the instance loss.
//
// Math (row a of an N x d row-major matrix; eps = 1e-12 as torch's F.normalize):
//   forward:  norm_a = ||z_a||,  f_a = z_a / max(norm_a, eps)
//   backward: dz_a = (df_a - f_a (f_a . df_a)) / norm_a     when norm_a > eps
//             dz_a = df_a / eps                              otherwise (the clamp is constant)
//
// Versions (see kernels/README.md):
//   v1: one warp per row, 8 rows per 256-thread block, float32 accumulation in a warp
//       reduction. grid = ceil(N / 8), block = 256, no shared memory. Any d >= 1.
//       The sum of squares is float32: rows with a norm above ~1e19 overflow it (the loss only
//       sees directions; the CPU path accumulates in float64 and has no such limit).

#include "common.cuh"

#define ROWS_PER_BLOCK 8

// z, f: N x d (may alias for in-place); norms: N (the unclamped ||z_a||).
extern "C" __global__ void __launch_bounds__(256)
normalize_rows_fwd_v1(const float* __restrict__ z, float* __restrict__ f, float* __restrict__ norms,
                      int n, int d) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * ROWS_PER_BLOCK + (threadIdx.x >> 5);
    if (row >= n) return;
    const float* zr = z + (size_t)row * d;
    float sumsq = 0.f;
    for (int k = lane; k < d; k += 32) sumsq = fmaf(zr[k], zr[k], sumsq);
    const float norm = sqrtf(warp_sum(sumsq));
    const float inv = 1.f / fmaxf(norm, INVASPREAD_NORM_EPS);
    float* fr = f + (size_t)row * d;
    for (int k = lane; k < d; k += 32) fr[k] = zr[k] * inv;
    if (lane == 0) norms[row] = norm;
}

// f: the forward's output, norms: the forward's norms, df: dL/df; dz: dL/dz (may alias df).
extern "C" __global__ void __launch_bounds__(256)
normalize_rows_bwd_v1(const float* __restrict__ f, const float* __restrict__ norms,
                      const float* df, float* dz, int n, int d) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * ROWS_PER_BLOCK + (threadIdx.x >> 5);
    if (row >= n) return;
    const float* fr = f + (size_t)row * d;
    const float* gr = df + (size_t)row * d;
    float* out = dz + (size_t)row * d;
    const float norm = norms[row];
    if (norm > INVASPREAD_NORM_EPS) {
        float dot = 0.f;
        for (int k = lane; k < d; k += 32) dot = fmaf(fr[k], gr[k], dot);
        dot = warp_sum(dot);
        const float inv = 1.f / norm;
        // Every lane has read its own gr[k] before writing out[k], so aliasing df and dz is safe.
        for (int k = lane; k < d; k += 32) out[k] = (gr[k] - fr[k] * dot) * inv;
    } else {
        for (int k = lane; k < d; k += 32) out[k] = gr[k] / INVASPREAD_NORM_EPS;
    }
}
