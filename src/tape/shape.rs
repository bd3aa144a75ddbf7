//! The activation shape every op shares, and the gradient output every backward pass writes.

/// A 4-d activation shape, NCHW (a matrix of N rows is N x C x 1 x 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape4 {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
}

impl Shape4 {
    /// One element: the shape of a scalar node (a loss).
    pub const SCALAR: Shape4 = Shape4 {
        n: 1,
        c: 1,
        h: 1,
        w: 1,
    };

    /// N rows of `features` (h = w = 1).
    pub fn rows(n: usize, features: usize) -> Shape4 {
        Shape4 {
            n,
            c: features,
            h: 1,
            w: 1,
        }
    }

    pub fn len(&self) -> usize {
        self.n * self.c * self.h * self.w
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Elements of one image.
    pub fn image(&self) -> usize {
        self.c * self.h * self.w
    }
}

/// A gradient output: written (`accumulate == false`), or added to what an earlier consumer of
/// the same value wrote (so a value used twice receives both contributions and no buffer needs
/// clearing first).
#[derive(Debug)]
pub struct Grad<Y> {
    pub buf: Y,
    pub accumulate: bool,
}

impl<Y> Grad<Y> {
    pub fn new(buf: Y, accumulate: bool) -> Self {
        Grad { buf, accumulate }
    }
    /// The same flag on another handle to the buffer.
    pub fn map<Y2>(self, f: impl FnOnce(Y) -> Y2) -> Grad<Y2> {
        Grad {
            buf: f(self.buf),
            accumulate: self.accumulate,
        }
    }
}
