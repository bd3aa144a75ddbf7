// Operand conversion of the cuBLAS front (launcher: src/cuda/blas.rs), for GEMMs with bf16
// operands and float32 accumulation.

#include "common.cuh"
#include "mma.cuh"

// f32_to_bf16_v1: y = bf16(x), round to nearest even (NaN stays NaN); bit arithmetic
// (mma.cuh's bf16_bits, the tensor-core kernels' rounding too), no cuda_bf16.h needed.
// grid-stride over len, block 256, no shared memory.
extern "C" __global__ void __launch_bounds__(256)
f32_to_bf16_v1(const float* __restrict__ x, unsigned short* __restrict__ y, long long len) {
    GRID_STRIDE(i, len) {
        y[i] = (unsigned short)bf16_bits(x[i]);
    }
}
