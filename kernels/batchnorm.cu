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

// Channel ch's mean and M2 = sum (x - mean)^2 over its M = N H W values by two passes, each
// thread of the block striding over the channel, fixed-order block sums; every thread gets both.
__device__ void channel_mean_m2(const float* __restrict__ x, int n, int c, int hw, int ch, float* shared,
                                float* mean_out, float* m2_out) {
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
    *mean_out = mean;
    *m2_out = block_sum(sq, shared);
}

extern "C" __global__ void __launch_bounds__(BN_THREADS)
batchnorm_train_stats_v1(const float* __restrict__ x, int n, int c, int hw, float momentum, float eps,
                         float* __restrict__ saved, float* __restrict__ running_mean, float* __restrict__ running_var) {
    __shared__ float shared[32];
    const int ch = blockIdx.x;
    const long long m = (long long)n * hw;
    float mean, m2;
    channel_mean_m2(x, n, c, hw, ch, shared, &mean, &m2);
    const float var = m2 / (float)m;
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

// ---- v2: the per-channel reductions as a 2-D grid (image chunk x channel) -----------------
//
// v1 runs one block per channel (64 blocks for the 132 SMs of an H100 at ResNet18's first
// widths) and divides 64-bit indices per element. v2 splits each channel's N images into S
// chunks of `ipb` images (grid S x C, block 256; S chosen on the host for about 4 blocks per SM,
// src/ops/batchnorm/cuda.rs), with 32-bit index math (the host runs v1's kernels instead when
// N C H W >= 2^31). Each chunk's block leaves its partial result in the tail of `saved`; the
// last block of a channel to finish (a counter per channel, zero before and after a launch)
// combines the chunks in chunk order, so the result does not depend on the schedule:
//   statistics: each chunk's (count, mean, M2) by two passes over the chunk, merged in chunk
//   order by Chan, Golub and LeVeque's pairwise update in double (as stable as two passes);
//   backward: each chunk's (s1, s2), summed in double in chunk order.
// batchnorm_apply_v2, batchnorm_bwd_dx_v2: v1's grid-stride kernels with 32-bit indices.
//
// saved (v2): mean[C], inv[C], s1[C], s2[C], partials[C][S][3], counters[C] (unsigned).

#define BN2_THREADS 256

// The chunk partials of channel `ch` and its counter.
__device__ __forceinline__ float* bn2_partials(float* saved, int c, int chunks, int ch) {
    return saved + 4 * c + ch * chunks * 3;
}
__device__ __forceinline__ unsigned int* bn2_counter(float* saved, int c, int chunks, int ch) {
    return reinterpret_cast<unsigned int*>(saved + 4 * c + c * chunks * 3) + ch;
}

// Whether this block is the last of its channel to finish (its partial stored by thread 0
// before the call); the last block resets the counter.
__device__ __forceinline__ bool bn2_last_of_channel(unsigned int* counter, bool* s_last) {
    __threadfence();
    if (threadIdx.x == 0) {
        *s_last = atomicAdd(counter, 1u) == gridDim.x - 1;
        if (*s_last) *counter = 0u;  // ready for the next launch
    }
    __syncthreads();
    return *s_last;
}

extern "C" __global__ void __launch_bounds__(BN2_THREADS)
batchnorm_train_stats_v2(const float* __restrict__ x, int n, int c, int hw, int ipb, float momentum, float eps,
                         float* saved, float* __restrict__ running_mean, float* __restrict__ running_var) {
    __shared__ float shared[32];
    __shared__ bool s_last;
    const int ch = blockIdx.y, chunk = blockIdx.x, chunks = gridDim.x;
    const int img0 = chunk * ipb, count = min(ipb, n - img0) * hw;
    const float* xc = x + ((size_t)img0 * c + ch) * hw;
    float s = 0.f;
    for (int e = threadIdx.x; e < count; e += blockDim.x) {
        const int img = e / hw;
        s += xc[img * c * hw + (e - img * hw)];
    }
    const float mean = block_sum(s, shared) / (float)count;
    float sq = 0.f;
    for (int e = threadIdx.x; e < count; e += blockDim.x) {
        const int img = e / hw;
        const float dev = xc[img * c * hw + (e - img * hw)] - mean;
        sq = fmaf(dev, dev, sq);
    }
    const float m2 = block_sum(sq, shared);
    float* part = bn2_partials(saved, c, chunks, ch);
    if (threadIdx.x == 0) {
        part[3 * chunk] = (float)count;
        part[3 * chunk + 1] = mean;
        part[3 * chunk + 2] = m2;
    }
    if (!bn2_last_of_channel(bn2_counter(saved, c, chunks, ch), &s_last) || threadIdx.x != 0) return;
    const volatile float* p = part;
    double n_a = p[0], mean_a = p[1], m2_a = p[2];
    for (int k = 1; k < chunks; ++k) {
        const double n_b = p[3 * k], mean_b = p[3 * k + 1], m2_b = p[3 * k + 2];
        const double total = n_a + n_b, delta = mean_b - mean_a;
        mean_a += delta * n_b / total;
        m2_a += m2_b + delta * delta * n_a * n_b / total;
        n_a = total;
    }
    const float var = (float)(m2_a / n_a);
    saved[ch] = (float)mean_a;
    saved[c + ch] = rsqrtf(var + eps);
    const float unbiased = n_a > 1.0 ? (float)(m2_a / (n_a - 1.0)) : var;
    running_mean[ch] = (1.f - momentum) * running_mean[ch] + momentum * (float)mean_a;
    running_var[ch] = (1.f - momentum) * running_var[ch] + momentum * unbiased;
}

extern "C" __global__ void __launch_bounds__(BN2_THREADS)
batchnorm_bwd_reduce_v2(const float* __restrict__ x, const float* __restrict__ dy, int n, int c, int hw, int ipb,
                        float* saved, float* __restrict__ dgamma, float* __restrict__ dbeta) {
    __shared__ float shared[32];
    __shared__ bool s_last;
    const int ch = blockIdx.y, chunk = blockIdx.x, chunks = gridDim.x;
    const int img0 = chunk * ipb, count = min(ipb, n - img0) * hw;
    const size_t base = ((size_t)img0 * c + ch) * hw;
    const float *xc = x + base, *gc = dy + base;
    const float mean = saved[ch], inv = saved[c + ch];
    float s1 = 0.f, s2 = 0.f;
    for (int e = threadIdx.x; e < count; e += blockDim.x) {
        const int img = e / hw, at = img * c * hw + (e - img * hw);
        const float g = gc[at];
        s1 += g;
        s2 = fmaf(g, (xc[at] - mean) * inv, s2);
    }
    s1 = block_sum(s1, shared);
    s2 = block_sum(s2, shared);
    float* part = bn2_partials(saved, c, chunks, ch);
    if (threadIdx.x == 0) {
        part[3 * chunk] = s1;
        part[3 * chunk + 1] = s2;
    }
    if (!bn2_last_of_channel(bn2_counter(saved, c, chunks, ch), &s_last) || threadIdx.x != 0) return;
    const volatile float* p = part;
    double t1 = 0.0, t2 = 0.0;
    for (int k = 0; k < chunks; ++k) {
        t1 += p[3 * k];
        t2 += p[3 * k + 1];
    }
    saved[2 * c + ch] = (float)t1;
    saved[3 * c + ch] = (float)t2;
    dbeta[ch] += (float)t1;
    dgamma[ch] += (float)t2;
}

extern "C" __global__ void __launch_bounds__(256)
batchnorm_apply_v2(const float* __restrict__ x, const float* __restrict__ gamma, const float* __restrict__ beta,
                   const float* __restrict__ saved, int n, int c, int hw, float* __restrict__ y) {
    const int total = n * c * hw;
    // The counter in 64 bits: e + the grid's stride passes 2^31 when total is near it.
    for (long long e64 = (long long)blockIdx.x * blockDim.x + threadIdx.x; e64 < total;
         e64 += (long long)gridDim.x * blockDim.x) {
        const int e = (int)e64;  // < total < 2^31 (the launcher's guard)
        const int ch = (e / hw) % c;
        const float scale = gamma[ch] * saved[c + ch];
        const float shift = beta[ch] - saved[ch] * scale;
        y[e] = fmaf(x[e], scale, shift);
    }
}

extern "C" __global__ void __launch_bounds__(256)
batchnorm_bwd_dx_v2(const float* __restrict__ x, const float* __restrict__ dy, const float* __restrict__ gamma,
                    const float* __restrict__ saved, int n, int c, int hw, int training, float* __restrict__ dx,
                    int accumulate) {
    const int total = n * c * hw;
    const float m = (float)(n * hw);
    // The counter in 64 bits: e + the grid's stride passes 2^31 when total is near it.
    for (long long e64 = (long long)blockIdx.x * blockDim.x + threadIdx.x; e64 < total;
         e64 += (long long)gridDim.x * blockDim.x) {
        const int e = (int)e64;  // < total < 2^31 (the launcher's guard)
        const int ch = (e / hw) % c;
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

// ---- --sync-bn: the statistics and dx over the global batch of a data-parallel group -------
//
// Every rank's moments are gathered between the two statistics kernels, and its (s1, s2) summed
// between the backward's reduction (batchnorm_bwd_reduce_v1, unchanged: dbeta and dgamma take
// the rank's own sums, which the gradient all-reduce then adds up) and dx; the collectives are
// the host's (src/dist/data_parallel.rs). saved has v1's layout (4 C floats).
// batchnorm_sync_moments_v1: one block of 512 per channel: the rank's mean and M2 = sum (x -
//   mean)^2 by two passes (v1's reductions).
// batchnorm_sync_stats_v1: one thread per channel: the R ranks' (mean, M2), each over `count`
//   values, merged in rank order by Chan, Golub and LeVeque's update in double; then v1's saved
//   and running statistics with M = R count.
// batchnorm_sync_bwd_dx_v1: v1's training dx with the global M and the summed (s1, s2).

extern "C" __global__ void __launch_bounds__(BN_THREADS)
batchnorm_sync_moments_v1(const float* __restrict__ x, int n, int c, int hw, float* __restrict__ moments) {
    __shared__ float shared[32];
    const int ch = blockIdx.x;
    float mean, m2;
    channel_mean_m2(x, n, c, hw, ch, shared, &mean, &m2);
    if (threadIdx.x == 0) {
        moments[ch] = mean;
        moments[c + ch] = m2;
    }
}

extern "C" __global__ void __launch_bounds__(256)
batchnorm_sync_stats_v1(const float* __restrict__ gathered, int ranks, long long count, int c, float momentum,
                        float eps, float* __restrict__ saved, float* __restrict__ running_mean,
                        float* __restrict__ running_var) {
    const int ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= c) return;
    double mean = 0.0, m2 = 0.0, total = 0.0;
    for (int r = 0; r < ranks; ++r) {
        const double mean_r = gathered[r * 2 * c + ch], m2_r = gathered[r * 2 * c + c + ch];
        const double merged = total + (double)count;
        const double delta = mean_r - mean;
        mean += delta * (double)count / merged;
        m2 += m2_r + delta * delta * total * (double)count / merged;
        total = merged;
    }
    const double var = m2 / total;
    saved[ch] = (float)mean;
    saved[c + ch] = rsqrtf((float)var + eps);
    const double unbiased = total > 1.0 ? m2 / (total - 1.0) : var;
    running_mean[ch] = (1.f - momentum) * running_mean[ch] + momentum * (float)mean;
    running_var[ch] = (1.f - momentum) * running_var[ch] + momentum * (float)unbiased;
}

extern "C" __global__ void __launch_bounds__(256)
batchnorm_sync_bwd_dx_v1(const float* __restrict__ x, const float* __restrict__ dy, const float* __restrict__ gamma,
                         const float* __restrict__ saved, int n, int c, int hw, float m, float* __restrict__ dx,
                         int accumulate) {
    const long long total = (long long)n * c * hw;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (long long)gridDim.x * blockDim.x) {
        const int ch = (int)((e / hw) % c);
        const float inv = saved[c + ch];
        const float xhat = (x[e] - saved[ch]) * inv;
        const float v = gamma[ch] * inv / m * (m * dy[e] - saved[2 * c + ch] - xhat * saved[3 * c + ch]);
        dx[e] = accumulate ? dx[e] + v : v;
    }
}
