//! SGD over every parameter as the backends run it ([`SgdDevice`]): a loop of `cpu::update` on
//! the CPU, one multi-tensor launch on CUDA (its pointer table kept while no buffer moves).

use cudarc::driver::CudaSlice;

use super::{cpu, cuda, SgdStep, SgdTensor, Tensors, Version};
use crate::backend::{Backend, Cpu, CudaBackend};
use crate::cuda::DevPtr;
use crate::error::{Error, Result};
use crate::simd::CpuFloat;
use crate::tape::ParamStore;

/// A backend that runs PyTorch's SGD update (`ops::sgd`).
pub trait SgdDevice: Backend {
    /// SGD on every parameter.
    fn sgd_update_all(
        &self,
        params: &mut [Tensors<'_, Self::Buffer>],
        step: &SgdStep,
    ) -> Result<()>;
}

impl<T: CpuFloat> SgdDevice for Cpu<T> {
    fn sgd_update_all(&self, params: &mut [Tensors<'_, Vec<T>>], step: &SgdStep) -> Result<()> {
        for p in params {
            cpu::update(p.w, p.g, p.v, step);
        }
        Ok(())
    }
}

/// The SGD table as last uploaded, and the blocks it spans.
struct SgdTable {
    host: Vec<SgdTensor>,
    device: CudaSlice<SgdTensor>,
    blocks: usize,
}

/// CUDA runs the kernel version of its options.
impl SgdDevice for CudaBackend {
    fn sgd_update_all(
        &self,
        params: &mut [Tensors<'_, CudaSlice<f32>>],
        step: &SgdStep,
    ) -> Result<()> {
        let refs: Vec<cuda::TensorRef<'_>> = params
            .iter()
            .map(|p| cuda::TensorRef {
                w: DevPtr::of(p.w),
                g: DevPtr::of(p.g),
                v: DevPtr::of(p.v),
            })
            .collect();
        let (host, blocks) = cuda::table(&refs)?;
        drop(refs);
        let init = || -> Result<Option<SgdTable>> { Ok(None) };
        self.slots().with(init, |cached: &mut Option<SgdTable>| {
            // The table is uploaded once and again only when a buffer moved (a reallocation).
            if cached.as_ref().is_none_or(|t| t.host != host) {
                let device = self.gpu().stream().clone_htod(&host)?;
                *cached = Some(SgdTable {
                    host,
                    device,
                    blocks,
                });
            }
            let t = cached
                .as_ref()
                .ok_or_else(|| Error::Cuda("SGD table missing".into()))?;
            // SAFETY: the table was built from `params`, whose buffers this call borrows
            // exclusively while the update is queued on the one stream that uses them.
            unsafe {
                cuda::update_all(
                    &**self.gpu(),
                    self.option::<Version>(),
                    DevPtr::of(&t.device),
                    t.blocks,
                    step,
                )
            }
        })
    }
}

/// Every parameter's buffers as the SGD update takes them.
pub fn tensors<B: Backend>(store: &mut ParamStore<B>) -> Vec<Tensors<'_, B::Buffer>> {
    store
        .params
        .iter_mut()
        .map(|p| Tensors {
            w: &mut p.value,
            g: &p.grad,
            v: &mut p.momentum,
        })
        .collect()
}
