//! Row normalization as the backends run it for embeddings ([`NormalizeDevice`]; the loss
//! normalizes inside its own kernels).

use super::{cpu, cuda, Version};
use crate::backend::cuda::{dev, dev_mut};
use crate::backend::{Backend, Cpu, CudaBackend, In, Out};
use crate::error::Result;
use crate::simd::CpuFloat;

/// A backend that L2-normalizes rows.
pub trait NormalizeDevice: Backend {
    /// y = each row of x (`shape` = (N, d)) divided by its L2 norm (as the loss normalizes).
    fn normalize_rows(
        &self,
        x: In<'_, Self>,
        shape: (usize, usize),
        y: Out<'_, Self>,
    ) -> Result<()>;
}

impl<T: CpuFloat> NormalizeDevice for Cpu<T> {
    fn normalize_rows(&self, x: &Vec<T>, (n, d): (usize, usize), y: &mut Vec<T>) -> Result<()> {
        *y = cpu::forward(x, n, d)?.0;
        Ok(())
    }
}

/// CUDA runs the kernel version of its options.
impl NormalizeDevice for CudaBackend {
    fn normalize_rows(
        &self,
        x: In<'_, Self>,
        (n, d): (usize, usize),
        y: Out<'_, Self>,
    ) -> Result<()> {
        self.ensure_len(y, n * d)?;
        let mut norms = self.alloc(n)?;
        let v = self.option::<Version>();
        cuda::forward(
            &**self.gpu(),
            v,
            dev(x),
            dev_mut(y),
            dev_mut(&mut norms),
            (n, d),
        )
    }
}
