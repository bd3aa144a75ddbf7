//! The encoder's autodiff graph: every op's backward against central finite differences in
//! float64 (stride 2, padding, odd sizes), batchnorm train against eval, a seeded ResNet18
//! forward twice, checkpoints round-tripping bit-exactly, and a small model overfitting.

use std::collections::HashMap;

use invaspread::backend::Cpu;
use invaspread::loss::{GradSemantics, LossConfig};
use invaspread::nn::checkpoint;
use invaspread::nn::models::{Model, ModelKind};
use invaspread::nn::optim::{learning_rate, Schedule, Sgd, SgdConfig};
use invaspread::nn::step::train_step;
use invaspread::ops::conv2d::Conv;
use invaspread::ops::Shape4;
use invaspread::tape::params::ParamStore;
use invaspread::tape::{Graph, Var};
use invaspread::testing::{random_matrix, rng};

type G64 = Graph<Cpu<f64>>;

/// Builds a graph from `build` on input `x` and reduces its output with fixed random weights;
/// returns the scalar.
fn run(
    g: &mut G64,
    x: &[f64],
    xs: Shape4,
    weights: &[f32],
    build: &dyn Fn(&mut G64, Var) -> Var,
) -> (f64, Var, Var) {
    g.begin();
    let host: Vec<f32> = vec![0.0; x.len()];
    let input = g.input(&host, xs).unwrap();
    // Inputs arrive as f32; overwrite with the exact f64 values.
    g.set_value_f64(input, x).unwrap();
    let out = build(g, input);
    let s = g.weighted_sum(out, weights).unwrap();
    (g.value_f64(s).unwrap()[0], input, s)
}

/// Checks d(sum w * op(x))/dx and /dparams against central differences.
fn check_op(
    name: &str,
    xs: Shape4,
    mut store: ParamStore<Cpu<f64>>,
    build: &dyn Fn(&mut G64, Var) -> Var,
) {
    let b = Cpu::<f64>::new();
    let mut r = rng(1234);
    let x: Vec<f64> = random_matrix(&mut r, 1, xs.len())
        .into_iter()
        .map(f64::from)
        .collect();
    // Perturb parameters away from their init (gamma = 1, beta = 0 would hide mistakes).
    for p in &mut store.params {
        let len = p.value.len();
        let noise = random_matrix(&mut r, 1, len);
        for (v, n) in p.value.iter_mut().zip(noise) {
            *v += 0.3 * f64::from(n);
        }
    }
    let mut g = Graph::new(b, store);
    g.input_grads = true;
    let out_len = {
        g.begin();
        let probe: Vec<f32> = (0..xs.len()).map(|i| 1.0 + (i % 7) as f32).collect();
        let input = g.input(&probe, xs).unwrap();
        let out = build(&mut g, input);
        g.shape(out).len()
    };
    let weights = random_matrix(&mut r, 1, out_len);
    let (_, input, s) = run(&mut g, &x, xs, &weights, build);
    g.params.zero_grad(&g.backend).unwrap();
    g.backward(s).unwrap();
    let dx = g.grad_f64(input).unwrap();
    let dparams: Vec<Vec<f64>> = g.params.params.iter().map(|p| p.grad.clone()).collect();

    let h = 1e-6;
    let tol = |num: f64, ana: f64| (num - ana).abs() <= 1e-6 * (1.0 + num.abs().max(ana.abs()));
    let mut xp = x.clone();
    for i in 0..x.len() {
        xp[i] = x[i] + h;
        let plus = run(&mut g, &xp, xs, &weights, build).0;
        xp[i] = x[i] - h;
        let minus = run(&mut g, &xp, xs, &weights, build).0;
        xp[i] = x[i];
        let num = (plus - minus) / (2.0 * h);
        assert!(
            tol(num, dx[i]),
            "{name}: dx[{i}] analytic {} numerical {num}",
            dx[i]
        );
    }
    for (pi, grads) in dparams.iter().enumerate() {
        for (i, &analytic) in grads.iter().enumerate() {
            let orig = g.params.params[pi].value[i];
            g.params.params[pi].value[i] = orig + h;
            let plus = run(&mut g, &x, xs, &weights, build).0;
            g.params.params[pi].value[i] = orig - h;
            let minus = run(&mut g, &x, xs, &weights, build).0;
            g.params.params[pi].value[i] = orig;
            let num = (plus - minus) / (2.0 * h);
            let pname = g.params.params[pi].name.clone();
            assert!(
                tol(num, analytic),
                "{name}: d{pname}[{i}] analytic {analytic} numerical {num}"
            );
            assert!(
                tol(num, grads[i]),
                "{name}: d{pname}[{i}] analytic {} numerical {num}",
                grads[i]
            );
        }
    }
}

fn store_with(f: impl FnOnce(&mut ParamStore<Cpu<f64>>, &Cpu<f64>)) -> ParamStore<Cpu<f64>> {
    let mut s = ParamStore::default();
    f(&mut s, &Cpu::new());
    s
}

#[test]
fn conv2d_backward_matches_finite_differences() {
    for (conv, xs) in [
        (
            Conv {
                c_in: 2,
                c_out: 3,
                k: 3,
                stride: 2,
                pad: 1,
            },
            Shape4 {
                n: 2,
                c: 2,
                h: 5,
                w: 7,
            },
        ),
        (
            Conv {
                c_in: 3,
                c_out: 2,
                k: 3,
                stride: 1,
                pad: 1,
            },
            Shape4 {
                n: 1,
                c: 3,
                h: 4,
                w: 3,
            },
        ),
        (
            Conv {
                c_in: 2,
                c_out: 2,
                k: 1,
                stride: 1,
                pad: 0,
            },
            Shape4 {
                n: 2,
                c: 2,
                h: 3,
                w: 3,
            },
        ),
        (
            Conv {
                c_in: 2,
                c_out: 3,
                k: 1,
                stride: 2,
                pad: 0,
            },
            Shape4 {
                n: 1,
                c: 2,
                h: 5,
                w: 5,
            },
        ),
    ] {
        let mut r = rng(5);
        let store = store_with(|s, b| {
            s.add_uniform(
                b,
                "w".into(),
                vec![conv.c_out, conv.c_in, conv.k, conv.k],
                0.5,
                &mut r,
            )
            .unwrap();
        });
        let w = store.find("w").unwrap();
        check_op(&format!("conv2d {conv:?}"), xs, store, &|g, x| {
            g.conv2d(x, w, conv).unwrap()
        });
    }
}

#[test]
fn batchnorm_train_and_eval_backward_match_finite_differences() {
    // Each: plain batchnorm, then the CPU's fused batchnorm + ReLU (one node).
    for (training, relu) in [(true, false), (false, false), (true, true), (false, true)] {
        let xs = Shape4 {
            n: 3,
            c: 2,
            h: 3,
            w: 1,
        };
        let mut bn_ids = None;
        let store = store_with(|s, b| {
            bn_ids = Some(s.add_batchnorm(b, "bn", 2).unwrap());
        });
        let (bn, gamma, beta) = bn_ids.unwrap();
        check_op(
            &format!("batchnorm training={training} relu={relu}"),
            xs,
            store,
            &|g, x| match relu {
                true => g.batchnorm_relu(x, bn, gamma, beta, training).unwrap(),
                false => g.batchnorm(x, bn, gamma, beta, training).unwrap(),
            },
        );
    }
}

/// The fused batchnorm + ReLU is the two ops exactly: same float32 values and gradients bit
/// for bit (the backward's mask is recomputed with the forward's arithmetic), in one node.
/// Betas put many pre-activations at and near zero, where a mask that differed would show.
#[test]
fn fused_batchnorm_relu_equals_batchnorm_then_relu_in_float32() {
    let xs = Shape4 {
        n: 5,
        c: 3,
        h: 7,
        w: 5,
    };
    let x = random_matrix(&mut rng(21), 1, xs.len());
    let weights = random_matrix(&mut rng(22), 1, xs.len());
    for training in [true, false] {
        let mut results = Vec::new();
        for fused in [false, true] {
            let b = Cpu::<f32>::new();
            let mut store = ParamStore::default();
            let (bn, gamma, beta) = store.add_batchnorm(&b, "bn", xs.c).unwrap();
            store.params[gamma.0].value = vec![1.3, -0.7, 0.9];
            store.params[beta.0].value = vec![0.0, 0.05, -0.4];
            let mut g = Graph::new(b, store);
            g.input_grads = true;
            for _ in 0..2 {
                g.begin();
                g.params.zero_grad(&g.backend).unwrap();
                let input = g.input(&x, xs).unwrap();
                let out = if fused {
                    g.batchnorm_relu(input, bn, gamma, beta, training).unwrap()
                } else {
                    let y = g.batchnorm(input, bn, gamma, beta, training).unwrap();
                    g.relu(y).unwrap()
                };
                let s = g.weighted_sum(out, &weights).unwrap();
                g.backward(s).unwrap();
                results.push((
                    g.len(),
                    g.value_f64(out).unwrap(),
                    g.grad_f64(input).unwrap(),
                    g.params.params[gamma.0].grad.clone(),
                    g.params.params[beta.0].grad.clone(),
                    g.params.bns[0].running_var.clone(),
                ));
            }
        }
        let (unfused, fused) = (&results[1], &results[3]);
        assert_eq!(unfused.0, fused.0 + 1, "the fused op is one node");
        let zeros = fused.1.iter().filter(|&&v| v == 0.0).count();
        assert!(zeros > xs.len() / 4, "only {zeros} outputs cut by the ReLU");
        assert_eq!(unfused.1, fused.1, "values, training={training}");
        assert_eq!(unfused.2, fused.2, "dx, training={training}");
        assert_eq!(unfused.3, fused.3, "dgamma, training={training}");
        assert_eq!(unfused.4, fused.4, "dbeta, training={training}");
        assert_eq!(unfused.5, fused.5, "running var, training={training}");
    }
}

#[test]
fn elementwise_pooling_and_linear_backward_match_finite_differences() {
    let xs = Shape4 {
        n: 2,
        c: 3,
        h: 4,
        w: 4,
    };
    check_op("relu", xs, ParamStore::default(), &|g, x| {
        g.relu(x).unwrap()
    });
    check_op("add (x + relu(x))", xs, ParamStore::default(), &|g, x| {
        let y = g.relu(x).unwrap();
        g.add(x, y).unwrap()
    });
    check_op("avgpool 2x2", xs, ParamStore::default(), &|g, x| {
        g.avgpool(x, 2).unwrap()
    });
    check_op("global avgpool", xs, ParamStore::default(), &|g, x| {
        g.avgpool(x, 4).unwrap()
    });
    check_op("flatten", xs, ParamStore::default(), &|g, x| {
        g.flatten(x).unwrap()
    });
    let mut r = rng(6);
    let mut ids = None;
    let store = store_with(|s, b| {
        let w = s
            .add_uniform(b, "w".into(), vec![5, 48], 0.3, &mut r)
            .unwrap();
        let bias = s.add_uniform(b, "b".into(), vec![5], 0.3, &mut r).unwrap();
        ids = Some((w, bias));
    });
    let (w, bias) = ids.unwrap();
    check_op("flatten + linear", xs, store, &|g, x| {
        let f = g.flatten(x).unwrap();
        g.linear(f, w, bias).unwrap()
    });
}

#[test]
fn instance_loss_op_backward_matches_finite_differences() {
    for semantics in [GradSemantics::QueryOnly, GradSemantics::BothSides] {
        let cfg = LossConfig {
            tau: 0.5,
            mu: 1.0,
            semantics,
            ..LossConfig::default()
        };
        let xs = Shape4 {
            n: 6,
            c: 4,
            h: 1,
            w: 1,
        };
        if semantics == GradSemantics::BothSides {
            // The full gradient is the derivative of the loss.
            check_op(
                "instance loss both-sides",
                xs,
                ParamStore::default(),
                &|g, x| g.instance_loss(x, &cfg).unwrap(),
            );
        } else {
            // Query-only is not the loss's derivative (keys are held fixed); check it is what
            // the loss implementation returns, passed through unchanged.
            let b = Cpu::<f64>::new();
            let mut g = Graph::new(b, ParamStore::default());
            g.input_grads = true;
            let z: Vec<f32> = random_matrix(&mut rng(7), 6, 4);
            g.begin();
            let x = g.input(&z, xs).unwrap();
            let l = g.instance_loss(x, &cfg).unwrap();
            g.backward(l).unwrap();
            let want = invaspread::loss::reference::instance_loss(&z, 6, 4, &cfg, true).unwrap();
            let got = g.grad_f64(x).unwrap();
            for (a, w) in got.iter().zip(want.grad_z.unwrap()) {
                assert!((a - w).abs() < 1e-10, "query-only dz {a} vs {w}");
            }
        }
    }
}

#[test]
fn batchnorm_eval_uses_the_running_statistics_of_training() {
    let b = Cpu::<f64>::new();
    let mut store = ParamStore::default();
    let (bn, gamma, beta) = store.add_batchnorm(&b, "bn", 3).unwrap();
    let mut g = Graph::new(b, store);
    let xs = Shape4 {
        n: 4,
        c: 3,
        h: 2,
        w: 2,
    };
    let x: Vec<f32> = random_matrix(&mut rng(8), 1, xs.len())
        .iter()
        .map(|v| v * 2.0 + 1.0)
        .collect();
    // 300 training passes on one batch: running mean -> batch mean, running var -> its
    // unbiased variance (momentum 0.1: 0.9^300 is negligible).
    for _ in 0..300 {
        g.begin();
        let v = g.input(&x, xs).unwrap();
        g.batchnorm(v, bn, gamma, beta, true).unwrap();
    }
    assert_eq!(g.params.bns[0].num_batches_tracked, 300);
    g.begin();
    let v = g.input(&x, xs).unwrap();
    let eval = g.batchnorm(v, bn, gamma, beta, false).unwrap();
    let eval = g.value_f64(eval).unwrap();
    let m = (xs.n * xs.h * xs.w) as f64;
    for c in 0..xs.c {
        let vals: Vec<f64> = (0..xs.n)
            .flat_map(|n| (0..4).map(move |j| (n * 3 + c) * 4 + j))
            .map(|i| f64::from(x[i]))
            .collect();
        let mean = vals.iter().sum::<f64>() / m;
        let unbiased = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (m - 1.0);
        for n in 0..xs.n {
            for j in 0..4 {
                let i = (n * 3 + c) * 4 + j;
                let want = (f64::from(x[i]) - mean) / (unbiased + 1e-5).sqrt();
                assert!(
                    (eval[i] - want).abs() < 1e-9,
                    "eval[{i}] {} vs {want}",
                    eval[i]
                );
            }
        }
    }
}

#[test]
fn resnet18_forward_with_a_fixed_seed_is_identical_twice() {
    let out = || {
        let b = Cpu::<f32>::new();
        let mut store = ParamStore::default();
        let model = Model::new(ModelKind::Resnet18Cifar, &mut store, &b, 42).unwrap();
        let mut g = Graph::new(b, store);
        let xs = Shape4 {
            n: 2,
            c: 3,
            h: 32,
            w: 32,
        };
        let x = random_matrix(&mut rng(9), 1, xs.len());
        g.begin();
        let v = g.input(&x, xs).unwrap();
        let z = model.forward(&mut g, v, true).unwrap();
        assert_eq!(
            g.shape(z),
            Shape4 {
                n: 2,
                c: 128,
                h: 1,
                w: 1
            }
        );
        (g.value(z).unwrap(), g.params.count(&g.backend))
    };
    let (a, count) = out();
    let (b, _) = out();
    // kuangliu-style CIFAR ResNet18 has 11,173,962 with a 10-class head; a 128-d head: 11,234,496.
    assert_eq!(count, 11_234_496);
    assert!(a.iter().all(|v| v.is_finite()));
    assert_eq!(
        a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        b.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
}

#[test]
fn checkpoints_round_trip_bit_exactly_and_reject_mismatches() {
    let dir = std::env::temp_dir().join(format!("invaspread-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let b = Cpu::<f32>::new();
    let mut store = ParamStore::default();
    let model = Model::new(ModelKind::ConvnetSmall, &mut store, &b, 1).unwrap();
    let mut g = Graph::new(b, store);
    let mut sgd = Sgd::new(SgdConfig::default());
    let xs = Shape4 {
        n: 8,
        c: 3,
        h: 8,
        w: 8,
    };
    let x = random_matrix(&mut rng(10), 1, xs.len());
    for _ in 0..2 {
        train_step(
            &mut g,
            &model,
            &mut sgd,
            &x,
            xs,
            &LossConfig::default(),
            0.03,
        )
        .unwrap();
    }
    let (model_path, opt_path) = (
        dir.join("model.safetensors"),
        dir.join("optimizer.safetensors"),
    );
    let meta = HashMap::from([("model".to_string(), "convnet-small".to_string())]);
    checkpoint::save_model(&g.params, &g.backend, &model_path, meta.clone()).unwrap();
    checkpoint::save_optimizer(&g.params, &sgd, &g.backend, &opt_path, meta).unwrap();

    let mut fresh = ParamStore::default();
    Model::new(ModelKind::ConvnetSmall, &mut fresh, &g.backend, 999).unwrap();
    let mut sgd2 = Sgd::new(SgdConfig::default());
    let read_meta = checkpoint::load_model(&mut fresh, &g.backend, &model_path).unwrap();
    checkpoint::load_optimizer(&mut fresh, &mut sgd2, &g.backend, &opt_path).unwrap();
    assert_eq!(
        read_meta.get("model").map(String::as_str),
        Some("convnet-small")
    );
    assert_eq!(sgd2.step, 2);
    let bits = |v: &Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for (a, b) in g.params.params.iter().zip(&fresh.params) {
        assert_eq!(bits(&a.value), bits(&b.value), "{}", a.name);
        assert_eq!(bits(&a.momentum), bits(&b.momentum), "{} momentum", a.name);
    }
    for (a, b) in g.params.bns.iter().zip(&fresh.bns) {
        assert_eq!(bits(&a.running_mean), bits(&b.running_mean));
        assert_eq!(bits(&a.running_var), bits(&b.running_var));
        assert_eq!(a.num_batches_tracked, 2);
        assert_eq!(b.num_batches_tracked, 2);
    }
    // Loading into another architecture names the first offending tensor.
    let mut other = ParamStore::default();
    Model::new(ModelKind::Resnet18Cifar, &mut other, &g.backend, 0).unwrap();
    let err = checkpoint::load_model(&mut other, &g.backend, &model_path)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.safetensors")
            && (err.contains("unexpected tensor")
                || err.contains("missing tensor")
                || err.contains("shape")),
        "{err}"
    );
    std::fs::write(dir.join("bad.safetensors"), b"not a checkpoint").unwrap();
    let err = checkpoint::load_model(&mut fresh, &g.backend, &dir.join("bad.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("bad.safetensors") && err.contains("not a safetensors file"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_small_model_overfits_a_small_batch() {
    let b = Cpu::<f32>::new();
    let mut store = ParamStore::default();
    let model = Model::new(ModelKind::ConvnetSmall, &mut store, &b, 3).unwrap();
    let mut g = Graph::new(b, store);
    let mut sgd = Sgd::new(SgdConfig {
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 0.0,
        nesterov: false,
    });
    // 8 images, two nearly identical views each: the loss can fall far.
    let m = 8;
    let xs = Shape4 {
        n: 2 * m,
        c: 3,
        h: 8,
        w: 8,
    };
    let images = random_matrix(&mut rng(11), m, 3 * 64);
    let noise = random_matrix(&mut rng(12), m, 3 * 64);
    let mut x = images.clone();
    x.extend(images.iter().zip(&noise).map(|(a, n)| a + 0.05 * n));
    let cfg = LossConfig::default();
    let first = train_step(&mut g, &model, &mut sgd, &x, xs, &cfg, 0.05).unwrap();
    let mut last = first;
    for _ in 0..60 {
        last = train_step(&mut g, &model, &mut sgd, &x, xs, &cfg, 0.05).unwrap();
    }
    assert!(
        last < first / 3.0,
        "the loss fell from {first} to only {last} in 60 steps (expected a factor of 3)"
    );
}

#[test]
fn learning_rate_schedules() {
    let step = Schedule::paper_step();
    assert_eq!(learning_rate(0.03, &step, 0, 200, 1, 0), 0.03);
    assert!((learning_rate(0.03, &step, 120, 200, 1, 0) - 0.003).abs() < 1e-12);
    assert!((learning_rate(0.03, &step, 160, 200, 1, 0) - 0.0003).abs() < 1e-12);
    assert!((learning_rate(0.1, &Schedule::Cosine {}, 50, 100, 10, 0) - 0.05).abs() < 1e-12);
    assert!((learning_rate(0.1, &Schedule::Cosine {}, 0, 100, 10, 10) - 0.01).abs() < 1e-12);
}

#[test]
fn sgd_matches_pytorch_update_rule() {
    // One parameter, two steps by hand: g' = g + wd w; v = g' then m v + g'; w -= lr v.
    let b = Cpu::<f64>::new();
    let mut store = ParamStore::default();
    store.add_values(&b, "w".into(), vec![1], &[1.0]).unwrap();
    let mut sgd = Sgd::new(SgdConfig {
        lr: 0.1,
        momentum: 0.9,
        weight_decay: 0.5,
        nesterov: false,
    });
    store.params[0].grad = vec![2.0];
    sgd.update(&b, &mut store, 0.1).unwrap();
    // g' = 2.5, v = 2.5, w = 1 - 0.25 = 0.75
    assert!((store.params[0].value[0] - 0.75).abs() < 1e-15);
    store.params[0].grad = vec![1.0];
    sgd.update(&b, &mut store, 0.1).unwrap();
    // g' = 1.375, v = 0.9 * 2.5 + 1.375 = 3.625, w = 0.75 - 0.3625
    assert!((store.params[0].value[0] - 0.3875).abs() < 1e-15);
}
