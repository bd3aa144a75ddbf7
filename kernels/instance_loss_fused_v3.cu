// Fused v3: fused v2's three sweeps with every matrix product on tensor cores (mma.cuh), in
// two operand formats: TF32 (m16n8k8) and bf16 (m16n8k16), float32 accumulation in both.
//
// What stays from v2: nothing N x N is stored, tiles of F are formed on load as
// z * (1 / max(||z||, eps)) (then rounded to the operand format), 64 query rows a block
// sweeping the keys in tiles of 64, three sweeps ((1) D_a and the largest negative, (2) the log
// terms and R_a, (3) dF = G F / (N tau)), the row scalars in double, the fixed offset
// exp((s - 1)/tau), the exact 1 - Q of the dominant negative, the loss summed by the last block
// in block order: deterministic, O(N) extra memory, the launches of v2 (its norms kernel).
//
// What changed: 128 threads = 4 warps, warp w owning query rows 16 w .. 16 w + 15 of the block
// against all 64 keys of a tile (8 m16n8 products side by side), so each row's reductions stay
// within the warp (its 4 lanes t = lane % 4; no shared-memory merge across warps). Operand
// tiles are 32-bit words in shared memory (one tf32 value, or two bf16 values of consecutive k),
// 36 words a row so the fragment reads of a warp hit 32 different banks. In sweep 3 the gradient
// tile G never leaves registers: the accumulator fragment of the similarity tile is the A
// fragment of the next product (bf16: exactly, m16n8k16's A pairs = two n8 accumulators; TF32:
// with the keys of each k-step taken in the order 2t, 2t + 1 that the accumulator holds, and F's
// rows read in the same order).
//
// Launches (src/loss/cuda/fused_v3.rs):
//   1. instance_loss_norms_v2 (fused v2's)                               grid ceil(N/8), block 256
//   2. instance_loss_query_v3_{tf32,bf16}: row scalars, the loss, dF_query into dz; query-only:
//      the normalization backward in place                               grid ceil(N/64), 128
//   3. instance_loss_key_v3_{tf32,bf16}: both-sides only, dz_b += key-side term, then the
//      normalization backward                                            grid ceil(N/64), 128
// Shapes: z, dz N x d float32 row-major; any even N >= 4, any d >= 1 (tails zero-padded).
// Shared memory: 3 tiles of 64 x 36 words (27 KB) and the row scalars. Math: loss_common.cuh.
// Numerics: similarities carry the operand format's rounding (TF32 2^-11, bf16 2^-9 relative
// per value), and G is rounded to it before G F, except each row's largest terms, the partner's
// (query and key kernels) and the dominant negative's (query kernel), which are added to dF in
// float32 outside the product (without that the rounding of F under a coefficient near -1 set
// the TF32 gradient's error at 3-4e-4 for every tau). Bounds: CudaLossVersion::tolerance
// (src/loss/cuda/mod.rs); measured errors: benches/RESULTS.md.

#include "loss_common.cuh"
#include "mma.cuh"

#define T3 64   // query rows of a block, keys of a tile
#define W3 36   // words per tile row: 32 and 4 of padding
#define DC3 128 // dF columns per pass of sweep 3

namespace v3 {

struct Smem {
    unsigned int a[T3][W3];  // query rows x 32 words of d
    unsigned int b[T3][W3];  // key rows x 32 words of d
    unsigned int f[T3][W3];  // sweep 3's F chunk (TF32: keys x 32 columns; bf16: columns x key pairs)
};

// TF32: one value per word, k-steps of 8.
struct Tf32 {
    static constexpr int PER_WORD = 1;
    static __device__ __forceinline__ unsigned int pack(const float* row, int k, int d, float scale) {
        return k < d ? tf32_bits(row[k] * scale) : 0u;
    }
    static __device__ __forceinline__ void mma(float d[4], const unsigned int a[4], const unsigned int b[2]) {
        mma_tf32_m16n8k8(d, a, b);
    }
};

// bf16: two values of consecutive k per word (the lower k in the low half), k-steps of 16.
struct Bf16 {
    static constexpr int PER_WORD = 2;
    static __device__ __forceinline__ unsigned int pack(const float* row, int k, int d, float scale) {
        const float lo = k < d ? row[k] * scale : 0.f, hi = k + 1 < d ? row[k + 1] * scale : 0.f;
        return bf16x2_bits(lo, hi);
    }
    static __device__ __forceinline__ void mma(float d[4], const unsigned int a[4], const unsigned int b[2]) {
        mma_bf16_m16n8k16(d, a, b);
    }
};

// tile[row][w] = the format's word w of f_{r0 + row} from column k0 on (0 past N or d).
template <class P>
__device__ __forceinline__ void load_rows(unsigned int (*tile)[W3], const float* __restrict__ z,
                                          const float* __restrict__ inv_norms, int n, int d, int r0, int k0) {
    for (int e = threadIdx.x; e < T3 * 32; e += blockDim.x) {
        const int row = e >> 5, w = e & 31, r = r0 + row;
        tile[row][w] = r < n ? P::pack(z + (size_t)r * d, k0 + w * P::PER_WORD, d, inv_norms[r]) : 0u;
    }
}

// acc[j][q] = f_{r0 + 16 warp + g + 8 (q / 2)} . f_{c0 + 8 j + 2 t + q % 2} (the m16n8 accumulator
// layout of mma.cuh, g = lane / 4, t = lane % 4); rows past N read as zero.
template <class P>
__device__ __forceinline__ void similarity_tile(const float* __restrict__ z, const float* __restrict__ inv_norms,
                                                int n, int d, int r0, int c0, Smem& sm, float acc[8][4]) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3, ar = 16 * (threadIdx.x >> 5) + g;
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[j][q] = 0.f;
    for (int k0 = 0; k0 < d; k0 += 32 * P::PER_WORD) {
        load_rows<P>(sm.a, z, inv_norms, n, d, r0, k0);
        load_rows<P>(sm.b, z, inv_norms, n, d, c0, k0);
        __syncthreads();
#pragma unroll
        for (int s = 0; s < 4; ++s) {
            const int w = 8 * s + t;
            const unsigned int a[4] = {sm.a[ar][w], sm.a[ar + 8][w], sm.a[ar][w + 4], sm.a[ar + 8][w + 4]};
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const unsigned int b[2] = {sm.b[8 * j + g][w], sm.b[8 * j + g][w + 4]};
                P::mma(acc[j], a, b);
            }
        }
        __syncthreads();
    }
}

// sm.f = F's rows k0 .. k0 + 63, columns c0 .. c0 + 31, as sweep 3's B operand wants them:
// TF32 f[key][column]; bf16 f[column][key pair].
__device__ __forceinline__ void load_f(Tf32, Smem& sm, const float* __restrict__ z, const float* __restrict__ inv_norms,
                                       int n, int d, int k0, int c0) {
    for (int e = threadIdx.x; e < T3 * 32; e += blockDim.x) {
        const int key = e >> 5, col = e & 31, r = k0 + key, c = c0 + col;
        sm.f[key][col] = (r < n && c < d) ? tf32_bits(z[(size_t)r * d + c] * inv_norms[r]) : 0u;
    }
}

__device__ __forceinline__ void load_f(Bf16, Smem& sm, const float* __restrict__ z, const float* __restrict__ inv_norms,
                                       int n, int d, int k0, int c0) {
    for (int e = threadIdx.x; e < 32 * 32; e += blockDim.x) {
        const int pair = e >> 5, col = e & 31, r = k0 + 2 * pair, c = c0 + col;
        const float lo = (r < n && c < d) ? z[(size_t)r * d + c] * inv_norms[r] : 0.f;
        const float hi = (r + 1 < n && c < d) ? z[(size_t)(r + 1) * d + c] * inv_norms[r + 1] : 0.f;
        sm.f[col][pair] = bf16x2_bits(lo, hi);
    }
}

// dacc[nt] += G F[:, 8 nt .. 8 nt + 7] over the tile's 64 keys, G the warp's 16 x 64 gradient
// tile in accumulator layout (gacc[j][q] = G(g + 8 (q / 2), 8 j + 2 t + q % 2)).
__device__ __forceinline__ void g_times_f(Tf32, const Smem& sm, const float gacc[8][4], float dacc[4][4]) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        // k-step j: logical k = t is key 8 j + 2 t, k = t + 4 is key 8 j + 2 t + 1.
        const unsigned int a[4] = {tf32_bits(gacc[j][0]), tf32_bits(gacc[j][2]), tf32_bits(gacc[j][1]),
                                   tf32_bits(gacc[j][3])};
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
            const unsigned int b[2] = {sm.f[8 * j + 2 * t][8 * nt + g], sm.f[8 * j + 2 * t + 1][8 * nt + g]};
            mma_tf32_m16n8k8(dacc[nt], a, b);
        }
    }
}

__device__ __forceinline__ void g_times_f(Bf16, const Smem& sm, const float gacc[8][4], float dacc[4][4]) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int s = 0; s < 4; ++s) {
        // k-step s: keys 16 s .. 16 s + 15 = accumulator tiles 2 s and 2 s + 1.
        const unsigned int a[4] = {bf16x2_bits(gacc[2 * s][0], gacc[2 * s][1]),
                                   bf16x2_bits(gacc[2 * s][2], gacc[2 * s][3]),
                                   bf16x2_bits(gacc[2 * s + 1][0], gacc[2 * s + 1][1]),
                                   bf16x2_bits(gacc[2 * s + 1][2], gacc[2 * s + 1][3])};
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
            const unsigned int b[2] = {sm.f[8 * nt + g][8 * s + t], sm.f[8 * nt + g][8 * s + t + 4]};
            mma_bf16_m16n8k16(dacc[nt], a, b);
        }
    }
}

// dacc[sc][nt] += G F over columns c0 + 32 sc + 8 nt ..: the F chunks loaded and multiplied.
template <class P>
__device__ __forceinline__ void accumulate_g_times_f(const float* __restrict__ z, const float* __restrict__ inv_norms,
                                                     int n, int d, int k0, int c0, Smem& sm, const float gacc[8][4],
                                                     float dacc[4][4][4]) {
#pragma unroll
    for (int sc = 0; sc < DC3 / 32; ++sc) {
        if (c0 + 32 * sc < d) {  // uniform over the block
            load_f(P{}, sm, z, inv_norms, n, d, k0, c0 + 32 * sc);
            __syncthreads();
            g_times_f(P{}, sm, gacc, dacc[sc]);
            __syncthreads();
        }
    }
}

// dacc += coef * f_other[columns of dacc] for one of the warp's rows (h: rows g, g + 8), in
// float32: the rows' largest gradient terms (the partner's, the dominant negative's) added
// outside the tensor-core product, whose operand rounding would otherwise set the gradient's
// error (a term of size ~1 against the many small ones of the other negatives).
__device__ __forceinline__ void add_row_term(const float* __restrict__ z, const float* __restrict__ inv_norms, int d,
                                             int c0, int h, int other, float coef, float dacc[4][4][4]) {
    const int t = threadIdx.x & 3;
    const float* fr = z + (size_t)other * d;
    const float scale = coef * inv_norms[other];
#pragma unroll
    for (int sc = 0; sc < DC3 / 32; ++sc)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int col = c0 + 32 * sc + 8 * nt + 2 * t + e;
                if (col < d) dacc[sc][nt][2 * h + e] = fmaf(scale, fr[col], dacc[sc][nt][2 * h + e]);
            }
}

// out[r][c0 + 32 sc + 8 nt + 2 t + e] (=|+=) scale dacc for the warp's rows.
__device__ __forceinline__ void store_dacc(float* __restrict__ out, int n, int d, int r0, int c0, float scale,
                                           bool accumulate, const float dacc[4][4][4]) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int r = r0 + 16 * (threadIdx.x >> 5) + g + 8 * h;
        if (r >= n) continue;
#pragma unroll
        for (int sc = 0; sc < DC3 / 32; ++sc)
#pragma unroll
            for (int nt = 0; nt < 4; ++nt)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int col = c0 + 32 * sc + 8 * nt + 2 * t + e;
                    if (col >= d) continue;
                    float* o = out + (size_t)r * d + col;
                    const float v = scale * dacc[sc][nt][2 * h + e];
                    *o = accumulate ? *o + v : v;
                }
    }
}

__device__ __forceinline__ void zero_dacc(float dacc[4][4][4]) {
#pragma unroll
    for (int sc = 0; sc < 4; ++sc)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
            for (int q = 0; q < 4; ++q) dacc[sc][nt][q] = 0.f;
}

template <class P>
__device__ __forceinline__ void query_rows(const float* __restrict__ z, const float* __restrict__ norms,
                                           const float* __restrict__ inv_norms, LossParams p,
                                           float* __restrict__ inv_denom_out, float* __restrict__ r_out,
                                           int* __restrict__ dominant_out, float* __restrict__ g_partner_out,
                                           float* __restrict__ g_dominant_out, float* dz, double* __restrict__ block_loss,
                                           unsigned int* __restrict__ counter, double* __restrict__ loss_out) {
    __shared__ Smem sm;
    __shared__ float s_xp[T3], s_inv_d[T3], s_r[T3], s_gp[T3], s_gdom[T3];
    __shared__ int s_dom[T3];
    __shared__ RowDenominator s_den[T3];
    __shared__ double s_loss[T3];
    __shared__ bool s_last;
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3, wrow = 16 * (threadIdx.x >> 5) + g;
    const int n = p.n, d = p.d, q0 = blockIdx.x * T3;
    float acc[8][4];

    // Sweep 1: the partner's exponent, the largest negative and the sum of the others.
    NegState st[2] = {neg_empty(), neg_empty()};
    for (int k0 = 0; k0 < n; k0 += T3) {
        similarity_tile<P>(z, inv_norms, n, d, q0, k0, sm, acc);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = wrow + 8 * h, r = q0 + row;
            if (r >= n) continue;
            const int pr = partner_of(r, n);
#pragma unroll
            for (int j = 0; j < 8; ++j)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int c = k0 + 8 * j + 2 * t + e;
                    if (c >= n || c == r) continue;
                    const float x = (acc[j][2 * h + e] - 1.f) * p.inv_tau;
                    if (c == pr) s_xp[row] = x;
                    else neg_push(st[h], expf(x), c);
                }
        }
    }
    __syncthreads();
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const NegState all = neg_merge_lanes(st[h], 4);
        const int row = wrow + 8 * h;
        if (t == 0 && q0 + row < n) {
            const RowDenominator den = row_denominator(s_xp[row], all, p.mu);
            s_den[row] = den;
            s_dom[row] = all.idx;
            s_inv_d[row] = (float)(1.0 / den.denom);
        }
    }
    __syncthreads();

    // Sweep 2: log(1 - Q) and Q / (1 - Q) over the other negatives.
    double log_sum[2] = {0.0, 0.0}, r_sum[2] = {0.0, 0.0};
    for (int k0 = 0; k0 < n; k0 += T3) {
        similarity_tile<P>(z, inv_norms, n, d, q0, k0, sm, acc);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = wrow + 8 * h, r = q0 + row;
            if (r >= n) continue;
            const int pr = partner_of(r, n), dom = s_dom[row];
            const float inv_d = s_inv_d[row];
#pragma unroll
            for (int j = 0; j < 8; ++j)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int c = k0 + 8 * j + 2 * t + e;
                    if (c >= n || c == r || c == pr || c == dom) continue;
                    const float q = expf((acc[j][2 * h + e] - 1.f) * p.inv_tau) * inv_d, one_minus_q = 1.f - q;
                    log_sum[h] += (double)logf(one_minus_q);
                    r_sum[h] += (double)(q / one_minus_q);
                }
        }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const double ls = sum_lanes(log_sum[h], 4), rs = sum_lanes(r_sum[h], 4);
        const int row = wrow + 8 * h, r = q0 + row;
        if (t != 0) continue;
        if (r >= n) {
            s_loss[row] = 0.0;
            continue;
        }
        const RowFinal fin = row_final(s_xp[row], s_den[row], ls, rs, p.mu);
        s_loss[row] = fin.loss;
        s_r[row] = fin.r;
        s_gp[row] = fin.g_partner;
        s_gdom[row] = fin.g_dominant;
        inv_denom_out[r] = s_inv_d[row];
        r_out[r] = fin.r;
        dominant_out[r] = s_dom[row];
        g_partner_out[r] = fin.g_partner;
        g_dominant_out[r] = fin.g_dominant;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        double s = 0.0;
        for (int row = 0; row < T3; ++row) s += s_loss[row];
        block_loss[blockIdx.x] = s;
    }

    // Sweep 3: dF_query = (1/(N tau)) G F, 128 columns of d at a time.
    if (p.with_grad) {
        for (int c0 = 0; c0 < d; c0 += DC3) {
            float dacc[4][4][4];
            zero_dacc(dacc);
            for (int k0 = 0; k0 < n; k0 += T3) {
                similarity_tile<P>(z, inv_norms, n, d, q0, k0, sm, acc);
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int row = wrow + 8 * h, r = q0 + row;
                    const int pr = r < n ? partner_of(r, n) : -1;
#pragma unroll
                    for (int j = 0; j < 8; ++j)
#pragma unroll
                        for (int e = 0; e < 2; ++e) {
                            const int c = k0 + 8 * j + 2 * t + e;
                            float gv = 0.f;
                            // The partner and the dominant negative: added exactly below.
                            if (r < n && c < n && c != r && c != pr && c != s_dom[row])
                                gv = g_negative(expf((acc[j][2 * h + e] - 1.f) * p.inv_tau) * s_inv_d[row], p.mu, s_r[row]);
                            acc[j][2 * h + e] = gv;
                        }
                }
                accumulate_g_times_f<P>(z, inv_norms, n, d, k0, c0, sm, acc, dacc);
            }
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int row = wrow + 8 * h, r = q0 + row;
                if (r >= n) continue;
                add_row_term(z, inv_norms, d, c0, h, partner_of(r, n), s_gp[row], dacc);
                if (s_dom[row] != NEG_NONE) add_row_term(z, inv_norms, d, c0, h, s_dom[row], s_gdom[row], dacc);
            }
            store_dacc(dz, n, d, q0, c0, p.grad_scale, false, dacc);
        }
        if (!p.both_sides) {
            __syncthreads();
            normalize_backward_rows(z, norms, inv_norms, n, d, q0, T3, dz);
        }
    }
    sum_block_losses_in_order(block_loss, counter, loss_out, n, s_last);
}

template <class P>
__device__ __forceinline__ void key_rows(const float* __restrict__ z, const float* __restrict__ norms,
                                         const float* __restrict__ inv_norms, LossParams p,
                                         const float* __restrict__ inv_denom, const float* __restrict__ r_row,
                                         const int* __restrict__ dominant, const float* __restrict__ g_partner,
                                         const float* __restrict__ g_dominant, float* dz) {
    __shared__ Smem sm;
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3, wrow = 16 * (threadIdx.x >> 5) + g;
    const int n = p.n, d = p.d, b0 = blockIdx.x * T3;
    float acc[8][4];
    for (int c0 = 0; c0 < d; c0 += DC3) {
        float dacc[4][4][4];
        zero_dacc(dacc);
        for (int a0 = 0; a0 < n; a0 += T3) {
            similarity_tile<P>(z, inv_norms, n, d, b0, a0, sm, acc);  // acc = s(b, a)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int b = b0 + wrow + 8 * h;
#pragma unroll
                for (int j = 0; j < 8; ++j)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const int a = a0 + 8 * j + 2 * t + e;
                        float gv = 0.f;
                        // The partner (one query per key): added exactly below.
                        if (b < n && a < n && a != b && b != partner_of(a, n)) {
                            if (b == dominant[a]) gv = g_dominant[a];
                            else gv = g_negative(expf((acc[j][2 * h + e] - 1.f) * p.inv_tau) * inv_denom[a], p.mu, r_row[a]);
                        }
                        acc[j][2 * h + e] = gv;
                    }
            }
            accumulate_g_times_f<P>(z, inv_norms, n, d, a0, c0, sm, acc, dacc);
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int b = b0 + wrow + 8 * h;
            if (b >= n) continue;
            const int a = partner_of(b, n);  // b is a's partner
            add_row_term(z, inv_norms, d, c0, h, a, g_partner[a], dacc);
        }
        store_dacc(dz, n, d, b0, c0, p.grad_scale, true, dacc);
    }
    __syncthreads();
    normalize_backward_rows(z, norms, inv_norms, n, d, b0, T3, dz);
}

}  // namespace v3

// The entry points: the same two kernels in each operand format (arguments as fused v2's).
#define V3_QUERY_ARGS                                                                                     \
    const float *__restrict__ z, const float *__restrict__ norms, const float *__restrict__ inv_norms,    \
        LossParams p, float *__restrict__ inv_denom_out, float *__restrict__ r_out,                       \
        int *__restrict__ dominant_out, float *__restrict__ g_partner_out,                                \
        float *__restrict__ g_dominant_out, float *dz, double *__restrict__ block_loss,                   \
        unsigned int *__restrict__ counter, double *__restrict__ loss_out
#define V3_QUERY_PASS \
    z, norms, inv_norms, p, inv_denom_out, r_out, dominant_out, g_partner_out, g_dominant_out, dz, block_loss, counter, loss_out
#define V3_KEY_ARGS                                                                                       \
    const float *__restrict__ z, const float *__restrict__ norms, const float *__restrict__ inv_norms,    \
        LossParams p, const float *__restrict__ inv_denom, const float *__restrict__ r_row,               \
        const int *__restrict__ dominant, const float *__restrict__ g_partner,                            \
        const float *__restrict__ g_dominant, float *dz
#define V3_KEY_PASS z, norms, inv_norms, p, inv_denom, r_row, dominant, g_partner, g_dominant, dz

extern "C" __global__ void __launch_bounds__(128) instance_loss_query_v3_tf32(V3_QUERY_ARGS) {
    v3::query_rows<v3::Tf32>(V3_QUERY_PASS);
}

extern "C" __global__ void __launch_bounds__(128) instance_loss_query_v3_bf16(V3_QUERY_ARGS) {
    v3::query_rows<v3::Bf16>(V3_QUERY_PASS);
}

extern "C" __global__ void __launch_bounds__(128) instance_loss_key_v3_tf32(V3_KEY_ARGS) {
    v3::key_rows<v3::Tf32>(V3_KEY_PASS);
}

extern "C" __global__ void __launch_bounds__(128) instance_loss_key_v3_bf16(V3_KEY_ARGS) {
    v3::key_rows<v3::Bf16>(V3_KEY_PASS);
}
