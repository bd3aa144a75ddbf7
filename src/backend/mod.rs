//! Where a graph's buffers live: the [`Backend`] trait (buffers of one device, copies between
//! them and the host), the CPU backend ([`Cpu`]) and the CUDA backend ([`CudaBackend`]).
//!
//! A backend knows no op and no rank. Each op's folder (`ops::<op>::node`, `loss::node`)
//! implements its own device trait (`Conv2dDevice`, ...) for both backends, reading what it
//! needs from the backend: an [`Options`] value chosen at construction (a kernel version, the
//! CPU convolution's version, the loss version) and, on CUDA, a [`Slots`] entry kept between
//! calls (a workspace, a pointer table). So adding an op adds nothing here. Collectives across
//! devices are a layer above (`dist`).

pub mod cpu;
pub mod cuda;

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub use self::cpu::Cpu;
pub use self::cuda::CudaBackend;
pub use crate::cuda::staging::PendingRead;
use crate::error::{Error, Result};

/// A backend's input handle to one of its buffers.
pub type In<'a, B> = &'a <B as Backend>::Buffer;
/// A backend's output handle to one of its buffers.
pub type Out<'a, B> = &'a mut <B as Backend>::Buffer;

/// Storage of one device.
pub trait Backend: Send + Sync + Sized + 'static {
    /// A buffer of elements on the device.
    type Buffer: Send + Sync + 'static;
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
    /// `dst[at..at + len(src)] = src`, on the device (a step's loss into a history read every
    /// few steps, a batch of embeddings into the bank).
    fn copy_into(&self, src: In<'_, Self>, dst: Out<'_, Self>, at: usize) -> Result<()>;
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
    /// Starts reading `buf` back without waiting for the device: the returned closure waits
    /// for the copy (and only it) and gives the values.
    fn read_later(&self, buf: In<'_, Self>) -> Result<PendingRead>;
    /// Waits until the device has finished the queued work (timing; a no-op on the CPU).
    fn synchronize(&self) -> Result<()>;

    /// The choices the backend was built with.
    fn options(&self) -> &Options;
    fn options_mut(&mut self) -> &mut Options;
    /// The value of type `T` this backend was built with ([`Backend::with_option`]), or `T`'s
    /// default (every op's default is its newest version).
    fn option<T: Copy + Default + Send + Sync + 'static>(&self) -> T {
        self.options().get()
    }
    /// The same backend with `value` as its choice of type `T` (`conv2d::Version::V1`,
    /// `CudaLossVersion::FusedV3Tf32`, ...).
    fn with_option<T: Copy + Send + Sync + 'static>(mut self, value: T) -> Self {
        self.options_mut().set(value);
        self
    }
}

/// A backend's choices, one value per type, fixed when it is built.
#[derive(Clone, Default)]
pub struct Options(Arc<HashMap<TypeId, Arc<dyn Any + Send + Sync>>>);

impl Options {
    /// The value of type `T`, or its default.
    pub fn get<T: Copy + Default + 'static>(&self) -> T {
        self.0
            .get(&TypeId::of::<T>())
            .and_then(|v| v.downcast_ref::<T>())
            .copied()
            .unwrap_or_default()
    }

    pub fn set<T: Copy + Send + Sync + 'static>(&mut self, value: T) {
        Arc::make_mut(&mut self.0).insert(TypeId::of::<T>(), Arc::new(value));
    }
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Options({} set)", self.0.len())
    }
}

/// State a backend keeps between calls for the ops that need some, one value per type (the
/// convolution's workspace, the SGD pointer table, each loss shape's scratch), made on first use.
#[derive(Default)]
pub struct Slots(Mutex<HashMap<TypeId, Slot>>);

/// One type's state, locked apart from the others'.
type Slot = Arc<Mutex<Box<dyn Any + Send>>>;

impl Slots {
    /// Runs `f` on the state of type `S`, made by `init` on first use. Different types are
    /// independent (an op may use another's slot inside its own); the same type is one lock.
    pub fn with<S: Send + 'static, R>(
        &self,
        init: impl FnOnce() -> Result<S>,
        f: impl FnOnce(&mut S) -> Result<R>,
    ) -> Result<R> {
        let poisoned = || Error::invalid("internal: a backend's state lock was poisoned");
        let slot = {
            let mut map = self.0.lock().map_err(|_| poisoned())?;
            match map.get(&TypeId::of::<S>()) {
                Some(slot) => slot.clone(),
                None => {
                    let fresh: Box<dyn Any + Send> = Box::new(init()?);
                    let slot = Arc::new(Mutex::new(fresh));
                    map.insert(TypeId::of::<S>(), slot.clone());
                    slot
                }
            }
        };
        let mut state = slot.lock().map_err(|_| poisoned())?;
        let state = state
            .downcast_mut::<S>()
            .ok_or_else(|| Error::invalid("internal: a backend state of another type"))?;
        f(state)
    }
}

impl std::fmt::Debug for Slots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Slots")
    }
}
