// Fused v2's tiles, shared by the kernels built on them (instance_loss_fused_v2.cu,
// instance_loss_ranks_v1.cu): 64 x 64 similarity tiles computed in shared-memory chunks of 32
// columns of d, each of the 256 threads holding a 4 x 4 micro-tile (rows ty + 16 i, columns
// tx + 16 j; ty = tid / 16, tx = tid % 16); the gradient tile G (64 x 64, shared memory) times
// 64 rows, accumulated in registers for 128 columns of d at a time.
#pragma once

#include "loss_common.cuh"

#define T2 64
#define DK2 32
#define DC2 128

struct V2Smem {
    float As[T2][DK2 + 1];
    float Bs[T2][DK2 + 1];
    float Gs[T2][T2 + 1];
};

// acc[i][j] = f_{r0 + ty + 16 i} . g_{c0 + tx + 16 j}: rows of f (zr, nr rows) against rows
// of g (zc, nc rows), each normalized by its inverse norms; rows past the end read as zero.
__device__ __forceinline__ void similarity_tile_of(const float* __restrict__ zr, const float* __restrict__ inv_r,
                                                   int nr, const float* __restrict__ zc,
                                                   const float* __restrict__ inv_c, int nc, int d, int r0, int c0,
                                                   V2Smem& sm, float acc[4][4]) {
    const int tid = threadIdx.x, ty = tid >> 4, tx = tid & 15;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
    for (int k0 = 0; k0 < d; k0 += DK2) {
        for (int e = tid; e < T2 * DK2; e += 256) {
            const int row = e / DK2, k = e % DK2, gk = k0 + k;
            const int ra = r0 + row, rb = c0 + row;
            sm.As[row][k] = (ra < nr && gk < d) ? zr[(size_t)ra * d + gk] * inv_r[ra] : 0.f;
            sm.Bs[row][k] = (rb < nc && gk < d) ? zc[(size_t)rb * d + gk] * inv_c[rb] : 0.f;
        }
        __syncthreads();
#pragma unroll 8
        for (int kk = 0; kk < DK2; ++kk) {
            float a[4], b[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) a[i] = sm.As[ty + 16 * i][kk];
#pragma unroll
            for (int j = 0; j < 4; ++j) b[j] = sm.Bs[tx + 16 * j][kk];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }
}

// acc[i][j] = f_{r0 + ty + 16 i} . f_{c0 + tx + 16 j} within one matrix z (N rows).
__device__ __forceinline__ void similarity_tile(const float* __restrict__ z, const float* __restrict__ inv_norms,
                                                int n, int d, int r0, int c0, V2Smem& sm, float acc[4][4]) {
    similarity_tile_of(z, inv_norms, n, z, inv_norms, n, d, r0, c0, sm, acc);
}

// dacc[i][2 sc + jj] += sum_kb Gs[ty + 16 i][kb] f_{k0 + kb}[c0 + 32 sc + tx + 16 jj].
// Gs must be complete (a __syncthreads() before the call).
__device__ __forceinline__ void accumulate_g_times_f(const float* __restrict__ z, const float* __restrict__ inv_norms,
                                                     int n, int d, int k0, int c0, V2Smem& sm, float dacc[4][8]) {
    const int tid = threadIdx.x, ty = tid >> 4, tx = tid & 15;
#pragma unroll
    for (int sc = 0; sc < DC2 / DK2; ++sc) {
        const int cbase = c0 + sc * DK2;
        if (cbase < d) {  // uniform over the block
            for (int e = tid; e < T2 * DK2; e += 256) {
                const int kb = e / DK2, k = e % DK2, rb = k0 + kb, gk = cbase + k;
                sm.Bs[kb][k] = (rb < n && gk < d) ? z[(size_t)rb * d + gk] * inv_norms[rb] : 0.f;
            }
            __syncthreads();
#pragma unroll 4
            for (int kb = 0; kb < T2; ++kb) {
                float g[4];
#pragma unroll
                for (int i = 0; i < 4; ++i) g[i] = sm.Gs[ty + 16 * i][kb];
                const float f0 = sm.Bs[kb][tx], f1 = sm.Bs[kb][tx + 16];
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    dacc[i][2 * sc] = fmaf(g[i], f0, dacc[i][2 * sc]);
                    dacc[i][2 * sc + 1] = fmaf(g[i], f1, dacc[i][2 * sc + 1]);
                }
            }
            __syncthreads();
        }
    }
}

// Writes (or adds) grad_scale * dacc into rows r0 + ty + 16 i, columns c0 .. c0 + 127 of out.
__device__ __forceinline__ void store_dacc(float* __restrict__ out, int n, int d, int r0, int c0, float scale,
                                           bool accumulate, const float dacc[4][8]) {
    const int ty = threadIdx.x >> 4, tx = threadIdx.x & 15;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int r = r0 + ty + 16 * i;
        if (r >= n) continue;
#pragma unroll
        for (int sc = 0; sc < DC2 / DK2; ++sc)
#pragma unroll
            for (int jj = 0; jj < 2; ++jj) {
                const int col = c0 + sc * DK2 + tx + 16 * jj;
                if (col >= d) continue;
                float* o = out + (size_t)r * d + col;
                *o = accumulate ? *o + scale * dacc[i][2 * sc + jj] : scale * dacc[i][2 * sc + jj];
            }
    }
}

