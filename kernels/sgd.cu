// SGD with momentum and weight decay over every parameter of a model in one launch (a
// multi-tensor update, as PyTorch's foreach/fused optimisers do). PyTorch's rule, dampening 0:
//   g' = g + wd w;  v = g' on the first step, else v = momentum v + g';
//   w -= lr (nesterov ? g' + momentum v : v)
//
// The host uploads a table of tensors {w, g, v, len, first_block}: tensor t owns blocks
// first_block .. first_block + ceil(len / SGD_CHUNK). Block b finds its tensor by binary search
// over first_block and updates SGD_CHUNK consecutive elements (4 per thread, coalesced).
// sgd_multi_tensor_v1: grid = total blocks of all tensors, block = 256, no shared memory.

#define SGD_CHUNK 1024

// The same fields in the same order as `SgdTensor` / `SgdParams` in src/ops/sgd/mod.rs
// (launcher: src/ops/sgd/cuda.rs).
struct SgdTensor {
    float* w;
    const float* g;
    float* v;
    long long len;
    long long first_block;
};

struct SgdParams {
    float lr, momentum, weight_decay;
    int nesterov, first, tensors;
};

extern "C" __global__ void __launch_bounds__(256) sgd_multi_tensor_v1(const SgdTensor* __restrict__ table, SgdParams p) {
    const long long b = blockIdx.x;
    int lo = 0, hi = p.tensors - 1;  // the last tensor whose first_block <= b
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (table[mid].first_block <= b) lo = mid; else hi = mid - 1;
    }
    const SgdTensor t = table[lo];
    const long long start = (b - t.first_block) * SGD_CHUNK;
    for (int j = threadIdx.x; j < SGD_CHUNK; j += blockDim.x) {
        const long long i = start + j;
        if (i >= t.len) break;
        const float w = t.w[i];
        const float grad = fmaf(p.weight_decay, w, t.g[i]);
        const float v = p.first ? grad : fmaf(p.momentum, t.v[i], grad);
        t.v[i] = v;
        const float step = p.nesterov ? fmaf(p.momentum, v, grad) : v;
        t.w[i] = w - p.lr * step;
    }
}
