//! The elementwise ops on the tape and on both backends: `Graph::relu`, `add`, `flatten`,
//! and the scalar nodes whose gradient is known in the forward pass (`given_loss`, a loss
//! computed elsewhere; `weighted_sum`, what gradient checks reduce an output with), with how
//! each backend runs them ([`ElementwiseDevice`]).

use std::any::Any;

use super::{cpu, cuda, Version};
use crate::backend::cuda::{dev, dev_mut};
use crate::backend::{Backend, Cpu, CudaBackend, In, Out};
use crate::error::{Error, Result};
use crate::simd::CpuFloat;
use crate::tape::{dy, scratch_of, sized, BackwardCtx, Grad, Graph, Shape4, TapeOp, Var};

/// A backend that runs the elementwise ops.
pub trait ElementwiseDevice: Backend {
    fn relu_forward(&self, x: In<'_, Self>, y: Out<'_, Self>) -> Result<()>;
    /// dx (=|+=) dy where the forward's output y > 0.
    fn relu_backward(
        &self,
        y: In<'_, Self>,
        dy: In<'_, Self>,
        dx: Grad<Out<'_, Self>>,
    ) -> Result<()>;
    /// out (=|+=) x.
    fn copy_or_add(&self, x: In<'_, Self>, out: Grad<Out<'_, Self>>) -> Result<()>;
    /// out (=|+=) scale x.
    fn axpy(&self, scale: f64, x: In<'_, Self>, out: Grad<Out<'_, Self>>) -> Result<()>;
}

fn grad_slice<T>(g: Grad<&mut Vec<T>>) -> Grad<&mut [T]> {
    g.map(|v| v.as_mut_slice())
}

impl<T: CpuFloat> ElementwiseDevice for Cpu<T> {
    fn relu_forward(&self, x: &Vec<T>, y: &mut Vec<T>) -> Result<()> {
        cpu::relu_forward(x, y);
        Ok(())
    }
    fn relu_backward(&self, y: &Vec<T>, dy: &Vec<T>, dx: Grad<&mut Vec<T>>) -> Result<()> {
        cpu::relu_backward(y, dy, grad_slice(dx));
        Ok(())
    }
    fn copy_or_add(&self, x: &Vec<T>, out: Grad<&mut Vec<T>>) -> Result<()> {
        cpu::copy_or_add(x, grad_slice(out));
        Ok(())
    }
    fn axpy(&self, scale: f64, x: &Vec<T>, out: Grad<&mut Vec<T>>) -> Result<()> {
        cpu::axpy(scale, x, grad_slice(out));
        Ok(())
    }
}

/// CUDA runs the kernel version of its options.
impl ElementwiseDevice for CudaBackend {
    fn relu_forward(&self, x: In<'_, Self>, y: Out<'_, Self>) -> Result<()> {
        cuda::relu_forward(&**self.gpu(), self.option::<Version>(), dev(x), dev_mut(y))
    }
    fn relu_backward(
        &self,
        y: In<'_, Self>,
        dy: In<'_, Self>,
        dx: Grad<Out<'_, Self>>,
    ) -> Result<()> {
        let v = self.option::<Version>();
        cuda::relu_backward(&**self.gpu(), v, dev(y), dev(dy), dx.map(dev_mut))
    }
    fn copy_or_add(&self, x: In<'_, Self>, out: Grad<Out<'_, Self>>) -> Result<()> {
        let v = self.option::<Version>();
        cuda::copy_or_add(&**self.gpu(), v, dev(x), out.map(dev_mut))
    }
    fn axpy(&self, scale: f64, x: In<'_, Self>, out: Grad<Out<'_, Self>>) -> Result<()> {
        let v = self.option::<Version>();
        cuda::axpy(&**self.gpu(), v, scale, dev(x), out.map(dev_mut))
    }
}

/// y = max(x, 0) on the tape.
struct Relu([Var; 1]);

impl<B: ElementwiseDevice> TapeOp<B> for Relu {
    fn name(&self) -> &'static str {
        "relu"
    }
    fn inputs(&self) -> &[Var] {
        &self.0
    }
    fn backward(&self, mut ctx: BackwardCtx<'_, B>) -> Result<()> {
        let dx = ctx.inputs.grad(self.0[0])?;
        ctx.backend
            .relu_backward(ctx.node.value, dy(ctx.node.grad)?, dx)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// a + b, or a copy of one input (flatten: N x C x H x W as N x (C H W)), on the tape: the
/// gradient goes to every input unchanged.
struct Sum {
    inputs: [Var; 2],
    /// Inputs used: 2 for add, 1 for flatten.
    count: usize,
    name: &'static str,
}

impl<B: ElementwiseDevice> TapeOp<B> for Sum {
    fn name(&self) -> &'static str {
        self.name
    }
    fn inputs(&self) -> &[Var] {
        &self.inputs[..self.count]
    }
    fn backward(&self, mut ctx: BackwardCtx<'_, B>) -> Result<()> {
        let dy = dy(ctx.node.grad)?;
        for &x in &self.inputs[..self.count] {
            ctx.backend.copy_or_add(dy, ctx.inputs.grad(x)?)?;
        }
        Ok(())
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// A scalar whose gradient with respect to its input is known when it is computed, kept in
/// the node's scratch: a loss (the instance loss's dL/dz, a baseline's) or a weighted sum (the
/// weights). Backward scales that gradient by the upstream one (1 at the root).
pub struct ScalarOf(pub [Var; 1]);

impl<B: ElementwiseDevice> TapeOp<B> for ScalarOf {
    fn name(&self) -> &'static str {
        "loss"
    }
    fn inputs(&self) -> &[Var] {
        &self.0
    }
    fn is_loss(&self) -> bool {
        true
    }
    fn backward(&self, mut ctx: BackwardCtx<'_, B>) -> Result<()> {
        // A root's dL/dL = 1 (a loss root has no gradient buffer: nothing to read).
        let upstream = if ctx.is_root {
            1.0
        } else {
            ctx.backend.download_f64(dy(ctx.node.grad)?)?[0]
        };
        let dx = ctx.inputs.grad(self.0[0])?;
        ctx.backend
            .axpy(upstream, scratch_of(ctx.node.scratch)?, dx)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl<B: ElementwiseDevice> Graph<B> {
    pub fn relu(&mut self, x: Var) -> Result<Var> {
        self.record(Relu([x]), self.shape(x), |ctx| {
            ctx.backend
                .relu_forward(ctx.inputs.value(x), ctx.node.value)
        })
    }

    pub fn add(&mut self, a: Var, b: Var) -> Result<Var> {
        if self.shape(a) != self.shape(b) {
            return Err(Error::invalid(format!(
                "add: shapes {:?} and {:?} differ",
                self.shape(a),
                self.shape(b)
            )));
        }
        let op = Sum {
            inputs: [a, b],
            count: 2,
            name: "add",
        };
        self.record(op, self.shape(a), |ctx| {
            let (backend, y) = (ctx.backend, ctx.node.value);
            backend.copy_or_add(ctx.inputs.value(a), Grad::new(&mut *y, false))?;
            backend.copy_or_add(ctx.inputs.value(b), Grad::new(y, true))
        })
    }

    /// N x C x H x W -> N x (C H W) (a copy; tiny next to the convolutions).
    pub fn flatten(&mut self, x: Var) -> Result<Var> {
        let xs = self.shape(x);
        let op = Sum {
            inputs: [x, x],
            count: 1,
            name: "flatten",
        };
        self.record(op, Shape4::rows(xs.n, xs.image()), |ctx| {
            let y = Grad::new(ctx.node.value, false);
            ctx.backend.copy_or_add(ctx.inputs.value(x), y)
        })
    }

    /// A loss of `z` computed elsewhere (a baseline's, on the host): the scalar `loss` and its
    /// gradient `dz` (one value per element of z), applied in backward as the instance loss's.
    pub fn given_loss(&mut self, z: Var, loss: f64, dz: &[f32]) -> Result<Var> {
        let zs = self.shape(z);
        if dz.len() != zs.len() {
            return Err(Error::invalid(format!(
                "given_loss: {} gradient values for {} elements",
                dz.len(),
                zs.len()
            )));
        }
        self.record(ScalarOf([z]), Shape4::SCALAR, |ctx| {
            let scratch = sized(ctx.backend, ctx.node.scratch, dz.len())?;
            ctx.backend.upload(dz, scratch)?;
            ctx.backend.upload_f64(&[loss], ctx.node.value)
        })
    }

    /// sum_i weights_i x_i, a scalar node (used by gradient checks to reduce any output).
    pub fn weighted_sum(&mut self, x: Var, weights: &[f32]) -> Result<Var> {
        let xs = self.shape(x);
        if weights.len() != xs.len() {
            return Err(Error::invalid("weighted_sum: one weight per element"));
        }
        self.record(ScalarOf([x]), Shape4::SCALAR, |ctx| {
            let b = ctx.backend;
            let scratch = sized(b, ctx.node.scratch, weights.len())?;
            b.upload(weights, scratch)?;
            let w = b.download_f64(scratch)?;
            let v = b.download_f64(ctx.inputs.value(x))?;
            let s: f64 = w.iter().zip(&v).map(|(a, b)| a * b).sum();
            b.upload_f64(&[s], ctx.node.value)
        })
    }
}
