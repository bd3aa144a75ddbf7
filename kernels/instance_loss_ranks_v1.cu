// Ranks v1: the loss rows of one data-parallel rank's own queries against every key of the
// gathered global batch, on fused v2's tiles (loss_tiles_v2.cuh), O(N) extra memory. Each rank
// does 1/R of the loss's work instead of all of it (`dist::data_parallel`, issue 14).
//
// Layout. The gathered batch Zg (N x d, M = N / 2 images) is one device's layout of the global
// batch: view A of every rank's images in rank order, then view B. Rank r holds its own rows
// Zr (2m x d): view A of its m images, then view B. Own (local) row i is global row
//   own(i) = i < m ? first_a + i : first_b + i - m      (first_a = r m, first_b = M + r m),
// whose partner is partner_of(own(i), N), as on one device. Math: loss_common.cuh, with every
// sum over keys running over all N gathered rows.
//
// Launches (src/loss/cuda/ranks_v1.rs):
//   1. instance_loss_norms_v2 on Zr (2m rows) and on Zg (N rows)         grid ceil(rows/8), 256
//   2. instance_loss_query_ranks_v1   own rows: the row scalars, the rank's share of the loss
//      (sum of its rows' terms / N; the last block sums the block sums in order), dF_query into
//      dz (2m x d); query-only: then the normalization backward in place  grid ceil(2m/64), 256
//   3. both-sides: instance_loss_key_ranks_v1   every key b of Zg: the key-side term of the
//      rank's own queries, grad_scale sum_{a own} g_ab f_a, into row rank_major(b) of kside
//      (N x d; rank_major(b) = rank(b) 2m + view(b) m + image(b)), so that a reduce-scatter
//      hands every rank the sum over ranks of its own rows               grid ceil(N/64), 256
//   4. both-sides, after the reduce-scatter: instance_loss_finish_ranks_v1   dz += the summed
//      key side of the own rows, then the normalization backward          grid ceil(2m/8), 256
//   5. instance_loss_sum_ranks_v1   after the ranks' shares are all-gathered: the loss = their
//      sum in rank order                                                  1 thread
// Shapes: Zr, dz 2m x d; Zg, kside N x d; float32 row-major; m >= 1, N = 2 R m >= 4, d >= 1.
// No floating-point atomics: every rank's results are deterministic.
// The query kernel is v2's three sweeps with the own-row mapping, written out again rather than
// made a shared template: v2's kernels stay as they were measured (versions are not rewritten);
// the tiles both use are loss_tiles_v2.cuh.

#include "loss_common.cuh"
#include "loss_tiles_v2.cuh"

// A rank's own rows in the gathered batch.
struct OwnRows {
    int m;        // images on the rank: 2m own rows
    int first_a;  // global row of its first view-A row (r m)
    int first_b;  // global row of its first view-B row (M + r m)
};

__device__ __forceinline__ int own_row(const OwnRows& o, int i) {
    return i < o.m ? o.first_a + i : o.first_b + i - o.m;
}

// 168-register budget as v2's query kernel: one block per SM.
extern "C" __global__ void __launch_bounds__(256, 1)
instance_loss_query_ranks_v1(const float* __restrict__ zq, const float* __restrict__ q_norms,
                             const float* __restrict__ q_inv, const float* __restrict__ zk,
                             const float* __restrict__ k_inv, OwnRows own, LossParams p,
                             float* __restrict__ inv_denom_out, float* __restrict__ r_out,
                             int* __restrict__ dominant_out, float* __restrict__ g_partner_out,
                             float* __restrict__ g_dominant_out, float* dz, double* __restrict__ block_loss,
                             unsigned int* __restrict__ counter, double* __restrict__ loss_out) {
    __shared__ V2Smem sm;
    __shared__ QueryRowScalars<T2> scalars;
    __shared__ bool s_last;
    const int tid = threadIdx.x, ty = tid >> 4, tx = tid & 15;
    const int n = p.n, d = p.d, nq = 2 * own.m, q0 = blockIdx.x * T2;
    float acc[4][4];

    // Sweep 1: the partner's exponent, the largest negative and the sum of the others.
    NegState st[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) st[i] = neg_empty();
    for (int k0 = 0; k0 < n; k0 += T2) {
        similarity_tile_of(zq, q_inv, nq, zk, k_inv, n, d, q0, k0, sm, acc);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int r = q0 + ty + 16 * i;
            if (r >= nq) continue;
            const int g = own_row(own, r), pr = partner_of(g, n);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int c = k0 + tx + 16 * j;
                if (c >= n || c == g) continue;
                const float x = (acc[i][j] - 1.f) * p.inv_tau;
                if (c == pr) scalars.xp[ty + 16 * i] = x;
                else neg_push(st[i], expf(x), c);
            }
        }
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const NegState all = neg_merge_lanes(st[i], 16);
        const int row = ty + 16 * i;
        if (tx == 0 && q0 + row < nq) scalars.set_denominator(row, all, p.mu);
    }
    __syncthreads();

    // Sweep 2: log(1 - Q) and Q / (1 - Q) over the other negatives.
    double log_sum[4] = {0.0, 0.0, 0.0, 0.0}, r_sum[4] = {0.0, 0.0, 0.0, 0.0};
    for (int k0 = 0; k0 < n; k0 += T2) {
        similarity_tile_of(zq, q_inv, nq, zk, k_inv, n, d, q0, k0, sm, acc);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int row = ty + 16 * i, r = q0 + row;
            if (r >= nq) continue;
            const int g = own_row(own, r), pr = partner_of(g, n), dom = scalars.dominant[row];
            const float inv_d = scalars.inv_d[row];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int c = k0 + tx + 16 * j;
                if (c >= n || c == g || c == pr || c == dom) continue;
                const float q = expf((acc[i][j] - 1.f) * p.inv_tau) * inv_d, one_minus_q = 1.f - q;
                log_sum[i] += (double)logf(one_minus_q);
                r_sum[i] += (double)(q / one_minus_q);
            }
        }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const double ls = sum_lanes(log_sum[i], 16), rs = sum_lanes(r_sum[i], 16);
        const int row = ty + 16 * i, r = q0 + row;
        if (tx != 0) continue;
        if (r >= nq) scalars.loss[row] = 0.0;
        else scalars.finish(row, r, ls, rs, p, inv_denom_out, r_out, dominant_out, g_partner_out, g_dominant_out);
    }
    __syncthreads();
    if (tid == 0) block_loss[blockIdx.x] = scalars.block_sum();

    // Sweep 3: dF_query = (1/(N tau)) G F over every gathered key, 128 columns of d at a time.
    if (p.with_grad) {
        for (int c0 = 0; c0 < d; c0 += DC2) {
            float dacc[4][8];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 8; ++j) dacc[i][j] = 0.f;
            for (int k0 = 0; k0 < n; k0 += T2) {
                similarity_tile_of(zq, q_inv, nq, zk, k_inv, n, d, q0, k0, sm, acc);
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int row = ty + 16 * i, r = q0 + row;
                    const int g = r < nq ? own_row(own, r) : -1;
                    const int pr = r < nq ? partner_of(g, n) : -1;
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        const int col = tx + 16 * j, c = k0 + col;
                        float gv = 0.f;
                        if (r < nq && c < n && c != g) {
                            if (c == pr) gv = scalars.g_partner[row];
                            else if (c == scalars.dominant[row]) gv = scalars.g_dominant[row];
                            else gv = g_negative(expf((acc[i][j] - 1.f) * p.inv_tau) * scalars.inv_d[row], p, scalars.r[row]);
                        }
                        sm.Gs[row][col] = gv;
                    }
                }
                __syncthreads();
                accumulate_g_times_f(zk, k_inv, n, d, k0, c0, sm, dacc);
            }
            store_dacc(dz, nq, d, q0, c0, p.grad_scale, false, dacc);
        }
        if (!p.both_sides) {
            __syncthreads();
            normalize_backward_rows(zq, q_norms, q_inv, nq, d, q0, T2, dz);
        }
    }

    sum_block_losses_in_order(block_loss, counter, loss_out, n, s_last);
}

// The row of gathered row b in the rank-major order of the reduce-scatter: rank, view, image.
__device__ __forceinline__ int rank_major_row(int b, int n, int m) {
    const int half = n >> 1, view = b >= half, j = view ? b - half : b;
    return (j / m) * 2 * m + view * m + j % m;
}

extern "C" __global__ void __launch_bounds__(256)
instance_loss_key_ranks_v1(const float* __restrict__ zk, const float* __restrict__ k_inv,
                           const float* __restrict__ zq, const float* __restrict__ q_inv, OwnRows own,
                           LossParams p, const float* __restrict__ inv_denom, const float* __restrict__ r_row,
                           const int* __restrict__ dominant, const float* __restrict__ g_partner,
                           const float* __restrict__ g_dominant, float* __restrict__ kside) {
    __shared__ V2Smem sm;
    const int tid = threadIdx.x, ty = tid >> 4, tx = tid & 15;
    const int n = p.n, d = p.d, nq = 2 * own.m, b0 = blockIdx.x * T2;
    float acc[4][4];
    for (int c0 = 0; c0 < d; c0 += DC2) {
        float dacc[4][8];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 8; ++j) dacc[i][j] = 0.f;
        for (int a0 = 0; a0 < nq; a0 += T2) {
            similarity_tile_of(zk, k_inv, n, zq, q_inv, nq, d, b0, a0, sm, acc);  // acc[i][j] = s(b, a)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int row = ty + 16 * i, b = b0 + row;
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const int col = tx + 16 * j, a = a0 + col;
                    float gv = 0.f;
                    if (b < n && a < nq) {
                        const int ga = own_row(own, a);
                        if (b == ga) gv = 0.f;
                        else if (b == partner_of(ga, n)) gv = g_partner[a];
                        else if (b == dominant[a]) gv = g_dominant[a];
                        else gv = g_negative(expf((acc[i][j] - 1.f) * p.inv_tau) * inv_denom[a], p, r_row[a]);
                    }
                    sm.Gs[row][col] = gv;
                }
            }
            __syncthreads();
            accumulate_g_times_f(zq, q_inv, nq, d, a0, c0, sm, dacc);
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int b = b0 + ty + 16 * i;
            if (b >= n) continue;
            float* out = kside + (size_t)rank_major_row(b, n, own.m) * d;
#pragma unroll
            for (int sc = 0; sc < DC2 / DK2; ++sc)
#pragma unroll
                for (int jj = 0; jj < 2; ++jj) {
                    const int col = c0 + sc * DK2 + tx + 16 * jj;
                    if (col < d) out[col] = p.grad_scale * dacc[i][2 * sc + jj];
                }
        }
    }
}

// dz_a += key_a (the key side summed over ranks), then the normalization backward: 8 own rows
// a block, one warp per row.
extern "C" __global__ void __launch_bounds__(256)
instance_loss_finish_ranks_v1(const float* __restrict__ zq, const float* __restrict__ q_norms,
                              const float* __restrict__ q_inv, int nq, int d, const float* __restrict__ key,
                              float* dz) {
    const int r0 = blockIdx.x * 8, row = r0 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row < nq)
        for (int k = lane; k < d; k += 32) dz[(size_t)row * d + k] += key[(size_t)row * d + k];
    __syncthreads();  // every thread reaches it: no return above
    normalize_backward_rows(zq, q_norms, q_inv, nq, d, r0, 8, dz);
}

// The loss: the ranks' shares summed in rank order (every rank the same bits).
extern "C" __global__ void instance_loss_sum_ranks_v1(const double* __restrict__ shares, int ranks,
                                                      double* __restrict__ loss_out) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    double s = 0.0;
    for (int r = 0; r < ranks; ++r) s += shares[r];
    loss_out[0] = s;
}
