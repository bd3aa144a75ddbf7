//! The CPU backend: buffers are `Vec<T>` (f32 for training, f64 for gradient checks) and every
//! op is a call into `ops::<op>::cpu`. The loss op runs the CPU loss version chosen with
//! [`Cpu::with_loss`] (the fused loss in the backend's precision by default); the convolution runs the version
//! chosen with [`Cpu::with_conv`] (Winograd by default).

use std::marker::PhantomData;

use super::backend::{Backend, In, Out, PendingRead};
use crate::error::{Error, Result};
use crate::loss::{cpu as cpu_loss, reference, CpuLossVersion, LossConfig};
use crate::ops::batchnorm::cpu::BnSaved;
use crate::ops::sgd::{SgdStep, Tensors};
use crate::ops::topk::Neighbours;
use crate::ops::{
    batchnorm, conv2d, elementwise, linear, normalize_rows, pool, sgd, topk, Grad, Shape4,
};
use crate::simd::CpuFloat;

/// The CPU backend, in f32 (training) or f64 (gradient checks).
#[derive(Debug, Default, Clone, Copy)]
pub struct Cpu<T> {
    loss: CpuLossVersion,
    conv: conv2d::CpuVersion,
    _elem: PhantomData<T>,
}

impl<T> Cpu<T> {
    pub fn new() -> Self {
        Cpu {
            loss: CpuLossVersion::Fused,
            conv: conv2d::CpuVersion::default(),
            _elem: PhantomData,
        }
    }
    /// The loss op runs `version`: `reference` (float64, stores N x N; for checking), `fused`
    /// (in the backend's precision) or `fused-f64`.
    pub fn with_loss(self, version: CpuLossVersion) -> Self {
        Cpu {
            loss: version,
            ..self
        }
    }
    /// The convolution runs `version`.
    pub fn with_conv(self, version: conv2d::CpuVersion) -> Self {
        Cpu {
            conv: version,
            ..self
        }
    }
}

fn slice<T>(v: &Vec<T>) -> &[T] {
    v
}
fn slice_mut<T>(v: &mut Vec<T>) -> &mut [T] {
    v
}
fn grad<T>(g: Grad<&mut Vec<T>>) -> Grad<&mut [T]> {
    g.map(slice_mut)
}

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

    fn conv2d_forward(&self, a: conv2d::Forward<In<'_, Self>, Out<'_, Self>>) -> Result<()> {
        conv2d::cpu::forward_by(self.conv, a.map(slice, slice_mut))
    }
    fn conv2d_backward(&self, a: conv2d::Backward<In<'_, Self>, Out<'_, Self>>) -> Result<()> {
        conv2d::cpu::backward_by(self.conv, a.map(slice, slice_mut))
    }
    fn batchnorm_forward(
        &self,
        a: batchnorm::Forward<In<'_, Self>, Out<'_, Self>>,
        saved: &mut BnSaved,
    ) -> Result<()> {
        batchnorm::cpu::forward(a.map(slice, slice_mut), saved);
        Ok(())
    }
    fn batchnorm_backward(
        &self,
        a: batchnorm::Backward<In<'_, Self>, Out<'_, Self>>,
        saved: &mut BnSaved,
    ) -> Result<()> {
        batchnorm::cpu::backward(a.map(slice, slice_mut), saved);
        Ok(())
    }
    fn fuses_batchnorm_relu(&self) -> bool {
        true
    }
    fn relu_forward(&self, x: &Vec<T>, y: &mut Vec<T>) -> Result<()> {
        elementwise::cpu::relu_forward(x, y);
        Ok(())
    }
    fn relu_backward(&self, y: &Vec<T>, dy: &Vec<T>, dx: Grad<&mut Vec<T>>) -> Result<()> {
        elementwise::cpu::relu_backward(y, dy, grad(dx));
        Ok(())
    }
    fn copy_or_add(&self, x: &Vec<T>, out: Grad<&mut Vec<T>>) -> Result<()> {
        elementwise::cpu::copy_or_add(x, grad(out));
        Ok(())
    }
    fn axpy(&self, scale: f64, x: &Vec<T>, out: Grad<&mut Vec<T>>) -> Result<()> {
        elementwise::cpu::axpy(scale, x, grad(out));
        Ok(())
    }
    fn avgpool_forward(&self, x: &Vec<T>, xs: Shape4, k: usize, y: &mut Vec<T>) -> Result<()> {
        pool::cpu::forward(x, xs, k, y);
        Ok(())
    }
    fn avgpool_backward(
        &self,
        xs: Shape4,
        k: usize,
        dy: &Vec<T>,
        dx: Grad<&mut Vec<T>>,
    ) -> Result<()> {
        pool::cpu::backward(xs, k, dy, grad(dx));
        Ok(())
    }
    fn linear_forward(&self, a: linear::Forward<In<'_, Self>, Out<'_, Self>>) -> Result<()> {
        linear::cpu::forward(a.map(slice, slice_mut))
    }
    fn linear_backward(&self, a: linear::Backward<In<'_, Self>, Out<'_, Self>>) -> Result<()> {
        linear::cpu::backward(a.map(slice, slice_mut))
    }
    fn instance_loss(
        &self,
        z: &Vec<T>,
        (n, d): (usize, usize),
        cfg: &LossConfig,
        loss: &mut Vec<T>,
        dz: &mut Vec<T>,
    ) -> Result<()> {
        let value = match self.loss {
            CpuLossVersion::Reference => {
                let out = reference::instance_loss(z, n, d, cfg, true)?;
                if let Some(g) = out.grad_z {
                    *dz = g.into_iter().map(T::of).collect();
                }
                out.loss
            }
            CpuLossVersion::Fused => {
                let out = cpu_loss::instance_loss(z, n, d, cfg, true)?;
                if let Some(g) = out.grad_z {
                    *dz = g;
                }
                out.loss
            }
            CpuLossVersion::FusedF64 => {
                let z64: Vec<f64> = z.iter().map(|&x| x.into()).collect();
                let out = cpu_loss::instance_loss(&z64, n, d, cfg, true)?;
                if let Some(g) = out.grad_z {
                    *dz = g.into_iter().map(T::of).collect();
                }
                out.loss
            }
        };
        *loss = vec![T::of(value)];
        Ok(())
    }
    fn normalize_rows(&self, x: &Vec<T>, (n, d): (usize, usize), y: &mut Vec<T>) -> Result<()> {
        *y = normalize_rows::cpu::forward(x, n, d)?.0;
        Ok(())
    }
    fn copy_into(&self, src: &Vec<T>, dst: &mut Vec<T>, at: usize) -> Result<()> {
        match dst.get_mut(at..at + src.len()) {
            Some(slot) => {
                slot.copy_from_slice(src);
                Ok(())
            }
            None => Err(Error::invalid(format!(
                "copy_into: {} elements at {at} of a buffer of {}",
                src.len(),
                dst.len()
            ))),
        }
    }
    fn sgd_update_all(&self, params: &mut [Tensors<'_, Vec<T>>], step: &SgdStep) -> Result<()> {
        for p in params {
            sgd::cpu::update(p.w, p.g, p.v, step);
        }
        Ok(())
    }
    fn nearest(&self, queries: &Vec<T>, keys: &Vec<T>, d: usize, k: usize) -> Result<Neighbours> {
        let (q, b) = (self.download(queries)?, self.download(keys)?);
        topk::cpu::nearest(&q, &b, d, k, false)
    }
    fn read_later(&self, buf: &Vec<T>) -> Result<PendingRead> {
        let values = self.download_f64(buf)?;
        Ok(Box::new(move || Ok(values)))
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
}
