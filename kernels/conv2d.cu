// Convolution as im2col + GEMM, the CUDA twin of src/ops/conv2d/cpu.rs (launchers:
// src/ops/conv2d/cuda.rs; the GEMMs go through the cuBLAS front, src/cuda/blas.rs): a group
// of B images at a time, so the column buffer stays bounded while each GEMM is wide.
//
// Shapes: x is B x C_in x H x W (NCHW), w is C_out x C_in x k x k, y is B x C_out x H_out x W_out.
// The column matrix `col` is K x (B P), K = C_in k k, P = H_out W_out, row r = (c k + ki) k + kj,
// column i P + oy W_out + ox, row stride ld = B P. Then
//   forward:   Y' (C_out x B P) = W col,            y = cbp_to_bcp(Y')
//   backward:  dY' = bcp_to_cbp(dy),  dW += dY' col^T,  dcol = W^T dY',  dx (=|+=) col2im(dcol)
//
// im2col_v1:     one thread per element of col (K x B P), grid-stride. Zero padding is written.
// col2im_v1:     one thread per element of dx (B x C_in x H x W), gathering every (ki, kj) whose
//                output position exists: no atomics, a fixed summation order (deterministic).
// bcp_to_cbp_v1 / cbp_to_bcp_v1: [B][C][P] <-> [C][B][P], one thread per element.
// All: block = 256, grid = min(ceil(total / 256), 262140), no shared memory.

#include "common.cuh"

// The same fields in the same order as `ConvGeom` in src/ops/conv2d/mod.rs.
struct ConvGeom {
    int images;  // B
    int c_in, h, w;
    int c_out, k, stride, pad;
    int h_out, w_out;
};

extern "C" __global__ void __launch_bounds__(256) im2col_v1(const float* __restrict__ x, ConvGeom g, float* __restrict__ col) {
    const int p = g.h_out * g.w_out;
    const long long ld = (long long)g.images * p;
    const long long total = (long long)g.c_in * g.k * g.k * ld;
    GRID_STRIDE(e, total) {
        const long long r = e / ld;
        const int j = (int)(e - r * ld);
        const int img = j / p, q = j - img * p;
        const int oy = q / g.w_out, ox = q - oy * g.w_out;
        const int kj = (int)(r % g.k), ki = (int)((r / g.k) % g.k), c = (int)(r / ((long long)g.k * g.k));
        const int iy = oy * g.stride + ki - g.pad, ix = ox * g.stride + kj - g.pad;
        float v = 0.f;
        if (iy >= 0 && iy < g.h && ix >= 0 && ix < g.w) v = x[(((size_t)img * g.c_in + c) * g.h + iy) * g.w + ix];
        col[e] = v;
    }
}

extern "C" __global__ void __launch_bounds__(256)
col2im_v1(const float* __restrict__ col, ConvGeom g, float* __restrict__ dx, int accumulate) {
    const int p = g.h_out * g.w_out;
    const long long ld = (long long)g.images * p;
    const long long total = (long long)g.images * g.c_in * g.h * g.w;
    GRID_STRIDE(e, total) {
        const int ix = (int)(e % g.w);
        const int iy = (int)((e / g.w) % g.h);
        const int c = (int)((e / ((long long)g.w * g.h)) % g.c_in);
        const int img = (int)(e / ((long long)g.w * g.h * g.c_in));
        float s = 0.f;
        for (int ki = 0; ki < g.k; ++ki) {
            const int ty = iy + g.pad - ki;  // = oy * stride
            if (ty < 0 || ty % g.stride != 0) continue;
            const int oy = ty / g.stride;
            if (oy >= g.h_out) continue;
            for (int kj = 0; kj < g.k; ++kj) {
                const int tx = ix + g.pad - kj;
                if (tx < 0 || tx % g.stride != 0) continue;
                const int ox = tx / g.stride;
                if (ox >= g.w_out) continue;
                const long long r = ((long long)c * g.k + ki) * g.k + kj;
                s += col[r * ld + (long long)img * p + oy * g.w_out + ox];
            }
        }
        dx[e] = accumulate ? dx[e] + s : s;
    }
}

extern "C" __global__ void __launch_bounds__(256)
bcp_to_cbp_v1(const float* __restrict__ src, float* __restrict__ dst, int b, int c, int p) {
    const long long total = (long long)b * c * p;
    GRID_STRIDE(e, total) {  // e indexes dst = [C][B][P]
        const int q = (int)(e % p);
        const int img = (int)((e / p) % b);
        const int ch = (int)(e / ((long long)p * b));
        dst[e] = src[((size_t)img * c + ch) * p + q];
    }
}

extern "C" __global__ void __launch_bounds__(256)
cbp_to_bcp_v1(const float* __restrict__ src, float* __restrict__ dst, int b, int c, int p) {
    const long long total = (long long)b * c * p;
    GRID_STRIDE(e, total) {  // e indexes dst = [B][C][P]
        const int q = (int)(e % p);
        const int ch = (int)((e / p) % c);
        const int img = (int)(e / ((long long)p * c));
        dst[e] = src[((size_t)ch * b + img) * p + q];
    }
}

// ---- v2: v1's kernels with 32-bit index math ------------------------------------------------
//
// v1 divides 64-bit indices per element (a 64-bit division is a long software sequence on a
// GPU, several times a 32-bit one). v2 is v1 with int indices (its grid-stride counter is 64-bit:
// e + stride would wrap for totals within one stride of 2^31, about 1.88e9 to 2.15e9): the
// launcher runs it when the group's element count is below 2^31 (always, with the default
// workspace cap), else v1's. Same math, same summation order: results identical to v1's.

extern "C" __global__ void __launch_bounds__(256) im2col_v2(const float* __restrict__ x, ConvGeom g, float* __restrict__ col) {
    const int p = g.h_out * g.w_out, ld = g.images * p, kk = g.k * g.k;
    const int total = g.c_in * kk * ld;
    // The counter in 64 bits: e + the grid's stride passes 2^31 when total is near it.
    for (long long e64 = (long long)blockIdx.x * blockDim.x + threadIdx.x; e64 < total;
         e64 += (long long)gridDim.x * blockDim.x) {
        const int e = (int)e64;  // < total < 2^31 (the launcher's guard)
        const int r = e / ld, j = e - r * ld;
        const int img = j / p, q = j - img * p;
        const int oy = q / g.w_out, ox = q - oy * g.w_out;
        const int c = r / kk, rk = r - c * kk, ki = rk / g.k, kj = rk - ki * g.k;
        const int iy = oy * g.stride + ki - g.pad, ix = ox * g.stride + kj - g.pad;
        float v = 0.f;
        if (iy >= 0 && iy < g.h && ix >= 0 && ix < g.w) v = x[((img * g.c_in + c) * g.h + iy) * g.w + ix];
        col[e] = v;
    }
}

extern "C" __global__ void __launch_bounds__(256)
col2im_v2(const float* __restrict__ col, ConvGeom g, float* __restrict__ dx, int accumulate) {
    const int p = g.h_out * g.w_out, ld = g.images * p, hw = g.h * g.w;
    const int total = g.images * g.c_in * hw;
    // The counter in 64 bits: e + the grid's stride passes 2^31 when total is near it.
    for (long long e64 = (long long)blockIdx.x * blockDim.x + threadIdx.x; e64 < total;
         e64 += (long long)gridDim.x * blockDim.x) {
        const int e = (int)e64;  // < total < 2^31 (the launcher's guard)
        const int plane = e / hw, at = e - plane * hw;
        const int iy = at / g.w, ix = at - iy * g.w;
        const int img = plane / g.c_in, c = plane - img * g.c_in;
        float s = 0.f;
        for (int ki = 0; ki < g.k; ++ki) {
            const int ty = iy + g.pad - ki;  // = oy * stride
            if (ty < 0 || ty % g.stride != 0) continue;
            const int oy = ty / g.stride;
            if (oy >= g.h_out) continue;
            for (int kj = 0; kj < g.k; ++kj) {
                const int tx = ix + g.pad - kj;
                if (tx < 0 || tx % g.stride != 0) continue;
                const int ox = tx / g.stride;
                if (ox >= g.w_out) continue;
                const int r = (c * g.k + ki) * g.k + kj;
                s += col[r * ld + img * p + oy * g.w_out + ox];
            }
        }
        dx[e] = accumulate ? dx[e] + s : s;
    }
}

extern "C" __global__ void __launch_bounds__(256)
bcp_to_cbp_v2(const float* __restrict__ src, float* __restrict__ dst, int b, int c, int p) {
    const int total = b * c * p, bp = b * p;
    // The counter in 64 bits: e + the grid's stride passes 2^31 when total is near it.
    for (long long e64 = (long long)blockIdx.x * blockDim.x + threadIdx.x; e64 < total;
         e64 += (long long)gridDim.x * blockDim.x) {
        const int e = (int)e64;  // < total < 2^31 (the launcher's guard)
        const int ch = e / bp, rest = e - ch * bp, img = rest / p, q = rest - img * p;  // dst = [C][B][P]
        dst[e] = src[(img * c + ch) * p + q];
    }
}

extern "C" __global__ void __launch_bounds__(256)
cbp_to_bcp_v2(const float* __restrict__ src, float* __restrict__ dst, int b, int c, int p) {
    const int total = b * c * p, cp = c * p;
    // The counter in 64 bits: e + the grid's stride passes 2^31 when total is near it.
    for (long long e64 = (long long)blockIdx.x * blockDim.x + threadIdx.x; e64 < total;
         e64 += (long long)gridDim.x * blockDim.x) {
        const int e = (int)e64;  // < total < 2^31 (the launcher's guard)
        const int img = e / cp, rest = e - img * cp, ch = rest / p, q = rest - ch * p;  // dst = [B][C][P]
        dst[e] = src[(ch * b + img) * p + q];
    }
}
