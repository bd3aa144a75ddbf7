// Operand conversion of the cuBLAS front (launcher: src/cuda/blas.rs), for GEMMs with bf16
// operands and float32 accumulation.

#include "common.cuh"

// f32_to_bf16_v1: y = bf16(x), round to nearest even (NaN stays NaN); bit arithmetic, no
// cuda_bf16.h needed. grid-stride over len, block 256, no shared memory.
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
