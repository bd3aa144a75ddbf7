// The linear layer's kernels besides its GEMMs (launchers: src/ops/linear/cuda.rs).
//
// bias_rows_v1:     y[r][j] = b[j] for an R x C row-major y (forward: y = b, then a GEMM adds x W^T)
//                   grid-stride over R C, block 256, no shared memory.
// column_sums_v1:   db[j] += sum_r dy[r][j], one thread per column, rows in order (deterministic).
//                   grid = ceil(C / 256), block 256.

#include "common.cuh"

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
