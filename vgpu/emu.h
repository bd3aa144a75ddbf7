// The CUDA language on a CPU, for the unchanged sources of kernels/: the virtual GPU
// (vgpu/driver.cpp) and the tests' kernel emulator both run kernels compiled against this header.
//
// Every CUDA thread of a block is a fiber (engine.cpp): they share one OS thread and switch at
// __syncthreads and at warp exchanges (shuffles, ballots), so a 256-thread block costs 256 fiber
// starts rather than 256 OS threads. Blocks of a grid run concurrently on separate OS threads,
// one per loaded copy of the kernel library (a copy has its own `__shared__` statics).
//
// `__shared__` variables are function statics placed in the section `emu_shared`, so the
// engine knows where shared memory is: kernels.cpp is compiled with -fsanitize=thread's
// instrumentation, and engine.cpp implements the instrumentation's callbacks itself (no TSan
// runtime): accesses to `emu_shared` go through the racecheck, accesses to device memory through
// the memcheck.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};

namespace emu {

// Bytes of a lane's warp exchange slot: a shuffle's value, or an mma's operand registers.
constexpr unsigned kSlotBytes = 32;

// The CUDA thread running now (a fiber of the engine).
struct ThreadState {
    dim3 thread_idx, block_idx, block_dim, grid_dim;
    unsigned flat;  // thread index within the block
};

extern "C" ThreadState* emu_thread();
// Block-wide barrier; warp-wide barrier (for exchanges); the calling lane's warp exchange slots.
extern "C" void emu_sync_block();
extern "C" void emu_sync_warp();
extern "C" unsigned char (*emu_warp_slots())[kSlotBytes];
// Warp-level matrix products, d += a b, by the PTX ISA's fragment layouts (engine.cpp;
// kernels/mma.cuh's emulated side).
extern "C" void emu_mma_tf32_m16n8k8(float d[4], const unsigned a[4], const unsigned b[2]);
extern "C" void emu_mma_bf16_m16n8k16(float d[4], const unsigned a[4], const unsigned b[2]);

inline unsigned lane() { return emu_thread()->thread_idx.x % 32; }

template <class T>
T exchange(T v, unsigned src_lane) {
    static_assert(sizeof(T) <= 8, "shuffles of up to 8 bytes");
    unsigned char(*slots)[kSlotBytes] = emu_warp_slots();
    std::memcpy(slots[lane()], &v, sizeof(T));
    emu_sync_warp();
    T r;
    std::memcpy(&r, slots[src_lane % 32], sizeof(T));
    emu_sync_warp();
    return r;
}

}  // namespace emu

#define threadIdx (emu::emu_thread()->thread_idx)
#define blockIdx (emu::emu_thread()->block_idx)
#define blockDim (emu::emu_thread()->block_dim)
#define gridDim (emu::emu_thread()->grid_dim)

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static __attribute__((section("emu_shared")))

inline void __syncthreads() { emu::emu_sync_block(); }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

template <class T>
T __shfl_xor_sync(unsigned, T v, int offset) { return emu::exchange(v, emu::lane() ^ (unsigned)offset); }
template <class T>
T __shfl_sync(unsigned, T v, int src) { return emu::exchange(v, (unsigned)src); }
inline unsigned __ballot_sync(unsigned, int pred) {
    unsigned char(*slots)[emu::kSlotBytes] = emu::emu_warp_slots();
    slots[emu::lane()][0] = pred ? 1 : 0;
    emu::emu_sync_warp();
    unsigned bits = 0;
    for (unsigned l = 0; l < 32; ++l)
        if (slots[l][0] == 1) bits |= 1u << l;
    emu::emu_sync_warp();
    return bits;
}

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __ffsll(long long v) { return __builtin_ffsll(v); }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
template <class T>
T atomicAdd(T* addr, T v) { return __atomic_fetch_add(addr, v, __ATOMIC_SEQ_CST); }
