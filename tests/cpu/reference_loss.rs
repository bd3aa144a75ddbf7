//! The float64 reference against loss.md: its test vector, finite differences under both
//! gradient semantics, invariance to row scaling, and every rejected input.
use crate::common::numerical_gradient;

use invaspread::loss::reference::{instance_loss, loss_with_fixed_keys};
use invaspread::loss::{GradSemantics, LossConfig};
use invaspread::testing::{random_matrix, rng};

/// loss.md's test vector: N = 4, d = 3, tau = 0.5, F already normalized (8 digits).
const F: [f64; 12] = [
    0.78710704,
    0.58950303,
    -0.18151772, //
    -0.92940589,
    0.04346545,
    -0.36649072, //
    0.82002432,
    -0.56831977,
    -0.06762214, //
    0.20016328,
    0.97969795,
    0.01125106,
];

fn cfg(tau: f64, mu: f64, semantics: GradSemantics) -> LossConfig {
    LossConfig {
        tau,
        mu,
        semantics,
        ..LossConfig::default()
    }
}

fn assert_close(got: &[f64], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol,
            "{what}[{i}]: got {g}, want {w} (tolerance {tol})"
        );
    }
}

#[test]
fn test_vector_loss_and_gradients() {
    #[rustfmt::skip]
    let cases: [(f64, GradSemantics, f64, [f64; 12], f64); 3] = [
        (1.0, GradSemantics::QueryOnly, 1.88204830, [
            -0.40349389, 1.0062762, 0.0511484, 0.21076491, -0.31070366, -0.05049338,
            -0.22820454, 0.02452549, 0.01850786, 1.16799121, 0.44900241, 0.11854804], 2e-8),
        (2.0, GradSemantics::QueryOnly, 2.26205528, [
            -0.3470207, 0.80090544, 0.03503303, 0.25786652, -0.38153571, -0.06162433,
            -0.32335564, 0.03389984, 0.02584686, 0.89239206, 0.25776027, 0.09863183], 2e-8),
        (1.0, GradSemantics::BothSides, 1.88204830, [
            -0.639971, 1.886332, 0.002567, 0.136418, -1.021202, -0.063328,
            -0.892877, -0.417232, 0.080759, 2.143487, 0.721202, 0.117713], 1e-6),
    ];
    for (mu, semantics, loss, grad, digits) in cases {
        let out = instance_loss(&F, 4, 3, &cfg(0.5, mu, semantics), true).unwrap();
        // F is rounded to 8 digits, so its norms are 1 only to about 1e-8.
        assert!(
            (out.loss - loss).abs() < 5e-8,
            "mu={mu} {semantics}: loss {} want {loss}",
            out.loss
        );
        assert_close(
            out.grad_f.as_ref().unwrap(),
            &grad,
            2e-7_f64.max(digits),
            &format!("dL/dF mu={mu} {semantics}"),
        );
        let mean: f64 = out.row_losses.iter().sum::<f64>() / 4.0;
        assert!((mean - out.loss).abs() < 1e-15);
    }
}

fn assert_relative(got: &[f64], want: &[f64], tol: f64, what: &str) {
    let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * scale,
            "{what}[{i}]: analytic {g}, numerical {w}, scale {scale}"
        );
    }
}

#[test]
fn query_only_gradient_matches_finite_differences_with_keys_fixed() {
    for (seed, n, d, tau, mu) in [
        (1, 4, 3, 0.5, 1.0),
        (2, 6, 5, 0.1, 1.0),
        (3, 8, 4, 0.2, 2.0),
        (4, 6, 7, 0.05, 1.5),
    ] {
        let z: Vec<f64> = random_matrix(&mut rng(seed), n, d)
            .into_iter()
            .map(f64::from)
            .collect();
        let c = cfg(tau, mu, GradSemantics::QueryOnly);
        let analytic = instance_loss(&z, n, d, &c, true).unwrap().grad_z.unwrap();
        let numerical = numerical_gradient(&z, 1e-6, |zq| {
            loss_with_fixed_keys(zq, &z, n, d, &c).unwrap()
        });
        assert_relative(
            &analytic,
            &numerical,
            1e-6,
            &format!("query-only seed {seed}"),
        );
    }
}

#[test]
fn both_sides_gradient_matches_finite_differences() {
    for (seed, n, d, tau, mu) in [
        (5, 4, 3, 0.5, 1.0),
        (6, 6, 5, 0.1, 1.0),
        (7, 8, 4, 0.2, 2.0),
        (8, 10, 3, 0.05, 1.0),
    ] {
        let z: Vec<f64> = random_matrix(&mut rng(seed), n, d)
            .into_iter()
            .map(f64::from)
            .collect();
        let c = cfg(tau, mu, GradSemantics::BothSides);
        let analytic = instance_loss(&z, n, d, &c, true).unwrap().grad_z.unwrap();
        let numerical = numerical_gradient(&z, 1e-6, |z| {
            instance_loss(z, n, d, &c, false).unwrap().loss
        });
        assert_relative(
            &analytic,
            &numerical,
            1e-6,
            &format!("both-sides seed {seed}"),
        );
    }
}

#[test]
fn fixed_keys_loss_equals_the_loss_when_queries_are_the_keys() {
    let z: Vec<f64> = random_matrix(&mut rng(9), 12, 6)
        .into_iter()
        .map(f64::from)
        .collect();
    let c = cfg(0.1, 1.0, GradSemantics::QueryOnly);
    let a = instance_loss(&z, 12, 6, &c, false).unwrap().loss;
    let b = loss_with_fixed_keys(&z, &z, 12, 6, &c).unwrap();
    assert!((a - b).abs() < 1e-14, "{a} vs {b}");
}

#[test]
fn loss_is_invariant_to_scaling_any_row() {
    let (n, d) = (10, 6);
    let z: Vec<f64> = random_matrix(&mut rng(10), n, d)
        .into_iter()
        .map(f64::from)
        .collect();
    let c = cfg(0.1, 1.0, GradSemantics::QueryOnly);
    let base = instance_loss(&z, n, d, &c, false).unwrap().loss;
    for (row, factor) in [(0, 3.0), (3, 1e-3), (7, 1e6), (9, 0.5)] {
        let mut scaled = z.clone();
        scaled[row * d..(row + 1) * d]
            .iter_mut()
            .for_each(|x| *x *= factor);
        let loss = instance_loss(&scaled, n, d, &c, false).unwrap().loss;
        assert!(
            (loss - base).abs() <= 1e-12 * base,
            "row {row} x{factor}: {loss} vs {base}"
        );
    }
}

#[test]
fn tiny_temperature_and_duplicate_partners_stay_finite() {
    let (n, d) = (8, 4);
    let mut z: Vec<f64> = random_matrix(&mut rng(11), n, d)
        .into_iter()
        .map(f64::from)
        .collect();
    z.copy_within(0..d, 4 * d); // row 0 equals its partner
    for tau in [0.005, 0.01, 0.05, 0.1, 10.0] {
        for semantics in [GradSemantics::QueryOnly, GradSemantics::BothSides] {
            let out = instance_loss(&z, n, d, &cfg(tau, 1.0, semantics), true).unwrap();
            assert!(
                out.loss.is_finite() && out.loss > 0.0,
                "tau {tau}: loss {}",
                out.loss
            );
            assert!(
                out.grad_z.unwrap().iter().all(|g| g.is_finite()),
                "tau {tau}: non-finite gradient"
            );
        }
    }
}

#[test]
fn rejected_inputs_give_clear_errors() {
    let good: Vec<f64> = random_matrix(&mut rng(12), 4, 3)
        .into_iter()
        .map(f64::from)
        .collect();
    let ok = cfg(0.1, 1.0, GradSemantics::QueryOnly);
    let expect_err = |z: &[f64], n: usize, d: usize, c: LossConfig, needle: &str| {
        let err = instance_loss(z, n, d, &c, true)
            .expect_err(needle)
            .to_string();
        assert!(
            err.contains(needle),
            "error {err:?} should mention {needle:?}"
        );
    };
    expect_err(
        &good,
        4,
        3,
        cfg(0.1, 0.5, GradSemantics::QueryOnly),
        "mu = 0.5 is invalid",
    );
    expect_err(
        &good,
        4,
        3,
        cfg(0.0, 1.0, GradSemantics::QueryOnly),
        "tau = 0 is invalid",
    );
    expect_err(
        &good,
        4,
        3,
        cfg(-0.1, 1.0, GradSemantics::QueryOnly),
        "tau = -0.1 is invalid",
    );
    expect_err(
        &good,
        4,
        3,
        cfg(f64::NAN, 1.0, GradSemantics::QueryOnly),
        "tau = NaN is invalid",
    );
    expect_err(&good[..9], 3, 3, ok, "N = 3 rows is invalid");
    expect_err(&good[..6], 2, 3, ok, "N = 2 rows is invalid");
    expect_err(&[], 4, 0, ok, "d = 0 columns is invalid");
    expect_err(&good, 4, 4, ok, "z has 12 elements");
    let mut nan = good.clone();
    nan[5] = f64::NAN;
    expect_err(&nan, 4, 3, ok, "z[1, 2] = NaN is not finite");
    let mut inf = good.clone();
    inf[0] = f64::INFINITY;
    expect_err(&inf, 4, 3, ok, "z[0, 0] = inf is not finite");
    let mut zero = good.clone();
    zero[6..9].fill(0.0);
    expect_err(&zero, 4, 3, ok, "row 2 of z is all zeros");
}
