//! The baselines' losses (`--method npid|nce|exemplar`) against float64 references written from
//! recipe.md's formulas, their gradients against finite differences of those references, the
//! bank's update, and their state's round trip through a run's resume.

use crate::common;

use invaspread::methods::exemplar::Classifier;
use invaspread::methods::memory_bank::{MemoryBank, Objective, NOISE, TEMPERATURE};
use invaspread::testing::{random_matrix, rng};

use crate::common::negatives::unit_rows as normalized;

fn dot(a: &[f64], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, &y)| x * f64::from(y)).sum()
}

/// NPID's loss in float64: mean_i -log softmax_j(f_i . v_j / T)[y_i].
fn npid_reference(z: &[f64], bank: &MemoryBank, y: &[usize]) -> f64 {
    let (d, f) = (bank.d, normalized(z, bank.d));
    let mut total = 0.0;
    for (i, &yi) in y.iter().enumerate() {
        let fi = &f[i * d..(i + 1) * d];
        let s: Vec<f64> = (0..bank.n)
            .map(|j| dot(fi, &bank.v[j * d..(j + 1) * d]) / TEMPERATURE)
            .collect();
        let log_sum = s.iter().map(|x| x.exp()).sum::<f64>().ln();
        total += log_sum - s[yi];
    }
    total / y.len() as f64
}

/// NCE's loss in float64 with the bank's Z and the given noise.
fn nce_reference(z: &[f64], bank: &MemoryBank, y: &[usize], noise: &[usize]) -> f64 {
    let (d, f) = (bank.d, normalized(z, bank.d));
    let c = NOISE as f64 / bank.n as f64;
    let zn = bank.z_nce.unwrap();
    let mut total = 0.0;
    for (i, &yi) in y.iter().enumerate() {
        let fi = &f[i * d..(i + 1) * d];
        let o = |j: usize| (dot(fi, &bank.v[j * d..(j + 1) * d]) / TEMPERATURE).exp() / zn;
        total -= (o(yi) / (o(yi) + c)).ln();
        for &j in &noise[i * NOISE..(i + 1) * NOISE] {
            total -= (c / (o(j) + c)).ln();
        }
    }
    total / y.len() as f64
}

/// Exemplar's loss in float64: mean_i -log softmax_j(f_i . w_j + b_j)[y_i].
fn exemplar_reference(z: &[f64], c: &Classifier, y: &[usize]) -> f64 {
    let (d, f) = (c.d, normalized(z, c.d));
    let mut total = 0.0;
    for (i, &yi) in y.iter().enumerate() {
        let fi = &f[i * d..(i + 1) * d];
        let s: Vec<f64> = (0..c.n)
            .map(|j| dot(fi, &c.w[j * d..(j + 1) * d]) + f64::from(c.b[j]))
            .collect();
        total += s.iter().map(|x| x.exp()).sum::<f64>().ln() - s[yi];
    }
    total / y.len() as f64
}

/// Finite differences with the step of the baselines' float64 references.
fn numerical_gradient(z: &[f64], f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    crate::common::numerical_gradient(z, 1e-6, f)
}

/// `got` (a loss and dL/dz in float32 arithmetic) against the float64 reference `f` at `z`.
fn check(what: &str, got_loss: f64, got_dz: &[f32], z: &[f32], f: impl Fn(&[f64]) -> f64) {
    let z64: Vec<f64> = z.iter().map(|&x| f64::from(x)).collect();
    let want = f(&z64);
    assert!(
        (got_loss - want).abs() < 1e-5 * want.abs().max(1.0),
        "{what}: loss {got_loss} vs {want}"
    );
    let numerical = numerical_gradient(&z64, &f);
    let scale = numerical.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    for (i, (&g, n)) in got_dz.iter().zip(&numerical).enumerate() {
        assert!(
            (f64::from(g) - n).abs() < 1e-4 * scale,
            "{what} dz[{i}]: {g} vs numerical {n} (scale {scale})"
        );
    }
}

const INDICES: [usize; 4] = [3, 0, 17, 9];

#[test]
fn npid_matches_its_float64_reference() {
    let (n, d) = (24, 6);
    let mut bank = MemoryBank::new(n, d, Objective::Softmax, 1).unwrap();
    let z = random_matrix(&mut rng(2), INDICES.len(), d);
    let out = bank.loss(&z, &INDICES, 0).unwrap();
    check("npid", out.loss, &out.dz, &z, |z| {
        npid_reference(z, &bank, &INDICES)
    });
}

#[test]
fn nce_matches_its_float64_reference_and_fixes_z_at_the_first_batch() {
    let (n, d) = (24, 6);
    let mut bank = MemoryBank::new(n, d, Objective::Nce, 3).unwrap();
    let z = random_matrix(&mut rng(4), INDICES.len(), d);
    let out = bank.loss(&z, &INDICES, 5).unwrap();
    let z_first = bank.z_nce.unwrap();
    let noise = bank.noise(5, INDICES.len());
    assert!(noise.iter().all(|&j| j < n) && noise.len() == INDICES.len() * NOISE);
    // Z = n x mean(exp(s)) over the first batch's own and noise entries.
    let f = normalized(&z.iter().map(|&x| f64::from(x)).collect::<Vec<_>>(), d);
    let mut sum = 0.0;
    for (i, &y) in INDICES.iter().enumerate() {
        let fi = &f[i * d..(i + 1) * d];
        for j in std::iter::once(y).chain(noise[i * NOISE..(i + 1) * NOISE].iter().copied()) {
            sum += (dot(fi, &bank.v[j * d..(j + 1) * d]) / TEMPERATURE).exp();
        }
    }
    let want_z = sum / (INDICES.len() * (NOISE + 1)) as f64 * n as f64;
    assert!(
        (z_first - want_z).abs() < 1e-6 * want_z,
        "Z {z_first} vs {want_z}"
    );
    check("nce", out.loss, &out.dz, &z, |z| {
        nce_reference(z, &bank, &INDICES, &noise)
    });
    let z2 = random_matrix(&mut rng(6), INDICES.len(), d);
    bank.loss(&z2, &INDICES, 6).unwrap();
    assert_eq!(
        bank.z_nce,
        Some(z_first),
        "Z stays fixed after the first batch"
    );
}

#[test]
fn exemplar_matches_its_float64_reference_and_takes_pytorchs_sgd_step() {
    let (n, d) = (24, 6);
    let mut c = Classifier::new(n, d, 7).unwrap();
    let z = random_matrix(&mut rng(8), INDICES.len(), d);
    let out = c.loss(&z, &INDICES).unwrap();
    check("exemplar", out.loss, &out.dz, &z, |z| {
        exemplar_reference(z, &c, &INDICES)
    });
    // The classifier's own gradient: finite differences of the reference in one weight and
    // one bias (of a class in the batch), through the update w <- w - lr (g + wd w).
    let z64: Vec<f64> = z.iter().map(|&x| f64::from(x)).collect();
    let (j, k) = (INDICES[2], 4);
    let probe = |dw: f32, db: f32| {
        let mut moved = c.clone();
        moved.w[j * d + k] += dw;
        moved.b[j] += db;
        exemplar_reference(&z64, &moved, &INDICES)
    };
    let gw = (probe(1e-3, 0.0) - probe(-1e-3, 0.0)) / 2e-3;
    let gb = (probe(0.0, 1e-3) - probe(0.0, -1e-3)) / 2e-3;
    let (w0, b0) = (c.w[j * d + k], c.b[j]);
    let sgd = invaspread::methods::SgdSettings {
        lr: 0.5,
        momentum: 0.9,
        weight_decay: 0.01,
        nesterov: false,
    };
    c.update(&sgd).unwrap();
    let want_w = f64::from(w0) - 0.5 * (gw + 0.01 * f64::from(w0));
    let want_b = f64::from(b0) - 0.5 * (gb + 0.01 * f64::from(b0));
    assert!(
        (f64::from(c.w[j * d + k]) - want_w).abs() < 1e-5,
        "{} vs {want_w}",
        c.w[j * d + k]
    );
    assert!(
        (f64::from(c.b[j]) - want_b).abs() < 1e-5,
        "{} vs {want_b}",
        c.b[j]
    );
}

#[test]
fn the_bank_update_mixes_half_and_half_and_renormalises() {
    let (n, d) = (10, 4);
    let mut bank = MemoryBank::new(n, d, Objective::Softmax, 9).unwrap();
    let before = bank.v.clone();
    let z = vec![2.0f32, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -3.0];
    bank.update(&z, &[1, 6]).unwrap();
    for (row, f) in [
        (1usize, [1.0f64, 0.0, 0.0, 0.0]),
        (6, [0.0, 0.0, 0.0, -1.0]),
    ] {
        let mixed: Vec<f64> = (0..d)
            .map(|k| 0.5 * f64::from(before[row * d + k]) + 0.5 * f[k])
            .collect();
        let norm = mixed.iter().map(|x| x * x).sum::<f64>().sqrt();
        for (k, m) in mixed.iter().enumerate() {
            assert!((f64::from(bank.v[row * d + k]) - m / norm).abs() < 1e-6);
        }
    }
    assert_eq!(bank.v[..d], before[..d], "other entries unchanged");
    assert!(bank.update(&z, &[1, 10]).is_err(), "an index past the bank");
}

/// A baseline's run stopped after its first epoch and resumed ends byte-identical to one that
/// never stopped: the bank (and NCE's Z, the classifier and its momentum) are in the state.
#[test]
fn a_resumed_baseline_run_ends_as_an_uninterrupted_one() {
    let data =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/sklearn-digits");
    if !data.exists() {
        eprintln!(
            "SKIPPED (no ../shared/data): a_resumed_baseline_run_ends_as_an_uninterrupted_one"
        );
        return;
    }
    let root = std::env::temp_dir().join(format!("invaspread-methods-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    for method in ["npid", "nce", "exemplar"] {
        let run = |dir: &std::path::Path, epochs: &str, resume: bool| {
            let mut args = vec![
                "--threads",
                "2",
                "train",
                "--dataset",
                "digits",
                "--data-dir",
                data.to_str().unwrap(),
                "--batch",
                "64",
                "--k",
                "20",
                "--method",
                method,
                "--epochs",
                epochs,
                "--out",
                dir.to_str().unwrap(),
            ];
            if resume {
                args.push("--resume");
            }
            let out = common::invaspread(&args);
            assert!(
                out.status.success(),
                "{method}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let (whole, split) = (
            root.join(format!("{method}-whole")),
            root.join(format!("{method}-split")),
        );
        run(&whole, "2", false);
        run(&split, "1", false);
        run(&split, "2", true);
        // (state.safetensors also holds the metrics' wall-clock seconds, so compare its
        // method tensors, and the files derived from the model.)
        for file in [
            "last.safetensors",
            "last.optimizer.safetensors",
            "steps.csv",
        ] {
            let (a, b) = (
                std::fs::read(whole.join(file)).unwrap(),
                std::fs::read(split.join(file)).unwrap(),
            );
            assert!(a == b, "{method}: {file} differs after a resume");
        }
        let extra = |dir: &std::path::Path| {
            invaspread::nn::checkpoint::load_extra_tensors(&dir.join("state.safetensors")).unwrap()
        };
        let (a, b) = (extra(&whole), extra(&split));
        assert!(
            !a.is_empty(),
            "{method}: the state holds the method's tensors"
        );
        assert!(
            a == b,
            "{method}: the method's state differs after a resume"
        );
        let config = std::fs::read_to_string(whole.join("config.json")).unwrap();
        assert!(
            config.contains(&format!("\"method\": \"{method}\"")),
            "{config}"
        );
    }
    std::fs::remove_dir_all(&root).unwrap();
}
