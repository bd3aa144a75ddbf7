//! Criterion benchmark of one training step (both views: forward, backward, SGD) for each
//! encoder, 128 images of 32 x 32 (256 rows), float32, on the CPU and, when a GPU is there, on
//! CUDA in each GEMM precision (each iteration waits for the device); `SKIPPED (no GPU)`
//! without one, a failure then under REQUIRE_GPU=1. Throughput is in images
//! per second (128 per step). Compare with benches/torch_train_reference.py on the same machine
//! (`invaspread bench-train` prints the same numbers as a table). Before a CUDA case is timed
//! its first step is checked against the CPU's float32 step (`nn::step::first_step_agreement`,
//! the bounds of `bench-train`); `cargo test --bench train_step` runs every case once with the
//! checks, so CI runs them on the virtual GPU, at 2 images a step there (it says so).

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use invaspread::backend::Cpu;
use invaspread::backend::CudaBackend;
use invaspread::cuda::GemmPrecision;
use invaspread::loss::LossConfig;
use invaspread::names::Named;
use invaspread::nn::models::{Model, ModelKind};
use invaspread::nn::optim::{Sgd, SgdConfig};
use invaspread::nn::step::{first_step_agreement, queue_train_step, random_views, step_tolerance};
use invaspread::nn::Encoder;
use invaspread::tape::params::ParamStore;
use invaspread::tape::Graph;
use invaspread::testing::{gpu_or_skip, virtual_gpu_note};

const IMAGES: usize = 128;

fn bench_backend<B: Encoder>(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    kind: ModelKind,
    device: &str,
    backend: B,
    images: usize,
) {
    let mut store = ParamStore::default();
    let model = Model::new(kind, &mut store, &backend, 0).unwrap();
    let mut graph = Graph::new(backend, store);
    let mut sgd = Sgd::new(SgdConfig::default());
    let (shape, views) = random_views(images, 1);
    let cfg = LossConfig::default();
    let name = if device == "cpu" {
        kind.name()
    } else {
        format!("{}/{device}", kind.name())
    };
    group.throughput(Throughput::Elements(images as u64));
    group.bench_function(name, |b| {
        b.iter(|| {
            queue_train_step(&mut graph, &model, &mut sgd, &views, shape, &cfg, 0.03).unwrap();
            graph.backend.synchronize().unwrap();
        })
    });
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("train_step");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(20));
    let gpu = gpu_or_skip("criterion train_step cuda");
    let gpu_images = match &gpu {
        Some(g) if g.is_virtual() => {
            virtual_gpu_note(
                "criterion train_step cuda",
                "2 images a step (the emulator is slow)",
            );
            2
        }
        _ => IMAGES,
    };
    for kind in [ModelKind::ConvnetSmall, ModelKind::Resnet18Cifar] {
        bench_backend(&mut group, kind, "cpu", Cpu::<f32>::new(), IMAGES);
        let Some(gpu) = &gpu else {
            continue;
        };
        for precision in [GemmPrecision::F32, GemmPrecision::Tf32, GemmPrecision::Bf16] {
            let device = format!("cuda-{}", precision.name());
            let backend = || {
                CudaBackend::new(gpu.clone())
                    .unwrap()
                    .with_gemm_precision(precision)
            };
            let (shape, views) = random_views(gpu_images, 1);
            first_step_agreement(kind, backend(), &views, shape)
                .unwrap()
                .check(
                    &format!("{}/{device}", kind.name()),
                    step_tolerance(precision),
                )
                .unwrap_or_else(|e| panic!("{e}"));
            bench_backend(&mut group, kind, &device, backend(), gpu_images);
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
