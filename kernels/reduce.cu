// Deterministic reductions shared by the unfused chain and fused v1.
//
// row_mean_v1: out[0] = (1/N) sum_a x[a] in double, in a fixed order.
//   grid = 1, block = 256: thread t sums x[t], x[t+256], ... in order, then a fixed-order tree.
//   x: N doubles; out: 1 double.

#include "common.cuh"

extern "C" __global__ void __launch_bounds__(256) row_mean_v1(const double* __restrict__ x, int n, double* __restrict__ out) {
    __shared__ double partial[256];
    double s = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += x[i];
    partial[threadIdx.x] = s;
    __syncthreads();
    for (int half = blockDim.x >> 1; half > 0; half >>= 1) {
        if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[0] = partial[0] / (double)n;
}
