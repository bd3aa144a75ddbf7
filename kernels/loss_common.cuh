// Pieces shared by every instance-loss kernel version (math in ../shared/notes/loss.md).
//
// Conventions of all versions:
// - N = 2m rows, partner p(a) = (a + m) mod N; the diagonal never enters any sum.
// - Fixed offset: e_ab = exp((s_ab - 1) / tau), s_ab = f_a . f_b <= 1, so nothing overflows;
//   with tau >= 0.025 (checked on the host) nothing underflows to 0 either.
// - The row's largest negative b* is tracked with the sum of the other negatives, so that
//   D_a - e_ab* = e_ap + mu * rest + (mu - 1) e_ab* is formed without cancellation: when one
//   negative is far closer than the partner, Q_ab* -> 1 and 1 - Q would otherwise round to 0.
//   Every other negative has Q_ab <= 1/2 (mu >= 1), where 1 - q is safe in float32.
// - Row sums accumulate in double, in a fixed order: two runs give identical bits.
#pragma once

#include "common.cuh"

// Shared with Rust: `LossParams` in src/loss/cuda/mod.rs (#[repr(C)], the same fields in order).
struct LossParams {
    int n;             // rows, even, >= 4
    int d;             // columns, >= 1
    float inv_tau;     // 1 / tau
    float mu;          // weight of the negatives, >= 1
    float grad_scale;  // 1 / (N tau)
    int with_grad;     // 0: loss only
    int both_sides;    // 1: keys receive gradient too
    int keep;          // negatives kept per row: N - 2 for all, fewer with a hard/easy selection
    int hard;          // 1: keep the most similar negatives, 0: the least (when keep < N - 2)
    float row_scale;   // the factor on each row's loss term inside the mean over rows: 1, or with a
                       // selection N/(keep + 1) (official scale) or 1/(keep + 1) (mean scale); the
                       // gradient's share of it is folded into grad_scale on the host
    float nu;          // the weight of the log(1 - Q_ab) terms: mu, or mu F (official hard/easy)
    float nu_over_mu;  // nu / mu, exactly 1 but for the official hard/easy scale
};

__device__ __forceinline__ int partner_of(int a, int n) {
    const int m = n >> 1;
    return a < m ? a + m : a - m;
}

// The negatives of one row seen so far: the largest (value, index; ties to the lower index)
// and the sum of all the others.
struct NegState {
    float max;
    int idx;
    double rest;
};

#define NEG_NONE 0x7fffffff

__device__ __forceinline__ NegState neg_empty() {
    NegState s;
    s.max = -1.f;  // below every exp(.)
    s.idx = NEG_NONE;
    s.rest = 0.0;
    return s;
}

__device__ __forceinline__ bool neg_beats(float e, int b, float max, int idx) {
    return e > max || (e == max && b < idx);
}

__device__ __forceinline__ void neg_push(NegState& s, float e, int b) {
    if (neg_beats(e, b, s.max, s.idx)) {
        if (s.idx != NEG_NONE) s.rest += (double)s.max;
        s.max = e;
        s.idx = b;
    } else {
        s.rest += (double)e;
    }
}

__device__ __forceinline__ NegState neg_merge(NegState a, NegState b) {
    if (b.idx == NEG_NONE) return a;
    if (a.idx == NEG_NONE) return b;
    NegState r;
    if (neg_beats(b.max, b.idx, a.max, a.idx)) {
        r.max = b.max; r.idx = b.idx; r.rest = (a.rest + b.rest) + (double)a.max;
    } else {
        r.max = a.max; r.idx = a.idx; r.rest = (a.rest + b.rest) + (double)b.max;
    }
    return r;
}

// Merges the states of lanes that differ in the bits of `width - 1` (width a power of 2 <= 32),
// in a fixed butterfly order; every lane of the group ends with the same state.
__device__ __forceinline__ NegState neg_merge_lanes(NegState s, int width) {
    for (int off = width >> 1; off > 0; off >>= 1) {
        NegState o;
        o.max = __shfl_xor_sync(0xffffffffu, s.max, off);
        o.idx = __shfl_xor_sync(0xffffffffu, s.idx, off);
        o.rest = __shfl_xor_sync(0xffffffffu, s.rest, off);
        // Merge in lane order so that both partners compute the same sum.
        const bool lower = (threadIdx.x & off) == 0;
        s = lower ? neg_merge(s, o) : neg_merge(o, s);
    }
    return s;
}

__device__ __forceinline__ double sum_lanes(double v, int width) {
    for (int off = width >> 1; off > 0; off >>= 1) {
        const double o = __shfl_xor_sync(0xffffffffu, v, off);
        v = ((threadIdx.x & off) == 0) ? v + o : o + v;
    }
    return v;
}

// A similarity as an unsigned key whose order is the float order (the sign bit flipped for
// positives, every bit for negatives; -0 taken as +0, equal as the reference compares them);
// `~key` reverses it.
__device__ __forceinline__ unsigned int selection_key(float s) {
    const unsigned int u = __float_as_uint(s == 0.f ? 0.f : s);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Whether a hard/easy selection is on: fewer than all N - 2 negatives kept.
__device__ __forceinline__ bool selects(const LossParams& p) { return p.keep < p.n - 2; }

// The key a selection ranks similarity s by: larger = kept first (hard: most similar first).
__device__ __forceinline__ unsigned int rank_key(const LossParams& p, float s) {
    const unsigned int k = selection_key(s);
    return p.hard ? k : ~k;
}

// Whether negative c of a row is kept, given the row's selection as a threshold key and a tie
// cut (the tiled versions' O(N) form of Negatives::dropped): every key above the threshold,
// and the ties at it up to index `cut` (the lower indices first).
__device__ __forceinline__ bool negative_kept(const LossParams& p, float s, int c, unsigned int threshold, int cut) {
    if (!selects(p)) return true;
    const unsigned int k = rank_key(p, s);
    return k > threshold || (k == threshold && c <= cut);
}

// A row's scalars once its negatives are summed (double, host-independent formulas).
struct RowDenominator {
    double denom;            // D_a
    double one_minus_q_max;  // 1 - Q_ab* = (D_a - e_ab*) / D_a
    double q_max;            // Q_ab*
};

__device__ __forceinline__ RowDenominator row_denominator(float x_partner, NegState s, float mu) {
    RowDenominator r;
    const double e_p = exp((double)x_partner);
    const double e_max = s.idx == NEG_NONE ? 0.0 : (double)s.max;
    r.denom = e_p + (double)mu * (s.rest + e_max);
    r.one_minus_q_max = (e_p + (double)mu * s.rest + ((double)mu - 1.0) * e_max) / r.denom;
    r.q_max = e_max / r.denom;
    return r;
}

// g_ab for a negative b other than b*: mu Q (1 + (nu/mu)/(1 - Q) - nu R_a) (loss.md's with the
// log terms weighted by nu; nu = mu gives its form to the bit). nu/mu times a reciprocal, not a
// quotient: the reciprocal is the one instruction it was, the quotient a slow-path call.
__device__ __forceinline__ float g_negative(float q, float mu, float nu_over_mu, float nu_r) {
    return mu * q * (1.f + nu_over_mu * (1.f / (1.f - q)) - nu_r);
}
__device__ __forceinline__ float g_negative(float q, const LossParams& p, float r) {
    return g_negative(q, p.mu, p.nu_over_mu, p.nu * r);
}

// The row's remaining scalars once the log terms are summed.
struct RowFinal {
    double loss;        // l_a
    float r;            // R_a
    float g_partner;    // g_ap = -1 + P_a - nu P_a R_a
    float g_dominant;   // g_ab* (exact 1 - Q)
};

__device__ __forceinline__ RowFinal row_final(float x_partner, RowDenominator den, double log_sum_rest,
                                              double r_rest, const LossParams& p) {
    const double mu = (double)p.mu, nu = (double)p.nu, nu_over_mu = (double)p.nu_over_mu;
    RowFinal f;
    const double r = r_rest + den.q_max / den.one_minus_q_max;
    // -log P_a = log D_a - x_ap, with x_ap = (s_ap - 1) / tau the partner's exponent.
    f.loss = log(den.denom) - (double)x_partner - nu * (log_sum_rest + log(den.one_minus_q_max));
    f.r = (float)r;
    const double p_a = exp((double)x_partner) / den.denom;
    f.g_partner = (float)(-1.0 + p_a - nu * p_a * r);
    f.g_dominant = (float)(mu * den.q_max * (1.0 + nu_over_mu * (1.0 / den.one_minus_q_max) - nu * r));
    return f;
}

// A tiled query block's row scalars in shared memory (fused v2, v3: ROWS rows a block), filled
// by one thread per row after each sweep, and their O(N) copies for the key kernel.
template <int ROWS>
struct QueryRowScalars {
    float xp[ROWS];                // the partner's exponent (sweep 1 writes it per element)
    float inv_d[ROWS];             // 1 / D_a
    float r[ROWS];                 // R_a
    float g_partner[ROWS];         // g_ap
    float g_dominant[ROWS];        // g_ab*
    int dominant[ROWS];            // b*
    RowDenominator den[ROWS];
    double loss[ROWS];             // the row's loss term (0 past N)

    // After sweep 1: D_a and b* from the row's merged negatives.
    __device__ __forceinline__ void set_denominator(int row, NegState all, float mu) {
        den[row] = row_denominator(xp[row], all, mu);
        dominant[row] = all.idx;
        inv_d[row] = (float)(1.0 / den[row].denom);
    }

    // After sweep 2: block row `row` (row a < N of the matrix) from its sums of log(1 - Q) and
    // Q / (1 - Q), kept here and written to the per-row outputs the key kernel reads.
    __device__ __forceinline__ void finish(int row, int a, double log_sum, double r_sum, const LossParams& p,
                                           float* inv_denom_out, float* r_out, int* dominant_out,
                                           float* g_partner_out, float* g_dominant_out) {
        const RowFinal fin = row_final(xp[row], den[row], log_sum, r_sum, p);
        loss[row] = fin.loss * p.row_scale;
        r[row] = fin.r;
        g_partner[row] = fin.g_partner;
        g_dominant[row] = fin.g_dominant;
        inv_denom_out[a] = inv_d[row];
        r_out[a] = fin.r;
        dominant_out[a] = dominant[row];
        g_partner_out[a] = fin.g_partner;
        g_dominant_out[a] = fin.g_dominant;
    }

    // The block's partial sum of its rows' loss terms, in row order (one thread).
    __device__ __forceinline__ double block_sum() const {
        double s = 0.0;
        for (int row = 0; row < ROWS; ++row) s += loss[row];
        return s;
    }
};

// dz_r = (dF_r - f_r (f_r . dF_r)) / ||z_r|| (or dF_r / eps under the clamp), in place, for rows
// r0 .. r0 + rows - 1; one warp per row, every warp of the block. The block's own writes of dF
// are visible after the caller's __syncthreads().
__device__ __forceinline__ void normalize_backward_rows(const float* __restrict__ z, const float* __restrict__ norms,
                                                        const float* __restrict__ inv_norms, int n, int d, int r0,
                                                        int rows, float* dz) {
    const int warps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int row = warp; row < rows; row += warps) {
        const int r = r0 + row;
        if (r >= n) break;
        const float inv = inv_norms[r];
        const float* zr = z + (size_t)r * d;
        float* g = dz + (size_t)r * d;
        if (norms[r] > INVASPREAD_NORM_EPS) {
            float dot = 0.f;
            for (int k = lane; k < d; k += 32) dot = fmaf(zr[k] * inv, g[k], dot);
            dot = warp_sum(dot);
            for (int k = lane; k < d; k += 32) g[k] = (g[k] - zr[k] * inv * dot) * inv;
        } else {
            for (int k = lane; k < d; k += 32) g[k] = g[k] * inv;
        }
    }
}

// The loss = (sum of the blocks' partial sums, in block order) / N, written by the last block to
// finish; `counter` (zero before the launch) is left at zero for the next. Every thread of every
// block calls it once its block's partial sum is stored; `s_last` is a __shared__ flag.
__device__ __forceinline__ void sum_block_losses_in_order(const double* block_loss, unsigned int* counter,
                                                          double* loss_out, int n, bool& s_last) {
    __threadfence();
    if (threadIdx.x == 0) s_last = atomicAdd(counter, 1u) == gridDim.x - 1;
    __syncthreads();
    if (s_last && threadIdx.x == 0) {
        const volatile double* partial = block_loss;
        double s = 0.0;
        for (unsigned b = 0; b < gridDim.x; ++b) s += partial[b];
        loss_out[0] = s / (double)n;
        *counter = 0u;  // ready for the next launch
    }
}
