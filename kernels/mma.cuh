// Warp-level matrix products on tensor cores (mma.sync), one header for every kernel that uses
// them. On a GPU each function is one PTX instruction; on the virtual GPU and the tests'
// emulator (vgpu/emu.h) the same call goes to vgpu/engine.cpp, which exchanges the warp's
// registers and computes D by the fragment layouts below. kernels/mma.cu probes the layouts
// alone (tests: `mma_fragment_layouts` in tests/emulated/kernels.rs and tests/gpu/loss.rs).
//
// Fragment layouts, PTX ISA 8.7 section 9.7.14.5.8 ("Matrix Fragments for mma.m16n8k8", .tf32)
// and section 9.7.14.5.9 ("Matrix Fragments for mma.m16n8k16 with floating point type", .bf16);
// g = lane / 4 ("groupID"), t = lane % 4 ("threadID_in_group"):
//   C, D (m16 x n8, float):  d[q] = D(g + 8 (q / 2), 2 t + q % 2)
//   A of m16n8k8 (16 x 8):   a[r] = A(g + 8 (r % 2), t + 4 (r / 2))
//   B of m16n8k8 (8 x 8):    b[r] = B(t + 4 r, g)
//   A of m16n8k16 (16 x 16): a[r] = A(g + 8 (r % 2), 2 t + 8 (r / 2) + h), h = 0 in the low half
//   B of m16n8k16 (16 x 8):  b[r] = B(2 t + 8 r + h, g), h = 0 in the low half
// Stored as 32-bit words, both shapes read their A and B registers at the same word positions:
// word t and t + 4 of a k-step, in rows g and g + 8 of A and row (key) g of B^T. The kernels
// rely on that to share their tile code between the two precisions.
//
// Operand rounding is plain bit arithmetic, identical on both sides (no cvt instruction whose
// rounding the emulator would have to copy): tf32 rounds to nearest with ties away from zero
// (as cvt.rna.tf32.f32), bf16 to nearest even (as cvt.rn.bf16.f32 and f32_to_bf16_v1).
#pragma once

// A float rounded to tf32 (10 mantissa bits, nearest, ties away from zero), as the 32-bit
// pattern mma reads; inf and NaN pass unchanged.
__device__ __forceinline__ unsigned int tf32_bits(float x) {
    const unsigned int u = __float_as_uint(x);
    if ((u & 0x7f800000u) == 0x7f800000u) return u;
    return (u + 0x1000u) & 0xffffe000u;
}

// A float rounded to bf16 (nearest even; NaN stays a quiet NaN), in the low 16 bits.
__device__ __forceinline__ unsigned int bf16_bits(float x) {
    const unsigned int u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x0040u;
    return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}

// Two floats as one bf16x2 register: `lo` (the lower k or column index) in the low half.
__device__ __forceinline__ unsigned int bf16x2_bits(float lo, float hi) {
    return bf16_bits(lo) | (bf16_bits(hi) << 16);
}

#ifdef __CUDACC__

// d += A (16 x 8, tf32) B (8 x 8, tf32), float32 accumulation.
__device__ __forceinline__ void mma_tf32_m16n8k8(float d[4], const unsigned int a[4], const unsigned int b[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// d += A (16 x 16, bf16) B (16 x 8, bf16), float32 accumulation.
__device__ __forceinline__ void mma_bf16_m16n8k16(float d[4], const unsigned int a[4], const unsigned int b[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

#else  // the virtual GPU and the emulator (vgpu/emu.h)

__device__ __forceinline__ void mma_tf32_m16n8k8(float d[4], const unsigned int a[4], const unsigned int b[2]) {
    emu::emu_mma_tf32_m16n8k8(d, a, b);
}

__device__ __forceinline__ void mma_bf16_m16n8k16(float d[4], const unsigned int a[4], const unsigned int b[2]) {
    emu::emu_mma_bf16_m16n8k16(d, a, b);
}

#endif
