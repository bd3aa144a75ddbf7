// Probes of the warp-level matrix products of mma.cuh, for the test of the fragment layouts
// alone (launcher: src/ops/mma/cuda.rs). Each takes every lane's registers exactly as the test
// placed them by the PTX ISA's tables (src/ops/mma/mod.rs, written from the ISA independently
// of this header and of the emulator) and returns every lane's D registers, so a layout that
// differs from the ISA's, on the hardware or in the emulator, shows as a wrong product.
//
// Shapes: a_regs 32 x 4 words, b_regs 32 x 2 words, c and d 32 x 4 floats, lane-major.
// Launch: one warp (grid 1, block 32).

#include "mma.cuh"

// One lane's share of a probe: its registers in, mma, its D out.
template <void (*Mma)(float*, const unsigned int*, const unsigned int*)>
__device__ __forceinline__ void probe(const unsigned int* a_regs, const unsigned int* b_regs, const float* c, float* d) {
    const int lane = threadIdx.x;
    unsigned int a[4], b[2];
    float acc[4];
    for (int r = 0; r < 4; ++r) a[r] = a_regs[lane * 4 + r];
    for (int r = 0; r < 2; ++r) b[r] = b_regs[lane * 2 + r];
    for (int q = 0; q < 4; ++q) acc[q] = c[lane * 4 + q];
    Mma(acc, a, b);
    for (int q = 0; q < 4; ++q) d[lane * 4 + q] = acc[q];
}

extern "C" __global__ void __launch_bounds__(32)
mma_probe_tf32_m16n8k8_v1(const unsigned int* __restrict__ a_regs, const unsigned int* __restrict__ b_regs,
                          const float* __restrict__ c, float* __restrict__ d) {
    probe<mma_tf32_m16n8k8>(a_regs, b_regs, c, d);
}

extern "C" __global__ void __launch_bounds__(32)
mma_probe_bf16_m16n8k16_v1(const unsigned int* __restrict__ a_regs, const unsigned int* __restrict__ b_regs,
                           const float* __restrict__ c, float* __restrict__ d) {
    probe<mma_bf16_m16n8k16>(a_regs, b_regs, c, d);
}
