// BatchNorm2d on NCHW activations, training and eval, forward and backward; float32 storage and
// float32 accumulation. The CUDA twin of src/ops/batchnorm/cpu.rs
// (launchers: src/ops/batchnorm/cuda.rs).
//
// Per channel c over the M = N H W values x_c:
//   training:  mean = sum x / M,  var = sum (x - mean)^2 / M (two passes, biased),
//              inv = 1 / sqrt(var + eps); running_mean = (1 - m) running_mean + m mean,
//              running_var = (1 - m) running_var + m var M / (M - 1)   (PyTorch: unbiased)
//   eval:      mean = running_mean, inv = 1 / sqrt(running_var + eps)
//   forward:   y = x scale + shift, scale = gamma inv, shift = beta - mean scale
//   backward:  s1 = sum dy, s2 = sum dy xhat (xhat = (x - mean) inv); dbeta += s1, dgamma += s2;
//              training: dx = gamma inv / M (M dy - s1 - xhat s2);  eval: dx = gamma inv dy
//
// `saved` (4 C floats): mean[C], inv[C], s1[C], s2[C], written by the forward / backward reductions.
//
// batchnorm_train_stats_v1, batchnorm_bwd_reduce_v1: one block of 512 threads per channel;
//   each thread sums a strided share of the channel, then a fixed-order block reduction
//   (warp shuffles, then warp 0 over the 16 warp sums): deterministic.
// batchnorm_eval_stats_v1: one thread per channel.
// batchnorm_apply_v1, batchnorm_bwd_dx_v1: grid-stride over N C H W, block 256.

#include "common.cuh"

#define BN_THREADS 512

// The block's sum, returned to every thread. Fixed order for a fixed blockDim.
__device__ float block_sum(float v, float* shared /* >= 32 floats */) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // `shared` may still be read from a previous call
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    const int warps = blockDim.x >> 5;
    float total = 0.f;
    if (warp == 0) {
        total = lane < warps ? shared[lane] : 0.f;
        total = warp_sum(total);
        if (lane == 0) shared[0] = total;
    }
    __syncthreads();
    return shared[0];
}

extern "C" __global__ void __launch_bounds__(BN_THREADS)
batchnorm_train_stats_v1(const float* __restrict__ x, int n, int c, int hw, float momentum, float eps,
                         float* __restrict__ saved, float* __restrict__ running_mean, float* __restrict__ running_var) {
    __shared__ float shared[32];
    const int ch = blockIdx.x;
    const long long m = (long long)n * hw;
    float s = 0.f;
    for (long long e = threadIdx.x; e < m; e += blockDim.x) {
        const long long img = e / hw, q = e - img * hw;
        s += x[(img * c + ch) * hw + q];
    }
    const float mean = block_sum(s, shared) / (float)m;
    float sq = 0.f;
    for (long long e = threadIdx.x; e < m; e += blockDim.x) {
        const long long img = e / hw, q = e - img * hw;
        const float dev = x[(img * c + ch) * hw + q] - mean;
        sq = fmaf(dev, dev, sq);
    }
    const float var = block_sum(sq, shared) / (float)m;
    if (threadIdx.x == 0) {
        saved[ch] = mean;
        saved[c + ch] = rsqrtf(var + eps);
        const float unbiased = m > 1 ? var * (float)m / (float)(m - 1) : var;
        running_mean[ch] = (1.f - momentum) * running_mean[ch] + momentum * mean;
        running_var[ch] = (1.f - momentum) * running_var[ch] + momentum * unbiased;
    }
}

extern "C" __global__ void __launch_bounds__(256)
batchnorm_eval_stats_v1(const float* __restrict__ running_mean, const float* __restrict__ running_var, int c, float eps,
                        float* __restrict__ saved) {
    const int ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= c) return;
    saved[ch] = running_mean[ch];
    saved[c + ch] = rsqrtf(running_var[ch] + eps);
}

extern "C" __global__ void __launch_bounds__(256)
batchnorm_apply_v1(const float* __restrict__ x, const float* __restrict__ gamma, const float* __restrict__ beta,
                   const float* __restrict__ saved, int n, int c, int hw, float* __restrict__ y) {
    const long long total = (long long)n * c * hw;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (long long)gridDim.x * blockDim.x) {
        const int ch = (int)((e / hw) % c);
        const float scale = gamma[ch] * saved[c + ch];
        const float shift = beta[ch] - saved[ch] * scale;
        y[e] = fmaf(x[e], scale, shift);
    }
}

extern "C" __global__ void __launch_bounds__(BN_THREADS)
batchnorm_bwd_reduce_v1(const float* __restrict__ x, const float* __restrict__ dy, int n, int c, int hw,
                        float* __restrict__ saved, float* __restrict__ dgamma, float* __restrict__ dbeta) {
    __shared__ float shared[32];
    const int ch = blockIdx.x;
    const long long m = (long long)n * hw;
    const float mean = saved[ch], inv = saved[c + ch];
    float s1 = 0.f, s2 = 0.f;
    for (long long e = threadIdx.x; e < m; e += blockDim.x) {
        const long long img = e / hw, q = e - img * hw;
        const long long at = (img * c + ch) * hw + q;
        const float g = dy[at];
        s1 += g;
        s2 = fmaf(g, (x[at] - mean) * inv, s2);
    }
    s1 = block_sum(s1, shared);
    s2 = block_sum(s2, shared);
    if (threadIdx.x == 0) {
        saved[2 * c + ch] = s1;
        saved[3 * c + ch] = s2;
        dbeta[ch] += s1;
        dgamma[ch] += s2;
    }
}

extern "C" __global__ void __launch_bounds__(256)
batchnorm_bwd_dx_v1(const float* __restrict__ x, const float* __restrict__ dy, const float* __restrict__ gamma,
                    const float* __restrict__ saved, int n, int c, int hw, int training, float* __restrict__ dx,
                    int accumulate) {
    const long long total = (long long)n * c * hw;
    const float m = (float)((long long)n * hw);
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (long long)gridDim.x * blockDim.x) {
        const int ch = (int)((e / hw) % c);
        const float inv = saved[c + ch];
        float v;
        if (training) {
            const float xhat = (x[e] - saved[ch]) * inv;
            v = gamma[ch] * inv / m * (m * dy[e] - saved[2 * c + ch] - xhat * saved[3 * c + ch]);
        } else {
            v = gamma[ch] * inv * dy[e];
        }
        dx[e] = accumulate ? dx[e] + v : v;
    }
}
