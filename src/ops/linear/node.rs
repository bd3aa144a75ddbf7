//! The linear layer on the tape and on both backends: `Graph::linear`, its backward, and how
//! each backend runs it ([`LinearDevice`]).

use std::any::Any;

use super::{cpu, cuda, Backward, Forward, Version};
use crate::backend::cpu::{slice, slice_mut};
use crate::backend::cuda::{dev, dev_mut};
use crate::backend::{Backend, Cpu, CudaBackend, In, Out};
use crate::error::{Error, Result};
use crate::simd::CpuFloat;
use crate::tape::params::pair_mut;
use crate::tape::{dy, BackwardCtx, Graph, ParamId, Shape4, TapeOp, Var};

/// A backend that runs y = x W^T + b.
pub trait LinearDevice: Backend {
    fn linear_forward(&self, a: Forward<In<'_, Self>, Out<'_, Self>>) -> Result<()>;
    fn linear_backward(&self, a: Backward<In<'_, Self>, Out<'_, Self>>) -> Result<()>;
}

impl<T: CpuFloat> LinearDevice for Cpu<T> {
    fn linear_forward(&self, a: Forward<In<'_, Self>, Out<'_, Self>>) -> Result<()> {
        cpu::forward(a.map(slice, slice_mut))
    }
    fn linear_backward(&self, a: Backward<In<'_, Self>, Out<'_, Self>>) -> Result<()> {
        cpu::backward(a.map(slice, slice_mut))
    }
}

/// CUDA runs the kernel version of its options at its GEMM precision.
impl LinearDevice for CudaBackend {
    fn linear_forward(&self, a: Forward<In<'_, Self>, Out<'_, Self>>) -> Result<()> {
        let (v, p) = (self.option::<Version>(), self.gemm_precision());
        cuda::forward(&**self.gpu(), v, a.map(dev, dev_mut), p)
    }
    fn linear_backward(&self, a: Backward<In<'_, Self>, Out<'_, Self>>) -> Result<()> {
        let (v, p) = (self.option::<Version>(), self.gemm_precision());
        cuda::backward(&**self.gpu(), v, a.map(dev, dev_mut), p)
    }
}

/// A linear layer on the tape.
struct Linear {
    x: [Var; 1],
    /// w, b.
    wb: [ParamId; 2],
    out: usize,
}

impl<B: LinearDevice> TapeOp<B> for Linear {
    fn name(&self) -> &'static str {
        "linear"
    }
    fn inputs(&self) -> &[Var] {
        &self.x
    }
    fn params(&self) -> &[ParamId] {
        &self.wb
    }
    fn backward(&self, ctx: BackwardCtx<'_, B>) -> Result<()> {
        let BackwardCtx {
            backend,
            mut inputs,
            params,
            node,
            ..
        } = ctx;
        let (x, xs, dx) = inputs.value_and_grad(self.x[0])?;
        let (pw, pb) = pair_mut(&mut params.params, self.wb[0], self.wb[1]);
        backend.linear_backward(Backward {
            x,
            n: xs.n,
            w: &pw.value,
            out: self.out,
            dy: dy(node.grad)?,
            dx,
            dw: &mut pw.grad,
            db: &mut pb.grad,
        })
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl<B: LinearDevice> Graph<B> {
    pub fn linear(&mut self, x: Var, w: ParamId, b: ParamId) -> Result<Var> {
        let xs = self.shape(x);
        let shape = &self.params.param(w).shape;
        let (out, inp) = (shape[0], shape[1]);
        if xs.image() != inp {
            return Err(Error::invalid(format!(
                "linear {}: input has {} features, expected {inp}",
                self.params.param(w).name,
                xs.image()
            )));
        }
        let op = Linear {
            x: [x],
            wb: [w, b],
            out,
        };
        self.record(op, Shape4::rows(xs.n, out), |ctx| {
            let p = &ctx.params.params;
            ctx.backend.linear_forward(Forward {
                x: ctx.inputs.value(x),
                n: xs.n,
                w: &p[w.0].value,
                b: &p[b.0].value,
                out,
                y: ctx.node.value,
            })
        })
    }
}
