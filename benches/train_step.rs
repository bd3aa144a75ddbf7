//! Criterion benchmark of one training step on the CPU (both views: forward, backward, SGD)
//! for each encoder, 128 images of 32 x 32 (256 rows), float32. Throughput is in images per
//! second (128 per step). Compare with benches/torch_train_reference.py on the same machine.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use invaspread::loss::LossConfig;
use invaspread::nn::backend::Cpu;
use invaspread::nn::cpu_ops::Shape4;
use invaspread::nn::graph::Graph;
use invaspread::nn::models::{Model, ModelKind};
use invaspread::nn::optim::{Sgd, SgdConfig};
use invaspread::nn::params::ParamStore;
use invaspread::nn::train::train_step;
use invaspread::testing::{random_matrix, rng};

const IMAGES: usize = 128;

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("train_step");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(20));
    group.throughput(Throughput::Elements(IMAGES as u64));
    for kind in [ModelKind::ConvnetSmall, ModelKind::Resnet18Cifar] {
        let backend = Cpu::<f32>::new();
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
        group.bench_function(kind.name(), |b| {
            b.iter(|| train_step(&mut graph, &model, &mut sgd, &views, shape, &cfg, 0.03).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
