//! Criterion benchmark of every loss implementation: the CPU reference, the fused CPU path
//! (f32, f64) and every CUDA version, forward and forward+backward, d = 128.
//!
//! N in {256, 1024, 4096, 16384, 65536}, capped by INVASPREAD_BENCH_MAX_N (default 4096 on the
//! CPU, where one N = 65536 iteration takes tens of seconds on 2 cores; no cap on a GPU, 256 on
//! the virtual GPU, which says so). Before a version is timed its output is checked against the
//! float64 truth (`loss::check`); a wrong one fails the run. `cargo test --bench instance_loss`
//! runs every case once, so CI runs these checks (on the virtual GPU too).
//! GPU times come from CUDA events (iter_custom). Throughput is reported in similarity pairs
//! (N^2) per second. Without a GPU the CUDA group prints `SKIPPED (no GPU)` and is left out.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use cudarc::driver::sys::CUevent_flags;
use invaspread::bench::{bench_input, pass_name, run_cpu};
use invaspread::loss::check::Truth;
use invaspread::loss::cuda::{CudaLoss, CudaLossVersion};
use invaspread::loss::{CpuLossVersion, LossConfig};
use invaspread::names::Named;
use invaspread::testing::{gpu_or_skip, virtual_gpu_note};

const D: usize = 128;
const SIZES: [usize; 5] = [256, 1024, 4096, 16384, 65536];

fn max_n(default: usize) -> usize {
    std::env::var("INVASPREAD_BENCH_MAX_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Panics (fails the run) when `version`'s output is off the truth by more than `tolerance`
/// (float32's, or a tensor-core version's own); see the module doc.
fn check(
    truth: &Truth,
    (version, tolerance): (&str, f64),
    n: usize,
    with_grad: bool,
    loss: f64,
    grad: Option<&[f32]>,
) {
    let what = format!("{version} N={n} d={D} {}", pass_name(with_grad));
    truth
        .check(&what, loss, grad, tolerance)
        .unwrap_or_else(|e| panic!("{e}"));
}

fn cpu_benches(c: &mut Criterion) {
    let cfg = LossConfig::default();
    for with_grad in [false, true] {
        let pass = invaspread::bench::pass_name(with_grad);
        let mut group = c.benchmark_group(format!("cpu/{pass}"));
        group
            .sample_size(10)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(3));
        for n in SIZES.into_iter().filter(|&n| n <= max_n(4096)) {
            let z = bench_input(n, D);
            let z64: Vec<f64> = z.iter().map(|&x| f64::from(x)).collect();
            let truth = Truth::of(&z, n, D, &cfg, with_grad).unwrap();
            group.throughput(Throughput::Elements((n * n) as u64));
            for version in CpuLossVersion::all() {
                if version == CpuLossVersion::Reference && n > 4096 {
                    continue; // stores N x N
                }
                let run = || run_cpu(version, &z, &z64, n, D, &cfg, with_grad).unwrap();
                let (loss, grad) = run();
                let tolerance = version.version().tolerance(cfg.tau, D, false).either();
                check(
                    &truth,
                    (&version.name(), tolerance),
                    n,
                    with_grad,
                    loss,
                    grad.as_deref(),
                );
                group.bench_with_input(BenchmarkId::new(version.name(), n), &n, |b, _| {
                    b.iter(|| black_box(run().0))
                });
            }
        }
        group.finish();
    }
}

fn cuda_benches(c: &mut Criterion) {
    let Some(gpu) = gpu_or_skip("criterion cuda/instance_loss") else {
        return;
    };
    let cfg = LossConfig::default();
    let stream = gpu.stream().clone();
    let cap = if gpu.is_virtual() {
        virtual_gpu_note(
            "criterion cuda/instance_loss",
            "N up to 256 (the emulator is slow)",
        );
        256
    } else {
        usize::MAX
    };
    for with_grad in [false, true] {
        let pass = invaspread::bench::pass_name(with_grad);
        let mut group = c.benchmark_group(format!("cuda/{pass}"));
        group
            .sample_size(20)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(2));
        for n in SIZES.into_iter().filter(|&n| n <= max_n(cap)) {
            let z_host = bench_input(n, D);
            let truth = Truth::of(&z_host, n, D, &cfg, with_grad).unwrap();
            let z = stream.clone_htod(&z_host).unwrap();
            let mut dz = stream.alloc_zeros::<f32>(n * D).unwrap();
            group.throughput(Throughput::Elements((n * n) as u64));
            for version in CudaLossVersion::all() {
                let free = gpu.context().mem_get_info().unwrap().0;
                if version.stores_nxn() && 3 * n * n * 4 > free {
                    continue; // the unfused chain's N x N matrices do not fit
                }
                if version == CudaLossVersion::FusedV1 && n > 16384 {
                    continue; // minutes per sample
                }
                let mut loss = CudaLoss::new(Arc::clone(&gpu), version, n, D).unwrap();
                loss.enqueue(&z, if with_grad { Some(&mut dz) } else { None }, &cfg)
                    .unwrap();
                let grad = with_grad.then(|| stream.clone_dtoh(&dz).unwrap());
                let value = loss.loss().unwrap();
                // bench_input is random: the version's bound on random inputs.
                let tolerance = version.tolerance(cfg.tau, D, false).either();
                check(
                    &truth,
                    (&version.name(), tolerance),
                    n,
                    with_grad,
                    value,
                    grad.as_deref(),
                );
                group.bench_with_input(BenchmarkId::new(version.name(), n), &n, |b, _| {
                    b.iter_custom(|iters| {
                        let start = stream
                            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                            .unwrap();
                        for _ in 0..iters {
                            loss.enqueue(&z, if with_grad { Some(&mut dz) } else { None }, &cfg)
                                .unwrap();
                        }
                        let stop = stream
                            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                            .unwrap();
                        Duration::from_secs_f64(f64::from(start.elapsed_ms(&stop).unwrap()) / 1e3)
                    })
                });
            }
        }
        group.finish();
    }
}

criterion_group!(benches, cpu_benches, cuda_benches);
criterion_main!(benches);
