// The unfused instance loss: the chain PyTorch eager runs, one kernel per step, storing N x N
// matrices (that is what this version stands for: the baseline the fused versions beat).
//
// Launch order (src/loss/cuda/unfused.rs, versions `unfused` and `unfused-cublas`):
//   1. normalize_rows_fwd_v1          z -> F (N x d), norms
//   2. matmul_v1 or cuBLAS SGEMM      S = F F^T                          (N x N)
//   3. unfused_exp_v1                 E = exp((S - 1) / tau), diagonal 0 (N x N)
//   3b. unfused_select_v1             with --negatives hard|easy only: E_ab = 0 for the
//                                     negatives a row leaves out      (one block per row)
//   4. unfused_row_sums_v1            D_a, b*, the partner's exponent   (one block per row)
//   5. unfused_row_terms_v1           l_a, R_a, g_ap, g_ab*              (one block per row)
//   6. unfused_grad_matrix_v1         G (N x N)
//   7. matmul_v1                      dF = G F / (N tau)  (+ G^T F / (N tau) for both-sides)
//   8. normalize_rows_bwd_v1          dz
//   9. row_mean_v1                    L = mean_a l_a
// Math and numerics: loss_common.cuh.

#include "loss_common.cuh"

// 3. E[a][b] = exp((S[a][b] - 1) / tau), E[a][a] = 0. Grid-stride over N x N.
extern "C" __global__ void __launch_bounds__(256)
unfused_exp_v1(const float* __restrict__ S, float* __restrict__ E, int n, float inv_tau) {
    const size_t total = (size_t)n * n;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const size_t a = i / n, b = i % n;
        E[i] = a == b ? 0.f : expf((S[i] - 1.f) * inv_tau);
    }
}

// 3b. The negative selection (loss.md's sums over the kept negatives only; the reference's
//     Negatives::dropped): row a keeps its p.keep negatives of highest similarity (p.hard) or
//     lowest, ties to the lower index, and zeroes E for the others, which every later kernel
//     then treats as absent (a zero term adds nothing to D_a, log(1 - 0) = 0, g = 0).
//     One 256-thread block per row. The threshold key is found by a radix select from the top
//     byte down (4 passes of a 256-bin shared histogram); the ties at the threshold are kept
//     in index order by thread 0 (a serial sweep: ties are few, and this is the correctness
//     version of the chain that stores N x N anyway).
extern "C" __global__ void __launch_bounds__(256)
unfused_select_v1(const float* __restrict__ S, float* __restrict__ E, LossParams p) {
    __shared__ unsigned int hist[256];
    __shared__ unsigned int prefix, remaining;
    const int a = blockIdx.x, n = p.n, pa = partner_of(a, n);
    const float* s_row = S + (size_t)a * n;
    float* e_row = E + (size_t)a * n;
    // The key of negative b, larger = kept first.
    auto key = [&](int b) { return rank_key(p, s_row[b]); };
    if (threadIdx.x == 0) {
        prefix = 0u;
        remaining = (unsigned int)p.keep;
    }
    __syncthreads();
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0u;
        __syncthreads();
        // Only keys that agree with the prefix chosen so far (all of them in the first pass).
        const unsigned int high = shift == 24 ? 0u : (0xffffffffu << (shift + 8));
        for (int b = threadIdx.x; b < n; b += blockDim.x) {
            if (b == a || b == pa) continue;
            const unsigned int k = key(b);
            if ((k & high) == (prefix & high)) atomicAdd(&hist[(k >> shift) & 255u], 1u);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            // The bin, from the top, where the kept count is reached.
            unsigned int above = 0u;
            int bin = 255;
            for (; bin > 0; --bin) {
                if (above + hist[bin] >= remaining) break;
                above += hist[bin];
            }
            prefix |= (unsigned int)bin << shift;
            remaining -= above;
        }
        __syncthreads();
    }
    // prefix is the threshold key; `remaining` of the ties at it are kept, by index.
    const unsigned int threshold = prefix;
    for (int b = threadIdx.x; b < n; b += blockDim.x) {
        if (b == a || b == pa) continue;
        if (key(b) < threshold) e_row[b] = 0.f;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned int kept_ties = 0u;
        for (int b = 0; b < n; ++b) {
            if (b == a || b == pa || key(b) != threshold) continue;
            if (kept_ties < remaining) ++kept_ties;
            else e_row[b] = 0.f;
        }
    }
}

// 4. Per row a (one 256-thread block): the partner's exponent x_ap = (S_ap - 1)/tau, the
//    largest negative b*, D_a, and 1 - Q_ab* without cancellation.
extern "C" __global__ void __launch_bounds__(256)
unfused_row_sums_v1(const float* __restrict__ S, const float* __restrict__ E, LossParams p,
                    float* __restrict__ x_partner, int* __restrict__ dominant, double* __restrict__ denom,
                    double* __restrict__ one_minus_q_max, double* __restrict__ q_max) {
    __shared__ NegState warp_state[8];
    const int a = blockIdx.x, n = p.n, pa = partner_of(a, n);
    const float* e_row = E + (size_t)a * n;
    NegState s = neg_empty();
    for (int b = threadIdx.x; b < n; b += blockDim.x)
        if (b != a && b != pa) neg_push(s, e_row[b], b);
    s = neg_merge_lanes(s, 32);
    if ((threadIdx.x & 31) == 0) warp_state[threadIdx.x >> 5] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        NegState all = warp_state[0];
        for (int w = 1; w < 8; ++w) all = neg_merge(all, warp_state[w]);
        const float xp = (S[(size_t)a * n + pa] - 1.f) * p.inv_tau;
        const RowDenominator den = row_denominator(xp, all, p.mu);
        x_partner[a] = xp;
        dominant[a] = all.idx;
        denom[a] = den.denom;
        one_minus_q_max[a] = den.one_minus_q_max;
        q_max[a] = den.q_max;
    }
}

// 5. Per row a: sum over the other negatives of log(1 - Q) and Q/(1 - Q); then l_a, R_a,
//    g_ap and g_ab*.
extern "C" __global__ void __launch_bounds__(256)
unfused_row_terms_v1(const float* __restrict__ E, LossParams p, const float* __restrict__ x_partner,
                     const int* __restrict__ dominant, const double* __restrict__ denom,
                     const double* __restrict__ one_minus_q_max, const double* __restrict__ q_max,
                     double* __restrict__ row_loss, float* __restrict__ r_out, float* __restrict__ g_partner,
                     float* __restrict__ g_dominant) {
    __shared__ double warp_log[8], warp_r[8];
    const int a = blockIdx.x, n = p.n, pa = partner_of(a, n), dom = dominant[a];
    const float inv_d = (float)(1.0 / denom[a]);
    const float* e_row = E + (size_t)a * n;
    double log_sum = 0.0, r_sum = 0.0;
    for (int b = threadIdx.x; b < n; b += blockDim.x) {
        if (b == a || b == pa || b == dom) continue;
        const float q = e_row[b] * inv_d, one_minus_q = 1.f - q;
        log_sum += (double)logf(one_minus_q);
        r_sum += (double)(q / one_minus_q);
    }
    log_sum = sum_lanes(log_sum, 32);
    r_sum = sum_lanes(r_sum, 32);
    if ((threadIdx.x & 31) == 0) {
        warp_log[threadIdx.x >> 5] = log_sum;
        warp_r[threadIdx.x >> 5] = r_sum;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        double ls = 0.0, rs = 0.0;
        for (int w = 0; w < 8; ++w) {
            ls += warp_log[w];
            rs += warp_r[w];
        }
        RowDenominator den;
        den.denom = denom[a];
        den.one_minus_q_max = one_minus_q_max[a];
        den.q_max = q_max[a];
        const RowFinal fin = row_final(x_partner[a], den, ls, rs, p);
        row_loss[a] = fin.loss * p.row_scale;
        r_out[a] = fin.r;
        g_partner[a] = fin.g_partner;
        g_dominant[a] = fin.g_dominant;
    }
}

// 6. G[a][b] = g_ab (zero diagonal). Grid-stride over N x N.
extern "C" __global__ void __launch_bounds__(256)
unfused_grad_matrix_v1(const float* __restrict__ E, LossParams p, const double* __restrict__ denom,
                       const int* __restrict__ dominant, const float* __restrict__ r,
                       const float* __restrict__ g_partner, const float* __restrict__ g_dominant,
                       float* __restrict__ G) {
    const int n = p.n;
    const size_t total = (size_t)n * n;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const int a = (int)(i / n), b = (int)(i % n);
        float g;
        if (b == a) g = 0.f;
        else if (b == partner_of(a, n)) g = g_partner[a];
        else if (b == dominant[a]) g = g_dominant[a];
        else g = g_negative(E[i] * (float)(1.0 / denom[a]), p, r[a]);
        G[i] = g;
    }
}
