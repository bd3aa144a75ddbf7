//! `invaspread loss` end to end: agreement with an independent float64 implementation
//! (tests/independent_reference.py, the authors' operations back-propagated by hand), and clear
//! errors for bad files.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::{invaspread, repo};

use invaspread::npy;
use invaspread::testing::{random_matrix, rng};

fn scratch(tag: &str) -> PathBuf {
    crate::common::scratch_dir(&format!("cli-{tag}"))
}

fn python_reference(z: &Path, tau: f64, mu: f64, semantics: &str, grad: &Path) -> f64 {
    let script = repo().join("tests/independent_reference.py");
    let out = Command::new("python3")
        .arg(&script)
        .args([
            z.to_str().unwrap(),
            &tau.to_string(),
            &mu.to_string(),
            semantics,
            grad.to_str().unwrap(),
        ])
        .output()
        .expect("python3 must be installed to run the independent reference");
    assert!(
        out.status.success(),
        "python reference failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn loss_and_gradient_agree_with_an_independent_float64_implementation() {
    let dir = scratch("agree");
    let mut checked = 0;
    for (seed, n, d, as_f64) in [
        (21u64, 256usize, 128usize, false),
        (22, 6, 4, true),
        (23, 6, 4, false),
    ] {
        let z = random_matrix(&mut rng(seed), n, d);
        let path = dir.join(format!("z{seed}.npy"));
        if as_f64 {
            let z64: Vec<f64> = z.iter().map(|&x| f64::from(x) * 1.000_000_1).collect();
            npy::write(&path, &[n, d], &z64).unwrap();
        } else {
            npy::write(&path, &[n, d], &z).unwrap();
        }
        for tau in [0.1, 0.5] {
            for mu in [1.0, 2.0] {
                for (semantics, implementation) in [
                    ("query-only", "fused-f64"),
                    ("both-sides", "fused-f64"),
                    ("query-only", "reference"),
                ] {
                    let ours_grad = dir.join("ours.npy");
                    let theirs_grad = dir.join("theirs.npy");
                    let out = invaspread(&[
                        "loss",
                        "--input",
                        path.to_str().unwrap(),
                        "--tau",
                        &tau.to_string(),
                        "--mu",
                        &mu.to_string(),
                        "--grad-semantics",
                        semantics,
                        "--loss",
                        implementation,
                        "--grad-out",
                        ours_grad.to_str().unwrap(),
                    ]);
                    assert!(
                        out.status.success(),
                        "{}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                    let ours: f64 = String::from_utf8(out.stdout)
                        .unwrap()
                        .trim()
                        .parse()
                        .unwrap();
                    let theirs = python_reference(&path, tau, mu, semantics, &theirs_grad);
                    let case =
                        format!("N={n} d={d} tau={tau} mu={mu} {semantics} {implementation}");
                    assert!(
                        (ours - theirs).abs() <= 1e-6 * theirs.abs(),
                        "{case}: loss {ours} vs {theirs}"
                    );

                    let g_ours = npy::read(&ours_grad).unwrap();
                    assert_eq!(g_ours.dtype_name(), "float32", "--grad-out is float32");
                    assert_eq!(g_ours.shape, vec![n, d]);
                    let (g_ours, g_theirs) =
                        (g_ours.to_f64(), npy::read(&theirs_grad).unwrap().to_f64());
                    let scale = g_theirs.iter().fold(0.0f64, |m, x| m.max(x.abs()));
                    assert!(scale > 0.0, "{case}: zero gradient");
                    for (i, (a, b)) in g_ours.iter().zip(&g_theirs).enumerate() {
                        assert!(
                            (a - b).abs() <= 1e-6 * scale,
                            "{case}: dL/dz[{i}] {a} vs {b} (max |g| {scale})"
                        );
                    }
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, 36);
    std::fs::remove_dir_all(&dir).unwrap();
}

fn assert_fails_with(args: &[&str], needles: &[&str]) {
    let out = invaspread(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} should fail");
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "{args:?}: stderr {stderr:?} should contain {needle:?}"
        );
    }
}

#[test]
fn bad_files_and_values_give_clear_errors_and_a_nonzero_exit() {
    let dir = scratch("bad");
    let p = |name: &str| dir.join(name).to_str().unwrap().to_string();
    let good = random_matrix(&mut rng(30), 4, 3);
    npy::write(Path::new(&p("good.npy")), &[4, 3], &good).unwrap();

    std::fs::write(p("text.npy"), b"this is not an array").unwrap();
    assert_fails_with(
        &["loss", "--input", &p("text.npy")],
        &["text.npy", "not a .npy file"],
    );

    let bytes = std::fs::read(p("good.npy")).unwrap();
    std::fs::write(p("cut.npy"), &bytes[..bytes.len() - 5]).unwrap();
    assert_fails_with(
        &["loss", "--input", &p("cut.npy")],
        &["cut.npy", "truncated"],
    );

    npy::write(Path::new(&p("ints.npy")), &[4, 3], &[1i64; 12]).unwrap();
    assert_fails_with(
        &["loss", "--input", &p("ints.npy")],
        &["ints.npy", "'<i8' is not supported"],
    );

    npy::write(Path::new(&p("rank3.npy")), &[2, 2, 3], &good).unwrap();
    assert_fails_with(
        &["loss", "--input", &p("rank3.npy")],
        &["rank3.npy", "rank 3", "expected rank 2"],
    );

    npy::write(Path::new(&p("odd.npy")), &[3, 4], &good).unwrap();
    assert_fails_with(
        &["loss", "--input", &p("odd.npy")],
        &["odd.npy", "N = 3 rows is invalid"],
    );

    let mut nan = good.clone();
    nan[4] = f32::NAN;
    npy::write(Path::new(&p("nan.npy")), &[4, 3], &nan).unwrap();
    assert_fails_with(
        &["loss", "--input", &p("nan.npy")],
        &["nan.npy", "z[1, 1] = NaN is not finite"],
    );

    assert_fails_with(
        &["loss", "--input", &p("good.npy"), "--mu", "0.5"],
        &["'0.5' for '--mu <MU>'", "expected 1 <= mu <= 1000"],
    );
    assert_fails_with(
        &["loss", "--input", &p("good.npy"), "--tau", "0"],
        &["'0' for '--tau <TAU>'", "expected 0.025 <= tau <= 100"],
    );
    assert_fails_with(
        &["loss", "--input", &p("missing.npy")],
        &["missing.npy", "No such file"],
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn info_runs_without_a_gpu_and_lists_the_kernels() {
    let out = invaspread(&["info", "--kernels"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("cpu threads:"), "{text}");
    if invaspread::cuda::kernels::BUILT {
        assert!(
            text.contains("normalize_rows_fwd_v1") && text.contains("spill stores"),
            "{text}"
        );
    } else {
        assert!(text.contains("cuda kernels:  not built"), "{text}");
    }
}
