//! The CPU backend: buffers are `Vec<T>` (f32 for training, f64 for gradient checks). Every op
//! on it is a call into `ops::<op>::cpu` from the op's own folder; the choices those read
//! (the convolution's version, the loss version) are the backend's [`Options`].

use std::marker::PhantomData;

use super::{Backend, Options, PendingRead};
use crate::error::{Error, Result};
use crate::simd::CpuFloat;

/// The CPU backend, in f32 (training) or f64 (gradient checks).
#[derive(Debug, Default, Clone)]
pub struct Cpu<T> {
    options: Options,
    _elem: PhantomData<T>,
}

impl<T> Cpu<T> {
    pub fn new() -> Self {
        Cpu {
            options: Options::default(),
            _elem: PhantomData,
        }
    }
}

impl<T: CpuFloat> Backend for Cpu<T> {
    type Buffer = Vec<T>;
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
    fn read_later(&self, buf: &Vec<T>) -> Result<PendingRead> {
        let values = self.download_f64(buf)?;
        Ok(Box::new(move || Ok(values)))
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    fn options(&self) -> &Options {
        &self.options
    }
    fn options_mut(&mut self) -> &mut Options {
        &mut self.options
    }
}

/// `&Vec<T>` as the slice the CPU kernels take (for `Forward::map` and friends).
pub fn slice<T>(v: &Vec<T>) -> &[T] {
    v
}

/// `&mut Vec<T>` as a mutable slice.
pub fn slice_mut<T>(v: &mut Vec<T>) -> &mut [T] {
    v
}
