//! Warp-level matrix products on tensor cores (`kernels/mma.cuh`), which the tensor-core loss
//! versions build on. Their fragment layouts (which lane holds which element of A, B and D in
//! which register) are written here a second time, from the PTX ISA (8.7, section 9.7.14.5.8
//! "Matrix Fragments for mma.m16n8k8" for .tf32, section 9.7.14.5.9 "Matrix Fragments for
//! mma.m16n8k16 with floating point type" for .bf16), independently of the header and of the
//! virtual GPU's emulation of it (vgpu/engine.cpp). [`Probe`] places a product's operands in
//! registers by these tables and predicts every lane's D; `kernels/mma.cu` runs the product on
//! the device, so a layout that differs from the ISA's, in the emulator or on the hardware,
//! shows as a wrong D (tests: `mma_fragment_layouts` in tests/emulated/kernels.rs on the
//! emulator, in tests/gpu/loss.rs on a GPU and the virtual GPU).

pub mod cuda;

/// The shapes the kernels use: m16 x n8, float32 accumulators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// `mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32`: one tf32 value per register.
    Tf32M16n8k8,
    /// `mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32`: two bf16 values per register.
    Bf16M16n8k16,
}

/// Rows of A and D.
pub const M: usize = 16;
/// Columns of B and D.
pub const N: usize = 8;
pub const LANES: usize = 32;
/// Registers per lane: A, B, C/D.
pub const A_REGS: usize = 4;
pub const B_REGS: usize = 2;
pub const D_REGS: usize = 4;

impl Shape {
    pub const ALL: [Shape; 2] = [Shape::Tf32M16n8k8, Shape::Bf16M16n8k16];

    /// The inner dimension.
    pub fn k(self) -> usize {
        match self {
            Shape::Tf32M16n8k8 => 8,
            Shape::Bf16M16n8k16 => 16,
        }
    }

    /// Values per 32-bit register of A and B.
    pub fn per_register(self) -> usize {
        match self {
            Shape::Tf32M16n8k8 => 1,
            Shape::Bf16M16n8k16 => 2,
        }
    }

    /// The (row, column) of A that `lane` holds in register `reg`, in half `half` (the low
    /// half is 0; always 0 for tf32).
    pub fn a_element(self, lane: usize, reg: usize, half: usize) -> (usize, usize) {
        let (group, thread) = (lane / 4, lane % 4);
        let row = group + 8 * (reg % 2);
        match self {
            // "row = groupID for a0 and a2, groupID + 8 for a1 and a3; col = threadID_in_group
            // for a0 and a1, threadID_in_group + 4 for a2 and a3".
            Shape::Tf32M16n8k8 => (row, thread + 4 * (reg / 2)),
            // Elements a0..a7, two per register: a(2 reg + half); "col = threadID_in_group * 2
            // + (i & 1) for ai < a4, + 8 for ai >= a4".
            Shape::Bf16M16n8k16 => (row, 2 * thread + half + 8 * (reg / 2)),
        }
    }

    /// The (row, column) = (k, n) of B that `lane` holds in register `reg`, half `half`.
    pub fn b_element(self, lane: usize, reg: usize, half: usize) -> (usize, usize) {
        let (group, thread) = (lane / 4, lane % 4);
        match self {
            // "row = threadID_in_group for b0, threadID_in_group + 4 for b1; col = groupID".
            Shape::Tf32M16n8k8 => (thread + 4 * reg, group),
            // b0..b3, two per register: "row = threadID_in_group * 2 + (i & 1), + 8 for
            // bi >= b2; col = groupID".
            Shape::Bf16M16n8k16 => (2 * thread + half + 8 * reg, group),
        }
    }

    /// Bits of one A or B value as the kernels pass it: `value` must be exact in the format.
    fn bits(self, value: f32) -> u32 {
        match self {
            Shape::Tf32M16n8k8 => value.to_bits(),
            Shape::Bf16M16n8k16 => value.to_bits() >> 16,
        }
    }

    /// Whether `value` is exact in the operand format.
    pub fn exact(self, value: f32) -> bool {
        let low = match self {
            Shape::Tf32M16n8k8 => 0x1fff,
            Shape::Bf16M16n8k16 => 0xffff,
        };
        value.to_bits() & low == 0
    }
}

/// The (row, column) of C and D in `lane`'s register `reg` (both shapes): "row = groupID for
/// c0 and c1, groupID + 8 for c2 and c3; col = threadID_in_group * 2 + (i & 1)".
pub fn d_element(lane: usize, reg: usize) -> (usize, usize) {
    (lane / 4 + 8 * (reg / 2), 2 * (lane % 4) + reg % 2)
}

/// One product D = A B + C of `shape`, its operands in every lane's registers (lane-major:
/// `a_regs[lane * 4 + reg]`, `b_regs[lane * 2 + reg]`, `c[lane * 4 + reg]`) and the D every
/// lane must end with.
#[derive(Debug, Clone)]
pub struct Probe {
    pub shape: Shape,
    pub a_regs: Vec<u32>,
    pub b_regs: Vec<u32>,
    pub c: Vec<f32>,
    pub expected_d: Vec<f32>,
}

impl Probe {
    /// A (16 x k), B (k x 8) and C (16 x 8) row-major; A and B exact in the format, and the
    /// product exact in float32 (small integers over powers of 2), so D has one right answer
    /// whatever the hardware's order of summation.
    pub fn new(shape: Shape, a: &[f32], b: &[f32], c: &[f32]) -> Probe {
        let k = shape.k();
        assert_eq!((a.len(), b.len(), c.len()), (M * k, k * N, M * N));
        let mut a_regs = vec![0u32; LANES * A_REGS];
        let mut b_regs = vec![0u32; LANES * B_REGS];
        let mut creg = vec![0f32; LANES * D_REGS];
        let mut expected_d = vec![0f32; LANES * D_REGS];
        for lane in 0..LANES {
            for half in 0..shape.per_register() {
                for reg in 0..A_REGS {
                    let (row, col) = shape.a_element(lane, reg, half);
                    a_regs[lane * A_REGS + reg] |= shape.bits(a[row * k + col]) << (16 * half);
                }
                for reg in 0..B_REGS {
                    let (row, col) = shape.b_element(lane, reg, half);
                    b_regs[lane * B_REGS + reg] |= shape.bits(b[row * N + col]) << (16 * half);
                }
            }
            for reg in 0..D_REGS {
                let (row, col) = d_element(lane, reg);
                creg[lane * D_REGS + reg] = c[row * N + col];
                let dot: f64 = (0..k)
                    .map(|i| f64::from(a[row * k + i]) * f64::from(b[i * N + col]))
                    .sum();
                expected_d[lane * D_REGS + reg] = (dot + f64::from(c[row * N + col])) as f32;
            }
        }
        Probe {
            shape,
            a_regs,
            b_regs,
            c: creg,
            expected_d,
        }
    }

    /// A probe of distinct-looking random operands: multiples of 1/4 in [-4, 4] (exact in
    /// both formats; every sum of 16 products is exact in float32).
    pub fn random(shape: Shape, seed: u64) -> Probe {
        use rand::Rng;
        let mut r = crate::rng::rng(seed);
        let mut draw = |len: usize| -> Vec<f32> {
            (0..len)
                .map(|_| (r.random_range(0..33u8) as f32 - 16.0) / 4.0)
                .collect()
        };
        let k = shape.k();
        let (a, b, c) = (draw(M * k), draw(k * N), draw(M * N));
        Probe::new(shape, &a, &b, &c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_element_is_held_by_exactly_one_lane_and_register() {
        for shape in Shape::ALL {
            let k = shape.k();
            let mut a_seen = vec![0; M * k];
            let mut b_seen = vec![0; k * N];
            let mut d_seen = vec![0; M * N];
            for lane in 0..LANES {
                for half in 0..shape.per_register() {
                    for reg in 0..A_REGS {
                        let (r, c) = shape.a_element(lane, reg, half);
                        a_seen[r * k + c] += 1;
                    }
                    for reg in 0..B_REGS {
                        let (r, c) = shape.b_element(lane, reg, half);
                        b_seen[r * N + c] += 1;
                    }
                }
                for reg in 0..D_REGS {
                    let (r, c) = d_element(lane, reg);
                    d_seen[r * N + c] += 1;
                }
            }
            assert!(a_seen.iter().all(|&x| x == 1), "{shape:?} A");
            assert!(b_seen.iter().all(|&x| x == 1), "{shape:?} B");
            assert!(d_seen.iter().all(|&x| x == 1), "{shape:?} D");
        }
    }

    #[test]
    fn the_identity_probe_predicts_c_plus_a_column() {
        // A = [I 0] (16 x k), B with B(i, j) = i + j: D(r, c) = B(r, c) + C for r < k.
        for shape in Shape::ALL {
            let k = shape.k();
            let a: Vec<f32> = (0..M * k)
                .map(|i| f32::from(u8::from(i / k == i % k)))
                .collect();
            let b: Vec<f32> = (0..k * N).map(|i| (i / N + i % N) as f32).collect();
            let p = Probe::new(shape, &a, &b, &vec![0.5; M * N]);
            for lane in 0..LANES {
                for reg in 0..D_REGS {
                    let (r, c) = d_element(lane, reg);
                    let want = if r < k { (r + c) as f32 + 0.5 } else { 0.5 };
                    assert_eq!(p.expected_d[lane * D_REGS + reg], want);
                }
            }
            assert!(shape.exact(3.25) && !shape.exact(1.0 + f32::EPSILON));
        }
    }
}
