// Fused v1: the simplest correct fused instance loss. No N x N matrix: each query row sweeps
// all keys three times, recomputing every dot product (D_a and b*; the log terms and R_a;
// the gradient), and stores only O(N) row scalars besides F and dF (N x d each).
//
// instance_loss_query_v1: one 256-thread block per query row a (grid = N); warp w takes keys
//   b = w, w + 8, ...; a dot product is one warp (lanes over d, result broadcast from lane 0).
//   Writes l_a, 1/D_a, R_a, b*, g_ap, g_ab* and, with gradients, dF_a = (1/(N tau)) sum_b g_ab f_b
//   (d in chunks of 256 columns, 8 per lane; the 8 warps' partial rows summed in warp order).
// instance_loss_key_v1 (both-sides): one block per key row b (grid = N); adds
//   (1/(N tau)) sum_a g_ab f_a to dF_b, rebuilding g_ab from row a's scalars.
// Launch order (src/loss/cuda/fused_v1.rs): normalize_rows_fwd_v1,
// instance_loss_query_v1, [instance_loss_key_v1], normalize_rows_bwd_v1, row_mean_v1.
// Shapes: f, df: N x d row-major float32; per-row outputs: N each. Any even N >= 4, any d >= 1.

#include "loss_common.cuh"

#define V1_WARPS 8
#define V1_CHUNK 256

__device__ __forceinline__ float warp_dot(const float* __restrict__ x, const float* __restrict__ y, int d) {
    const int lane = threadIdx.x & 31;
    float s = 0.f;
    for (int k = lane; k < d; k += 32) s = fmaf(x[k], y[k], s);
    s = warp_sum(s);
    return __shfl_sync(0xffffffffu, s, 0);  // one value for the whole warp
}

// Sums red[w][c] over warps in order and stores scale * sum (+ the old value when accumulate).
__device__ __forceinline__ void store_chunk(float (*red)[V1_CHUNK], float* __restrict__ out_row, int c0, int d,
                                            float scale, bool accumulate) {
    for (int c = threadIdx.x; c < V1_CHUNK; c += blockDim.x) {
        const int k = c0 + c;
        if (k >= d) continue;
        float s = 0.f;
        for (int w = 0; w < V1_WARPS; ++w) s += red[w][c];
        out_row[k] = accumulate ? out_row[k] + scale * s : scale * s;
    }
}

extern "C" __global__ void __launch_bounds__(256)
instance_loss_query_v1(const float* __restrict__ f, LossParams p, double* __restrict__ row_loss,
                       float* __restrict__ inv_denom_out, float* __restrict__ r_out, int* __restrict__ dominant_out,
                       float* __restrict__ g_partner_out, float* __restrict__ g_dominant_out, float* __restrict__ df) {
    __shared__ NegState warp_state[V1_WARPS];
    __shared__ double warp_log[V1_WARPS], warp_r[V1_WARPS];
    __shared__ float red[V1_WARPS][V1_CHUNK];
    __shared__ float s_xp, s_inv_d, s_nu_r, s_gp, s_gdom;
    __shared__ int s_dom;
    __shared__ RowDenominator s_den;
    const int a = blockIdx.x, n = p.n, d = p.d, pa = partner_of(a, n);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const float* fa = f + (size_t)a * d;

    // Sweep 1: D_a and the largest negative.
    NegState st = neg_empty();
    for (int b = warp; b < n; b += V1_WARPS) {
        if (b == a) continue;
        const float x = (warp_dot(fa, f + (size_t)b * d, d) - 1.f) * p.inv_tau;
        if (b == pa) {
            if (lane == 0) s_xp = x;
        } else {
            neg_push(st, expf(x), b);
        }
    }
    if (lane == 0) warp_state[warp] = st;
    __syncthreads();
    if (threadIdx.x == 0) {
        NegState all = warp_state[0];
        for (int w = 1; w < V1_WARPS; ++w) all = neg_merge(all, warp_state[w]);
        s_den = row_denominator(s_xp, all, p.mu);
        s_dom = all.idx;
        s_inv_d = (float)(1.0 / s_den.denom);
    }
    __syncthreads();

    // Sweep 2: log(1 - Q) and Q / (1 - Q) over the other negatives.
    double log_sum = 0.0, r_sum = 0.0;
    for (int b = warp; b < n; b += V1_WARPS) {
        if (b == a || b == pa || b == s_dom) continue;
        const float x = (warp_dot(fa, f + (size_t)b * d, d) - 1.f) * p.inv_tau;
        const float q = expf(x) * s_inv_d, one_minus_q = 1.f - q;
        log_sum += (double)logf(one_minus_q);
        r_sum += (double)(q / one_minus_q);
    }
    if (lane == 0) {
        warp_log[warp] = log_sum;
        warp_r[warp] = r_sum;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        double ls = 0.0, rs = 0.0;
        for (int w = 0; w < V1_WARPS; ++w) {
            ls += warp_log[w];
            rs += warp_r[w];
        }
        const RowFinal fin = row_final(s_xp, s_den, ls, rs, p);
        // nu R_a once for sweep 3 (read from the parameters there, ptxas spills in the f64
        // division's slow path above).
        s_nu_r = p.nu * fin.r;
        s_gp = fin.g_partner;
        s_gdom = fin.g_dominant;
        row_loss[a] = fin.loss;
        inv_denom_out[a] = s_inv_d;
        r_out[a] = fin.r;
        dominant_out[a] = s_dom;
        g_partner_out[a] = fin.g_partner;
        g_dominant_out[a] = fin.g_dominant;
    }
    __syncthreads();
    if (!p.with_grad) return;

    // Sweep 3: dF_a = (1/(N tau)) sum_b g_ab f_b, 256 columns at a time.

    for (int c0 = 0; c0 < d; c0 += V1_CHUNK) {
        float acc[V1_CHUNK / 32] = {};
        for (int b = warp; b < n; b += V1_WARPS) {
            if (b == a) continue;
            const float* fb = f + (size_t)b * d;
            float g;
            if (b == pa) g = s_gp;
            else if (b == s_dom) g = s_gdom;
            else g = g_negative(expf((warp_dot(fa, fb, d) - 1.f) * p.inv_tau) * s_inv_d, p.mu, p.nu_over_mu, s_nu_r);
#pragma unroll
            for (int t = 0; t < V1_CHUNK / 32; ++t) {
                const int k = c0 + lane + 32 * t;
                if (k < d) acc[t] = fmaf(g, fb[k], acc[t]);
            }
        }
#pragma unroll
        for (int t = 0; t < V1_CHUNK / 32; ++t) red[warp][lane + 32 * t] = acc[t];
        __syncthreads();
        store_chunk(red, df + (size_t)a * d, c0, d, p.grad_scale, false);
        __syncthreads();
    }
}

extern "C" __global__ void __launch_bounds__(256)
instance_loss_key_v1(const float* __restrict__ f, LossParams p, const float* __restrict__ inv_denom,
                     const float* __restrict__ r, const int* __restrict__ dominant,
                     const float* __restrict__ g_partner, const float* __restrict__ g_dominant, float* __restrict__ df) {
    __shared__ float red[V1_WARPS][V1_CHUNK];
    const int b = blockIdx.x, n = p.n, d = p.d;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const float* fb = f + (size_t)b * d;
    for (int c0 = 0; c0 < d; c0 += V1_CHUNK) {
        float acc[V1_CHUNK / 32] = {};
        for (int a = warp; a < n; a += V1_WARPS) {
            if (a == b) continue;
            const float* fa = f + (size_t)a * d;
            float g;
            if (b == partner_of(a, n)) g = g_partner[a];
            else if (b == dominant[a]) g = g_dominant[a];
            else g = g_negative(expf((warp_dot(fa, fb, d) - 1.f) * p.inv_tau) * inv_denom[a], p, r[a]);
#pragma unroll
            for (int t = 0; t < V1_CHUNK / 32; ++t) {
                const int k = c0 + lane + 32 * t;
                if (k < d) acc[t] = fmaf(g, fa[k], acc[t]);
            }
        }
#pragma unroll
        for (int t = 0; t < V1_CHUNK / 32; ++t) red[warp][lane + 32 * t] = acc[t];
        __syncthreads();
        store_chunk(red, df + (size_t)b * d, c0, d, p.grad_scale, true);
        __syncthreads();
    }
}
