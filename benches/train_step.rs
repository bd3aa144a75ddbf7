//! Criterion benchmark of one training step (both views: forward, backward, SGD) for each
//! encoder, 128 images of 32 x 32 (256 rows), float32, on the CPU and, when a GPU is there, on
//! CUDA in each GEMM precision (each iteration waits for the device). Throughput is in images
//! per second (128 per step). Compare with benches/torch_train_reference.py on the same machine
//! (`invaspread bench-train` prints the same numbers as a table).

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use invaspread::cuda::GemmPrecision;
use invaspread::loss::LossConfig;
use invaspread::names::Named;
use invaspread::nn::backend::Backend;
use invaspread::nn::cpu_backend::Cpu;
use invaspread::nn::cuda_backend::CudaBackend;
use invaspread::nn::graph::Graph;
use invaspread::nn::models::{Model, ModelKind};
use invaspread::nn::optim::{Sgd, SgdConfig};
use invaspread::nn::params::ParamStore;
use invaspread::nn::step::queue_train_step;
use invaspread::ops::Shape4;
use invaspread::testing::{random_matrix, rng};

const IMAGES: usize = 128;

fn bench_backend<B: Backend>(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    kind: ModelKind,
    device: &str,
    backend: B,
) {
    let mut store = ParamStore::default();
    let model = Model::new(kind, &mut store, &backend, 0).unwrap();
    let mut graph = Graph::new(backend, store);
    let mut sgd = Sgd::new(SgdConfig::default());
    let shape = Shape4 {
        n: 2 * IMAGES,
        c: 3,
        h: 32,
        w: 32,
    };
    let views = random_matrix(&mut rng(1), 1, shape.len());
    let cfg = LossConfig::default();
    let name = if device == "cpu" {
        kind.name()
    } else {
        format!("{}/{device}", kind.name())
    };
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
    group.throughput(Throughput::Elements(IMAGES as u64));
    let gpu = invaspread::cuda::Gpu::try_new()
        .ok()
        .flatten()
        .map(std::sync::Arc::new);
    for kind in [ModelKind::ConvnetSmall, ModelKind::Resnet18Cifar] {
        bench_backend(&mut group, kind, "cpu", Cpu::<f32>::new());
        if let Some(gpu) = &gpu {
            for precision in [GemmPrecision::F32, GemmPrecision::Tf32, GemmPrecision::Bf16] {
                let backend = CudaBackend::new(gpu.clone())
                    .unwrap()
                    .with_gemm_precision(precision);
                bench_backend(
                    &mut group,
                    kind,
                    &format!("cuda-{}", precision.name()),
                    backend,
                );
            }
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
