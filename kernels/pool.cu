// k x k average pooling with stride k (k = H = W: global pooling), NCHW; the CUDA twin of
// src/ops/pool/cpu.rs (launchers: src/ops/pool/cuda.rs).
//
// avgpool_fwd_v1: y[nc][oy][ox] = mean of x[nc][oy k + i][ox k + j], one thread per output.
// avgpool_bwd_v1: dx[nc][iy][ix] (=|+=) dy[nc][iy / k][ix / k] / k^2, one thread per input
//                 (windows do not overlap: every input has exactly one term).
// Both: grid-stride, block 256, no shared memory. planes = N C.

extern "C" __global__ void __launch_bounds__(256)
avgpool_fwd_v1(const float* __restrict__ x, int planes, int h, int w, int k, float* __restrict__ y) {
    const int ho = h / k, wo = w / k;
    const long long total = (long long)planes * ho * wo;
    const float scale = 1.f / (float)(k * k);
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (long long)gridDim.x * blockDim.x) {
        const int ox = (int)(e % wo), oy = (int)((e / wo) % ho);
        const long long plane = e / ((long long)wo * ho);
        const float* src = x + (size_t)plane * h * w;
        float s = 0.f;
        for (int i = 0; i < k; ++i)
            for (int j = 0; j < k; ++j) s += src[(oy * k + i) * w + ox * k + j];
        y[e] = s * scale;
    }
}

extern "C" __global__ void __launch_bounds__(256)
avgpool_bwd_v1(const float* __restrict__ dy, int planes, int h, int w, int k, float* __restrict__ dx, int accumulate) {
    const int ho = h / k, wo = w / k;
    const long long total = (long long)planes * h * w;
    const float scale = 1.f / (float)(k * k);
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (long long)gridDim.x * blockDim.x) {
        const int ix = (int)(e % w), iy = (int)((e / w) % h);
        const long long plane = e / ((long long)w * h);
        const float g = dy[(plane * ho + iy / k) * wo + ix / k] * scale;
        dx[e] = accumulate ? dx[e] + g : g;
    }
}
