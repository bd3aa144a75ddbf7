//! The instance loss on the tape and on both backends: `Graph::instance_loss` (a scalar node
//! whose dL/dz the fused loss forms in the forward pass), how each backend runs it
//! ([`LossDevice`], with the version of its options), and the hook through which a
//! data-parallel group computes it over its gathered batch ([`LossGroup`]).

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::CudaSlice;

use super::cuda::{validate_for_kernels, CudaLoss};
use super::{cpu, reference, CpuLossVersion, CudaLossVersion, LossConfig};
use crate::backend::cuda::dev_mut;
use crate::backend::{Backend, Cpu, CudaBackend, In, Out};
use crate::cuda::DevPtr;
use crate::error::Result;
use crate::ops::elementwise::node::ScalarOf;
use crate::ops::elementwise::{self, ElementwiseDevice};
use crate::simd::CpuFloat;
use crate::tape::{sized, Graph, Shape4, Var};

/// A backend that computes the instance loss.
pub trait LossDevice: Backend {
    /// The instance loss (with its normalization) of z (`shape` = (N, d)): writes L into
    /// `loss` (one element) and dL/dz into `dz`, without waiting for the device.
    fn instance_loss(
        &self,
        z: In<'_, Self>,
        shape: (usize, usize),
        cfg: &LossConfig,
        loss: Out<'_, Self>,
        dz: Out<'_, Self>,
    ) -> Result<()>;
}

/// The CPU runs the version of its options ([`CpuLossVersion`], `fused` by default).
impl<T: CpuFloat> LossDevice for Cpu<T> {
    fn instance_loss(
        &self,
        z: &Vec<T>,
        (n, d): (usize, usize),
        cfg: &LossConfig,
        loss: &mut Vec<T>,
        dz: &mut Vec<T>,
    ) -> Result<()> {
        let value = match self.option::<CpuLossVersion>() {
            CpuLossVersion::Reference => {
                let out = reference::instance_loss(z, n, d, cfg, true)?;
                if let Some(g) = out.grad_z {
                    *dz = g.into_iter().map(T::of).collect();
                }
                out.loss
            }
            CpuLossVersion::Fused => {
                let out = cpu::instance_loss(z, n, d, cfg, true)?;
                if let Some(g) = out.grad_z {
                    *dz = g;
                }
                out.loss
            }
            CpuLossVersion::FusedF64 => {
                let z64: Vec<f64> = z.iter().map(|&x| x.into()).collect();
                let out = cpu::instance_loss(&z64, n, d, cfg, true)?;
                if let Some(g) = out.grad_z {
                    *dz = g.into_iter().map(T::of).collect();
                }
                out.loss
            }
        };
        *loss = vec![T::of(value)];
        Ok(())
    }
}

/// Each loss shape's scratch allocation on CUDA, kept between steps.
type LossCache = HashMap<(usize, usize), CudaLoss>;

/// CUDA runs the kernel version of its options ([`CudaLossVersion`], `fused-v2` by default).
impl LossDevice for CudaBackend {
    fn instance_loss(
        &self,
        z: &CudaSlice<f32>,
        (n, d): (usize, usize),
        cfg: &LossConfig,
        loss: &mut CudaSlice<f32>,
        dz: &mut CudaSlice<f32>,
    ) -> Result<()> {
        cuda_outputs(self, cfg, (n, d), loss, dz)?;
        let version = self.option::<CudaLossVersion>();
        let init = || -> Result<LossCache> { Ok(HashMap::new()) };
        self.slots().with(init, |losses: &mut LossCache| {
            let l = match losses.entry((n, d)) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(CudaLoss::new(self.gpu().clone(), version, n, d)?)
                }
            };
            l.enqueue(z, Some(dz), cfg)?;
            elementwise::cuda::f64_to_f32(&**self.gpu(), DevPtr::of(l.loss_buffer()), dev_mut(loss))
        })
    }
}

/// What every CUDA computation of the loss checks and sizes first: the kernels' rules on
/// `cfg`, and the loss (one float) and dL/dz (N x d) outputs.
pub fn cuda_outputs(
    backend: &CudaBackend,
    cfg: &LossConfig,
    (n, d): (usize, usize),
    loss: &mut CudaSlice<f32>,
    dz: &mut CudaSlice<f32>,
) -> Result<()> {
    validate_for_kernels(cfg)?;
    backend.ensure_len(loss, 1)?;
    backend.ensure_len(dz, n * d)
}

/// The loss of a graph computed by a layer above the backend (a data-parallel group: the loss
/// of its gathered global batch, this rank's rows of dL/dz): registered on the graph as
/// `Arc<dyn LossGroup<B>>` ([`crate::tape::Extensions`]).
pub trait LossGroup<B: LossDevice>: Send + Sync {
    fn instance_loss(
        &self,
        backend: &B,
        z: In<'_, B>,
        shape: (usize, usize),
        cfg: &LossConfig,
        loss: Out<'_, B>,
        dz: Out<'_, B>,
    ) -> Result<()>;
}

impl<B: LossDevice + ElementwiseDevice> Graph<B> {
    /// The instance loss of `z` (N x d; normalized inside), a scalar node. Its gradient is
    /// formed in the forward pass (the fused loss computes both) and applied in backward.
    pub fn instance_loss(&mut self, z: Var, cfg: &LossConfig) -> Result<Var> {
        let zs = self.shape(z);
        let shape = (zs.n, zs.image());
        self.record(ScalarOf([z]), Shape4::SCALAR, |ctx| {
            let dz = sized(ctx.backend, ctx.node.scratch, zs.len())?;
            let (z, loss) = (ctx.inputs.value(z), ctx.node.value);
            match ctx.extensions.get::<Arc<dyn LossGroup<B>>>() {
                Some(group) => group.instance_loss(ctx.backend, z, shape, cfg, loss, dz),
                None => ctx.backend.instance_loss(z, shape, cfg, loss, dz),
            }
        })
    }
}
