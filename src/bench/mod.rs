//! Timing of the loss implementations, shared by `invaspread bench-loss` and the criterion
//! benchmark: medians over repeated runs, useful FLOP counts, extra memory, markdown tables.
//!
//! Every row also has a floor and the ratio of the median to it: on the CPU ([`floor`]) the time
//! of its products and exponentials at the rates measured on the machine; on a GPU
//! ([`gpu_floor`]) its products, special functions and bytes at the card's peak rates.
//!
//! Useful FLOPs are the fewest an implementation must do, so that versions compare fairly:
//! forward = one N x N x d product (2 N^2 d), query-only backward one more (G F), both-sides
//! two more (G F and G^T F). Recomputation is not counted: a version that recomputes tiles
//! shows it as a lower achieved rate.

pub mod floor;
pub mod gathered;
pub mod gpu_floor;
pub mod peak;

use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::sys::CUevent_flags;

use serde::Serialize;

use crate::cuda::Gpu;
use crate::error::{Error, Result};
use crate::loss::check::Truth;
use crate::loss::cuda::CudaLoss;
use crate::loss::{cpu, reference, GradSemantics, LossConfig};
use crate::loss::{CpuLossVersion, CudaLossVersion};
use crate::names::Named;
use crate::rng::{random_matrix, rng};

/// One measured configuration.
#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    pub device: String,
    pub version: String,
    pub n: usize,
    pub d: usize,
    /// "fwd" or "fwd+bwd".
    pub pass: &'static str,
    pub median_s: f64,
    pub runs: usize,
    pub tflops: f64,
    pub extra_bytes: usize,
    /// Median of the baseline (reference on the CPU, unfused on the GPU) over this median.
    pub speedup: Option<f64>,
    /// The output's error against the float64 truth ([`Truth::error`]), checked before timing;
    /// `None` when the size was above the check's limit.
    pub check_error: Option<f64>,
    /// The least time on this machine ([`floor`], [`gpu_floor`]); `None` where none is known
    /// (a GPU architecture without known per-SM rates).
    pub floor_s: Option<f64>,
    /// The useful FLOP rate's share of the machine's measured FMA peak in the version's
    /// precision ([`peak`]); CPU rows only.
    pub peak_share: Option<f64>,
}

impl BenchRow {
    /// A row from a measured (median, runs); the rate counts useful FLOPs.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        device: String,
        version: &str,
        n: usize,
        d: usize,
        cfg: &LossConfig,
        with_grad: bool,
        timing: (f64, usize),
        extra_bytes: usize,
    ) -> Self {
        let (median_s, runs) = timing;
        BenchRow {
            device,
            version: version.into(),
            n,
            d,
            pass: pass_name(with_grad),
            median_s,
            runs,
            tflops: useful_flops(n, d, with_grad, cfg.semantics) / median_s / 1e12,
            extra_bytes,
            speedup: None,
            check_error: None,
            floor_s: None,
            peak_share: None,
        }
    }
}

/// The label of a measured pass: "fwd" or "fwd+bwd".
pub fn pass_name(with_grad: bool) -> &'static str {
    if with_grad {
        "fwd+bwd"
    } else {
        "fwd"
    }
}

/// Useful FLOPs of one call.
pub fn useful_flops(n: usize, d: usize, with_grad: bool, semantics: GradSemantics) -> f64 {
    let passes = match (with_grad, semantics) {
        (false, _) => 1.0,
        (true, GradSemantics::QueryOnly) => 2.0,
        (true, GradSemantics::BothSides) => 3.0,
    };
    passes * 2.0 * (n as f64) * (n as f64) * d as f64
}

/// Runs `f` until `min_runs` runs and `min_seconds` have passed (at most `max_runs`) and
/// returns the median of the per-run times `f` reports, and the count.
pub fn median_time(
    min_runs: usize,
    max_runs: usize,
    min_seconds: f64,
    mut f: impl FnMut() -> Result<f64>,
) -> Result<(f64, usize)> {
    f()?; // warm-up: caches, lazily loaded modules, page faults
    let start = Instant::now();
    let mut times = Vec::new();
    while times.len() < min_runs
        || (start.elapsed().as_secs_f64() < min_seconds && times.len() < max_runs)
    {
        times.push(f()?);
    }
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], times.len()))
}

/// One measured configuration: the seeded input, its size, the loss settings and, when the
/// size is within the check's limit, the float64 truth every version is checked against.
pub struct Case<'a> {
    pub z: &'a [f32],
    pub n: usize,
    pub d: usize,
    pub cfg: &'a LossConfig,
    pub with_grad: bool,
    pub truth: Option<&'a Truth>,
}

impl Case<'_> {
    /// Checks one output of `version` (before it is timed); the error, or `None` unchecked.
    fn check(
        &self,
        version: &str,
        loss: f64,
        grad_z: Option<&[f32]>,
        tolerance: f64,
    ) -> Result<Option<f64>> {
        let Some(truth) = self.truth else {
            return Ok(None);
        };
        let what = format!(
            "{version} N={} d={} {}",
            self.n,
            self.d,
            pass_name(self.with_grad)
        );
        truth.check(&what, loss, grad_z, tolerance).map(Some)
    }
}

/// The seeded input of a measured size: the same for every version, so one truth serves all.
pub fn bench_input(n: usize, d: usize) -> Vec<f32> {
    random_matrix(&mut rng(n as u64 * 31 + d as u64), n, d)
}

/// Device memory (GPU) or heap (CPU) beyond z and dz that the fused CPU path needs: the
/// normalized F, dF, one B x N buffer per thread and the row scalars.
pub fn cpu_fused_extra_bytes(
    n: usize,
    d: usize,
    elem: usize,
    threads: usize,
    with_grad: bool,
) -> usize {
    let rows = n * d * elem * if with_grad { 2 } else { 1 };
    rows + threads * cpu::ROW_BLOCK * n * elem + n * (8 + 3 * elem + 16)
}

/// The float64 reference keeps N x N coefficients (f64) when a gradient is asked for, plus a
/// row of similarities per thread.
pub fn cpu_reference_extra_bytes(n: usize, d: usize, threads: usize, with_grad: bool) -> usize {
    n * d * 8 * if with_grad { 3 } else { 2 }
        + threads * n * 8
        + if with_grad { n * n * 8 } else { 0 }
}

/// One run of a CPU version on `z` (its float64 copy `z64` for the float64 versions): the loss
/// and, with `with_grad`, dL/dz as float32 (what is checked).
pub fn run_cpu(
    version: CpuLossVersion,
    z: &[f32],
    z64: &[f64],
    n: usize,
    d: usize,
    cfg: &LossConfig,
    with_grad: bool,
) -> Result<(f64, Option<Vec<f32>>)> {
    let as_f32 = |g: Option<Vec<f64>>| g.map(|g| g.iter().map(|&x| x as f32).collect());
    Ok(match version {
        CpuLossVersion::Reference => {
            let out = reference::instance_loss(z, n, d, cfg, with_grad)?;
            (out.loss, as_f32(out.grad_z))
        }
        CpuLossVersion::FusedF64 => {
            let out = cpu::instance_loss(z64, n, d, cfg, with_grad)?;
            (out.loss, as_f32(out.grad_z))
        }
        CpuLossVersion::Fused => {
            let out = cpu::instance_loss(z, n, d, cfg, with_grad)?;
            (out.loss, out.grad_z)
        }
    })
}

/// Times one CPU version on the case's input, after checking its output against the truth;
/// `None` when the size is past what that version is meant for (the reference stores N x N).
pub fn bench_cpu(
    version: CpuLossVersion,
    case: &Case<'_>,
    min_seconds: f64,
    rates: &mut floor::Rates,
) -> Result<Option<BenchRow>> {
    let (z, n, d, cfg, with_grad) = (case.z, case.n, case.d, case.cfg, case.with_grad);
    if version == CpuLossVersion::Reference && n > 8192 {
        return Ok(None);
    }
    let z64: Vec<f64> = z.iter().map(|&x| f64::from(x)).collect();
    let threads = rayon::current_num_threads();
    let run = || run_cpu(version, z, &z64, n, d, cfg, with_grad);
    let (loss, grad) = run()?;
    let tolerance = version.version().tolerance(cfg.tau, d, false).either();
    let check_error = case.check(&version.name(), loss, grad.as_deref(), tolerance)?;
    let (median_s, runs) = median_time(3, 50, min_seconds, || {
        let t = Instant::now();
        run()?;
        Ok(t.elapsed().as_secs_f64())
    })?;
    let extra_bytes = match version {
        CpuLossVersion::Reference => cpu_reference_extra_bytes(n, d, threads, with_grad),
        CpuLossVersion::FusedF64 => cpu_fused_extra_bytes(n, d, 8, threads, with_grad),
        CpuLossVersion::Fused => cpu_fused_extra_bytes(n, d, 4, threads, with_grad),
    };
    let mut row = BenchRow::new(
        format!("cpu ({threads} threads)"),
        &version.name(),
        n,
        d,
        cfg,
        with_grad,
        (median_s, runs),
        extra_bytes,
    );
    row.check_error = check_error;
    let shape = (n, d, cpu::ROW_BLOCK);
    row.floor_s = Some(match version {
        CpuLossVersion::Fused => rates.loss_seconds::<f32>(shape, with_grad, cfg.semantics)?,
        CpuLossVersion::Reference | CpuLossVersion::FusedF64 => {
            rates.loss_seconds::<f64>(shape, with_grad, cfg.semantics)?
        }
    });
    let dtype = match version {
        CpuLossVersion::Fused => "float32",
        CpuLossVersion::Reference | CpuLossVersion::FusedF64 => "float64",
    };
    row.peak_share = Some(row.tflops * 1e12 / rates.fma_peak().of(dtype).flops);
    Ok(Some(row))
}

/// Times one GPU version with CUDA events (after a warm-up run whose output is checked against
/// the truth), on the case's input. `None` when the version cannot hold the size in device
/// memory.
pub fn bench_cuda(
    gpu: &Arc<Gpu>,
    version: CudaLossVersion,
    case: &Case<'_>,
    min_seconds: f64,
) -> Result<Option<BenchRow>> {
    let (n, d, cfg, with_grad) = (case.n, case.d, case.cfg, case.with_grad);
    let free = gpu.context().mem_get_info()?.0;
    let nxn = if version.stores_nxn() {
        3 * n * n * 4
    } else {
        0
    };
    if nxn + 4 * n * d * 4 > free {
        return Ok(None);
    }
    let stream = gpu.stream().clone();
    let z = stream.clone_htod(case.z)?;
    let mut dz = stream.alloc_zeros::<f32>(n * d)?;
    let mut loss = CudaLoss::new(gpu.clone(), version, n, d)?;
    loss.enqueue(&z, if with_grad { Some(&mut dz) } else { None }, cfg)?;
    let grad = if with_grad {
        Some(stream.clone_dtoh(&dz)?)
    } else {
        None
    };
    // bench_input is random: the version's bound on random inputs.
    let tolerance = version.tolerance(cfg.tau, d, false).either();
    let check_error = case.check(&version.name(), loss.loss()?, grad.as_deref(), tolerance)?;
    let (median_s, runs) = median_time(5, 200, min_seconds, || {
        let start = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        loss.enqueue(&z, if with_grad { Some(&mut dz) } else { None }, cfg)?;
        let stop = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        Ok(f64::from(start.elapsed_ms(&stop)?) / 1e3)
    })?;
    let mut row = BenchRow::new(
        gpu.name()?,
        &version.name(),
        n,
        d,
        cfg,
        with_grad,
        (median_s, runs),
        loss.extra_bytes(),
    );
    row.check_error = check_error;
    row.floor_s = gpu_floor::CardPeaks::of(gpu)?.map(|peaks| {
        let both = cfg.semantics == GradSemantics::BothSides;
        let work = gpu_floor::loss_work(version, n, d, with_grad, both);
        gpu_floor::floor_seconds(&peaks, version, &work)
    });
    Ok(Some(row))
}

/// Fills `speedup` of every row from the row of `baseline` with the same N, d and pass.
pub fn fill_speedups(rows: &mut [BenchRow], baseline: &str) {
    let base: Vec<(usize, usize, &'static str, f64)> = rows
        .iter()
        .filter(|r| r.version == baseline)
        .map(|r| (r.n, r.d, r.pass, r.median_s))
        .collect();
    for row in rows.iter_mut() {
        row.speedup = base
            .iter()
            .find(|b| (b.0, b.1, b.2) == (row.n, row.d, row.pass))
            .map(|b| b.3 / row.median_s);
    }
}

fn human_bytes(b: usize) -> String {
    let b = b as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else {
        format!("{:.1} kB", b / 1e3)
    }
}

pub fn human_time(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.3} s")
    } else if s >= 1e-3 {
        format!("{:.3} ms", s * 1e3)
    } else {
        format!("{:.1} us", s * 1e6)
    }
}

/// The markdown table `bench-loss` prints (the same columns as benches/torch_reference.py).
pub fn markdown_table(rows: &[BenchRow], baseline: &str) -> String {
    let mut out = markdown_header(baseline);
    for r in rows {
        out.push_str(&markdown_row(r));
    }
    out
}

/// The table's header lines (what `bench-loss` prints before its first measurement).
pub fn markdown_header(baseline: &str) -> String {
    format!(
        "| device | version | N | d | pass | median | runs | useful TFLOP/s | extra memory | vs {baseline} | error vs f64 | floor | vs floor | of FMA peak |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
}

/// One row of the table, its line break included.
pub fn markdown_row(r: &BenchRow) -> String {
    let speedup = r.speedup.map_or("-".to_string(), |s| format!("{s:.2}x"));
    let checked = r
        .check_error
        .map_or("unchecked".to_string(), |e| format!("{e:.1e}"));
    let (floor, ratio) = match r.floor_s {
        Some(f) => (human_time(f), format!("{:.2}x", r.median_s / f)),
        None => ("-".to_string(), "-".to_string()),
    };
    let share = r
        .peak_share
        .map_or("-".to_string(), |p| format!("{:.1}%", 100.0 * p));
    format!(
        "| {} | {} | {} | {} | {} | {} | {} | {:.3} | {} | {} | {} | {} | {} | {} |\n",
        r.device,
        r.version,
        r.n,
        r.d,
        r.pass,
        human_time(r.median_s),
        r.runs,
        r.tflops,
        human_bytes(r.extra_bytes),
        speedup,
        checked,
        floor,
        ratio,
        share
    )
}

/// The rows as a JSON array.
pub fn json(rows: &[BenchRow]) -> Result<String> {
    serde_json::to_string_pretty(rows).map_err(|e| Error::invalid(format!("bench JSON: {e}")))
}
