//! `invaspread bench-train`: images per second of whole training steps (both views: forward,
//! the instance loss, backward, SGD) on one device, as a markdown table in the format of
//! benches/torch_train_reference.py, so that the two can be put side by side. On CUDA each
//! precision's first step is checked against the CPU's float32 step before it is timed (the
//! `checked:` lines under the table); a step beyond its bound stops the run.

use std::sync::Arc;
use std::time::Instant;

use invaspread::backend::Backend;
use invaspread::backend::Cpu;
use invaspread::backend::CudaBackend;
use invaspread::bench::{floor, gpu_floor};
use invaspread::cuda::GemmPrecision;
use invaspread::cuda::Gpu;
use invaspread::loss::{CpuLossVersion, CudaLossVersion, LossConfig, LossVersion};
use invaspread::names::Named;
use invaspread::nn::models::{Model, ModelKind, EMBED_DIM};
use invaspread::nn::optim::{Sgd, SgdConfig};
use invaspread::nn::step::{first_step_agreement, queue_train_step, random_views, step_tolerance};
use invaspread::nn::Encoder;
use invaspread::ops::conv2d::node::ConvUse;
use invaspread::ops::conv2d::{self, CpuVersion};
use invaspread::ops::Shape4;
use invaspread::tape::params::ParamStore;
use invaspread::tape::Graph;

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
    /// The loss version of the steps (default: fused on the CPU, fused-v2 on CUDA).
    #[arg(long, value_enum)]
    loss: Option<LossVersion>,
    /// Convolution versions to time on the CPU.
    #[arg(long, value_enum, num_args = 1.., default_values_t = [CpuVersion::Im2col, CpuVersion::Winograd])]
    cpu_conv: Vec<CpuVersion>,
}

/// The median over 3 repetitions of the mean step time of `steps` queued steps, and the step's
/// convolutions with their input shapes.
fn time_steps<B: Encoder>(
    kind: ModelKind,
    backend: B,
    (shape, views): (Shape4, &[f32]),
    steps: usize,
) -> invaspread::Result<(f64, Vec<ConvUse>)> {
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
    Ok((means[1], graph.convolutions()))
}

/// The floor of a CPU training step: every convolution's products (forward, dW and dx) as
/// `version` runs them and the loss's, at the rates the gemm crate and the SIMD exp reach on
/// this machine ([`floor`]).
fn cpu_step_floor(
    rates: &mut floor::Rates,
    version: CpuVersion,
    convs: &[ConvUse],
    rows: usize,
) -> invaspread::Result<f64> {
    let mut s = 0.0;
    for c in convs {
        let shapes = conv2d::cpu::gemm_shapes(version, &c.conv, c.input, c.with_dx);
        s += rates.gemm_seconds::<f32>(&shapes)?;
    }
    let cfg = LossConfig::default();
    let shape = (rows, EMBED_DIM, invaspread::loss::cpu::ROW_BLOCK);
    Ok(s + rates.loss_seconds::<f32>(shape, true, cfg.semantics)?)
}

/// Useful FLOPs of a training step: every convolution's forward, dW and dx as direct
/// convolutions count them (im2col's products: what PyTorch's profilers count too; Winograd
/// does fewer multiplications for the same work), and the loss's products (forward and the
/// query-only backward). The same count for every version, so that shares of the FMA peak
/// compare.
fn useful_step_flops(convs: &[ConvUse], rows: usize) -> f64 {
    let convs: f64 = convs
        .iter()
        .flat_map(|c| conv2d::cpu::gemm_shapes(CpuVersion::Im2col, &c.conv, c.input, c.with_dx))
        .map(|g| g.flops())
        .sum();
    let cfg = LossConfig::default();
    convs + invaspread::bench::useful_flops(rows, EMBED_DIM, true, cfg.semantics)
}

/// The floor of a CUDA training step on a card of `peaks` ([`gpu_floor`]).
fn cuda_step_floor(
    peaks: &gpu_floor::CardPeaks,
    precision: GemmPrecision,
    convs: &[ConvUse],
    rows: usize,
    loss: CudaLossVersion,
) -> f64 {
    let gemms: Vec<_> = convs
        .iter()
        .flat_map(|c| conv2d::cpu::gemm_shapes(CpuVersion::Im2col, &c.conv, c.input, c.with_dx))
        .collect();
    gpu_floor::step_floor_seconds(peaks, precision, &gemms, loss, (rows, EMBED_DIM))
}

pub fn run(args: BenchTrainArgs) -> invaspread::Result<()> {
    let gpu = match args.device {
        Device::Cuda => Some(Arc::new(Gpu::require()?)),
        Device::Cpu => None,
    };
    let version = env!("CARGO_PKG_VERSION");
    let loss = args
        .loss
        .unwrap_or(LossVersion::default_on(args.device))
        .for_device(args.device, "--loss")?;
    // The version of the device timed (the other device's is not used).
    let (cpu_loss, cuda_loss) = match loss {
        LossVersion::Cpu(v) => (v, CudaLossVersion::FusedV2),
        LossVersion::Cuda(v) => (CpuLossVersion::Fused, v),
    };
    let (shape, views) = random_views(args.batch, 1);
    let mut checks = Vec::new();
    if gpu.as_ref().is_some_and(|g| g.is_virtual()) {
        eprintln!("bench-train: on the virtual GPU the times are the CPU emulator's, not a GPU's");
    }
    let mut rates = floor::Rates::default();
    println!(
        "| model | framework | device | mean step | images/s | floor | vs floor | useful GFLOP/s | of FMA peak |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for &kind in &args.models {
        match &gpu {
            None => {
                let threads = rayon::current_num_threads();
                for &conv in &args.cpu_conv {
                    let backend = Cpu::<f32>::new().with_option(conv).with_option(cpu_loss);
                    let (s, convs) = time_steps(kind, backend, (shape, &views), args.steps)?;
                    let floor = cpu_step_floor(&mut rates, conv, &convs, shape.n)?;
                    let rate = useful_step_flops(&convs, shape.n) / s;
                    let share = rate / rates.fma_peak().f32.flops;
                    println!(
                        "| {} | invaspread {version} cpu f32 {} | {threads} threads | {:.4} s | {:.1} | {:.4} s | {:.2}x | {:.1} | {:.1}% |",
                        kind.name(),
                        conv.name(),
                        s,
                        args.batch as f64 / s,
                        floor,
                        s / floor,
                        rate / 1e9,
                        100.0 * share
                    );
                }
            }
            Some(gpu) => {
                for &precision in &args.precision {
                    let what = format!("{} cuda {}", kind.name(), precision.name());
                    let backend = CudaBackend::new(gpu.clone())?
                        .with_option(cuda_loss)
                        .with_gemm_precision(precision);
                    let err = first_step_agreement(kind, backend, &views, shape)?
                        .check(&what, step_tolerance(precision))?;
                    checks.push(format!(
                        "{what}: one step within {err:.1e} of the CPU's float32 step (at most {:.0e})",
                        step_tolerance(precision)
                    ));
                    let backend = CudaBackend::new(gpu.clone())?
                        .with_option(cuda_loss)
                        .with_gemm_precision(precision);
                    let (s, convs) = time_steps(kind, backend, (shape, &views), args.steps)?;
                    let (floor, ratio) = match gpu_floor::CardPeaks::of(gpu)? {
                        Some(peaks) => {
                            let f = cuda_step_floor(&peaks, precision, &convs, shape.n, cuda_loss);
                            (invaspread::bench::human_time(f), format!("{:.2}x", s / f))
                        }
                        None => ("-".into(), "-".into()),
                    };
                    println!(
                        "| {} | invaspread {version} cuda {} | {} | {:.4} s | {:.1} | {floor} | {ratio} | - | - |",
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
    if gpu.is_some() {
        println!();
        println!(
            "floor: the step's convolution products (forward, dW and dx as im2col GEMMs) at the \
             card's peak for the GEMM precision, plus the fused-v2 loss's floor, from the card's \
             SM count and clocks (invaspread::bench::gpu_floor); the rest (im2col, batchnorm, \
             elementwise passes, SGD, launches) is what vs floor shows"
        );
    }
    if gpu.is_none() {
        println!();
        println!(
            "floor: the step's matrix products (every convolution's forward, dW and dx as the \
             version runs them, and the loss's) at the gemm crate's rate on each shape, plus the \
             loss's exponentials and logarithms, measured on this machine with every thread busy; the rest \
             (im2col, Winograd transforms, batchnorm, SGD) is what vs floor shows"
        );
        println!(
            "useful GFLOP/s: the step's convolutions as direct convolutions count them (forward, \
             dW, dx; the same count whatever the version) and the loss's products, over the mean \
             step; of FMA peak: that rate over the float32 {}",
            rates.fma_peak().describe()
        );
    }
    if !checks.is_empty() {
        println!();
        for line in &checks {
            println!("checked: {line}");
        }
    }
    Ok(())
}
