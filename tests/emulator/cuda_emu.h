// A CUDA execution emulator for the kernel sources in kernels/, for tests on machines without a
// GPU (tests/emulated_kernels.rs). It runs the unchanged .cu code as C++: every CUDA thread of a
// block is an OS thread, __syncthreads is a barrier across them, warp shuffles and ballots go
// through a per-warp exchange buffer between two warp barriers, and blocks run one after
// another (so __shared__ variables become function statics, and "last block" patterns see
// every earlier block finished).
//
// What it checks: the kernels' arithmetic, indexing, masking of tails, and the use of shared
// memory and barriers as written. What it cannot: timing, memory coalescing, hardware float
// contraction differences, races between blocks, or anything about the real launch path.
#pragma once

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};

namespace emu {

struct Warp {
    explicit Warp(std::ptrdiff_t lanes) : bar(lanes) {}
    std::barrier<> bar;
    alignas(8) unsigned char slots[32][8];
};

struct Block {
    explicit Block(std::ptrdiff_t threads) : bar(threads) {}
    std::barrier<> bar;
    std::vector<std::unique_ptr<Warp>> warps;
};

inline thread_local dim3 thread_idx, block_idx, block_dim, grid_dim;
inline thread_local Block* block;
// One launch at a time in the whole process: __shared__ variables are function statics.
inline std::mutex launch_lock;

inline Warp& my_warp() { return *block->warps[thread_idx.x / 32]; }
inline unsigned lane() { return thread_idx.x % 32; }

template <class T>
T exchange(T v, unsigned src_lane) {
    static_assert(sizeof(T) <= 8, "shuffles of up to 8 bytes");
    Warp& w = my_warp();
    std::memcpy(w.slots[lane()], &v, sizeof(T));
    w.bar.arrive_and_wait();
    T r;
    std::memcpy(&r, w.slots[src_lane % 32], sizeof(T));
    w.bar.arrive_and_wait();
    return r;
}

// Runs kernel<<<(gx, gy), threads>>>(args...) (1-d blocks, as every kernel here uses).
template <class... P, class... A>
void launch(void (*kernel)(P...), unsigned gx, unsigned gy, unsigned threads, A... args) {
    std::lock_guard<std::mutex> serial(launch_lock);
    for (unsigned b = 0; b < gx * gy; ++b) {
        Block blk(threads);
        for (unsigned w0 = 0; w0 < threads; w0 += 32)
            blk.warps.push_back(std::make_unique<Warp>(std::min(32u, threads - w0)));
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (unsigned t = 0; t < threads; ++t) {
            pool.emplace_back([&, t] {
                grid_dim = dim3{gx, gy, 1};
                block_dim = dim3{threads, 1, 1};
                thread_idx = dim3{t, 1, 1};
                block_idx = dim3{b % gx, b / gx, 1};
                block = &blk;
                kernel(static_cast<P>(args)...);
                // An exited thread no longer holds up its warp or block (as on the hardware),
                // and votes 0 in later ballots (every exchange it took part in is complete).
                std::memset(blk.warps[t / 32]->slots[t % 32], 0, 8);
                blk.warps[t / 32]->bar.arrive_and_drop();
                blk.bar.arrive_and_drop();
            });
        }
        for (auto& th : pool) th.join();
    }
}

}  // namespace emu

#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static

inline void __syncthreads() { emu::block->bar.arrive_and_wait(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <class T>
T __shfl_xor_sync(unsigned, T v, int offset) { return emu::exchange(v, emu::lane() ^ (unsigned)offset); }
template <class T>
T __shfl_sync(unsigned, T v, int src) { return emu::exchange(v, (unsigned)src); }
inline unsigned __ballot_sync(unsigned, int pred) {
    emu::Warp& w = emu::my_warp();
    const unsigned char p = pred ? 1 : 0;
    std::memcpy(w.slots[emu::lane()], &p, 1);
    w.bar.arrive_and_wait();
    unsigned bits = 0;
    for (unsigned l = 0; l < 32; ++l)
        if (w.slots[l][0] == 1) bits |= 1u << l;
    w.bar.arrive_and_wait();
    return bits;
}

inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
template <class T>
T atomicAdd(T* addr, T v) { return __atomic_fetch_add(addr, v, __ATOMIC_SEQ_CST); }
