//! The instance loss on the GPU: every kernel version, one file each, behind one launcher.
//!
//! | version | file | kernels (kernels/) | N x N stored | launches (fwd + bwd) |
//! |---|---|---|---|---|
//! | `unfused` | [`unfused`] | normalize, matmul_v1, exp, row sums, row terms, grad matrix, matmul_v1 x1-2, normalize bwd, mean | S, E, G | 9-10 |
//! | `unfused-cublas` | [`unfused`] | as `unfused` with cuBLAS SGEMM for the three products | S, E, G | 9-10 |
//! | `fused-v1` | [`fused_v1`] | normalize, instance_loss_query_v1, (instance_loss_key_v1 both-sides), normalize bwd, mean | no | 4-5 |
//! | `fused-v2` | [`fused_v2`] | instance_loss_norms_v2, instance_loss_query_v2, (instance_loss_key_v2 both-sides) | no, O(N) extra | 2-3 |
//! | `fused-v3-tf32`, `fused-v3-bf16` | [`fused_v3`] | instance_loss_norms_v2, instance_loss_query_v3_*, (instance_loss_key_v3_* both-sides): v2's sweeps on tensor cores | no, O(N) extra | 2-3 |
//! | (a data-parallel rank's `fused-v2`) | [`ranks_v1`] | instance_loss_norms_v2 x2, instance_loss_query_ranks_v1, (instance_loss_key_ranks_v1, a reduce-scatter, instance_loss_finish_ranks_v1 both-sides), an all-gather, instance_loss_sum_ranks_v1: the rank's own query rows only | no, O(N) extra | 4-6 |
//!
//! [`foreign`] runs any of them but `unfused-cublas` on memory and a stream another runtime owns
//! (the PyTorch op's CUDA path).
//!
//! Each version lays out its scratch in a [`Scratch`] cut from one allocation, and queues its
//! launches with [`enqueue`], generic over the [`Queue`] (a GPU, or the tests' emulator). A
//! [`CudaLoss`] owns the allocation of one version for one shape, so repeated calls (training
//! steps, benchmark iterations) allocate nothing. A new version is a file here and an arm of
//! [`CudaLossVersion`] and its row in
//! the registry (`loss::versions`).

pub mod foreign;
pub mod fused_v1;
pub mod fused_v2;
pub mod fused_v3;
pub mod ranks_v1;
pub mod unfused;

use std::sync::Arc;

use bytemuck::{Pod, Zeroable};
use cudarc::driver::CudaSlice;

use super::{validate_input, GradSemantics, LossConfig};
use crate::cuda::{to_i32, Carve, DevPtr, DevPtrMut, Gpu, Queue};
use crate::error::{Error, Result};

/// Below this tau the kernels' fixed offset exp((s - 1) / tau) can underflow to 0 in float32
/// for a whole row (exp(-2 / tau) < FLT_MIN near tau = 0.023).
pub const MIN_TAU: f64 = 0.025;

/// The kernels' parameters, the same fields in the same order as `LossParams` in
/// kernels/loss_common.cuh.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct LossParams {
    pub n: i32,
    pub d: i32,
    pub inv_tau: f32,
    pub mu: f32,
    pub grad_scale: f32,
    pub with_grad: i32,
    pub both_sides: i32,
    /// Negatives kept per row (N - 2 for all).
    pub keep: i32,
    /// 1: the most similar are kept, 0: the least (with keep < N - 2).
    pub hard: i32,
    /// The factor on each row's loss term inside the mean over rows
    /// ([`Negatives::row_scale`](super::Negatives::row_scale)); the gradient's share is in
    /// `grad_scale`.
    pub row_scale: f32,
    /// The weight of the log(1 - Q) terms ([`Negatives::log_weight`](super::Negatives::log_weight)).
    pub nu: f32,
    /// nu / mu (exactly 1 but for the official hard/easy scale).
    pub nu_over_mu: f32,
}

impl LossParams {
    pub fn new(n: usize, d: usize, cfg: &LossConfig, with_grad: bool) -> Result<LossParams> {
        let row_scale = cfg.negatives.row_scale(n);
        let nu = cfg.negatives.log_weight(cfg.mu);
        Ok(LossParams {
            n: to_i32("N", n)?,
            d: to_i32("d", d)?,
            inv_tau: (1.0 / cfg.tau) as f32,
            mu: cfg.mu as f32,
            grad_scale: (row_scale / (n as f64 * cfg.tau)) as f32,
            with_grad: with_grad as i32,
            both_sides: (cfg.semantics == GradSemantics::BothSides) as i32,
            keep: to_i32("kept negatives", cfg.negatives.kept(n))?,
            hard: matches!(cfg.negatives, super::Negatives::Hard { .. }) as i32,
            row_scale: row_scale as f32,
            nu: nu as f32,
            nu_over_mu: (nu / cfg.mu) as f32,
        })
    }
}

pub use super::versions::{CudaLossVersion, Tolerance};

/// Whether `version` computes `cfg` (the registry's `selects`: a hard/easy selection runs in
/// the unfused chain, over the stored N x N exponentials, and in fused v3, over recomputed
/// tiles).
pub fn check_version_supports(cfg: &LossConfig, version: CudaLossVersion) -> Result<()> {
    version.version().supports(cfg)
}

/// Checks what the kernels need beyond the loss's own rules.
pub fn validate_for_kernels(cfg: &LossConfig) -> Result<()> {
    cfg.validate()?;
    if cfg.tau < MIN_TAU {
        return Err(Error::invalid(format!(
            "tau = {} is below {MIN_TAU}: the CUDA kernels' fixed offset exp((s - 1)/tau) can underflow in float32; use --device cpu",
            cfg.tau
        )));
    }
    Ok(())
}

/// Per-row scalars (O(N)), shared by every version.
pub struct RowScratch<'a> {
    pub row_loss: DevPtrMut<'a, f64>,
    pub inv_denom: DevPtrMut<'a, f32>,
    pub r: DevPtrMut<'a, f32>,
    pub dominant: DevPtrMut<'a, i32>,
    pub g_partner: DevPtrMut<'a, f32>,
    pub g_dominant: DevPtrMut<'a, f32>,
}

impl<'a> RowScratch<'a> {
    /// The scalars of `rows` rows, cut from `c`.
    pub fn carve(c: &mut Carve<'a>, rows: usize) -> Result<Self> {
        Ok(RowScratch {
            row_loss: c.take(rows)?,
            inv_denom: c.take(rows)?,
            r: c.take(rows)?,
            dominant: c.take(rows)?,
            g_partner: c.take(rows)?,
            g_dominant: c.take(rows)?,
        })
    }
}

/// The scratch of one version for one (N, d).
pub struct Scratch<'a> {
    pub norms: DevPtrMut<'a, f32>,
    pub inv_norms: DevPtrMut<'a, f32>,
    /// The normalized F and dL/dF before the normalization backward (unfused and v1 only).
    pub f: Option<DevPtrMut<'a, f32>>,
    pub df: Option<DevPtrMut<'a, f32>>,
    pub rows: RowScratch<'a>,
    pub unfused: Option<unfused::Scratch<'a>>,
    /// Each row's hard/easy selection as a threshold key and a tie cut (fused v3).
    pub selection: Option<fused_v3::Selection<'a>>,
    /// One partial sum per 64-row block and the last-block counter (fused v2, v3).
    pub block_loss: DevPtrMut<'a, f64>,
    pub counter: DevPtrMut<'a, u32>,
}

impl<'a> Scratch<'a> {
    /// The scratch of `version` for N x d inputs, cut from `c` (zeroed memory: v2's counter
    /// must start at 0, and every launch leaves it at 0 again).
    pub fn carve(c: &mut Carve<'a>, version: CudaLossVersion, n: usize, d: usize) -> Result<Self> {
        let nd = n
            .checked_mul(d)
            .ok_or_else(|| Error::invalid(format!("N = {n}, d = {d}: N d overflows")))?;
        let stores_f = matches!(
            version,
            CudaLossVersion::Unfused | CudaLossVersion::UnfusedCublas | CudaLossVersion::FusedV1
        );
        Ok(Scratch {
            norms: c.take(n)?,
            inv_norms: c.take(n)?,
            f: if stores_f { Some(c.take(nd)?) } else { None },
            df: if stores_f { Some(c.take(nd)?) } else { None },
            rows: RowScratch::carve(c, n)?,
            unfused: if version.stores_nxn() {
                Some(unfused::Scratch::carve(c, n)?)
            } else {
                None
            },
            selection: if version.selects_in_tiles() {
                Some(fused_v3::Selection {
                    threshold: c.take(n)?,
                    cut: c.take(n)?,
                })
            } else {
                None
            },
            block_loss: c.take(n.div_ceil(fused_v2::TILE))?,
            counter: c.take(1)?,
        })
    }

    /// Bytes of the scratch of `version` for N x d.
    pub fn bytes(version: CudaLossVersion, n: usize, d: usize) -> Result<usize> {
        let mut c = Carve::sizing();
        Scratch::carve(&mut c, version, n, d)?;
        Ok(c.used())
    }
}

/// Checks a shape the kernels take: an even N >= 4, d >= 1, both within `int`.
pub fn check_shape(n: usize, d: usize) -> Result<()> {
    if n < 4 || !n.is_multiple_of(2) || d == 0 {
        return Err(Error::invalid(format!(
            "N = {n}, d = {d}: expected an even N >= 4 and d >= 1"
        )));
    }
    to_i32("N", n)?;
    to_i32("d", d)?;
    if n.checked_mul(d).and_then(|x| x.checked_mul(4)).is_none() {
        return Err(Error::invalid(format!("N = {n}, d = {d} is too large")));
    }
    Ok(())
}

/// Queues the loss of `z` (N x d) with `version` on `q`: the loss into `loss` (one double)
/// and, when `dz` is given, dL/dz into it. Nothing is read back.
#[allow(clippy::too_many_arguments)] // the loss's own inputs and outputs
pub fn enqueue(
    q: &impl Queue,
    version: CudaLossVersion,
    z: DevPtr<'_, f32>,
    dz: Option<DevPtrMut<'_, f32>>,
    (n, d): (usize, usize),
    cfg: &LossConfig,
    s: &mut Scratch<'_>,
    loss: DevPtrMut<'_, f64>,
) -> Result<()> {
    validate_for_kernels(cfg)?;
    check_shape(n, d)?;
    if z.len() != n * d || dz.as_ref().is_some_and(|g| g.len() != n * d) {
        return Err(Error::invalid(format!(
            "z and dz must hold N x d = {n} x {d} floats"
        )));
    }
    check_version_supports(cfg, version)?;
    let p = LossParams::new(n, d, cfg, dz.is_some())?;
    match version {
        CudaLossVersion::Unfused => unfused::enqueue(q, false, z, dz, &p, s, loss),
        CudaLossVersion::UnfusedCublas => unfused::enqueue(q, true, z, dz, &p, s, loss),
        CudaLossVersion::FusedV1 => fused_v1::enqueue(q, z, dz, &p, s, loss),
        CudaLossVersion::FusedV2 => fused_v2::enqueue(q, z, dz, &p, s, loss),
        CudaLossVersion::FusedV3Tf32 | CudaLossVersion::FusedV3Bf16 => {
            let operands = match version {
                CudaLossVersion::FusedV3Bf16 => fused_v3::Operands::Bf16,
                _ => fused_v3::Operands::Tf32,
            };
            let selects = cfg.negatives != super::Negatives::All;
            fused_v3::enqueue(q, operands, selects, z, dz, &p, s, loss)
        }
    }
}

/// One version's scratch allocation for one (N, d) on a GPU, and the loss scalar.
pub struct CudaLoss {
    gpu: Arc<Gpu>,
    version: CudaLossVersion,
    n: usize,
    d: usize,
    arena: CudaSlice<u8>,
    loss: CudaSlice<f64>,
}

impl CudaLoss {
    /// Allocates the scratch of `version` for N x d inputs.
    pub fn new(gpu: Arc<Gpu>, version: CudaLossVersion, n: usize, d: usize) -> Result<Self> {
        check_shape(n, d)?;
        let bytes = Scratch::bytes(version, n, d)?;
        let stream = gpu.stream().clone();
        let arena = stream.alloc_zeros::<u8>(bytes.max(1))?;
        let loss = stream.alloc_zeros::<f64>(1)?;
        Ok(CudaLoss {
            gpu,
            version,
            n,
            d,
            arena,
            loss,
        })
    }

    pub fn version(&self) -> CudaLossVersion {
        self.version
    }

    /// Device memory this version uses beyond z and dz, in bytes.
    pub fn extra_bytes(&self) -> usize {
        self.arena.len() + 8
    }

    /// Kernel launches of one call (forward, plus backward when `with_grad`).
    pub fn launches(&self, cfg: &LossConfig, with_grad: bool) -> usize {
        self.version.launches(cfg, with_grad)
    }

    /// Queues the loss of `z` (N x d) and, when `dz` is given, dL/dz into it. Nothing is
    /// read back; call [`CudaLoss::loss`] for the scalar.
    pub fn enqueue(
        &mut self,
        z: &CudaSlice<f32>,
        dz: Option<&mut CudaSlice<f32>>,
        cfg: &LossConfig,
    ) -> Result<()> {
        let mut carve = Carve::from(DevPtrMut::of(&mut self.arena));
        let mut scratch = Scratch::carve(&mut carve, self.version, self.n, self.d)?;
        enqueue(
            &*self.gpu,
            self.version,
            DevPtr::of(z),
            dz.map(DevPtrMut::of),
            (self.n, self.d),
            cfg,
            &mut scratch,
            DevPtrMut::of(&mut self.loss),
        )
    }

    /// The device scalar (float64) the queued work writes the loss into.
    pub fn loss_buffer(&self) -> &CudaSlice<f64> {
        &self.loss
    }

    /// Waits for the queued work and returns the loss.
    pub fn loss(&self) -> Result<f64> {
        let mut host = [0.0f64];
        self.gpu.read(DevPtr::of(&self.loss), &mut host)?;
        Ok(host[0])
    }
}

/// The whole round trip for host data: upload, compute, download. For the CLI and tests.
pub fn instance_loss(
    gpu: Arc<Gpu>,
    version: CudaLossVersion,
    z: &[f32],
    n: usize,
    d: usize,
    cfg: &LossConfig,
    with_grad: bool,
) -> Result<(f64, Option<Vec<f32>>)> {
    validate_for_kernels(cfg)?;
    validate_input(z, n, d)?;
    let stream = gpu.stream().clone();
    let mut loss = CudaLoss::new(gpu, version, n, d)?;
    let z_dev = stream.clone_htod(z)?;
    if with_grad {
        let mut dz = stream.clone_htod(&vec![f32::NAN; n * d])?; // poisoned: unwritten shows
        loss.enqueue(&z_dev, Some(&mut dz), cfg)?;
        let value = loss.loss()?;
        Ok((value, Some(stream.clone_dtoh(&dz)?)))
    } else {
        loss.enqueue(&z_dev, None, cfg)?;
        Ok((loss.loss()?, None))
    }
}
