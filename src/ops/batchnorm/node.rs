//! BatchNorm on the tape and on both backends: `Graph::batchnorm` (and the fused
//! `batchnorm_relu` where a backend fuses it), its backward, how each backend runs it
//! ([`BatchNormDevice`]), and the hook through which a data-parallel group takes it over with
//! statistics over its global batch ([`BatchNormGroup`], `--sync-bn`).

use std::any::Any;
use std::sync::Arc;

use cudarc::driver::CudaSlice;

use super::{cpu, cuda, Backward, Forward, Version};
use crate::backend::cpu::{slice, slice_mut};
use crate::backend::cuda::{dev, dev_mut};
use crate::backend::{Backend, Cpu, CudaBackend, In, Out};
use crate::cuda::DevPtrMut;
use crate::error::{Error, Result};
use crate::ops::elementwise::ElementwiseDevice;
use crate::simd::CpuFloat;
use crate::tape::params::pair_mut;
use crate::tape::{
    dy, state_of, BackwardCtx, BnId, ForwardCtx, Graph, ParamId, ParamStore, TapeOp, Var,
};

/// A backend that runs batchnorm.
pub trait BatchNormDevice: Backend {
    /// What the forward keeps for the backward (per-channel statistics).
    type Saved: Default + Send + Sync + 'static;
    /// Whether batchnorm takes `relu: true` (a fused batchnorm + ReLU); the graph records the
    /// two apart where it does not.
    fn fuses_relu(&self) -> bool {
        false
    }
    fn batchnorm_forward(
        &self,
        a: Forward<In<'_, Self>, Out<'_, Self>>,
        saved: &mut Self::Saved,
    ) -> Result<()>;
    fn batchnorm_backward(
        &self,
        a: Backward<In<'_, Self>, Out<'_, Self>>,
        saved: &mut Self::Saved,
    ) -> Result<()>;
}

impl<T: CpuFloat> BatchNormDevice for Cpu<T> {
    type Saved = cpu::BnSaved;
    fn fuses_relu(&self) -> bool {
        true
    }
    fn batchnorm_forward(
        &self,
        a: Forward<In<'_, Self>, Out<'_, Self>>,
        saved: &mut cpu::BnSaved,
    ) -> Result<()> {
        cpu::forward(a.map(slice, slice_mut), saved);
        Ok(())
    }
    fn batchnorm_backward(
        &self,
        a: Backward<In<'_, Self>, Out<'_, Self>>,
        saved: &mut cpu::BnSaved,
    ) -> Result<()> {
        cpu::backward(a.map(slice, slice_mut), saved);
        Ok(())
    }
}

/// CUDA's statistics for the backward, in the layout of the version that made them
/// ([`cuda::saved_len`]), allocated by the forward at the right length.
pub type CudaSaved = Option<CudaSlice<f32>>;

/// The statistics buffer for `version` and `xs`, allocated (zeroed, as v2's counters need)
/// when its length changes.
pub fn cuda_saved<'a>(
    b: &CudaBackend,
    version: Version,
    xs: crate::tape::Shape4,
    saved: &'a mut CudaSaved,
) -> Result<&'a mut CudaSlice<f32>> {
    let len = cuda::saved_len(version, xs);
    if saved.as_ref().is_none_or(|s| s.len() != len) {
        *saved = Some(b.gpu().stream().alloc_zeros::<f32>(len)?);
    }
    saved
        .as_mut()
        .ok_or_else(|| Error::Cuda("batchnorm statistics missing".into()))
}

/// The statistics a backward pass of `version` and `xs` reads, or an error when the forward
/// made none.
pub fn cuda_saved_for_backward(
    version: Version,
    xs: crate::tape::Shape4,
    saved: &mut CudaSaved,
) -> Result<&mut CudaSlice<f32>> {
    let len = cuda::saved_len(version, xs);
    saved
        .as_mut()
        .filter(|s| s.len() == len)
        .ok_or_else(|| Error::Cuda("batchnorm backward before its forward".into()))
}

/// CUDA runs the kernel version of its options.
impl BatchNormDevice for CudaBackend {
    type Saved = CudaSaved;
    fn batchnorm_forward(
        &self,
        a: Forward<In<'_, Self>, Out<'_, Self>>,
        saved: &mut CudaSaved,
    ) -> Result<()> {
        let v = self.option::<Version>();
        let saved = cuda_saved(self, v, a.xs, saved)?;
        cuda::forward(
            &**self.gpu(),
            v,
            a.map(dev, dev_mut),
            &mut DevPtrMut::of(saved),
        )
    }
    fn batchnorm_backward(
        &self,
        a: Backward<In<'_, Self>, Out<'_, Self>>,
        saved: &mut CudaSaved,
    ) -> Result<()> {
        let v = self.option::<Version>();
        let saved = cuda_saved_for_backward(v, a.xs, saved)?;
        cuda::backward(
            &**self.gpu(),
            v,
            a.map(dev, dev_mut),
            &mut DevPtrMut::of(saved),
        )
    }
}

/// Every BatchNorm of a graph run by a layer above the backend instead (a data-parallel
/// group's `--sync-bn`: the training statistics of its global batch): registered on the graph
/// as `Arc<dyn BatchNormGroup<B>>` ([`crate::tape::Extensions`]).
pub trait BatchNormGroup<B: BatchNormDevice>: Send + Sync {
    fn forward(
        &self,
        backend: &B,
        a: Forward<In<'_, B>, Out<'_, B>>,
        saved: &mut B::Saved,
    ) -> Result<()>;
    fn backward(
        &self,
        backend: &B,
        a: Backward<In<'_, B>, Out<'_, B>>,
        saved: &mut B::Saved,
    ) -> Result<()>;
}

/// BatchNorm on the tape.
pub struct BatchNormOp {
    x: [Var; 1],
    bn: BnId,
    /// gamma, beta.
    affine: [ParamId; 2],
    training: bool,
    /// Followed by a fused ReLU (backends that fuse it).
    relu: bool,
}

impl<B: BatchNormDevice> TapeOp<B> for BatchNormOp {
    fn name(&self) -> &'static str {
        "batchnorm"
    }
    fn inputs(&self) -> &[Var] {
        &self.x
    }
    fn params(&self) -> &[ParamId] {
        &self.affine
    }
    fn backward(&self, ctx: BackwardCtx<'_, B>) -> Result<()> {
        let BackwardCtx {
            backend,
            mut inputs,
            params,
            node,
            extensions,
            ..
        } = ctx;
        let (x, xs, dx) = inputs.value_and_grad(self.x[0])?;
        let ParamStore { params, bns } = params;
        let bufs = &bns[self.bn.0];
        let (pg, pb) = pair_mut(params, self.affine[0], self.affine[1]);
        let a = Backward {
            x,
            xs,
            gamma: &pg.value,
            running_mean: &bufs.running_mean,
            running_var: &bufs.running_var,
            training: self.training,
            relu: self.relu,
            dy: dy(node.grad)?,
            dx,
            dgamma: &mut pg.grad,
            dbeta: &mut pb.grad,
        };
        let saved = state_of::<B::Saved>(node.state)?;
        match extensions.get::<Arc<dyn BatchNormGroup<B>>>() {
            Some(group) => group.backward(backend, a, saved),
            None => backend.batchnorm_backward(a, saved),
        }
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl<B: BatchNormDevice> Graph<B> {
    pub fn batchnorm(
        &mut self,
        x: Var,
        bn: BnId,
        gamma: ParamId,
        beta: ParamId,
        training: bool,
    ) -> Result<Var> {
        self.batchnorm_node(x, bn, [gamma, beta], training, false)
    }

    fn batchnorm_node(
        &mut self,
        x: Var,
        bn: BnId,
        affine: [ParamId; 2],
        training: bool,
        relu: bool,
    ) -> Result<Var> {
        let xs = self.shape(x);
        let op = BatchNormOp {
            x: [x],
            bn,
            affine,
            training,
            relu,
        };
        let var = self.record(op, xs, |ctx| {
            let ForwardCtx {
                backend,
                inputs,
                params,
                node,
                extensions,
            } = ctx;
            let ParamStore { params, bns } = params;
            let buffers = &mut bns[bn.0];
            let a = Forward {
                x: inputs.value(x),
                xs,
                gamma: &params[affine[0].0].value,
                beta: &params[affine[1].0].value,
                running_mean: &mut buffers.running_mean,
                running_var: &mut buffers.running_var,
                training,
                relu,
                y: node.value,
            };
            let saved = state_of::<B::Saved>(node.state)?;
            match extensions.get::<Arc<dyn BatchNormGroup<B>>>() {
                Some(group) => group.forward(backend, a, saved),
                None => backend.batchnorm_forward(a, saved),
            }
        })?;
        if training {
            self.params.bns[bn.0].num_batches_tracked += 1;
        }
        Ok(var)
    }
}

impl<B: BatchNormDevice + ElementwiseDevice> Graph<B> {
    /// relu(batchnorm(x)): one fused node where the backend fuses them (the CPU: a pass fewer
    /// each way, no stored pre-activation), otherwise the two ops.
    pub fn batchnorm_relu(
        &mut self,
        x: Var,
        bn: BnId,
        gamma: ParamId,
        beta: ParamId,
        training: bool,
    ) -> Result<Var> {
        if self.backend.fuses_relu() {
            return self.batchnorm_node(x, bn, [gamma, beta], training, true);
        }
        let y = self.batchnorm_node(x, bn, [gamma, beta], training, false)?;
        self.relu(y)
    }
}
