//! `row_mean_v1` on a [`Queue`] (`kernels/reduce.cu`): one block, a fixed-order tree.

use crate::cuda::{
    check_len, to_i32, DevPtr, DevPtrMut, Geometry, Kernel, KernelArgs, Queue, BLOCK,
};
use crate::error::Result;

const ROW_MEAN_V1: Kernel = Kernel::new("reduce", "row_mean_v1");

/// `out[0]` = the mean of x.
pub fn mean(q: &impl Queue, x: DevPtr<'_, f64>, mut out: DevPtrMut<'_, f64>) -> Result<()> {
    check_len("mean out", out.len(), 1)?;
    let mut args = KernelArgs::new();
    args.input(x).value(to_i32("N", x.len())?).output(&mut out);
    // SAFETY: row_mean_v1(const double* x, int n, double* out); x holds n doubles.
    unsafe { q.launch(ROW_MEAN_V1, Geometry::blocks(1, BLOCK), &mut args) }
}
