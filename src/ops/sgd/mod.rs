//! SGD with momentum and weight decay, PyTorch's update rule (dampening 0):
//! g' = g + wd w; v = g' on the first step, else v = m v + g'; w -= lr (nesterov ? g' + m v : v).
//! The CPU updates one tensor at a time; CUDA updates every parameter in one launch from a
//! table of device pointers (a multi-tensor update, as PyTorch's foreach optimisers).

pub mod cpu;
pub mod cuda;
pub mod device;

pub use device::SgdDevice;

use crate::cuda::to_i32;
use crate::error::Result;
use bytemuck::{Pod, Zeroable};

/// One update's hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdStep {
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
    /// The first step: the momentum buffer starts as the gradient.
    pub first: bool,
}

/// One parameter's buffers for an update: weights, gradient, momentum (the same length).
pub struct Tensors<'a, B> {
    pub w: &'a mut B,
    pub g: &'a B,
    pub v: &'a mut B,
}

/// Elements per block of the multi-tensor kernel (SGD_CHUNK in kernels/sgd.cu).
pub const SGD_CHUNK: usize = 1024;

/// One parameter in the table of `sgd_multi_tensor_v1` (the same layout as `SgdTensor` in
/// kernels/sgd.cu): device addresses of the weights, gradient and momentum, the length, and
/// the first of the tensor's `len.div_ceil(SGD_CHUNK)` blocks.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Pod, Zeroable)]
pub struct SgdTensor {
    pub w: u64,
    pub g: u64,
    pub v: u64,
    pub len: i64,
    pub first_block: i64,
}

// SAFETY: #[repr(C)] plain old data (device addresses as integers), uploaded as the table.
unsafe impl cudarc::driver::DeviceRepr for SgdTensor {}

/// The update's hyper-parameters, passed by value to `sgd_multi_tensor_v1` (the same fields
/// in the same order as `SgdParams` in kernels/sgd.cu).
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct SgdParams {
    pub lr: f32,
    pub momentum: f32,
    pub weight_decay: f32,
    pub nesterov: i32,
    pub first: i32,
    pub tensors: i32,
}

impl SgdParams {
    /// `step` over `tensors` table entries.
    pub fn new(step: &SgdStep, tensors: usize) -> Result<SgdParams> {
        Ok(SgdParams {
            lr: step.lr as f32,
            momentum: step.momentum as f32,
            weight_decay: step.weight_decay as f32,
            nesterov: step.nesterov as i32,
            first: step.first as i32,
            tensors: to_i32("parameter tensors", tensors)?,
        })
    }
}

/// The CUDA kernel versions of the update.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Version {
    /// Every tensor in one launch, 1024 elements a block, binary search for the tensor.
    #[default]
    V1,
}
crate::serde_by_name!(Version);
