// Elementwise kernels of the encoder (launchers: src/ops/elementwise/cuda.rs). Every kernel is a
// grid-stride loop over `len` elements: grid = min(ceil(len / 256), 65535 * 4), block = 256, no
// shared memory. `accumulate` selects out = v (0) or out += v (1), the backend's convention for
// gradients (the first consumer of a value writes its gradient, later ones add).
//
// relu_fwd_v1:      y = max(x, 0)
// relu_bwd_v1:      dx (=|+=) dy * [y > 0]          (y is the forward's output)
// add_v1:           out (=|+=) x
// axpy_v1:          out (=|+=) alpha * x
// f64_to_f32_v1:    out[i] = (float) x[i]            (the loss scalar into a graph node)

#include "common.cuh"

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
