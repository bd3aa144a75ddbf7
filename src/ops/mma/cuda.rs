//! The probes of `kernels/mma.cu` on a [`Queue`]: one warp runs one product of [`Shape`]
//! from registers placed by [`Probe`](super::Probe).

use super::{Shape, A_REGS, B_REGS, D_REGS, LANES};
use crate::cuda::{check_len, DevPtr, DevPtrMut, Geometry, Kernel, KernelArgs, Queue};
use crate::error::Result;

const PROBE_TF32: Kernel = Kernel::new("mma", "mma_probe_tf32_m16n8k8_v1");
const PROBE_BF16: Kernel = Kernel::new("mma", "mma_probe_bf16_m16n8k16_v1");

/// d = (A B + C) of `shape`, every buffer lane-major as [`Probe`](super::Probe) lays it out.
pub fn probe(
    q: &impl Queue,
    shape: Shape,
    a_regs: DevPtr<'_, u32>,
    b_regs: DevPtr<'_, u32>,
    c: DevPtr<'_, f32>,
    mut d: DevPtrMut<'_, f32>,
) -> Result<()> {
    check_len("mma probe: A registers", a_regs.len(), LANES * A_REGS)?;
    check_len("mma probe: B registers", b_regs.len(), LANES * B_REGS)?;
    check_len("mma probe: C", c.len(), LANES * D_REGS)?;
    check_len("mma probe: D", d.len(), LANES * D_REGS)?;
    let kernel = match shape {
        Shape::Tf32M16n8k8 => PROBE_TF32,
        Shape::Bf16M16n8k16 => PROBE_BF16,
    };
    let mut args = KernelArgs::new();
    args.input(a_regs).input(b_regs).input(c).output(&mut d);
    // SAFETY: mma_probe_*_v1(const unsigned* a_regs, const unsigned* b_regs, const float* c,
    // float* d): 32 x 4, 32 x 2, 32 x 4 and 32 x 4 elements, checked above; one warp.
    unsafe { q.launch(kernel, Geometry::blocks(1, LANES as u32), &mut args) }
}
