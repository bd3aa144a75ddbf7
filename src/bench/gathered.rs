//! `bench-loss --device cuda --ranks R`: the loss of a global batch over R data-parallel ranks
//! ([`DataParallel::gathered_loss`]: both views' rows all-gathered, the loss of the whole batch,
//! the rank's rows of dL/dz kept), checked on every rank against the float64 truth of the global
//! batch, then timed (the collectives included).

use std::sync::Arc;
use std::time::Instant;

use crate::cuda::Gpu;
use crate::dist::data_parallel::DataParallel;
use crate::error::{Error, Result};
use crate::loss::cuda::{CudaLoss, CudaLossVersion};
use crate::loss::gathered::RankLayout;
use crate::loss::{reference, LossConfig};

/// One version's result on one rank.
#[derive(Debug, Clone)]
pub struct RankRow {
    pub version: CudaLossVersion,
    /// The loss rows of the rank's own queries (`DataParallel::own_rows_loss`), not the whole
    /// gathered batch's.
    pub own_rows: bool,
    /// The global batch: n rows (n / 2 images) of d.
    pub n: usize,
    pub d: usize,
    pub ranks: usize,
    /// Median milliseconds of one call (gathers, loss, rows kept), waited for.
    pub median_ms: f64,
    pub calls: usize,
    /// The loss's relative error and the rank's dL/dz rows' scaled error, the worse one; None
    /// when unchecked.
    pub error: Option<f64>,
}

/// This rank's rows of a global batch in one device's layout (view A of every image, then view
/// B), split evenly over `ranks`: its images' view A rows, then their view B rows.
pub fn rank_rows(
    global: &[f32],
    n: usize,
    d: usize,
    rank: usize,
    ranks: usize,
) -> Result<Vec<f32>> {
    Ok(even_layout(n, ranks)?.take_rank_rows(global, d, rank))
}

/// n rows (n / 2 images) split evenly over `ranks`.
fn even_layout(n: usize, ranks: usize) -> Result<RankLayout> {
    if ranks == 0 || !n.is_multiple_of(2 * ranks) {
        return Err(Error::invalid(format!(
            "bench-loss --ranks {ranks}: N = {n} is not a multiple of 2 x ranks (each rank takes \
             both views of N / (2 x ranks) images)"
        )));
    }
    RankLayout::new(&vec![n / 2 / ranks; ranks])
}

/// The truth this rank checks against: the global loss, its rows of dL/dz, and the scale of
/// the whole batch's gradient (so that a rank's error means what one device's would).
pub struct RankTruth {
    loss: f64,
    /// This rank's rows of dL/dz, each multiplied by its row's norm ||z_a||.
    scaled_rows: Vec<f64>,
    /// The largest |dL/dz_ak| ||z_a|| over the global batch (loss::check's scale).
    scale: f64,
}

/// Each row of `rows` (d wide) multiplied by the norm of the same row of `z`.
fn scale_by_norms(rows: &[f64], z: &[f32], d: usize) -> Vec<f64> {
    rows.chunks_exact(d)
        .zip(z.chunks_exact(d))
        .flat_map(|(g, zr)| {
            let norm = zr.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
            g.iter().map(move |&v| v * norm)
        })
        .collect()
}

impl RankTruth {
    pub fn of(
        global: &[f32],
        n: usize,
        d: usize,
        cfg: &LossConfig,
        rank: usize,
        ranks: usize,
    ) -> Result<Self> {
        let out = reference::instance_loss(global, n, d, cfg, true)?;
        let grad = out
            .grad_z
            .ok_or_else(|| Error::invalid("the reference gave no gradient"))?;
        let scaled = scale_by_norms(&grad, global, d);
        let scale = scaled.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        Ok(RankTruth {
            loss: out.loss,
            scaled_rows: even_layout(n, ranks)?.take_rank_rows(&scaled, d, rank),
            scale,
        })
    }

    /// The worse of the loss's relative error and this rank's dL/dz rows' error (scaled by
    /// row norms, relative to the global batch's largest such entry); NaN counts as infinite.
    pub fn error(&self, loss: f64, rows: &[f32], z_rows: &[f32], d: usize) -> f64 {
        let loss_err = (loss - self.loss).abs() / self.loss.abs().max(f64::MIN_POSITIVE);
        let got: Vec<f64> = rows.iter().map(|&g| f64::from(g)).collect();
        let got = scale_by_norms(&got, z_rows, d);
        let worst = got
            .iter()
            .zip(&self.scaled_rows)
            .fold(0.0f64, |m, (g, w)| m.max((g - w).abs()));
        let err = loss_err.max(worst / self.scale.max(f64::MIN_POSITIVE));
        if err.is_nan() {
            f64::INFINITY
        } else {
            err
        }
    }
}

/// Checks (against `truth`, when given) and times `version` on this rank of `dp`, the global
/// batch `global` (n x d) split evenly; `own_rows`: the loss rows of the rank's own queries
/// (fused-v2 only), else the whole gathered batch's loss on every rank.
#[allow(clippy::too_many_arguments)] // the case: device, group, version, batch, config, truth, time
pub fn bench_rank(
    gpu: &Arc<Gpu>,
    dp: &DataParallel,
    (version, own_rows): (CudaLossVersion, bool),
    global: &[f32],
    (n, d): (usize, usize),
    cfg: &LossConfig,
    truth: Option<&RankTruth>,
    min_seconds: f64,
) -> Result<RankRow> {
    let ranks = dp.world_size();
    let local_rows = rank_rows(global, n, d, dp.rank(), ranks)?;
    let stream = gpu.stream();
    let z = stream.clone_htod(&local_rows)?;
    let mut dz = stream.alloc_zeros::<f32>(local_rows.len())?;
    if own_rows && version != CudaLossVersion::FusedV2 {
        return Err(Error::invalid(format!(
            "the loss rows of a rank's own queries exist for fused-v2, not {version:?}"
        )));
    }
    let mut loss = CudaLoss::new(gpu.clone(), version, n, d)?;
    let mut own_loss = stream.alloc_zeros::<f32>(1)?;
    let shape = (local_rows.len() / d, d);
    let mut call = |dz: &mut cudarc::driver::CudaSlice<f32>| -> Result<f64> {
        if own_rows {
            dp.own_rows_loss(gpu, &z, shape, cfg, &mut own_loss, dz)?;
            Ok(f64::from(stream.clone_dtoh(&own_loss)?[0]))
        } else {
            dp.gathered_loss(gpu, &z, shape, dz, |zg, _, dzg| {
                loss.enqueue(zg, Some(dzg), cfg)
            })?;
            loss.loss()
        }
    };
    let value = call(&mut dz)?;
    let error = match truth {
        None => None,
        Some(t) => Some(t.error(value, &stream.clone_dtoh(&dz)?, &local_rows, d)),
    };
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < 3 || start.elapsed().as_secs_f64() < min_seconds {
        let t = Instant::now();
        call(&mut dz)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(RankRow {
        version,
        own_rows,
        n,
        d,
        ranks,
        median_ms: times[times.len() / 2],
        calls: times.len(),
        error,
    })
}
