//! Helpers for tests and benchmarks: adversarial inputs, error measures and the GPU-test guard
//! (seeded generators are in [`crate::rng`], re-exported here).
//!
//! GPU tests call [`gpu_or_skip`] first: without a GPU it prints `SKIPPED (no GPU): <name>`
//! to the terminal (not to the captured test output) and the test returns; with
//! `REQUIRE_GPU=1` the missing GPU fails the test instead.

use std::io::Write;
use std::sync::{Arc, OnceLock};

use rand::Rng;

use crate::cuda::{kernels, Gpu};
pub use crate::rng::{random_matrix, rng};

/// Whether `REQUIRE_GPU=1` is set: GPU tests then fail instead of skipping.
pub fn gpu_required() -> bool {
    std::env::var("REQUIRE_GPU").is_ok_and(|v| v == "1")
}

/// Says on the terminal (not the captured test output, which a passing test never shows) what a
/// GPU test does differently on the virtual GPU: smaller sizes, cases left to a real GPU.
pub fn virtual_gpu_note(test: &str, what: &str) {
    let _ = writeln!(std::io::stderr(), "virtual GPU: {test}: {what}");
}

/// The process-wide GPU for tests, or `None` after printing `SKIPPED (no GPU): name`.
/// Panics (fails the test) when `REQUIRE_GPU=1` and no GPU or no kernels are available.
pub fn gpu_or_skip(name: &str) -> Option<Arc<Gpu>> {
    static GPU: OnceLock<Result<Arc<Gpu>, String>> = OnceLock::new();
    let gpu = GPU.get_or_init(|| {
        if !kernels::BUILT {
            return Err(format!("kernels not built: {}", kernels::NOT_BUILT_REASON));
        }
        match Gpu::try_new() {
            Ok(Some(gpu)) => Ok(Arc::new(gpu)),
            Ok(None) => Err("no CUDA driver or device".into()),
            Err(e) => Err(e.to_string()),
        }
    });
    match gpu {
        Ok(gpu) if gpu.is_virtual() => {
            let _ = writeln!(std::io::stderr(), "virtual GPU: {name}");
            Some(gpu.clone())
        }
        Ok(gpu) => Some(gpu.clone()),
        Err(reason) if gpu_required() => {
            panic!("REQUIRE_GPU=1 but the GPU test {name} cannot run: {reason}")
        }
        Err(reason) => {
            // Straight to the terminal: the test harness captures print! but not this handle.
            let _ = writeln!(std::io::stderr(), "SKIPPED (no GPU): {name} ({reason})");
            None
        }
    }
}

/// Rows of +-1 times a power of two (2^-2 .. 2^2, per row), with `d` a power of 4 so that
/// ||row|| is a power of two: every normalized value, product and similarity is exact in
/// float32, TF32 and bf16 alike, so any precision ranks the negatives as float64 does, and
/// similarities tie often (d + 1 levels): a hard/easy selection's ties are exercised, and a
/// reduced-precision kernel's kept set is the reference's.
pub fn sign_matrix(rng: &mut impl Rng, n: usize, d: usize) -> Vec<f32> {
    let mut z = Vec::with_capacity(n * d);
    for _ in 0..n {
        let scale = 2f32.powi(rng.random_range(-2..=2));
        z.extend((0..d).map(|_| if rng.random::<bool>() { scale } else { -scale }));
    }
    z
}

/// Adversarial inputs for the loss: rows that are nearly equal to others, a row equal to its
/// partner, and very large and very small row norms.
pub fn adversarial_matrix(rng: &mut impl Rng, n: usize, d: usize) -> Vec<f32> {
    let mut z = random_matrix(rng, n, d);
    let m = n / 2;
    // Row 0's partner is a copy of it: s_{0,p} = 1/tau exactly, P_0 close to 1.
    for k in 0..d {
        z[m * d + k] = z[k];
    }
    // Two images whose four views are near-duplicates of one another (rows 1, 2 and their
    // partners): every one of those rows has a negative almost as close as its partner.
    // (A negative far closer than the partner at small tau makes 1 - Q_ab round to zero in
    // float32: ill-conditioned in any float32 implementation, PyTorch's included.)
    if n > 4 {
        let base: Vec<f32> = z[d..2 * d].to_vec();
        for row in [1, 2, 1 + m, 2 + m] {
            for k in 0..d {
                z[row * d + k] =
                    base[k] * (1.0 + 1e-5 * row as f32) + 1e-4 * (rng.random::<f32>() - 0.5);
            }
        }
    }
    // Huge and tiny norms: the loss only sees directions, so these must change nothing.
    for k in 0..d {
        z[(n - 1) * d + k] *= 1e15;
        z[(n - 2) * d + k] *= 1e-15;
    }
    z
}

pub use crate::loss::check::scaled_grad_error;
