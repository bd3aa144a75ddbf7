//! The floor of a CUDA loss version on the card it runs on: the least time its work can take,
//! the largest of
//! - its matrix products at the card's peak rate for the arithmetic the version uses (float32
//!   FMAs for the SIMT versions and cuBLAS SGEMM, TF32 or bf16 tensor cores for fused v3),
//! - its exponentials, logarithms and reciprocals at the special-function units' rate,
//! - the bytes it must move through device memory at the memory bandwidth.
//!
//! Peaks come from the card itself (SM count, SM clock, memory clock and bus width, read from
//! the device's attributes) times the per-SM, per-clock rates of its architecture, dense
//! (the datasheets' figures divided by SMs and boost clock): sm_80 (A100) and sm_90
//! (H100/H200). Other architectures get no floor (a `-` in the table) rather than a guess.
//! Launch latency is not in the floor: at small N every version is launch-bound and its ratio
//! to this floor is large by construction.

use crate::cuda::{GemmPrecision, Gpu};
use crate::error::Result;
use crate::linalg::GemmShape;
use crate::loss::cuda::CudaLossVersion;

/// A card's peak rates, per second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CardPeaks {
    pub fp32_flops: f64,
    pub tf32_flops: f64,
    pub bf16_flops: f64,
    /// Special-function (MUFU: exp2, lg2, rcp) operations.
    pub sfu_ops: f64,
    pub bytes: f64,
}

impl CardPeaks {
    /// The peaks of a card from its attributes: compute capability, SMs, SM clock (kHz),
    /// memory clock (kHz, double data rate) and bus width (bits). `None` for an architecture
    /// without known per-SM rates.
    pub fn from_attributes(
        capability: (i32, i32),
        sms: i32,
        clock_khz: i32,
        memory_clock_khz: i32,
        bus_bits: i32,
    ) -> Option<CardPeaks> {
        // FLOP per SM per clock (dense): float32 FMA, TF32 and bf16 tensor cores; MUFU ops.
        let (fp32, tf32, bf16, sfu) = match capability {
            (8, 0) => (128.0, 1024.0, 2048.0, 16.0),
            (9, 0) => (256.0, 2048.0, 4096.0, 16.0),
            _ => return None,
        };
        let per_s = f64::from(sms) * f64::from(clock_khz) * 1e3;
        Some(CardPeaks {
            fp32_flops: fp32 * per_s,
            tf32_flops: tf32 * per_s,
            bf16_flops: bf16 * per_s,
            sfu_ops: sfu * per_s,
            bytes: 2.0 * f64::from(memory_clock_khz) * 1e3 * f64::from(bus_bits) / 8.0,
        })
    }

    /// The peaks of the card `gpu` runs on.
    pub fn of(gpu: &Gpu) -> Result<Option<CardPeaks>> {
        use cudarc::driver::sys::CUdevice_attribute as A;
        let ctx = gpu.context();
        Ok(CardPeaks::from_attributes(
            gpu.compute_capability()?,
            ctx.attribute(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
            ctx.attribute(A::CU_DEVICE_ATTRIBUTE_CLOCK_RATE)?,
            ctx.attribute(A::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE)?,
            ctx.attribute(A::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH)?,
        ))
    }
}

/// The work of one call of a loss version: matrix-product FLOPs, special-function operations
/// and device-memory bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossWork {
    pub product_flops: f64,
    pub sfu_ops: f64,
    pub bytes: f64,
}

/// The work of `version` on N x d as it runs (forward, or forward + backward with query-only
/// or both-sides gradients). One pass is one N x N x d product, 2 N^2 d FLOPs:
/// - unfused chains: S = F F^T, then G F and (both-sides) G^T F: 1, 2, 3 passes; N x N float32
///   matrices written and read (S written; S read, E written; E read by the row sums and the
///   row terms; E read, G written; G read by each product): 5, 8, 9 N^2 floats.
/// - fused versions recompute similarities in every sweep: D_a, then the log terms (forward,
///   2 passes), then the query rows' similarity and G F (4), then the keys' similarity and
///   G^T F (both-sides, 6); v2 and v3 redo the similarity once more per further 128 columns of
///   d in each gradient kernel. Memory: z read and dz written, O(N d).
///
/// Special functions per N x N element: the fused versions take exp in every sweep, log and a
/// reciprocal in the second, a reciprocal in each gradient sweep (4, 6, 8); the unfused chain
/// takes exp once, log and a reciprocal, and one reciprocal for G (3, 4, 4).
pub fn loss_work(
    version: CudaLossVersion,
    n: usize,
    d: usize,
    with_grad: bool,
    both_sides: bool,
) -> LossWork {
    let (n2, nd) = ((n * n) as f64, (n * d) as f64);
    let grad_kernels = usize::from(with_grad) * (1 + usize::from(both_sides));
    let (passes, sfu, nxn_floats) = match version {
        CudaLossVersion::Unfused | CudaLossVersion::UnfusedCublas => {
            let passes = 1 + grad_kernels;
            (
                passes,
                if with_grad { 4 } else { 3 },
                [5, 8, 9][grad_kernels],
            )
        }
        CudaLossVersion::FusedV1 => (2 + 2 * grad_kernels, 4 + 2 * grad_kernels, 0),
        CudaLossVersion::FusedV2 | CudaLossVersion::FusedV3Tf32 | CudaLossVersion::FusedV3Bf16 => {
            let repeats = d.div_ceil(128).saturating_sub(1);
            (2 + grad_kernels * (2 + repeats), 4 + 2 * grad_kernels, 0)
        }
    };
    let io_floats = nd
        * (1.0
            + if with_grad {
                1.0 + 2.0 * usize::from(both_sides) as f64
            } else {
                0.0
            });
    LossWork {
        product_flops: passes as f64 * 2.0 * n2 * d as f64,
        sfu_ops: sfu as f64 * n2,
        bytes: 4.0 * (nxn_floats as f64 * n2 + io_floats),
    }
}

/// The floor of `work` done by `version` on a card of `peaks`, in seconds.
pub fn floor_seconds(peaks: &CardPeaks, version: CudaLossVersion, work: &LossWork) -> f64 {
    let flops = match version {
        CudaLossVersion::FusedV3Tf32 => peaks.tf32_flops,
        CudaLossVersion::FusedV3Bf16 => peaks.bf16_flops,
        _ => peaks.fp32_flops,
    };
    (work.product_flops / flops)
        .max(work.sfu_ops / peaks.sfu_ops)
        .max(work.bytes / peaks.bytes)
}

/// The floor of a training step on a card of `peaks`: the encoder's products (`gemms`, every
/// convolution's forward, dW and dx as im2col GEMMs, as the CUDA backend runs them) at
/// the peak of the GEMMs' `precision`, plus the floor of the loss `version` on `rows` x `dim`
/// with query-only gradients. What the step does besides (im2col, batchnorm, elementwise
/// passes, SGD, launches) is what the ratio to it shows.
pub fn step_floor_seconds(
    peaks: &CardPeaks,
    precision: GemmPrecision,
    gemms: &[GemmShape],
    loss: CudaLossVersion,
    (rows, dim): (usize, usize),
) -> f64 {
    let rate = match precision {
        GemmPrecision::F32 => peaks.fp32_flops,
        GemmPrecision::Tf32 => peaks.tf32_flops,
        GemmPrecision::Bf16 => peaks.bf16_flops,
    };
    let flops: f64 = gemms.iter().map(GemmShape::flops).sum();
    let loss_work = loss_work(loss, rows, dim, true, false);
    flops / rate + floor_seconds(peaks, loss, &loss_work)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_h200s_attributes_give_its_datasheet_peaks() {
        // 132 SMs at 1.98 GHz; HBM3e 6144 bits at 3.125 GHz (DDR): 4.8 TB/s.
        let p = CardPeaks::from_attributes((9, 0), 132, 1_980_000, 3_125_000, 6144).unwrap();
        assert!((p.fp32_flops / 1e12 - 66.9).abs() < 0.1, "{p:?}");
        assert!((p.tf32_flops / 1e12 - 535.3).abs() < 0.1, "{p:?}");
        assert!((p.sfu_ops / 1e12 - 4.18).abs() < 0.01, "{p:?}");
        assert!((p.bytes / 1e12 - 4.8).abs() < 1e-9, "{p:?}");
        assert_eq!(CardPeaks::from_attributes((7, 5), 40, 1, 1, 1), None);
    }

    #[test]
    fn the_work_counts_follow_the_versions_passes() {
        let (n, d) = (4096, 128);
        let pass = 2.0 * (n * n * d) as f64;
        let v2 = |g, b| loss_work(CudaLossVersion::FusedV2, n, d, g, b).product_flops / pass;
        assert_eq!(
            (v2(false, false), v2(true, false), v2(true, true)),
            (2.0, 4.0, 6.0)
        );
        // d = 130: one more similarity sweep per gradient kernel.
        let v3 = loss_work(CudaLossVersion::FusedV3Tf32, n, 130, true, true);
        assert_eq!(v3.product_flops, 8.0 * 2.0 * (n * n * 130) as f64);
        let unfused = loss_work(CudaLossVersion::Unfused, n, d, true, false);
        assert_eq!(unfused.product_flops / pass, 2.0);
        assert!(unfused.bytes > 8.0 * 4.0 * (n * n) as f64);
        // On an H200 the fused TF32 floor at N = 16,384 (query-only) is its 4 passes at TF32
        // speed (0.51 ms), above its 6 N^2 special functions (0.39 ms).
        let p = CardPeaks::from_attributes((9, 0), 132, 1_980_000, 3_125_000, 6144).unwrap();
        let v = CudaLossVersion::FusedV3Tf32;
        let w = loss_work(v, 16384, 128, true, false);
        let floor = floor_seconds(&p, v, &w);
        assert!(
            (floor - w.product_flops / p.tf32_flops).abs() < 1e-12,
            "{floor}"
        );
        assert!(floor > 0.50e-3 && floor < 0.53e-3, "{floor}");
    }
}
