//! The fused CPU loss (f32 and f64) against the float64 reference, forward and backward, both
//! semantics, on random and adversarial inputs over the sizes of the loss issue.

use invaspread::loss::{cpu, reference, GradSemantics, LossConfig};
use invaspread::simd::CpuFloat;
use invaspread::testing::{adversarial_matrix, random_matrix, rng, scaled_grad_error};

/// Tolerances: f64 agrees to rounding; f32 (SIMD exp/ln, f32 GEMM, f64 row sums) far under
/// 1e-3. Adversarial f32 inputs get 1e-4: near-duplicate rows make dL/df_a almost parallel to
/// f_a, and the normalization backward's projection then cancels in float32.
fn tolerance<T: CpuFloat>(adversarial: bool) -> f64 {
    match (T::LANES == 8, adversarial) {
        (true, false) => 2e-5,
        (true, true) => 1e-4,
        (false, _) => 1e-10,
    }
}

fn check<T: CpuFloat>(z: &[f32], n: usize, d: usize, cfg: LossConfig, case: &str) {
    let adversarial = case.starts_with("adversarial");
    let reference = reference::instance_loss(z, n, d, &cfg, true).unwrap();
    let zt: Vec<T> = z.iter().map(|&x| T::of(f64::from(x))).collect();
    let ours = cpu::instance_loss(&zt, n, d, &cfg, true).unwrap();
    let tol = tolerance::<T>(adversarial);
    let loss_err = (ours.loss - reference.loss).abs() / reference.loss.abs();
    assert!(
        loss_err < tol,
        "{} {case}: loss {} vs {} (rel {loss_err:e})",
        T::NAME,
        ours.loss,
        reference.loss
    );
    let g: Vec<f64> = ours.grad_z.unwrap().iter().map(|&x| x.into()).collect();
    let err = scaled_grad_error(&g, reference.grad_z.as_ref().unwrap(), z, d);
    assert!(err < tol, "{} {case}: gradient error {err:e}", T::NAME);
    let no_grad = cpu::instance_loss(&zt, n, d, &cfg, false).unwrap();
    assert!(no_grad.grad_z.is_none());
    assert_eq!(
        no_grad.loss.to_bits(),
        ours.loss.to_bits(),
        "{case}: loss must not depend on with_grad"
    );
}

const SEMANTICS: [GradSemantics; 2] = [GradSemantics::QueryOnly, GradSemantics::BothSides];

#[test]
fn every_size_against_the_reference() {
    let taus = [0.05, 0.1, 0.5];
    let mut i = 0;
    for n in [4usize, 6, 250, 256, 1000, 4098] {
        for d in [3usize, 64, 128, 130, 512] {
            if n * n * d > 1000 * 1000 * 512 {
                continue; // 4098 rows: covered below with fewer columns, the reference is O(N^2 d)
            }
            let z = random_matrix(&mut rng(100 + i), n, d);
            for semantics in SEMANTICS {
                let cfg = LossConfig {
                    tau: taus[i as usize % 3],
                    mu: [1.0, 2.0][(i as usize / 3) % 2],
                    semantics,
                    ..LossConfig::default()
                };
                let case = format!("random N={n} d={d} {cfg:?}");
                check::<f32>(&z, n, d, cfg, &case);
                check::<f64>(&z, n, d, cfg, &case);
            }
            i += 1;
        }
    }
    for (n, d) in [(4098usize, 3usize), (4098, 130)] {
        let z = random_matrix(&mut rng(200 + n as u64 + d as u64), n, d);
        for semantics in SEMANTICS {
            let cfg = LossConfig {
                tau: 0.1,
                mu: 1.0,
                semantics,
                ..LossConfig::default()
            };
            check::<f32>(&z, n, d, cfg, &format!("random N={n} d={d} {semantics}"));
        }
    }
}

#[test]
fn every_hyper_parameter_on_a_small_batch() {
    let (n, d) = (250, 130);
    let z = random_matrix(&mut rng(300), n, d);
    for tau in [0.05, 0.1, 0.5] {
        for mu in [1.0, 2.0] {
            for semantics in SEMANTICS {
                let cfg = LossConfig {
                    tau,
                    mu,
                    semantics,
                    ..LossConfig::default()
                };
                check::<f32>(&z, n, d, cfg, &format!("{cfg:?}"));
                check::<f64>(&z, n, d, cfg, &format!("{cfg:?}"));
            }
        }
    }
}

#[test]
fn adversarial_inputs_against_the_reference() {
    for (seed, n, d) in [
        (400u64, 6usize, 3usize),
        (401, 250, 64),
        (402, 256, 130),
        (403, 1000, 128),
    ] {
        let z = adversarial_matrix(&mut rng(seed), n, d);
        for tau in [0.05, 0.1, 0.5] {
            for semantics in SEMANTICS {
                let cfg = LossConfig {
                    tau,
                    mu: 1.0,
                    semantics,
                    ..LossConfig::default()
                };
                let case = format!("adversarial N={n} d={d} {cfg:?}");
                check::<f32>(&z, n, d, cfg, &case);
                check::<f64>(&z, n, d, cfg, &case);
            }
        }
    }
}

#[test]
fn results_are_deterministic() {
    let (n, d) = (1000, 64);
    let z = random_matrix(&mut rng(500), n, d);
    let cfg = LossConfig {
        tau: 0.1,
        mu: 1.0,
        semantics: GradSemantics::BothSides,
        ..LossConfig::default()
    };
    let a = cpu::instance_loss(&z, n, d, &cfg, true).unwrap();
    let b = cpu::instance_loss(&z, n, d, &cfg, true).unwrap();
    assert_eq!(a.loss.to_bits(), b.loss.to_bits());
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(
        bits(a.grad_z.as_ref().unwrap()),
        bits(b.grad_z.as_ref().unwrap())
    );
}

#[test]
fn invalid_input_is_rejected_like_the_reference() {
    let cfg = LossConfig::default();
    let z = random_matrix(&mut rng(600), 5, 3);
    assert!(cpu::instance_loss(&z, 5, 3, &cfg, true)
        .unwrap_err()
        .to_string()
        .contains("N = 5"));
    let mut zero = random_matrix(&mut rng(601), 4, 3);
    zero[3..6].fill(0.0);
    assert!(cpu::instance_loss(&zero, 4, 3, &cfg, true)
        .unwrap_err()
        .to_string()
        .contains("row 1 of z is all zeros"));
    let bad_mu = LossConfig { mu: 0.9, ..cfg };
    assert!(cpu::instance_loss(&z[..12], 4, 3, &bad_mu, true).is_err());
}

/// Rows already normalised: the loss is the loss of z, and dL/df, projected on each row's
/// tangent (dL/dz = (I - f f^T) dL/df for unit rows), is the reference's dL/dz; both
/// semantics, all and hard negatives, N not a multiple of the row block, d not of 4.
#[test]
fn normalized_rows_give_the_loss_and_the_gradient_before_the_projection() {
    let hard = invaspread::loss::Negatives::hard(0.5);
    for (i, (n, d)) in [(6usize, 3usize), (70, 5), (130, 128)]
        .into_iter()
        .enumerate()
    {
        let z = random_matrix(&mut rng(700 + i as u64), n, d);
        let f: Vec<f64> = z
            .chunks_exact(d)
            .flat_map(|row| {
                let norm = row
                    .iter()
                    .map(|&x| f64::from(x).powi(2))
                    .sum::<f64>()
                    .sqrt();
                row.iter().map(move |&x| f64::from(x) / norm)
            })
            .collect();
        let f32s: Vec<f32> = f.iter().map(|&x| x as f32).collect();
        for semantics in SEMANTICS {
            for negatives in [invaspread::loss::Negatives::All, hard] {
                let cfg = LossConfig {
                    semantics,
                    negatives,
                    ..LossConfig::default()
                };
                let want = reference::instance_loss(&f32s, n, d, &cfg, true).unwrap();
                let got = cpu::instance_loss_normalized(&f, n, d, &cfg, true).unwrap();
                let case = format!("n {n} d {d} {semantics} {negatives:?}");
                assert!(
                    (got.loss - want.loss).abs() < 1e-6 * want.loss.abs(),
                    "{case}: loss {} vs {}",
                    got.loss,
                    want.loss
                );
                let grad_f = got.grad_z.unwrap();
                let mut projected = vec![0.0; n * d];
                for a in 0..n {
                    let (fa, ga) = (&f[a * d..(a + 1) * d], &grad_f[a * d..(a + 1) * d]);
                    let along: f64 = fa.iter().zip(ga).map(|(x, g)| x * g).sum();
                    for k in 0..d {
                        projected[a * d + k] = ga[k] - along * fa[k];
                    }
                }
                let err = scaled_grad_error(&projected, want.grad_z.as_ref().unwrap(), &f32s, d);
                assert!(err < 1e-6, "{case}: gradient error {err:e}");
                // The gradient before the projection has a radial part the projection removes.
                let radial: f64 = (0..n)
                    .map(|a| {
                        let (fa, ga) = (&f[a * d..(a + 1) * d], &grad_f[a * d..(a + 1) * d]);
                        fa.iter().zip(ga).map(|(x, g)| x * g).sum::<f64>().abs()
                    })
                    .sum();
                assert!(
                    radial > 1e-6,
                    "{case}: dL/df has no radial part: {radial:e}"
                );
            }
        }
    }
}
