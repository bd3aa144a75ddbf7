//! The kNN search as the backends run it ([`NearestDevice`]): on the CPU `cpu::nearest`, on
//! CUDA a similarity GEMM and `topk_rows_v1` over blocks of queries, its scratch kept.

use cudarc::driver::CudaSlice;

use super::{cpu, cuda, Neighbours, Version};
use crate::backend::cuda::dev;
use crate::backend::{Backend, Cpu, CudaBackend, In};
use crate::cuda::DevPtrMut;
use crate::error::Result;
use crate::simd::CpuFloat;

/// A backend that finds nearest neighbours.
pub trait NearestDevice: Backend {
    /// For each row of `queries` (L2-normalized, d wide), its `k` most similar rows of `keys`
    /// as (similarity, index), best first (ties: lower index first).
    fn nearest(
        &self,
        queries: In<'_, Self>,
        keys: In<'_, Self>,
        d: usize,
        k: usize,
    ) -> Result<Neighbours>;
}

impl<T: CpuFloat> NearestDevice for Cpu<T> {
    fn nearest(&self, queries: &Vec<T>, keys: &Vec<T>, d: usize, k: usize) -> Result<Neighbours> {
        let (q, b) = (self.download(queries)?, self.download(keys)?);
        cpu::nearest(&q, &b, d, k, false)
    }
}

/// The kNN search's scratch, grown on demand and kept.
struct KnnScratch {
    sims: CudaSlice<f32>,
    values: CudaSlice<f32>,
    indices: CudaSlice<i32>,
}

/// CUDA runs the kernel version of its options.
impl NearestDevice for CudaBackend {
    fn nearest(
        &self,
        queries: In<'_, Self>,
        keys: In<'_, Self>,
        d: usize,
        k: usize,
    ) -> Result<Neighbours> {
        let (nq, nk) = (queries.len() / d.max(1), keys.len() / d.max(1));
        let k = k.min(nk);
        let rows = cuda::block_rows(nq, nk, cuda::MAX_BLOCK);
        let stream = self.gpu().stream();
        let init = || -> Result<Option<KnnScratch>> { Ok(None) };
        self.slots().with(init, |scratch: &mut Option<KnnScratch>| {
            let fits = |s: &KnnScratch| s.sims.len() >= rows * nk && s.values.len() >= rows * k;
            if k > 0 && scratch.as_ref().is_none_or(|s| !fits(s)) {
                *scratch = Some(KnnScratch {
                    sims: stream.alloc_zeros::<f32>(rows * nk)?,
                    values: stream.alloc_zeros::<f32>(rows * k)?,
                    indices: stream.alloc_zeros::<i32>(rows * k)?,
                });
            }
            let Some(s) = scratch.as_mut() else {
                return Ok(vec![Vec::new(); nq]);
            };
            let mut s = cuda::Scratch {
                sims: DevPtrMut::of(&mut s.sims),
                values: DevPtrMut::of(&mut s.values),
                indices: DevPtrMut::of(&mut s.indices),
            };
            let v = self.option::<Version>();
            cuda::nearest(&**self.gpu(), v, dev(queries), dev(keys), d, k, &mut s)
        })
    }
}
