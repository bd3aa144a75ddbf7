//! `invaspread bench-train`: images per second of whole training steps (both views: forward,
//! the instance loss, backward, SGD) on one device, as a markdown table in the format of
//! benches/torch_train_reference.py, so that the two can be put side by side. On CUDA each
//! precision's first step is checked against the CPU's float32 step before it is timed (the
//! `checked:` lines under the table); a step beyond its bound stops the run.

use std::sync::Arc;
use std::time::Instant;

use invaspread::cuda::GemmPrecision;
use invaspread::cuda::Gpu;
use invaspread::loss::LossConfig;
use invaspread::names::Named;
use invaspread::nn::backend::Backend;
use invaspread::nn::cpu_backend::Cpu;
use invaspread::nn::cuda_backend::CudaBackend;
use invaspread::nn::graph::Graph;
use invaspread::nn::models::{Model, ModelKind};
use invaspread::nn::optim::{Sgd, SgdConfig};
use invaspread::nn::params::ParamStore;
use invaspread::nn::step::{first_step_agreement, queue_train_step, random_views, step_tolerance};
use invaspread::ops::Shape4;

use super::Device;

#[derive(Debug, clap::Args)]
pub struct BenchTrainArgs {
    /// Where to measure.
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    device: Device,
    /// Encoders to time.
    #[arg(long, value_enum, num_args = 1.., default_values_t = [ModelKind::ConvnetSmall, ModelKind::Resnet18Cifar])]
    models: Vec<ModelKind>,
    /// Images per step (2 x batch rows) [2 <= batch <= 4096].
    #[arg(long, default_value_t = 128, value_parser = super::ranges::bench_batch)]
    batch: usize,
    /// Timed steps per repetition (after 3 warm-up steps); the median of 3 repetitions is shown
    /// [1 <= steps <= 100000].
    #[arg(long, default_value_t = 10, value_parser = super::ranges::bench_steps)]
    steps: usize,
    /// GEMM precisions to time on CUDA (float32 storage and accumulation in every case).
    #[arg(long, value_enum, num_args = 1.., default_values_t = [GemmPrecision::F32, GemmPrecision::Tf32, GemmPrecision::Bf16])]
    precision: Vec<GemmPrecision>,
}

/// The median over 3 repetitions of the mean step time of `steps` queued steps.
fn time_steps<B: Backend>(
    kind: ModelKind,
    backend: B,
    (shape, views): (Shape4, &[f32]),
    steps: usize,
) -> invaspread::Result<f64> {
    let mut store = ParamStore::default();
    let model = Model::new(kind, &mut store, &backend, 0)?;
    let mut graph = Graph::new(backend, store);
    let mut sgd = Sgd::new(SgdConfig::default());
    let cfg = LossConfig::default();
    for _ in 0..3 {
        queue_train_step(&mut graph, &model, &mut sgd, views, shape, &cfg, 0.03)?;
    }
    graph.backend.synchronize()?;
    let mut means = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        for _ in 0..steps {
            queue_train_step(&mut graph, &model, &mut sgd, views, shape, &cfg, 0.03)?;
        }
        graph.backend.synchronize()?;
        means.push(t.elapsed().as_secs_f64() / steps.max(1) as f64);
    }
    means.sort_by(f64::total_cmp);
    Ok(means[1])
}

pub fn run(args: BenchTrainArgs) -> invaspread::Result<()> {
    let gpu = match args.device {
        Device::Cuda => Some(Arc::new(Gpu::require()?)),
        Device::Cpu => None,
    };
    let version = env!("CARGO_PKG_VERSION");
    let (shape, views) = random_views(args.batch, 1);
    let mut checks = Vec::new();
    if gpu.as_ref().is_some_and(|g| g.is_virtual()) {
        eprintln!("bench-train: on the virtual GPU the times are the CPU emulator's, not a GPU's");
    }
    println!("| model | framework | device | mean step | images/s |");
    println!("|---|---|---|---|---|");
    for &kind in &args.models {
        match &gpu {
            None => {
                let threads = rayon::current_num_threads();
                let s = time_steps(kind, Cpu::<f32>::new(), (shape, &views), args.steps)?;
                println!(
                    "| {} | invaspread {version} cpu f32 | {threads} threads | {:.4} s | {:.1} |",
                    kind.name(),
                    s,
                    args.batch as f64 / s
                );
            }
            Some(gpu) => {
                for &precision in &args.precision {
                    let what = format!("{} cuda {}", kind.name(), precision.name());
                    let backend = CudaBackend::new(gpu.clone())?.with_gemm_precision(precision);
                    let err = first_step_agreement(kind, backend, &views, shape)?
                        .check(&what, step_tolerance(precision))?;
                    checks.push(format!(
                        "{what}: one step within {err:.1e} of the CPU's float32 step (at most {:.0e})",
                        step_tolerance(precision)
                    ));
                    let backend = CudaBackend::new(gpu.clone())?.with_gemm_precision(precision);
                    let s = time_steps(kind, backend, (shape, &views), args.steps)?;
                    println!(
                        "| {} | invaspread {version} cuda {} | {} | {:.4} s | {:.1} |",
                        kind.name(),
                        precision.name(),
                        gpu.name()?,
                        s,
                        args.batch as f64 / s
                    );
                }
            }
        }
    }
    if !checks.is_empty() {
        println!();
        for line in &checks {
            println!("checked: {line}");
        }
    }
    Ok(())
}
