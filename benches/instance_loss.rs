//! Criterion benchmark of every loss implementation: the CPU reference, the fused CPU path
//! (f32, f64) and every CUDA version, forward and forward+backward, d = 128.
//!
//! N in {256, 1024, 4096, 16384, 65536}, capped by INVASPREAD_BENCH_MAX_N (default 4096 on the
//! CPU, where one N = 65536 iteration takes tens of seconds on 2 cores; no cap on the GPU).
//! GPU times come from CUDA events (iter_custom). Throughput is reported in similarity pairs
//! (N^2) per second. Without a GPU the CUDA group prints `SKIPPED (no GPU)` and is left out.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use cudarc::driver::sys::CUevent_flags;
use invaspread::loss::cuda::{CudaLoss, CudaLossVersion};
use invaspread::loss::{cpu, reference, LossConfig};
use invaspread::names::Named;
use invaspread::testing::{gpu_or_skip, random_matrix, rng};

const D: usize = 128;
const SIZES: [usize; 5] = [256, 1024, 4096, 16384, 65536];

fn max_n(default: usize) -> usize {
    std::env::var("INVASPREAD_BENCH_MAX_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
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
            let z = random_matrix(&mut rng(n as u64), n, D);
            let z64: Vec<f64> = z.iter().map(|&x| f64::from(x)).collect();
            group.throughput(Throughput::Elements((n * n) as u64));
            if n <= 4096 {
                group.bench_with_input(BenchmarkId::new("reference-f64", n), &n, |b, &n| {
                    b.iter(|| {
                        black_box(
                            reference::instance_loss(&z, n, D, &cfg, with_grad)
                                .unwrap()
                                .loss,
                        )
                    })
                });
            }
            group.bench_with_input(BenchmarkId::new("fused-f64", n), &n, |b, &n| {
                b.iter(|| {
                    black_box(
                        cpu::instance_loss(&z64, n, D, &cfg, with_grad)
                            .unwrap()
                            .loss,
                    )
                })
            });
            group.bench_with_input(BenchmarkId::new("fused-f32", n), &n, |b, &n| {
                b.iter(|| black_box(cpu::instance_loss(&z, n, D, &cfg, with_grad).unwrap().loss))
            });
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
    for with_grad in [false, true] {
        let pass = invaspread::bench::pass_name(with_grad);
        let mut group = c.benchmark_group(format!("cuda/{pass}"));
        group
            .sample_size(20)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(2));
        for n in SIZES.into_iter().filter(|&n| n <= max_n(usize::MAX)) {
            let z = stream
                .clone_htod(&random_matrix(&mut rng(n as u64), n, D))
                .unwrap();
            let mut dz = stream.alloc_zeros::<f32>(n * D).unwrap();
            group.throughput(Throughput::Elements((n * n) as u64));
            for version in CudaLossVersion::ALL {
                let free = gpu.context().mem_get_info().unwrap().0;
                if version.stores_nxn() && 3 * n * n * 4 > free {
                    continue; // the unfused chain's N x N matrices do not fit
                }
                if version == CudaLossVersion::FusedV1 && n > 16384 {
                    continue; // minutes per sample
                }
                let mut loss = CudaLoss::new(Arc::clone(&gpu), version, n, D).unwrap();
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
