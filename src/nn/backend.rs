//! The backend trait: where a graph's buffers live and how its ops run. The graph (tape) only
//! records ops and hands buffers to its backend; each backend method is one call into the op's
//! own implementation in `ops::<op>::{cpu, cuda}`.
//!
//! Parameter gradients are always accumulated (`+=`); an input's gradient is a [`Grad`]:
//! written, or added when another consumer of the same value already wrote one.

use crate::error::{Error, Result};
use crate::loss::LossConfig;
use crate::ops::sgd::{SgdStep, Tensors};
use crate::ops::topk::Neighbours;
use crate::ops::{batchnorm, conv2d, linear, Grad, Shape4};

pub use crate::cuda::staging::PendingRead;

/// A backend's input handle to one of its buffers.
pub type In<'a, B> = &'a <B as Backend>::Buffer;
/// A backend's output handle to one of its buffers.
pub type Out<'a, B> = &'a mut <B as Backend>::Buffer;

/// Storage and kernels of one device.
pub trait Backend: Send + Sync + Sized {
    /// A buffer of elements on the device.
    type Buffer: Send + Sync;
    /// What batchnorm's forward keeps for its backward (per-channel statistics).
    type BnSaved: Default + Send + Sync;
    /// The element type's name, for checkpoints and messages.
    const DTYPE: &'static str;

    fn zeros(&self, len: usize) -> Result<Self::Buffer>;
    fn len(&self, buf: &Self::Buffer) -> usize;
    /// Resizes to `len` (keeping the allocation when it is large enough) and zeroes.
    fn reset(&self, buf: &mut Self::Buffer, len: usize) -> Result<()>;
    /// Resizes to `len` without clearing when the length is already right (for buffers that
    /// are about to be overwritten).
    fn ensure_len(&self, buf: &mut Self::Buffer, len: usize) -> Result<()>;
    fn upload(&self, host: &[f32], buf: &mut Self::Buffer) -> Result<()>;
    fn download(&self, buf: &Self::Buffer) -> Result<Vec<f32>>;
    /// Every element as f64 (checkpoints, tests).
    fn download_f64(&self, buf: &Self::Buffer) -> Result<Vec<f64>>;
    fn upload_f64(&self, host: &[f64], buf: &mut Self::Buffer) -> Result<()>;

    fn conv2d_forward(&self, a: conv2d::Forward<In<'_, Self>, Out<'_, Self>>) -> Result<()>;
    fn conv2d_backward(&self, a: conv2d::Backward<In<'_, Self>, Out<'_, Self>>) -> Result<()>;
    fn batchnorm_forward(
        &self,
        a: batchnorm::Forward<In<'_, Self>, Out<'_, Self>>,
        saved: &mut Self::BnSaved,
    ) -> Result<()>;
    fn batchnorm_backward(
        &self,
        a: batchnorm::Backward<In<'_, Self>, Out<'_, Self>>,
        saved: &mut Self::BnSaved,
    ) -> Result<()>;
    fn relu_forward(&self, x: In<'_, Self>, y: Out<'_, Self>) -> Result<()>;
    /// Whether batchnorm takes `relu: true` (a fused batchnorm + ReLU); the graph records the
    /// two apart where it does not.
    fn fuses_batchnorm_relu(&self) -> bool {
        false
    }
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
    /// k x k average pooling with stride k of `x` (shape `xs`) into `y`.
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
    fn linear_forward(&self, a: linear::Forward<In<'_, Self>, Out<'_, Self>>) -> Result<()>;
    fn linear_backward(&self, a: linear::Backward<In<'_, Self>, Out<'_, Self>>) -> Result<()>;
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
    /// A backward pass begins whose parameter gradients (`lens` floats each, in the store's
    /// order) [`Backend::reduce_gradients`] will sum; nothing on one device.
    fn gradients_begin(&self, lens: &[usize]) -> Result<()> {
        let _ = lens;
        Ok(())
    }
    /// Parameter `index`'s gradient is final for this backward pass (the tape reached its
    /// last use): a data-parallel backend may start summing it over the ranks while the rest
    /// of the pass runs; nothing on one device.
    fn gradient_final(&self, index: usize, grad: In<'_, Self>) -> Result<()> {
        let _ = (index, grad);
        Ok(())
    }
    /// Replaces every parameter gradient by its sum over the ranks of a data-parallel group,
    /// before the update (waiting for what [`Backend::gradient_final`] started); nothing on
    /// one device.
    fn reduce_gradients(&self, grads: &mut [&mut Self::Buffer]) -> Result<()> {
        let _ = grads;
        Ok(())
    }
    /// (rank, ranks) of this backend in its data-parallel group; (0, 1) on its own.
    fn rank(&self) -> (usize, usize) {
        (0, 1)
    }
    /// Rank 0's values of every buffer on every rank (the same lengths on every rank);
    /// nothing on one device.
    fn broadcast(&self, bufs: &mut [&mut Self::Buffer]) -> Result<()> {
        let _ = bufs;
        Ok(())
    }
    /// `local` of every rank (the same length on every rank), concatenated in rank order into
    /// `out` (ranks x that length); a copy on one device.
    fn all_gather(&self, local: In<'_, Self>, out: Out<'_, Self>) -> Result<()> {
        self.ensure_len(out, self.len(local))?;
        self.copy_into(local, out, 0)
    }
    /// `dst` = the first len(`dst`) values of `src` (a gathered buffer less its padding):
    /// through the host here, on the device where a backend has a copy of its own.
    fn copy_prefix(&self, src: In<'_, Self>, dst: Out<'_, Self>) -> Result<()> {
        let (want, have) = (self.len(dst), self.len(src));
        if want > have {
            return Err(Error::invalid(format!(
                "copy_prefix: {want} values from a buffer of {have}"
            )));
        }
        let mut host = self.download(src)?;
        host.truncate(want);
        self.upload(&host, dst)
    }
    /// y = each row of x (`shape` = (N, d)) divided by its L2 norm (as the loss normalizes).
    fn normalize_rows(
        &self,
        x: In<'_, Self>,
        shape: (usize, usize),
        y: Out<'_, Self>,
    ) -> Result<()>;
    /// `dst[at..at + len(src)] = src`, on the device (a step's loss into a history read every
    /// few steps, a batch of embeddings into the bank).
    fn copy_into(&self, src: In<'_, Self>, dst: Out<'_, Self>, at: usize) -> Result<()>;
    /// SGD (PyTorch's update, `ops::sgd`) on every parameter.
    fn sgd_update_all(
        &self,
        params: &mut [Tensors<'_, Self::Buffer>],
        step: &SgdStep,
    ) -> Result<()>;
    /// For each row of `queries` (L2-normalized, d wide), its `k` most similar rows of `keys`
    /// as (similarity, index), best first (ties: lower index first).
    fn nearest(
        &self,
        queries: In<'_, Self>,
        keys: In<'_, Self>,
        d: usize,
        k: usize,
    ) -> Result<Neighbours>;
    /// Starts reading `buf` back without waiting for the device: the returned closure waits
    /// for the copy (and only it) and gives the values.
    fn read_later(&self, buf: In<'_, Self>) -> Result<PendingRead>;
    /// Waits until the device has finished the queued work (timing; a no-op on the CPU).
    fn synchronize(&self) -> Result<()>;
}
