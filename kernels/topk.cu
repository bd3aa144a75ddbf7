// The k largest entries of each row of a similarity matrix (kNN evaluation on the GPU).
//
// topk_rows_v1: S is rows x cols row-major (queries x memory bank, from a cuBLAS SGEMM); writes
// each row's k largest values and their column indices, unordered, to out_val / out_idx
// (rows x k). Ties at the k-th value are broken by the lowest index, as the CPU path does, so
// the selected set is deterministic (the host sorts each row).
//
// Method: radix select on the order-preserving uint32 key of each float (4 passes of 8 bits,
// a 256-bin shared histogram per pass, integer atomics), giving the k-th largest key T and the
// count above it; then one ordered sweep writes every key > T (a shared counter) and the first
// ties == T in index order (block-wide prefix counts per 256-column chunk).
// Launch: one block of 256 threads per row, 1 KB + 8 B shared memory. Requires 1 <= k <= cols.

#define TOPK_THREADS 256

__device__ __forceinline__ unsigned int order_key(float v) {
    const unsigned int u = __float_as_uint(v);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

extern "C" __global__ void __launch_bounds__(TOPK_THREADS)
topk_rows_v1(const float* __restrict__ s, int rows, int cols, int k, float* __restrict__ out_val, int* __restrict__ out_idx) {
    __shared__ unsigned int hist[256];
    __shared__ unsigned int prefix_s, above_s;  // the key's known high bits, count strictly above
    __shared__ int written_s, ties_taken_s;
    __shared__ int warp_ties[TOPK_THREADS / 32];
    const int row = blockIdx.x;
    if (row >= rows) return;
    const float* sr = s + (size_t)row * cols;
    if (threadIdx.x == 0) { prefix_s = 0u; above_s = 0u; }
    __syncthreads();
    // Radix select, most significant byte first.
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0u;
        __syncthreads();
        const unsigned int prefix = prefix_s;
        const unsigned int high_mask = shift == 24 ? 0u : (0xffffffffu << (shift + 8));
        for (int j = threadIdx.x; j < cols; j += blockDim.x) {
            const unsigned int key = order_key(sr[j]);
            if ((key & high_mask) == prefix) atomicAdd(&hist[(key >> shift) & 0xffu], 1u);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            unsigned int above = above_s;
            int digit = 255;
            for (; digit > 0; --digit) {
                if (above + hist[digit] >= (unsigned int)k) break;
                above += hist[digit];
            }
            above_s = above;
            prefix_s = prefix | ((unsigned int)digit << shift);
        }
        __syncthreads();
    }
    const unsigned int kth = prefix_s;
    const int ties_needed = k - (int)above_s;
    if (threadIdx.x == 0) { written_s = 0; ties_taken_s = 0; }
    __syncthreads();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int base = 0; base < cols; base += blockDim.x) {
        const int j = base + threadIdx.x;
        const unsigned int key = j < cols ? order_key(sr[j]) : 0u;
        const bool above = j < cols && key > kth;
        const bool tie = j < cols && key == kth;
        if (above) {
            const int at = atomicAdd(&written_s, 1);
            out_val[(size_t)row * k + at] = sr[j];
            out_idx[(size_t)row * k + at] = j;
        }
        // Ties in index order: the rank of this tie among the chunk's ties, plus earlier chunks'.
        const unsigned int ballot = __ballot_sync(0xffffffffu, tie);
        if (lane == 0) warp_ties[warp] = __popc(ballot);
        __syncthreads();
        int rank = ties_taken_s + __popc(ballot & ((1u << lane) - 1u));
        for (int w = 0; w < warp; ++w) rank += warp_ties[w];
        if (tie && rank < ties_needed) {
            const int at = atomicAdd(&written_s, 1);
            out_val[(size_t)row * k + at] = sr[j];
            out_idx[(size_t)row * k + at] = j;
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            int chunk = 0;
            for (int w = 0; w < TOPK_THREADS / 32; ++w) chunk += warp_ties[w];
            ties_taken_s += chunk;
        }
        __syncthreads();
    }
}
