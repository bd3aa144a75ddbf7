//! The convolution on the tape and on both backends: `Graph::conv2d`, its backward, and how
//! each backend runs it ([`Conv2dDevice`]).

use std::any::Any;

use cudarc::driver::CudaSlice;

use super::{cpu, cuda, Backward, Conv, CpuVersion, Forward, Version};
use crate::backend::cpu::{slice, slice_mut};
use crate::backend::cuda::{dev, dev_mut};
use crate::backend::{Backend, Cpu, CudaBackend, In, Out};
use crate::cuda::DevPtrMut;
use crate::error::{Error, Result};
use crate::simd::CpuFloat;
use crate::tape::{dy, BackwardCtx, Graph, ParamId, Shape4, TapeOp, Var};

/// A backend that runs the convolution.
pub trait Conv2dDevice: Backend {
    fn conv2d_forward(&self, a: Forward<In<'_, Self>, Out<'_, Self>>) -> Result<()>;
    fn conv2d_backward(&self, a: Backward<In<'_, Self>, Out<'_, Self>>) -> Result<()>;
}

/// The CPU runs the version of its options ([`CpuVersion`], Winograd by default).
impl<T: CpuFloat> Conv2dDevice for Cpu<T> {
    fn conv2d_forward(&self, a: Forward<In<'_, Self>, Out<'_, Self>>) -> Result<()> {
        cpu::forward_by(self.option::<CpuVersion>(), a.map(slice, slice_mut))
    }
    fn conv2d_backward(&self, a: Backward<In<'_, Self>, Out<'_, Self>>) -> Result<()> {
        cpu::backward_by(self.option::<CpuVersion>(), a.map(slice, slice_mut))
    }
}

/// The largest im2col buffer of one group of images on CUDA, in floats (256 MB by default): a
/// small cap runs a small batch in the several groups a large batch needs (tests on the
/// virtual GPU use it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkspaceCap(pub usize);

impl Default for WorkspaceCap {
    fn default() -> Self {
        WorkspaceCap(1 << 26)
    }
}

/// The convolution's scratch on CUDA, grown on demand and kept.
struct ConvWorkspace {
    col: CudaSlice<f32>,
    gemm: CudaSlice<f32>,
}

/// Runs `f` with exactly the floats of the convolution's groups for `xs` and `conv` (a larger
/// workspace kept from another layer must not change the grouping, and so the GEMM shapes).
fn with_workspace(
    b: &CudaBackend,
    xs: Shape4,
    conv: &Conv,
    f: impl FnOnce(&mut cuda::Workspace<'_>) -> Result<()>,
) -> Result<()> {
    let (col, gemm) = cuda::workspace_len(xs, conv, b.option::<WorkspaceCap>().0);
    let stream = b.gpu().stream();
    let init = || -> Result<ConvWorkspace> {
        Ok(ConvWorkspace {
            col: stream.alloc_zeros::<f32>(1)?,
            gemm: stream.alloc_zeros::<f32>(1)?,
        })
    };
    b.slots().with(init, |ws: &mut ConvWorkspace| {
        if ws.col.len() < col {
            ws.col = stream.alloc_zeros::<f32>(col)?;
        }
        if ws.gemm.len() < gemm {
            ws.gemm = stream.alloc_zeros::<f32>(gemm)?;
        }
        f(&mut cuda::Workspace {
            col: DevPtrMut::of(&mut ws.col).into_slice(0..col)?,
            gemm: DevPtrMut::of(&mut ws.gemm).into_slice(0..gemm)?,
        })
    })
}

/// CUDA runs the kernel version of its options ([`Version`]) at its GEMM precision.
impl Conv2dDevice for CudaBackend {
    fn conv2d_forward(&self, a: Forward<In<'_, Self>, Out<'_, Self>>) -> Result<()> {
        let (v, p) = (self.option::<Version>(), self.gemm_precision());
        let (xs, conv) = (a.xs, a.conv);
        with_workspace(self, xs, &conv, |ws| {
            cuda::forward(&**self.gpu(), v, a.map(dev, dev_mut), ws, p)
        })
    }
    fn conv2d_backward(&self, a: Backward<In<'_, Self>, Out<'_, Self>>) -> Result<()> {
        let (v, p) = (self.option::<Version>(), self.gemm_precision());
        let (xs, conv) = (a.xs, a.conv);
        with_workspace(self, xs, &conv, |ws| {
            cuda::backward(&**self.gpu(), v, a.map(dev, dev_mut), ws, p)
        })
    }
}

/// A convolution on the tape.
pub struct Conv2dOp {
    x: [Var; 1],
    w: [ParamId; 1],
    pub conv: Conv,
}

impl Conv2dOp {
    /// Its input.
    pub fn input(&self) -> Var {
        self.x[0]
    }
}

impl<B: Conv2dDevice> TapeOp<B> for Conv2dOp {
    fn name(&self) -> &'static str {
        "conv2d"
    }
    fn inputs(&self) -> &[Var] {
        &self.x
    }
    fn params(&self) -> &[ParamId] {
        &self.w
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
        let p = &mut params.params[self.w[0].0];
        backend.conv2d_backward(Backward {
            x,
            xs,
            w: &p.value,
            conv: self.conv,
            dy: dy(node.grad)?,
            dx,
            dw: &mut p.grad,
        })
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// A convolution of a step: its geometry, its input's shape, whether its backward forms dx.
#[derive(Debug, Clone, Copy)]
pub struct ConvUse {
    pub conv: Conv,
    pub input: Shape4,
    pub with_dx: bool,
}

impl<B: Conv2dDevice> Graph<B> {
    pub fn conv2d(&mut self, x: Var, w: ParamId, conv: Conv) -> Result<Var> {
        let xs = self.shape(x);
        if xs.c != conv.c_in {
            return Err(Error::invalid(format!(
                "conv2d {}: input has {} channels, expected {}",
                self.params.param(w).name,
                xs.c,
                conv.c_in
            )));
        }
        let op = Conv2dOp {
            x: [x],
            w: [w],
            conv,
        };
        self.record(op, conv.out_shape(xs), |ctx| {
            ctx.backend.conv2d_forward(Forward {
                x: ctx.inputs.value(x),
                xs,
                w: &ctx.params.params[w.0].value,
                conv,
                y: ctx.node.value,
            })
        })
    }
}

impl<B: Backend> Graph<B> {
    /// The convolutions recorded this step: each with its input shape and whether its backward
    /// pass forms dx (what a floor is computed from).
    pub fn convolutions(&self) -> Vec<ConvUse> {
        self.recorded()
            .filter_map(|op| op.as_any().downcast_ref::<Conv2dOp>())
            .map(|op| ConvUse {
                conv: op.conv,
                input: self.shape(op.input()),
                with_dx: self.receives_grad(op.input()),
            })
            .collect()
    }
}
