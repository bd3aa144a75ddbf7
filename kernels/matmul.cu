// A plain tiled float32 matrix product for the unfused chain (the eager baseline).
//
// matmul_v1: C = alpha * A B + beta * C, with A (M x K) and B (K x N) given by strides, so
//   that A B^T (the similarity matrix) and A^T B (the key-side gradient) are the same kernel.
//   A(i, k) = A[i * a_rs + k * a_cs]; B(k, j) = B[k * b_rs + j * b_cs]; C row-major, ldc.
//   beta = 0 never reads C (it may hold garbage or NaN).
//   Tiles of 64 x 64 outputs, K in chunks of 32 through shared memory; 256 threads, each
//   computing a 4 x 4 micro-tile (rows ty + 16 i, columns tx + 16 j). grid = (ceil(N/64),
//   ceil(M/64)), block = 256. Any M, N, K >= 1 (tails masked).

#include "common.cuh"

#define MM_TILE 64
#define MM_DK 32

extern "C" __global__ void __launch_bounds__(256)
matmul_v1(int M, int N, int K, const float* __restrict__ A, long long a_rs, long long a_cs,
          const float* __restrict__ B, long long b_rs, long long b_cs, float* __restrict__ C, long long ldc,
          float alpha, float beta) {
    __shared__ float As[MM_TILE][MM_DK + 1];
    __shared__ float Bs[MM_DK][MM_TILE + 1];
    const int tid = threadIdx.x, ty = tid >> 4, tx = tid & 15;
    const int row0 = blockIdx.y * MM_TILE, col0 = blockIdx.x * MM_TILE;
    float acc[4][4] = {};
    for (int k0 = 0; k0 < K; k0 += MM_DK) {
        for (int e = tid; e < MM_TILE * MM_DK; e += 256) {
            const int r = e / MM_DK, k = e % MM_DK;
            const int gr = row0 + r, gk = k0 + k;
            As[r][k] = (gr < M && gk < K) ? A[gr * a_rs + gk * a_cs] : 0.f;
        }
        for (int e = tid; e < MM_TILE * MM_DK; e += 256) {
            const int k = e / MM_TILE, c = e % MM_TILE;
            const int gk = k0 + k, gc = col0 + c;
            Bs[k][c] = (gk < K && gc < N) ? B[gk * b_rs + gc * b_cs] : 0.f;
        }
        __syncthreads();
#pragma unroll 8
        for (int kk = 0; kk < MM_DK; ++kk) {
            float a[4], b[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) a[i] = As[ty + 16 * i][kk];
#pragma unroll
            for (int j = 0; j < 4; ++j) b[j] = Bs[kk][tx + 16 * j];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int r = row0 + ty + 16 * i;
        if (r >= M) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int c = col0 + tx + 16 * j;
            if (c >= N) continue;
            float* out = C + r * ldc + c;
            *out = beta == 0.f ? alpha * acc[i][j] : fmaf(beta, *out, alpha * acc[i][j]);
        }
    }
}
