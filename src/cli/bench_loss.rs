//! `invaspread bench-loss`: a markdown table of every loss implementation on one device.

use std::sync::Arc;

use invaspread::bench::{self, BenchRow, CpuVersion};
use invaspread::cuda::Gpu;
use invaspread::loss::cuda::CudaLossVersion;
use invaspread::loss::{GradSemantics, LossConfig};
use invaspread::names::Named;

use super::Device;

#[derive(Debug, clap::Args)]
pub struct BenchLossArgs {
    /// Where to measure.
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    device: Device,
    /// Batch sizes N (rows); default 256 1024 4096, and 16384 65536 on CUDA.
    #[arg(long, num_args = 1..)]
    n: Vec<usize>,
    /// Embedding dimension.
    #[arg(long, default_value_t = 128)]
    d: usize,
    /// Temperature.
    #[arg(long, default_value_t = 0.1)]
    tau: f64,
    /// Gradient semantics of the fwd+bwd rows.
    #[arg(long, value_enum, default_value_t = GradSemantics::QueryOnly)]
    grad_semantics: GradSemantics,
    /// Keep repeating each measurement for at least this long (seconds).
    #[arg(long, default_value_t = 1.0)]
    min_seconds: f64,
    /// Print JSON instead of the markdown table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: BenchLossArgs) -> invaspread::Result<()> {
    let cfg = LossConfig {
        tau: args.tau,
        mu: 1.0,
        semantics: args.grad_semantics,
    };
    cfg.validate()?;
    let sizes = if args.n.is_empty() {
        match args.device {
            Device::Cpu => vec![256, 1024, 4096],
            Device::Cuda => vec![256, 1024, 4096, 16384, 65536],
        }
    } else {
        args.n.clone()
    };
    let mut rows: Vec<BenchRow> = Vec::new();
    let baseline = match args.device {
        Device::Cpu => {
            for &n in &sizes {
                for with_grad in [false, true] {
                    for version in CpuVersion::ALL {
                        eprintln!(
                            "measuring {} N={n} d={} {}",
                            version.name(),
                            args.d,
                            bench::pass_name(with_grad)
                        );
                        rows.extend(bench::bench_cpu(
                            version,
                            n,
                            args.d,
                            &cfg,
                            with_grad,
                            args.min_seconds,
                        )?);
                    }
                }
            }
            CpuVersion::Reference.name()
        }
        Device::Cuda => {
            let gpu = Arc::new(Gpu::require()?);
            for &n in &sizes {
                for with_grad in [false, true] {
                    for version in CudaLossVersion::ALL {
                        eprintln!(
                            "measuring {} N={n} d={} {}",
                            version.name(),
                            args.d,
                            bench::pass_name(with_grad)
                        );
                        match bench::bench_cuda(
                            &gpu,
                            version,
                            n,
                            args.d,
                            &cfg,
                            with_grad,
                            args.min_seconds,
                        )? {
                            Some(row) => rows.push(row),
                            None => eprintln!("  skipped: does not fit in device memory"),
                        }
                    }
                }
            }
            CudaLossVersion::Unfused.name()
        }
    };
    bench::fill_speedups(&mut rows, &baseline);
    if args.json {
        println!("{}", bench::json(&rows)?);
    } else {
        print!("{}", bench::markdown_table(&rows, &baseline));
        println!("\nuseful FLOPs: 2N^2d forward, x2 query-only fwd+bwd, x3 both-sides; semantics {}, tau {}", cfg.semantics, cfg.tau);
    }
    Ok(())
}
