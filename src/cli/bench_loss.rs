//! `invaspread bench-loss`: a markdown table of every loss implementation on one device.

use std::sync::Arc;

use invaspread::bench::peak::FmaPeak;
use invaspread::bench::{self, BenchRow, Case};
use invaspread::cuda::Gpu;
use invaspread::loss::check::Truth;
use invaspread::loss::{CpuLossVersion, CudaLossVersion, GradSemantics, LossConfig, LossVersion};
use invaspread::names::Named;

use super::Device;

#[derive(Debug, clap::Args)]
pub struct BenchLossArgs {
    /// Where to measure.
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    pub(super) device: Device,
    /// The loss versions to time (default: every version of the device).
    #[arg(long, value_enum, num_args = 1..)]
    pub(super) loss: Vec<LossVersion>,
    /// Batch sizes N (rows); default 256 1024 4096, and 16384 65536 on CUDA [2 <= n <= 16777216].
    #[arg(long, num_args = 1.., value_parser = super::ranges::rows)]
    pub(super) n: Vec<usize>,
    /// Embedding dimension [1 <= d <= 65536].
    #[arg(long, default_value_t = 128, value_parser = super::ranges::dim)]
    pub(super) d: usize,
    /// Temperature [0.025 <= tau <= 100].
    #[arg(long, default_value_t = 0.1, value_parser = super::ranges::tau, allow_negative_numbers = true)]
    tau: f64,
    /// Gradient semantics of the fwd+bwd rows.
    #[arg(long, value_enum, default_value_t = GradSemantics::QueryOnly)]
    grad_semantics: GradSemantics,
    /// Keep repeating each measurement for at least this long (seconds) [0 <= min_seconds <= 3600].
    #[arg(long, default_value_t = 1.0, value_parser = super::ranges::min_seconds, allow_negative_numbers = true)]
    pub(super) min_seconds: f64,
    /// Print JSON instead of the markdown table.
    #[arg(long)]
    pub(super) json: bool,
    /// Check every version's output against the float64 truth before timing it, up to this N
    /// (the truth costs about one fused CPU run; larger sizes are timed unchecked).
    #[arg(long, default_value_t = 65536)]
    pub(super) check_max_n: usize,
    /// Data-parallel ranks (CUDA; one GPU each): the gathered loss of every N over R ranks,
    /// checked on every rank and timed; R processes are started on this machine unless this
    /// one already is a rank (WORLD_SIZE set, as `invaspread launch` sets it) [1 <= ranks <= 64].
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub(super) ranks: u16,
}

pub fn run(args: BenchLossArgs) -> invaspread::Result<()> {
    let cfg = LossConfig {
        tau: args.tau,
        mu: 1.0,
        semantics: args.grad_semantics,
        ..LossConfig::default()
    };
    cfg.validate()?;
    if args.ranks > 1 {
        return super::bench_ranks::run(&args, &cfg);
    }
    let sizes = if args.n.is_empty() {
        match args.device {
            Device::Cpu => vec![256, 1024, 4096],
            Device::Cuda => vec![256, 1024, 4096, 16384, 65536],
        }
    } else {
        args.n.clone()
    };
    let versions: Vec<LossVersion> = if args.loss.is_empty() {
        LossVersion::on(args.device).collect()
    } else {
        let given = args
            .loss
            .iter()
            .map(|v| v.for_device(args.device, "--loss"));
        given.collect::<invaspread::Result<_>>()?
    };
    let baseline = match args.device {
        Device::Cpu => CpuLossVersion::Reference.name(),
        Device::Cuda => CudaLossVersion::Unfused.name(),
    };
    // The markdown table goes out a row at a time, flushed as each is measured (a run cut short
    // keeps every row so far); the baseline of each case is measured first, so its speed-up is
    // known then. JSON is one document, written at the end.
    let mut versions = versions;
    versions.sort_by_key(|v| v.name() != baseline);
    let mut table = (!args.json).then(|| TableOut::start(&baseline));
    let mut rows: Vec<BenchRow> = Vec::new();
    let mut rates = bench::floor::Rates::default();
    let gpu = match args.device {
        Device::Cpu => None,
        Device::Cuda => Some(Arc::new(Gpu::require()?)),
    };
    for &n in &sizes {
        // z, dz, the normalized rows and their gradient in float64 for the truth, and the
        // reference's N x N coefficients where it is the truth: checked before allocating.
        let elements = (n as u64).checked_mul(args.d as u64);
        let nxn = if n <= invaspread::loss::check::REFERENCE_MAX_N {
            (n * n) as u64 * 8
        } else {
            0
        };
        invaspread::limits::check_allocation(
            &format!("bench-loss --n {n} --d {}", args.d),
            elements
                .and_then(|e| e.checked_mul(4 * 4 + 8 * 3))
                .and_then(|b| b.checked_add(nxn)),
        )?;
        let z = bench::bench_input(n, args.d);
        for with_grad in [false, true] {
            let truth = if n <= args.check_max_n {
                eprintln!(
                    "the float64 truth for N={n} d={} {}",
                    args.d,
                    bench::pass_name(with_grad)
                );
                Some(Truth::of(&z, n, args.d, &cfg, with_grad)?)
            } else {
                None
            };
            let case = Case {
                z: &z,
                n,
                d: args.d,
                cfg: &cfg,
                with_grad,
                truth: truth.as_ref(),
            };
            let progress = |version: &str| {
                eprintln!(
                    "measuring {version} N={n} d={} {}",
                    args.d,
                    bench::pass_name(with_grad)
                )
            };
            for &version in &versions {
                progress(&version.name());
                let measured = rows.len();
                match (version, &gpu) {
                    (LossVersion::Cpu(v), _) => {
                        rows.extend(bench::bench_cpu(v, &case, args.min_seconds, &mut rates)?)
                    }
                    (LossVersion::Cuda(v), Some(gpu)) => {
                        match bench::bench_cuda(gpu, v, &case, args.min_seconds)? {
                            Some(row) => rows.push(row),
                            None => eprintln!("  skipped: does not fit in device memory"),
                        }
                    }
                    (LossVersion::Cuda(_), None) => {}
                }
                if let Some(table) = &mut table {
                    bench::fill_speedups(&mut rows, &baseline);
                    table.rows(&rows[measured..])?;
                }
            }
        }
    }
    bench::fill_speedups(&mut rows, &baseline);
    if args.json {
        println!("{}", bench::json(&rows)?);
    } else {
        let peak = gpu.is_none().then(|| rates.fma_peak());
        print_notes(&cfg, &args, peak);
    }
    Ok(())
}

/// The markdown table on stdout, flushed line by line.
struct TableOut(std::io::Stdout);

impl TableOut {
    fn start(baseline: &str) -> TableOut {
        let out = TableOut(std::io::stdout());
        print!("{}", bench::markdown_header(baseline));
        out
    }

    fn rows(&mut self, rows: &[BenchRow]) -> invaspread::Result<()> {
        use std::io::Write;
        for row in rows {
            print!("{}", bench::markdown_row(row));
        }
        self.0
            .flush()
            .map_err(|e| invaspread::Error::io(std::path::Path::new("stdout"), e))
    }
}

/// The table's footnotes: what the columns mean and how each row was checked.
fn print_notes(cfg: &LossConfig, args: &BenchLossArgs, cpu_peak: Option<FmaPeak>) {
    let on_cpu = cpu_peak.is_some();
    println!(
        "\nuseful FLOPs: 2N^2d forward, x2 query-only fwd+bwd, x3 both-sides; semantics {}, tau {}",
        cfg.semantics, cfg.tau
    );
    println!(
        "error vs f64: each version's loss (relative) and dL/dz (scaled by row norms) against \
         the float64 truth before timing, at most its bound in the loss registry \
         (float32 {:.0e}, float64 1e-6; the tensor-core versions: fused-v3-tf32 {:.1e}, \
         fused-v3-bf16 {:.1e} at this tau) or the run stops; unchecked above N = {}",
        CudaLossVersion::FusedV2
            .tolerance(cfg.tau, args.d, false)
            .either(),
        CudaLossVersion::FusedV3Tf32
            .tolerance(cfg.tau, args.d, false)
            .either(),
        CudaLossVersion::FusedV3Bf16
            .tolerance(cfg.tau, args.d, false)
            .either(),
        args.check_max_n
    );
    if !on_cpu {
        println!(
            "floor: the version's matrix products at the card's peak for its arithmetic (float32 \
             FMA; TF32 or bf16 tensor cores for fused-v3), its exp/log/reciprocals at the \
             special-function units' rate, or its device-memory bytes at the bandwidth, whichever \
             is largest; peaks from the card's SM count, clocks and bus width \
             (invaspread::bench::gpu_floor); launch latency not included; vs floor: median / floor"
        );
    }
    if on_cpu {
        println!(
            "floor: the version's products (blocks of {} query rows by N x d, one per pass) at \
             the gemm crate's rate on that shape, plus N^2 exponentials and N^2 logarithms at \
             the SIMD exp's and ln's rates, all measured on this machine with every thread \
             busy; vs floor: median / floor",
            invaspread::loss::cpu::ROW_BLOCK
        );
    }
    if let Some(peak) = cpu_peak {
        println!(
            "of FMA peak: the useful FLOP rate over the {}; the loss also spends time on exp and \
             ln, which no FMA counts",
            peak.describe()
        );
    }
}
