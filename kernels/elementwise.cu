// Elementwise kernels of the encoder's CUDA backend (src/nn/cuda_backend.rs). Every kernel is a
// grid-stride loop over `len` elements: grid = min(ceil(len / 256), 65535 * 4), block = 256, no
// shared memory. `accumulate` selects out = v (0) or out += v (1), the backend's convention for
// gradients (the first consumer of a value writes its gradient, later ones add).
//
// relu_fwd_v1:      y = max(x, 0)
// relu_bwd_v1:      dx (=|+=) dy * [y > 0]          (y is the forward's output)
// add_v1:           out (=|+=) x
// axpy_v1:          out (=|+=) alpha * x
// f64_to_f32_v1:    out[i] = (float) x[i]            (the loss scalar into a graph node)
// bias_rows_v1:     y[r][j] = b[j] for an R x C row-major y (linear layer: y = b, then GEMM adds x W^T)
// column_sums_v1:   db[j] += sum_r dy[r][j]          one thread per column, rows in order (deterministic)
// f32_to_bf16_v1:   y = bf16(x) (round to nearest even), the operands of bf16 GEMMs

#include "common.cuh"

#define GRID_STRIDE(i, len) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (len); i += (long long)gridDim.x * blockDim.x)

extern "C" __global__ void __launch_bounds__(256) relu_fwd_v1(const float* __restrict__ x, float* __restrict__ y, long long len) {
    GRID_STRIDE(i, len) y[i] = fmaxf(x[i], 0.f);
}

extern "C" __global__ void __launch_bounds__(256)
relu_bwd_v1(const float* __restrict__ y, const float* __restrict__ dy, float* __restrict__ dx, long long len, int accumulate) {
    GRID_STRIDE(i, len) {
        const float g = y[i] > 0.f ? dy[i] : 0.f;
        dx[i] = accumulate ? dx[i] + g : g;
    }
}

extern "C" __global__ void __launch_bounds__(256) add_v1(const float* __restrict__ x, float* __restrict__ out, long long len, int accumulate) {
    GRID_STRIDE(i, len) out[i] = accumulate ? out[i] + x[i] : x[i];
}

extern "C" __global__ void __launch_bounds__(256)
axpy_v1(float alpha, const float* __restrict__ x, float* __restrict__ out, long long len, int accumulate) {
    GRID_STRIDE(i, len) out[i] = accumulate ? fmaf(alpha, x[i], out[i]) : alpha * x[i];
}

extern "C" __global__ void __launch_bounds__(256) f64_to_f32_v1(const double* __restrict__ x, float* __restrict__ out, long long len) {
    GRID_STRIDE(i, len) out[i] = (float)x[i];
}

extern "C" __global__ void __launch_bounds__(256) bias_rows_v1(const float* __restrict__ b, float* __restrict__ y, int rows, int cols) {
    GRID_STRIDE(i, (long long)rows * cols) y[i] = b[i % cols];
}

extern "C" __global__ void __launch_bounds__(256) column_sums_v1(const float* __restrict__ dy, float* __restrict__ db, int rows, int cols) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= cols) return;
    float s = 0.f;
    for (int r = 0; r < rows; ++r) s += dy[(size_t)r * cols + j];
    db[j] += s;
}

// f32_to_bf16_v1: y = bf16(x), round to nearest even (NaN stays NaN). The operands of the
// bf16 mixed-precision GEMMs (float32 accumulation); bit arithmetic, no cuda_bf16.h needed.
extern "C" __global__ void __launch_bounds__(256)
f32_to_bf16_v1(const float* __restrict__ x, unsigned short* __restrict__ y, long long len) {
    GRID_STRIDE(i, len) {
        const unsigned int u = __float_as_uint(x[i]);
        if ((u & 0x7fffffffu) > 0x7f800000u) {
            y[i] = (unsigned short)((u >> 16) | 0x0040u);  // quiet NaN
        } else {
            y[i] = (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
        }
    }
}
