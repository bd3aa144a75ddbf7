// Fused v2: tiled, recomputed, O(N) extra memory, at most 3 launches, deterministic.
//
// Nothing N x N and not even the normalized F is stored: tiles of F are formed on load as
// z * (1 / max(||z||, eps)). A block owns 64 rows and sweeps all keys in tiles of 64; the
// 64 x 64 similarity tile is computed in shared memory chunks of 32 columns of d, each of the
// 256 threads holding a 4 x 4 micro-tile (rows ty + 16 i, columns tx + 16 j; ty = tid / 16,
// tx = tid % 16). Three sweeps per row block recompute the tiles: (1) D_a and the largest
// negative, (2) the log terms and R_a, (3) the gradient tile G (64 x 64, shared memory) times
// the key rows, accumulated in registers for 128 columns of d at a time (d > 128: sweep 3
// repeats per 128 columns).
//
// Launches (src/loss/cuda/fused_v2.rs):
//   1. instance_loss_norms_v2   norms, 1/max(norms, eps)                 grid ceil(N/8), block 256
//   2. instance_loss_query_v2   row scalars, the loss (last block sums the blocks' partial sums
//                               in block order), dF_query into dz; query-only: then
//                               dz = normalization backward of dF in place   grid ceil(N/64), 256
//   3. instance_loss_key_v2     both-sides only: dz_b += key-side term, then the normalization
//                               backward                                 grid ceil(N/64), 256
// Extra memory: norms, 1/norms, five row scalars and one partial sum per block: O(N).
// Shapes: z, dz N x d float32 row-major; any even N >= 4 and any d >= 1 (tails masked).
// Math and numerics: loss_common.cuh.

#include "loss_common.cuh"
#include "loss_tiles_v2.cuh"

extern "C" __global__ void __launch_bounds__(256)
instance_loss_norms_v2(const float* __restrict__ z, int n, int d, float* __restrict__ norms, float* __restrict__ inv_norms) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * 8 + (threadIdx.x >> 5);
    if (row >= n) return;
    const float* zr = z + (size_t)row * d;
    float s = 0.f;
    for (int k = lane; k < d; k += 32) s = fmaf(zr[k], zr[k], s);
    const float norm = sqrtf(warp_sum(s));
    if (lane == 0) {
        norms[row] = norm;
        inv_norms[row] = 1.f / fmaxf(norm, INVASPREAD_NORM_EPS);
    }
}

// One block per SM is enough registers (168) for the three sweeps without spilling.
extern "C" __global__ void __launch_bounds__(256, 1)
instance_loss_query_v2(const float* __restrict__ z, const float* __restrict__ norms, const float* __restrict__ inv_norms,
                       LossParams p, float* __restrict__ inv_denom_out, float* __restrict__ r_out,
                       int* __restrict__ dominant_out, float* __restrict__ g_partner_out,
                       float* __restrict__ g_dominant_out, float* dz, double* __restrict__ block_loss,
                       unsigned int* __restrict__ counter, double* __restrict__ loss_out) {
    __shared__ V2Smem sm;
    __shared__ QueryRowScalars<T2> scalars;
    __shared__ bool s_last;
    const int tid = threadIdx.x, ty = tid >> 4, tx = tid & 15;
    const int n = p.n, d = p.d, q0 = blockIdx.x * T2;
    float acc[4][4];

    // Sweep 1: the partner's exponent, the largest negative and the sum of the others.
    NegState st[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) st[i] = neg_empty();
    for (int k0 = 0; k0 < n; k0 += T2) {
        similarity_tile(z, inv_norms, n, d, q0, k0, sm, acc);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int r = q0 + ty + 16 * i;
            if (r >= n) continue;
            const int pr = partner_of(r, n);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int c = k0 + tx + 16 * j;
                if (c >= n || c == r) continue;
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
        if (tx == 0 && q0 + row < n) scalars.set_denominator(row, all, p.mu);
    }
    __syncthreads();

    // Sweep 2: log(1 - Q) and Q / (1 - Q) over the other negatives.
    double log_sum[4] = {0.0, 0.0, 0.0, 0.0}, r_sum[4] = {0.0, 0.0, 0.0, 0.0};
    for (int k0 = 0; k0 < n; k0 += T2) {
        similarity_tile(z, inv_norms, n, d, q0, k0, sm, acc);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int row = ty + 16 * i, r = q0 + row;
            if (r >= n) continue;
            const int pr = partner_of(r, n), dom = scalars.dominant[row];
            const float inv_d = scalars.inv_d[row];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int c = k0 + tx + 16 * j;
                if (c >= n || c == r || c == pr || c == dom) continue;
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
        if (r >= n) scalars.loss[row] = 0.0;
        else scalars.finish(row, r, ls, rs, p, inv_denom_out, r_out, dominant_out, g_partner_out, g_dominant_out);
    }
    __syncthreads();
    if (tid == 0) block_loss[blockIdx.x] = scalars.block_sum();

    // Sweep 3: dF_query = (1/(N tau)) G F, 128 columns of d at a time.
    if (p.with_grad) {
        for (int c0 = 0; c0 < d; c0 += DC2) {
            float dacc[4][8];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 8; ++j) dacc[i][j] = 0.f;
            for (int k0 = 0; k0 < n; k0 += T2) {
                similarity_tile(z, inv_norms, n, d, q0, k0, sm, acc);
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int row = ty + 16 * i, r = q0 + row;
                    const int pr = r < n ? partner_of(r, n) : -1;
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        const int col = tx + 16 * j, c = k0 + col;
                        float g = 0.f;
                        if (r < n && c < n && c != r) {
                            if (c == pr) g = scalars.g_partner[row];
                            else if (c == scalars.dominant[row]) g = scalars.g_dominant[row];
                            else g = g_negative(expf((acc[i][j] - 1.f) * p.inv_tau) * scalars.inv_d[row], p, scalars.r[row]);
                        }
                        sm.Gs[row][col] = g;
                    }
                }
                __syncthreads();
                accumulate_g_times_f(z, inv_norms, n, d, k0, c0, sm, dacc);
            }
            store_dacc(dz, n, d, q0, c0, p.grad_scale, false, dacc);
        }
        if (!p.both_sides) {
            __syncthreads();
            normalize_backward_rows(z, norms, inv_norms, n, d, q0, T2, dz);
        }
    }

    sum_block_losses_in_order(block_loss, counter, loss_out, n, s_last);
}

extern "C" __global__ void __launch_bounds__(256)
instance_loss_key_v2(const float* __restrict__ z, const float* __restrict__ norms, const float* __restrict__ inv_norms,
                     LossParams p, const float* __restrict__ inv_denom, const float* __restrict__ r_row,
                     const int* __restrict__ dominant, const float* __restrict__ g_partner,
                     const float* __restrict__ g_dominant, float* dz) {
    __shared__ V2Smem sm;
    const int tid = threadIdx.x, ty = tid >> 4, tx = tid & 15;
    const int n = p.n, d = p.d, b0 = blockIdx.x * T2;
    float acc[4][4];
    for (int c0 = 0; c0 < d; c0 += DC2) {
        float dacc[4][8];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 8; ++j) dacc[i][j] = 0.f;
        for (int a0 = 0; a0 < n; a0 += T2) {
            similarity_tile(z, inv_norms, n, d, b0, a0, sm, acc);  // acc[i][j] = s(b, a)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int row = ty + 16 * i, b = b0 + row;
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const int col = tx + 16 * j, a = a0 + col;
                    float g = 0.f;
                    if (b < n && a < n && a != b) {
                        if (b == partner_of(a, n)) g = g_partner[a];
                        else if (b == dominant[a]) g = g_dominant[a];
                        else g = g_negative(expf((acc[i][j] - 1.f) * p.inv_tau) * inv_denom[a], p, r_row[a]);
                    }
                    sm.Gs[row][col] = g;
                }
            }
            __syncthreads();
            accumulate_g_times_f(z, inv_norms, n, d, a0, c0, sm, dacc);
        }
        store_dacc(dz, n, d, b0, c0, p.grad_scale, true, dacc);
    }
    __syncthreads();
    normalize_backward_rows(z, norms, inv_norms, n, d, b0, T2, dz);
}
