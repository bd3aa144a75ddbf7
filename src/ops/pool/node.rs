//! Average pooling on the tape and on both backends: `Graph::avgpool`, its backward, and how
//! each backend runs it ([`PoolDevice`]).

use std::any::Any;

use super::{cpu, cuda, out_shape, Version};
use crate::backend::cuda::{dev, dev_mut};
use crate::backend::{Backend, Cpu, CudaBackend, In, Out};
use crate::error::{Error, Result};
use crate::simd::CpuFloat;
use crate::tape::{dy, BackwardCtx, Grad, Graph, Shape4, TapeOp, Var};

/// A backend that runs k x k average pooling with stride k.
pub trait PoolDevice: Backend {
    fn avgpool_forward(
        &self,
        x: In<'_, Self>,
        xs: Shape4,
        k: usize,
        y: Out<'_, Self>,
    ) -> Result<()>;
    fn avgpool_backward(
        &self,
        xs: Shape4,
        k: usize,
        dy: In<'_, Self>,
        dx: Grad<Out<'_, Self>>,
    ) -> Result<()>;
}

impl<T: CpuFloat> PoolDevice for Cpu<T> {
    fn avgpool_forward(&self, x: &Vec<T>, xs: Shape4, k: usize, y: &mut Vec<T>) -> Result<()> {
        cpu::forward(x, xs, k, y);
        Ok(())
    }
    fn avgpool_backward(
        &self,
        xs: Shape4,
        k: usize,
        dy: &Vec<T>,
        dx: Grad<&mut Vec<T>>,
    ) -> Result<()> {
        cpu::backward(xs, k, dy, dx.map(|v| v.as_mut_slice()));
        Ok(())
    }
}

/// CUDA runs the kernel version of its options.
impl PoolDevice for CudaBackend {
    fn avgpool_forward(
        &self,
        x: In<'_, Self>,
        xs: Shape4,
        k: usize,
        y: Out<'_, Self>,
    ) -> Result<()> {
        cuda::forward(
            &**self.gpu(),
            self.option::<Version>(),
            dev(x),
            xs,
            k,
            dev_mut(y),
        )
    }
    fn avgpool_backward(
        &self,
        xs: Shape4,
        k: usize,
        dy: In<'_, Self>,
        dx: Grad<Out<'_, Self>>,
    ) -> Result<()> {
        let v = self.option::<Version>();
        cuda::backward(&**self.gpu(), v, xs, k, dev(dy), dx.map(dev_mut))
    }
}

/// Average pooling on the tape.
struct AvgPool {
    x: [Var; 1],
    k: usize,
}

impl<B: PoolDevice> TapeOp<B> for AvgPool {
    fn name(&self) -> &'static str {
        "avgpool"
    }
    fn inputs(&self) -> &[Var] {
        &self.x
    }
    fn backward(&self, mut ctx: BackwardCtx<'_, B>) -> Result<()> {
        let xs = ctx.inputs.shape(self.x[0]);
        let dx = ctx.inputs.grad(self.x[0])?;
        ctx.backend
            .avgpool_backward(xs, self.k, dy(ctx.node.grad)?, dx)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl<B: PoolDevice> Graph<B> {
    /// k x k average pooling with stride k; `k = H = W` is global pooling.
    pub fn avgpool(&mut self, x: Var, k: usize) -> Result<Var> {
        let xs = self.shape(x);
        if k == 0 || !xs.h.is_multiple_of(k) || !xs.w.is_multiple_of(k) {
            return Err(Error::invalid(format!(
                "avgpool: {}x{} is not divisible into {k}x{k} windows",
                xs.h, xs.w
            )));
        }
        self.record(AvgPool { x: [x], k }, out_shape(xs, k), |ctx| {
            ctx.backend
                .avgpool_forward(ctx.inputs.value(x), xs, k, ctx.node.value)
        })
    }
}
