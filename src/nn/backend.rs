//! The backend trait: where a graph's buffers live and how its ops run. The graph (tape) only
//! records ops and hands buffers to its backend, so the same graph can run on the CPU now and
//! on CUDA once a CUDA backend implements this trait.

// Kernels take their buffers and geometry explicitly, as their CUDA twins will.
#![allow(clippy::too_many_arguments)]

use std::marker::PhantomData;

use super::cpu_ops::{self, BnSaved, Conv, Shape4};
use super::params::Param;
use crate::error::Result;
use crate::loss::{cpu as cpu_loss, LossConfig};
use crate::simd::CpuFloat;

/// A read-back in flight (see [`Backend::read_later`]): call it for the values.
pub type PendingRead = Box<dyn FnOnce() -> Result<Vec<f64>> + Send>;

/// Storage and kernels of one device. Parameter gradients are always accumulated (`+=`); an
/// input's gradient is written, or added when its `accumulate` flag says a gradient already
/// arrived from another consumer (so a value used twice receives both contributions and no
/// buffer needs clearing first).
pub trait Backend: Send + Sync {
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

    fn conv2d_forward(
        &self,
        x: &Self::Buffer,
        xs: Shape4,
        w: &Self::Buffer,
        conv: &Conv,
        y: &mut Self::Buffer,
    ) -> Result<Shape4>;
    /// dw += ..., dx (when given) written.
    fn conv2d_backward(
        &self,
        x: &Self::Buffer,
        xs: Shape4,
        w: &Self::Buffer,
        conv: &Conv,
        dy: &Self::Buffer,
        dx: Option<&mut Self::Buffer>,
        dx_accumulate: bool,
        dw: &mut Self::Buffer,
    ) -> Result<()>;
    fn batchnorm_forward(
        &self,
        x: &Self::Buffer,
        xs: Shape4,
        gamma: &Self::Buffer,
        beta: &Self::Buffer,
        running_mean: &mut Self::Buffer,
        running_var: &mut Self::Buffer,
        training: bool,
        saved: &mut Self::BnSaved,
        y: &mut Self::Buffer,
    ) -> Result<()>;
    /// dgamma, dbeta += ...; dx (when given) written.
    fn batchnorm_backward(
        &self,
        x: &Self::Buffer,
        xs: Shape4,
        gamma: &Self::Buffer,
        running_mean: &Self::Buffer,
        running_var: &Self::Buffer,
        training: bool,
        saved: &mut Self::BnSaved,
        dy: &Self::Buffer,
        dx: Option<&mut Self::Buffer>,
        dx_accumulate: bool,
        dgamma: &mut Self::Buffer,
        dbeta: &mut Self::Buffer,
    ) -> Result<()>;
    fn relu_forward(&self, x: &Self::Buffer, y: &mut Self::Buffer) -> Result<()>;
    fn relu_backward(
        &self,
        y: &Self::Buffer,
        dy: &Self::Buffer,
        dx: &mut Self::Buffer,
        accumulate: bool,
    ) -> Result<()>;
    /// out += x.
    fn add_into(&self, x: &Self::Buffer, out: &mut Self::Buffer) -> Result<()>;
    /// out = x, or out += x with `accumulate`.
    fn copy_or_add(&self, x: &Self::Buffer, out: &mut Self::Buffer, accumulate: bool)
        -> Result<()>;
    fn avgpool_forward(
        &self,
        x: &Self::Buffer,
        xs: Shape4,
        k: usize,
        y: &mut Self::Buffer,
    ) -> Result<Shape4>;
    fn avgpool_backward(
        &self,
        xs: Shape4,
        k: usize,
        dy: &Self::Buffer,
        dx: &mut Self::Buffer,
        accumulate: bool,
    ) -> Result<()>;
    fn linear_forward(
        &self,
        x: &Self::Buffer,
        n: usize,
        w: &Self::Buffer,
        b: &Self::Buffer,
        out: usize,
        y: &mut Self::Buffer,
    ) -> Result<()>;
    /// dw, db += ...; dx (when given) written.
    fn linear_backward(
        &self,
        x: &Self::Buffer,
        n: usize,
        w: &Self::Buffer,
        out: usize,
        dy: &Self::Buffer,
        dx: Option<&mut Self::Buffer>,
        dx_accumulate: bool,
        dw: &mut Self::Buffer,
        db: &mut Self::Buffer,
    ) -> Result<()>;
    /// The instance loss (with its normalisation) of z (N x d): writes L into `loss` (one
    /// element) and dL/dz into `dz`, without waiting for the device.
    fn instance_loss(
        &self,
        z: &Self::Buffer,
        n: usize,
        d: usize,
        cfg: &LossConfig,
        loss: &mut Self::Buffer,
        dz: &mut Self::Buffer,
    ) -> Result<()>;
    /// dst = (or += with `accumulate`) scale * src.
    fn axpy(
        &self,
        scale: f64,
        src: &Self::Buffer,
        dst: &mut Self::Buffer,
        accumulate: bool,
    ) -> Result<()>;
    /// `dst[at] = src[0]`, on the device (a step's loss into a history read every few steps).
    fn copy_scalar(&self, src: &Self::Buffer, dst: &mut Self::Buffer, at: usize) -> Result<()>;
    /// SGD with momentum and weight decay on one parameter (PyTorch's update):
    /// g' = g + wd w; v = m v + g' (v = g' on the first step); w -= lr (nesterov ? g' + m v : v).
    fn sgd_update(
        &self,
        w: &mut Self::Buffer,
        g: &Self::Buffer,
        v: &mut Self::Buffer,
        lr: f64,
        momentum: f64,
        weight_decay: f64,
        nesterov: bool,
        first: bool,
    ) -> Result<()>;

    /// [`Backend::sgd_update`] on every parameter; a device may do it in one launch.
    fn sgd_update_all(
        &self,
        params: &mut [Param<Self>],
        lr: f64,
        momentum: f64,
        weight_decay: f64,
        nesterov: bool,
        first: bool,
    ) -> Result<()>
    where
        Self: Sized,
    {
        for p in params {
            self.sgd_update(
                &mut p.value,
                &p.grad,
                &mut p.momentum,
                lr,
                momentum,
                weight_decay,
                nesterov,
                first,
            )?;
        }
        Ok(())
    }

    /// For each query row (host, L2-normalised, d wide), its `k` most similar rows of `keys`
    /// as (similarity, index), best first (ties: lower index first). The CPU answers by default.
    fn nearest(
        &self,
        queries: &[f32],
        keys: &[f32],
        d: usize,
        k: usize,
    ) -> Result<Vec<Vec<(f32, usize)>>> {
        crate::eval::nearest(queries, keys, d, k, false)
    }

    /// Starts reading `buf` back without waiting for the device: the returned closure waits
    /// for the copy (and only it) and gives the values. The CPU reads at once.
    fn read_later(&self, buf: &Self::Buffer) -> Result<PendingRead> {
        let values = self.download_f64(buf)?;
        Ok(Box::new(move || Ok(values)))
    }

    /// Waits until the device has finished the queued work (timing; a no-op on the CPU).
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
}

/// The CPU backend, in f32 (training) or f64 (gradient checks). The loss op runs the fused
/// CPU loss, or the float64 reference when built with [`Cpu::with_reference_loss`].
#[derive(Debug, Default, Clone, Copy)]
pub struct Cpu<T> {
    reference_loss: bool,
    _elem: PhantomData<T>,
}

impl<T> Cpu<T> {
    pub fn new() -> Self {
        Cpu {
            reference_loss: false,
            _elem: PhantomData,
        }
    }
    /// The loss op runs `loss::reference` (float64, stores N x N; for checking).
    pub fn with_reference_loss() -> Self {
        Cpu {
            reference_loss: true,
            _elem: PhantomData,
        }
    }
}

/// BatchNorm's constants (PyTorch's defaults).
pub const BN_MOMENTUM: f64 = 0.1;
pub const BN_EPS: f64 = 1e-5;

impl<T: CpuFloat> Backend for Cpu<T> {
    type Buffer = Vec<T>;
    type BnSaved = BnSaved;
    const DTYPE: &'static str = T::NAME;

    fn zeros(&self, len: usize) -> Result<Vec<T>> {
        Ok(vec![T::ZERO; len])
    }
    fn len(&self, buf: &Vec<T>) -> usize {
        buf.len()
    }
    fn reset(&self, buf: &mut Vec<T>, len: usize) -> Result<()> {
        buf.clear();
        buf.resize(len, T::ZERO);
        Ok(())
    }
    fn ensure_len(&self, buf: &mut Vec<T>, len: usize) -> Result<()> {
        if buf.len() != len {
            buf.resize(len, T::ZERO);
        }
        Ok(())
    }
    fn upload(&self, host: &[f32], buf: &mut Vec<T>) -> Result<()> {
        buf.clear();
        buf.extend(host.iter().map(|&x| T::of(f64::from(x))));
        Ok(())
    }
    fn download(&self, buf: &Vec<T>) -> Result<Vec<f32>> {
        Ok(buf.iter().map(|&x| x.into() as f32).collect())
    }
    fn download_f64(&self, buf: &Vec<T>) -> Result<Vec<f64>> {
        Ok(buf.iter().map(|&x| x.into()).collect())
    }
    fn upload_f64(&self, host: &[f64], buf: &mut Vec<T>) -> Result<()> {
        buf.clear();
        buf.extend(host.iter().map(|&x| T::of(x)));
        Ok(())
    }
    fn conv2d_forward(
        &self,
        x: &Vec<T>,
        xs: Shape4,
        w: &Vec<T>,
        conv: &Conv,
        y: &mut Vec<T>,
    ) -> Result<Shape4> {
        cpu_ops::conv2d_forward(x, xs, w, conv, y)
    }
    fn conv2d_backward(
        &self,
        x: &Vec<T>,
        xs: Shape4,
        w: &Vec<T>,
        conv: &Conv,
        dy: &Vec<T>,
        dx: Option<&mut Vec<T>>,
        dx_accumulate: bool,
        dw: &mut Vec<T>,
    ) -> Result<()> {
        cpu_ops::conv2d_backward(
            x,
            xs,
            w,
            conv,
            dy,
            dx.map(|v| v.as_mut_slice()),
            dx_accumulate,
            dw,
        )
    }
    fn batchnorm_forward(
        &self,
        x: &Vec<T>,
        xs: Shape4,
        gamma: &Vec<T>,
        beta: &Vec<T>,
        running_mean: &mut Vec<T>,
        running_var: &mut Vec<T>,
        training: bool,
        saved: &mut BnSaved,
        y: &mut Vec<T>,
    ) -> Result<()> {
        if training {
            *saved = cpu_ops::batchnorm_train_forward(
                x,
                xs,
                gamma,
                beta,
                running_mean,
                running_var,
                BN_MOMENTUM,
                BN_EPS,
                y,
            );
        } else {
            cpu_ops::batchnorm_eval_forward(
                x,
                xs,
                gamma,
                beta,
                running_mean,
                running_var,
                BN_EPS,
                y,
            );
        }
        Ok(())
    }
    fn batchnorm_backward(
        &self,
        x: &Vec<T>,
        xs: Shape4,
        gamma: &Vec<T>,
        running_mean: &Vec<T>,
        running_var: &Vec<T>,
        training: bool,
        saved: &mut BnSaved,
        dy: &Vec<T>,
        dx: Option<&mut Vec<T>>,
        dx_accumulate: bool,
        dgamma: &mut Vec<T>,
        dbeta: &mut Vec<T>,
    ) -> Result<()> {
        let dx = dx.map(|v| v.as_mut_slice());
        if training {
            cpu_ops::batchnorm_train_backward(
                x,
                xs,
                gamma,
                saved,
                dy,
                dx,
                dx_accumulate,
                dgamma,
                dbeta,
            );
        } else {
            cpu_ops::batchnorm_eval_backward(
                x,
                xs,
                gamma,
                running_mean,
                running_var,
                BN_EPS,
                dy,
                dx,
                dx_accumulate,
                dgamma,
                dbeta,
            );
        }
        Ok(())
    }
    fn relu_forward(&self, x: &Vec<T>, y: &mut Vec<T>) -> Result<()> {
        cpu_ops::relu_forward(x, y);
        Ok(())
    }
    fn relu_backward(
        &self,
        y: &Vec<T>,
        dy: &Vec<T>,
        dx: &mut Vec<T>,
        accumulate: bool,
    ) -> Result<()> {
        cpu_ops::relu_backward(y, dy, dx, accumulate);
        Ok(())
    }
    fn copy_or_add(&self, x: &Vec<T>, out: &mut Vec<T>, accumulate: bool) -> Result<()> {
        cpu_ops::copy_or_add(x, out, accumulate);
        Ok(())
    }
    fn add_into(&self, x: &Vec<T>, out: &mut Vec<T>) -> Result<()> {
        cpu_ops::add_into(x, out);
        Ok(())
    }
    fn avgpool_forward(&self, x: &Vec<T>, xs: Shape4, k: usize, y: &mut Vec<T>) -> Result<Shape4> {
        Ok(cpu_ops::avgpool_forward(x, xs, k, y))
    }
    fn avgpool_backward(
        &self,
        xs: Shape4,
        k: usize,
        dy: &Vec<T>,
        dx: &mut Vec<T>,
        accumulate: bool,
    ) -> Result<()> {
        cpu_ops::avgpool_backward(xs, k, dy, dx, accumulate);
        Ok(())
    }
    fn linear_forward(
        &self,
        x: &Vec<T>,
        n: usize,
        w: &Vec<T>,
        b: &Vec<T>,
        out: usize,
        y: &mut Vec<T>,
    ) -> Result<()> {
        cpu_ops::linear_forward(x, n, w, b, out, y)
    }
    fn linear_backward(
        &self,
        x: &Vec<T>,
        n: usize,
        w: &Vec<T>,
        out: usize,
        dy: &Vec<T>,
        dx: Option<&mut Vec<T>>,
        dx_accumulate: bool,
        dw: &mut Vec<T>,
        db: &mut Vec<T>,
    ) -> Result<()> {
        cpu_ops::linear_backward(
            x,
            n,
            w,
            out,
            dy,
            dx.map(|v| v.as_mut_slice()),
            dx_accumulate,
            dw,
            db,
        )
    }
    fn instance_loss(
        &self,
        z: &Vec<T>,
        n: usize,
        d: usize,
        cfg: &LossConfig,
        loss: &mut Vec<T>,
        dz: &mut Vec<T>,
    ) -> Result<()> {
        let value = if self.reference_loss {
            let out = crate::loss::reference::instance_loss(z, n, d, cfg, true)?;
            if let Some(g) = out.grad_z {
                *dz = g.into_iter().map(T::of).collect();
            }
            out.loss
        } else {
            let out = cpu_loss::instance_loss(z, n, d, cfg, true)?;
            if let Some(g) = out.grad_z {
                *dz = g;
            }
            out.loss
        };
        *loss = vec![T::of(value)];
        Ok(())
    }
    fn axpy(&self, scale: f64, src: &Vec<T>, dst: &mut Vec<T>, accumulate: bool) -> Result<()> {
        let s = T::of(scale);
        for (d, &x) in dst.iter_mut().zip(src) {
            *d = if accumulate { *d + s * x } else { s * x };
        }
        Ok(())
    }
    fn copy_scalar(&self, src: &Vec<T>, dst: &mut Vec<T>, at: usize) -> Result<()> {
        match (src.first(), dst.get_mut(at)) {
            (Some(&v), Some(slot)) => {
                *slot = v;
                Ok(())
            }
            _ => Err(crate::error::Error::invalid(format!(
                "copy_scalar: element {at} of a buffer of {}",
                dst.len()
            ))),
        }
    }
    fn sgd_update(
        &self,
        w: &mut Vec<T>,
        g: &Vec<T>,
        v: &mut Vec<T>,
        lr: f64,
        momentum: f64,
        weight_decay: f64,
        nesterov: bool,
        first: bool,
    ) -> Result<()> {
        let (lr, m, wd) = (T::of(lr), T::of(momentum), T::of(weight_decay));
        for ((wi, &gi), vi) in w.iter_mut().zip(g).zip(v.iter_mut()) {
            let grad = gi + wd * *wi;
            *vi = if first { grad } else { m * *vi + grad };
            let step = if nesterov { grad + m * *vi } else { *vi };
            *wi = *wi - lr * step;
        }
        Ok(())
    }
}
