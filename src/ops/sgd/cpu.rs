//! The SGD update of one tensor on the CPU, in the element type.

use super::SgdStep;
use crate::simd::CpuFloat;

/// Updates `w` and its momentum `v` from the gradient `g`.
pub fn update<T: CpuFloat>(w: &mut [T], g: &[T], v: &mut [T], step: &SgdStep) {
    let (lr, m, wd) = (
        T::of(step.lr),
        T::of(step.momentum),
        T::of(step.weight_decay),
    );
    for ((wi, &gi), vi) in w.iter_mut().zip(g).zip(v.iter_mut()) {
        let grad = gi + wd * *wi;
        *vi = if step.first { grad } else { m * *vi + grad };
        let update = if step.nesterov { grad + m * *vi } else { *vi };
        *wi = *wi - lr * update;
    }
}
