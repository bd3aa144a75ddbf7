//! Helpers shared by the integration tests: running the `invaspread` binary, and comparing a
//! device's output with a CPU reference.

// Every test binary compiles this module and uses a part of it.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};

/// Runs the binary under test; `INVASPREAD_EXE` overrides the build path (scripts/device-check.sh
/// runs these tests on a machine where the build folder does not exist).
pub fn invaspread(args: &[&str]) -> Output {
    let exe = std::env::var("INVASPREAD_EXE")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_invaspread").to_string());
    Command::new(exe)
        .args(args)
        .output()
        .expect("run invaspread")
}

/// The repository root; `INVASPREAD_REPO` overrides it for the same reason.
pub fn repo() -> PathBuf {
    std::env::var_os("INVASPREAD_REPO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// max |got - want| / max |want| (a non-finite `got` counts as infinitely wrong).
pub fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "lengths differ");
    let scale = want
        .iter()
        .fold(0.0f64, |m, &x| m.max(f64::from(x).abs()))
        .max(1e-30);
    got.iter()
        .zip(want)
        .map(|(&g, &w)| {
            if g.is_finite() {
                (f64::from(g) - f64::from(w)).abs() / scale
            } else {
                f64::INFINITY
            }
        })
        .fold(0.0, f64::max)
}

pub fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f64) {
    let e = rel_err(got, want);
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.1e}");
}
