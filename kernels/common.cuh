// Helpers shared by every kernel file. Header-only; each .cu file is its own module.
#pragma once

// F.normalize's clamp: a row's norm below this is replaced by it (see ../shared/notes/loss.md).
#define INVASPREAD_NORM_EPS 1e-12f

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// A grid-stride loop over `len` elements (64-bit index: len may exceed 2^31).
#define GRID_STRIDE(i, len) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (len); i += (long long)gridDim.x * blockDim.x)
