//! The loss on another runtime's memory and stream: the CUDA path of the PyTorch op
//! (`python/`). PyTorch allocates z, dL/dz, the loss scalar and the version's scratch (zeroed,
//! `torch.zeros`), and hands in their device addresses and its current stream; the launches of
//! [`enqueue`](super::enqueue) go to that stream, so they are ordered with the rest of the
//! training step as any PyTorch op is, and nothing is copied to the host or waited for.
//!
//! Every version runs here but `unfused-cublas` (the crate's cuBLAS handle is bound to its own
//! stream). [`default_version`] is the op's choice when the caller names none.

use super::{check_shape, enqueue, validate_for_kernels, CudaLossVersion, Scratch};
use crate::cuda::foreign::{foreign_ptr, foreign_ptr_mut};
use crate::cuda::{Carve, ForeignStream, Gpu};
use crate::error::{Error, Result};
use crate::loss::{LossConfig, Negatives};

/// The raw device addresses of one call's buffers.
#[derive(Debug, Clone, Copy)]
pub struct ForeignBuffers {
    /// N x d float32, row-major.
    pub z: u64,
    /// N x d float32 for dL/dz, or none for the loss alone.
    pub dz: Option<u64>,
    /// At least [`scratch_bytes`] bytes, zero before the first call with it (every call leaves
    /// the counter it holds at zero again).
    pub scratch: u64,
    pub scratch_len: usize,
    /// One float64: the loss.
    pub loss: u64,
}

/// The scratch bytes of `version` for N x d on the device this process sees.
pub fn scratch_bytes(version: CudaLossVersion, n: usize, d: usize) -> Result<usize> {
    check_shape(n, d)?;
    Scratch::bytes(version, n, d)
}

/// PyTorch's `torch.get_float32_matmul_precision()`: how much a float32 product may round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatmulPrecision {
    /// float32 products (PyTorch's default).
    Highest,
    /// TF32 allowed.
    High,
    /// bf16 allowed.
    Medium,
}

impl MatmulPrecision {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "highest" => Ok(MatmulPrecision::Highest),
            "high" => Ok(MatmulPrecision::High),
            "medium" => Ok(MatmulPrecision::Medium),
            other => Err(Error::invalid(format!(
                "float32 matmul precision {other:?}: expected highest, high or medium"
            ))),
        }
    }
}

/// The version the op runs when none is named: the fastest whose rounding the caller's
/// float32 matmul precision allows and that computes `cfg`.
///
/// - `highest` (PyTorch's default: no TF32 in products): `fused-v2` with all negatives; with
///   hard/easy negatives `unfused` (own float32 matmul; stores N x N), the only float32 version
///   that selects.
/// - `high` on compute capability 8.0 or later (tensor cores with TF32): `fused-v3-tf32`;
///   `medium` there: `fused-v3-bf16`. Below 8.0, as `highest`.
pub fn default_version(
    cfg: &LossConfig,
    capability: (i32, i32),
    precision: MatmulPrecision,
) -> CudaLossVersion {
    let tensor_cores = capability.0 >= 8;
    match precision {
        MatmulPrecision::High if tensor_cores => CudaLossVersion::FusedV3Tf32,
        MatmulPrecision::Medium if tensor_cores => CudaLossVersion::FusedV3Bf16,
        _ if cfg.negatives == Negatives::All => CudaLossVersion::FusedV2,
        _ => CudaLossVersion::Unfused,
    }
}

/// Queues the loss of `bufs.z` (N x d) with `version` on the stream `stream` of `gpu`'s
/// context: the loss into `bufs.loss`, dL/dz into `bufs.dz` when given. Returns once queued.
///
/// # Safety
/// `stream` is 0 or a live stream of `gpu`'s (primary) context. Each address of `bufs` is
/// live device memory of that context of the size given above, stays live until the queued work
/// has run (PyTorch's caching allocator keeps memory freed on a stream for that stream's later
/// work), and dz, scratch and loss are written by nothing else meanwhile.
pub unsafe fn enqueue_on_stream(
    gpu: &Gpu,
    stream: u64,
    version: CudaLossVersion,
    (n, d): (usize, usize),
    cfg: &LossConfig,
    bufs: ForeignBuffers,
) -> Result<()> {
    validate_for_kernels(cfg)?;
    check_shape(n, d)?;
    if version == CudaLossVersion::UnfusedCublas {
        return Err(Error::invalid(
            "version unfused-cublas runs on the crate's own stream only (its cuBLAS handle); \
             on a stream handed in choose another CUDA version",
        ));
    }
    version.version().supports(cfg)?;
    let needed = Scratch::bytes(version, n, d)?;
    if bufs.scratch_len < needed {
        return Err(Error::invalid(format!(
            "scratch of {} bytes for {} at N = {n}, d = {d}: expected at least {needed}",
            bufs.scratch_len,
            version.version()
        )));
    }
    let nd = n * d;
    // SAFETY: the caller's guarantees; each address is checked to be device memory.
    let (z, dz, arena, loss) = unsafe {
        (
            foreign_ptr::<f32>(gpu, "z", bufs.z, nd)?,
            match bufs.dz {
                Some(addr) => Some(foreign_ptr_mut::<f32>(gpu, "dz", addr, nd)?),
                None => None,
            },
            foreign_ptr_mut::<u8>(gpu, "scratch", bufs.scratch, bufs.scratch_len)?,
            foreign_ptr_mut::<f64>(gpu, "loss", bufs.loss, 1)?,
        )
    };
    let mut carve = Carve::from(arena);
    let mut scratch = Scratch::carve(&mut carve, version, n, d)?;
    // SAFETY: `new`'s contract is the caller's.
    let queue = unsafe { ForeignStream::new(gpu, stream) };
    enqueue(&queue, version, z, dz, (n, d), cfg, &mut scratch, loss)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_follows_the_matmul_precision_and_the_negatives() {
        let all = LossConfig::default();
        let hard = LossConfig {
            negatives: Negatives::hard(0.5),
            ..LossConfig::default()
        };
        use CudaLossVersion as V;
        use MatmulPrecision as P;
        let cases = [
            (&all, (9, 0), P::Highest, V::FusedV2),
            (&hard, (9, 0), P::Highest, V::Unfused),
            (&all, (9, 0), P::High, V::FusedV3Tf32),
            (&hard, (8, 0), P::Medium, V::FusedV3Bf16),
            (&all, (7, 5), P::High, V::FusedV2),
            (&hard, (7, 5), P::Medium, V::Unfused),
        ];
        for (cfg, capability, precision, want) in cases {
            let got = default_version(cfg, capability, precision);
            assert_eq!(got, want, "{capability:?} {precision:?}");
            got.version().supports(cfg).unwrap();
        }
        assert!(MatmulPrecision::parse("low").is_err());
    }
}
