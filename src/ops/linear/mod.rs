//! A linear layer on N rows: y = x W^T + b, W is out x in (PyTorch's layout); backward
//! dW += dy^T x, db += the column sums of dy, dx (=|+=) dy W.

pub mod cpu;
pub mod cuda;
pub mod node;

pub use node::LinearDevice;

use super::Grad;

/// The forward pass.
#[derive(Debug)]
pub struct Forward<X, Y> {
    pub x: X,
    /// Rows of x.
    pub n: usize,
    pub w: X,
    pub b: X,
    /// Output features (W's rows).
    pub out: usize,
    pub y: Y,
}

/// The backward pass: dw, db += ...; dx when asked for.
#[derive(Debug)]
pub struct Backward<X, Y> {
    pub x: X,
    pub n: usize,
    pub w: X,
    pub out: usize,
    pub dy: X,
    pub dx: Option<Grad<Y>>,
    pub dw: Y,
    pub db: Y,
}

impl<X, Y> Forward<X, Y> {
    /// The same arguments through other handles to the buffers.
    pub fn map<X2, Y2>(self, fx: impl Fn(X) -> X2, fy: impl FnOnce(Y) -> Y2) -> Forward<X2, Y2> {
        Forward {
            x: fx(self.x),
            n: self.n,
            w: fx(self.w),
            b: fx(self.b),
            out: self.out,
            y: fy(self.y),
        }
    }
}

impl<X, Y> Backward<X, Y> {
    /// The same arguments through other handles to the buffers.
    pub fn map<X2, Y2>(self, fx: impl Fn(X) -> X2, fy: impl Fn(Y) -> Y2) -> Backward<X2, Y2> {
        Backward {
            x: fx(self.x),
            n: self.n,
            w: fx(self.w),
            out: self.out,
            dy: fx(self.dy),
            dx: self.dx.map(|g| g.map(&fy)),
            dw: fy(self.dw),
            db: fy(self.db),
        }
    }
}

/// The CUDA kernel versions of the linear layer (besides its cuBLAS GEMMs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Version {
    /// bias_rows_v1 then a GEMM forward; GEMMs and column_sums_v1 backward.
    #[default]
    V1,
}
crate::serde_by_name!(Version);
