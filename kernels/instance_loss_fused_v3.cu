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
// With --negatives hard|easy: instance_loss_select_v3_{tf32,bf16} between 1 and 2 (each row's
// kept negatives as a threshold key and a tie cut, O(N)), and 2 and 3 as their `_select`
// variants, which test every negative against it.
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

// f(h, row, r, c, s) for each row r = q0 + row of the warp (row = 16 warp + g + 8 h) inside N and
// each key c of the tile at k0 inside N other than r itself (its partner included), s = f_r . f_c
// from similarity_tile's accumulator.
template <class F>
__device__ __forceinline__ void for_each_pair(int q0, int k0, int n, const float acc[8][4], F&& f) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3, wrow = 16 * (threadIdx.x >> 5) + g;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int row = wrow + 8 * h, r = q0 + row;
        if (r >= n) continue;
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int c = k0 + 8 * j + 2 * t + e;
                if (c < n && c != r) f(h, row, r, c, acc[j][2 * h + e]);
            }
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

// The hard/easy selection without N x N storage: each row's kept negatives as a threshold key
// and a tie cut (negative_kept, loss_common.cuh), found by a radix select over the row's
// similarities recomputed tile by tile with the loss kernels' own products (similarity_tile,
// the same tiles in the same order), so the keys the loss kernels test are the bits chosen
// here. Six sweeps of 6, 6, 6, 6, 6 and 2 bits from the top, a 64-bin histogram per row in
// shared memory (16 KB); then, only if some row of the block keeps part of the ties at its
// threshold, a seventh sweep finds the index of its last kept tie (ties by index, as
// Negatives::dropped). Grid ceil(N/64), 128 threads; writes threshold[r], cut[r] (N if every
// tie is kept).
#define SELECT_BINS 64

template <class P>
__device__ __forceinline__ void select_rows(const float* __restrict__ z, const float* __restrict__ inv_norms,
                                            LossParams p, unsigned int* __restrict__ threshold_out,
                                            int* __restrict__ cut_out) {
    __shared__ Smem sm;
    __shared__ unsigned int hist[T3][SELECT_BINS];
    __shared__ unsigned int s_prefix[T3], s_remaining[T3], s_ties[T3];
    __shared__ int s_partial;
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3, wrow = 16 * (threadIdx.x >> 5) + g;
    const int n = p.n, d = p.d, q0 = blockIdx.x * T3;
    float acc[8][4];
    for (int row = threadIdx.x; row < T3; row += blockDim.x) {
        s_prefix[row] = 0u;
        s_remaining[row] = (unsigned int)p.keep;
    }
    if (threadIdx.x == 0) s_partial = 0;
    for (int pass = 0; pass < 6; ++pass) {
        const int width = pass < 5 ? 6 : 2, shift = pass < 5 ? 26 - 6 * pass : 0;
        // The bits chosen by the earlier passes.
        const unsigned int decided = pass == 0 ? 0u : 0xffffffffu << (shift + width);
        const unsigned int digit_mask = (1u << width) - 1u;
        for (int e = threadIdx.x; e < T3 * SELECT_BINS; e += blockDim.x) hist[e / SELECT_BINS][e % SELECT_BINS] = 0u;
        __syncthreads();
        for (int k0 = 0; k0 < n; k0 += T3) {
            similarity_tile<P>(z, inv_norms, n, d, q0, k0, sm, acc);
            for_each_pair(q0, k0, n, acc, [&](int, int row, int r, int c, float s) {
                if (c == partner_of(r, n)) return;
                const unsigned int k = rank_key(p, s);
                if ((k & decided) == (s_prefix[row] & decided)) atomicAdd(&hist[row][(k >> shift) & digit_mask], 1u);
            });
        }
        __syncthreads();
        for (int row = threadIdx.x; row < T3; row += blockDim.x) {
            // The bin, from the top, where the kept count is reached.
            unsigned int above = 0u;
            int bin = (1 << width) - 1;
            for (; bin > 0; --bin) {
                if (above + hist[row][bin] >= s_remaining[row]) break;
                above += hist[row][bin];
            }
            s_prefix[row] |= (unsigned int)bin << shift;
            s_remaining[row] -= above;
            if (pass == 5) {
                s_ties[row] = hist[row][bin];  // every key equal to the threshold
                if (q0 + row < n && s_remaining[row] < s_ties[row]) s_partial = 1;
            }
        }
        __syncthreads();
    }
    // The ties: the row keeps the first s_remaining of them by index.
    int cut[2] = {n, n};
    if (s_partial) {  // uniform over the block
        unsigned int seen[2] = {0u, 0u};
        for (int k0 = 0; k0 < n; k0 += T3) {
            similarity_tile<P>(z, inv_norms, n, d, q0, k0, sm, acc);
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int row = wrow + 8 * h, r = q0 + row;
                const bool open = r < n && s_remaining[row] < s_ties[row] && cut[h] == n;
                const int pr = r < n ? partner_of(r, n) : -1;
                // Bit 8 j + 2 t + e of the tile's 64 keys: a tie of this row.
                unsigned long long mask = 0ull;
#pragma unroll
                for (int j = 0; j < 8; ++j)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const int c = k0 + 8 * j + 2 * t + e;
                        if (open && c < n && c != r && c != pr && rank_key(p, acc[j][2 * h + e]) == s_prefix[row])
                            mask |= 1ull << (8 * j + 2 * t + e);
                    }
                mask |= __shfl_xor_sync(0xffffffffu, mask, 1);
                mask |= __shfl_xor_sync(0xffffffffu, mask, 2);
                if (!open) continue;
                const unsigned int ties = (unsigned int)__popcll(mask), want = s_remaining[row] - seen[h];
                if (ties >= want) {
                    for (unsigned int i = 1; i < want; ++i) mask &= mask - 1;  // drop the first want - 1
                    cut[h] = k0 + __ffsll((long long)mask) - 1;
                }
                seen[h] += ties;
            }
        }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int row = wrow + 8 * h, r = q0 + row;
        if (t == 0 && r < n) {
            threshold_out[r] = s_prefix[row];
            cut_out[r] = cut[h];
        }
    }
}

// SELECT: the row kernels of a hard/easy selection (the threshold and cut arguments read);
// without it the selection tests compile away (the plain kernels, registers as before).
template <class P, bool SELECT>
__device__ __forceinline__ void query_rows(const float* __restrict__ z, const float* __restrict__ norms,
                                           const float* __restrict__ inv_norms, LossParams p,
                                           float* __restrict__ inv_denom_out, float* __restrict__ r_out,
                                           int* __restrict__ dominant_out, float* __restrict__ g_partner_out,
                                           float* __restrict__ g_dominant_out, float* dz, double* __restrict__ block_loss,
                                           unsigned int* __restrict__ counter, double* __restrict__ loss_out,
                                           const unsigned int* __restrict__ sel_threshold,
                                           const int* __restrict__ sel_cut) {
    __shared__ Smem sm;
    __shared__ QueryRowScalars<T3> scalars;
    __shared__ int s_cut[T3];
    __shared__ unsigned int s_thr[T3];
    __shared__ bool s_last;
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3, wrow = 16 * (threadIdx.x >> 5) + g;
    const int n = p.n, d = p.d, q0 = blockIdx.x * T3;
    float acc[8][4];
    if (SELECT)
        for (int row = threadIdx.x; row < T3; row += blockDim.x) {
            const bool read = q0 + row < n;
            s_thr[row] = read ? sel_threshold[q0 + row] : 0u;
            s_cut[row] = read ? sel_cut[q0 + row] : n;
        }
    // (The first sweep's __syncthreads in similarity_tile orders these before their reads.)

    // Sweep 1: the partner's exponent, the largest negative and the sum of the others (the
    // kept ones under a selection).
    NegState st[2] = {neg_empty(), neg_empty()};
    for (int k0 = 0; k0 < n; k0 += T3) {
        similarity_tile<P>(z, inv_norms, n, d, q0, k0, sm, acc);
        for_each_pair(q0, k0, n, acc, [&](int h, int row, int r, int c, float s) {
            const float x = (s - 1.f) * p.inv_tau;
            if (c == partner_of(r, n)) scalars.xp[row] = x;
            else if (!SELECT || negative_kept(p, s, c, s_thr[row], s_cut[row])) neg_push(st[h], expf(x), c);
        });
    }
    __syncthreads();
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const NegState all = neg_merge_lanes(st[h], 4);
        const int row = wrow + 8 * h;
        if (t == 0 && q0 + row < n) scalars.set_denominator(row, all, p.mu);
    }
    __syncthreads();

    // Sweep 2: log(1 - Q) and Q / (1 - Q) over the other negatives.
    double log_sum[2] = {0.0, 0.0}, r_sum[2] = {0.0, 0.0};
    for (int k0 = 0; k0 < n; k0 += T3) {
        similarity_tile<P>(z, inv_norms, n, d, q0, k0, sm, acc);
        for_each_pair(q0, k0, n, acc, [&](int h, int row, int r, int c, float s) {
            if (c == partner_of(r, n) || c == scalars.dominant[row]) return;
            if (SELECT && !negative_kept(p, s, c, s_thr[row], s_cut[row])) return;
            const float q = expf((s - 1.f) * p.inv_tau) * scalars.inv_d[row], one_minus_q = 1.f - q;
            log_sum[h] += (double)logf(one_minus_q);
            r_sum[h] += (double)(q / one_minus_q);
        });
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const double ls = sum_lanes(log_sum[h], 4), rs = sum_lanes(r_sum[h], 4);
        const int row = wrow + 8 * h, r = q0 + row;
        if (t != 0) continue;
        if (r >= n) scalars.loss[row] = 0.0;
        else scalars.finish(row, r, ls, rs, p, inv_denom_out, r_out, dominant_out, g_partner_out, g_dominant_out);
    }
    __syncthreads();
    if (threadIdx.x == 0) block_loss[blockIdx.x] = scalars.block_sum();

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
                            if (r < n && c < n && c != r && c != pr && c != scalars.dominant[row] &&
                                (!SELECT || negative_kept(p, acc[j][2 * h + e], c, s_thr[row], s_cut[row])))
                                gv = g_negative(expf((acc[j][2 * h + e] - 1.f) * p.inv_tau) * scalars.inv_d[row], p,
                                                scalars.r[row]);
                            acc[j][2 * h + e] = gv;
                        }
                }
                accumulate_g_times_f<P>(z, inv_norms, n, d, k0, c0, sm, acc, dacc);
            }
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int row = wrow + 8 * h, r = q0 + row;
                if (r >= n) continue;
                add_row_term(z, inv_norms, d, c0, h, partner_of(r, n), scalars.g_partner[row], dacc);
                if (scalars.dominant[row] != NEG_NONE)
                    add_row_term(z, inv_norms, d, c0, h, scalars.dominant[row], scalars.g_dominant[row], dacc);
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

template <class P, bool SELECT>
__device__ __forceinline__ void key_rows(const float* __restrict__ z, const float* __restrict__ norms,
                                         const float* __restrict__ inv_norms, LossParams p,
                                         const float* __restrict__ inv_denom, const float* __restrict__ r_row,
                                         const int* __restrict__ dominant, const float* __restrict__ g_partner,
                                         const float* __restrict__ g_dominant, float* dz,
                                         const unsigned int* __restrict__ sel_threshold,
                                         const int* __restrict__ sel_cut) {
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
                        // The partner (one query per key): added exactly below. Under a
                        // selection, s(b, a) is tested against a's threshold: the product of the
                        // swapped operands, the same terms summed in the same k order.
                        if (b < n && a < n && a != b && b != partner_of(a, n)) {
                            if (b == dominant[a]) gv = g_dominant[a];
                            else if (SELECT &&
                                     !negative_kept(p, acc[j][2 * h + e], b, sel_threshold[a], sel_cut[a]))
                                gv = 0.f;
                            else gv = g_negative(expf((acc[j][2 * h + e] - 1.f) * p.inv_tau) * inv_denom[a], p, r_row[a]);
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

// The entry points: the same two kernels in each operand format (arguments as fused v2's), and
// their selecting variants (_select: fused v2's arguments, then the selection's threshold and
// cut; the query variant's register budget set by 2 blocks an SM, as the selection's extra
// tests would otherwise spill under ptxas's default for TF32).
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
#define V3_SELECTION_ARGS const unsigned int *__restrict__ sel_threshold, const int *__restrict__ sel_cut

extern "C" __global__ void __launch_bounds__(128) instance_loss_query_v3_tf32(V3_QUERY_ARGS) {
    v3::query_rows<v3::Tf32, false>(V3_QUERY_PASS, nullptr, nullptr);
}

extern "C" __global__ void __launch_bounds__(128) instance_loss_query_v3_bf16(V3_QUERY_ARGS) {
    v3::query_rows<v3::Bf16, false>(V3_QUERY_PASS, nullptr, nullptr);
}

extern "C" __global__ void __launch_bounds__(128) instance_loss_key_v3_tf32(V3_KEY_ARGS) {
    v3::key_rows<v3::Tf32, false>(V3_KEY_PASS, nullptr, nullptr);
}

extern "C" __global__ void __launch_bounds__(128) instance_loss_key_v3_bf16(V3_KEY_ARGS) {
    v3::key_rows<v3::Bf16, false>(V3_KEY_PASS, nullptr, nullptr);
}

extern "C" __global__ void __launch_bounds__(128, 2)
instance_loss_query_v3_tf32_select(V3_QUERY_ARGS, V3_SELECTION_ARGS) {
    v3::query_rows<v3::Tf32, true>(V3_QUERY_PASS, sel_threshold, sel_cut);
}

extern "C" __global__ void __launch_bounds__(128, 2)
instance_loss_query_v3_bf16_select(V3_QUERY_ARGS, V3_SELECTION_ARGS) {
    v3::query_rows<v3::Bf16, true>(V3_QUERY_PASS, sel_threshold, sel_cut);
}

extern "C" __global__ void __launch_bounds__(128)
instance_loss_key_v3_tf32_select(V3_KEY_ARGS, V3_SELECTION_ARGS) {
    v3::key_rows<v3::Tf32, true>(V3_KEY_PASS, sel_threshold, sel_cut);
}

extern "C" __global__ void __launch_bounds__(128)
instance_loss_key_v3_bf16_select(V3_KEY_ARGS, V3_SELECTION_ARGS) {
    v3::key_rows<v3::Bf16, true>(V3_KEY_PASS, sel_threshold, sel_cut);
}

extern "C" __global__ void __launch_bounds__(128)
instance_loss_select_v3_tf32(const float* __restrict__ z, const float* __restrict__ inv_norms, LossParams p,
                             unsigned int* __restrict__ threshold, int* __restrict__ cut) {
    v3::select_rows<v3::Tf32>(z, inv_norms, p, threshold, cut);
}

extern "C" __global__ void __launch_bounds__(128)
instance_loss_select_v3_bf16(const float* __restrict__ z, const float* __restrict__ inv_norms, LossParams p,
                             unsigned int* __restrict__ threshold, int* __restrict__ cut) {
    v3::select_rows<v3::Bf16>(z, inv_norms, p, threshold, cut);
}
