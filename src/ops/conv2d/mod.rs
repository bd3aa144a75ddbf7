//! 2-d convolution without bias: square kernel, stride, zero padding; NCHW activations,
//! weights C_out x C_in x k x k.
//!
//! forward: `y[n][co][oy][ox] = sum_{c, ki, kj} w[co][c][ki][kj] x[n][c][oy s + ki - p][ox s + kj - p]`
//! backward: dW += the same sum with dy, dx (=|+=) its transpose.
//!
//! Both devices compute it as im2col + GEMM over groups of images: the column matrix of a
//! group (C_in k k rows, B H_out W_out columns) times the weights. The CPU has a second
//! version for 3 x 3 kernels of stride 1, Winograd's F(4 x 4, 3 x 3) (`winograd.rs`): a
//! quarter of the multiplies.

pub mod cpu;
pub mod cuda;
pub mod node;
pub mod winograd;

pub use node::Conv2dDevice;

use super::{Grad, Shape4};
use crate::cuda::to_i32;
use crate::error::Result;
use bytemuck::{Pod, Zeroable};

/// A convolution's geometry: square kernel, stride and zero padding, no bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv {
    pub c_in: usize,
    pub c_out: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
}

impl Conv {
    /// The output shape for input `x`.
    pub fn out_shape(&self, x: Shape4) -> Shape4 {
        let out = |len: usize| (len + 2 * self.pad - self.k) / self.stride + 1;
        Shape4 {
            n: x.n,
            c: self.c_out,
            h: out(x.h),
            w: out(x.w),
        }
    }
    /// Rows of the im2col matrix: C_in k k.
    pub fn patch(&self) -> usize {
        self.c_in * self.k * self.k
    }
    /// FLOPs of the forward pass on `x` (2 per multiply-add).
    pub fn flops(&self, x: Shape4) -> f64 {
        let y = self.out_shape(x);
        2.0 * (y.len() * self.patch()) as f64
    }
}

/// The forward pass: y = conv(x, w).
#[derive(Debug)]
pub struct Forward<X, Y> {
    pub x: X,
    pub xs: Shape4,
    pub w: X,
    pub conv: Conv,
    pub y: Y,
}

/// The backward pass: dw += ..., and dx when asked for.
#[derive(Debug)]
pub struct Backward<X, Y> {
    pub x: X,
    pub xs: Shape4,
    pub w: X,
    pub conv: Conv,
    pub dy: X,
    pub dx: Option<Grad<Y>>,
    pub dw: Y,
}

impl<X, Y> Forward<X, Y> {
    /// The same arguments through other handles to the buffers (a backend's to a kernel's).
    pub fn map<X2, Y2>(self, fx: impl Fn(X) -> X2, fy: impl FnOnce(Y) -> Y2) -> Forward<X2, Y2> {
        Forward {
            x: fx(self.x),
            xs: self.xs,
            w: fx(self.w),
            conv: self.conv,
            y: fy(self.y),
        }
    }
}

impl<X, Y> Backward<X, Y> {
    /// The same arguments through other handles to the buffers.
    pub fn map<X2, Y2>(
        self,
        fx: impl Fn(X) -> X2,
        mut fy: impl FnMut(Y) -> Y2,
    ) -> Backward<X2, Y2> {
        Backward {
            x: fx(self.x),
            xs: self.xs,
            w: fx(self.w),
            conv: self.conv,
            dy: fx(self.dy),
            dx: self.dx.map(|g| g.map(&mut fy)),
            dw: fy(self.dw),
        }
    }
}

/// The CPU versions of the convolution, selected per run (`train --cpu-conv`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum CpuVersion {
    /// im2col + GEMM for every convolution (the first version).
    Im2col,
    /// Winograd F(4x4, 3x3) for the 3 x 3 convolutions of stride 1 (and padding at most 2),
    /// im2col + GEMM for the others.
    #[default]
    Winograd,
}
crate::serde_by_name!(CpuVersion);

impl CpuVersion {
    /// The version of runs whose configuration predates the choice (they resume unchanged).
    pub fn legacy() -> CpuVersion {
        CpuVersion::Im2col
    }
}

/// The CUDA kernel versions of the convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Version {
    /// im2col_v1 / col2im_v1 (gather, no atomics) around cuBLAS GEMMs, NCHW permutes.
    V1,
    /// v1 with 32-bit index math (v1's kernels for a group of 2^31 values or more).
    #[default]
    V2,
}
crate::serde_by_name!(Version);

/// A convolution's geometry for one group of images, passed by value to the kernels of
/// kernels/conv2d.cu (the same fields in the same order as its `ConvGeom`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct ConvGeom {
    pub images: i32,
    pub c_in: i32,
    pub h: i32,
    pub w: i32,
    pub c_out: i32,
    pub k: i32,
    pub stride: i32,
    pub pad: i32,
    pub h_out: i32,
    pub w_out: i32,
}

impl ConvGeom {
    /// The geometry of `conv` on `images` images of input shape `xs` (its `n` is ignored).
    pub fn new(xs: Shape4, conv: &Conv, images: usize) -> Result<ConvGeom> {
        let ys = conv.out_shape(xs);
        Ok(ConvGeom {
            images: to_i32("images", images)?,
            c_in: to_i32("C_in", conv.c_in)?,
            h: to_i32("H", xs.h)?,
            w: to_i32("W", xs.w)?,
            c_out: to_i32("C_out", conv.c_out)?,
            k: to_i32("k", conv.k)?,
            stride: to_i32("stride", conv.stride)?,
            pad: to_i32("pad", conv.pad)?,
            h_out: to_i32("H_out", ys.h)?,
            w_out: to_i32("W_out", ys.w)?,
        })
    }
}
