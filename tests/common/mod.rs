//! Helpers shared by the integration tests: running the `invaspread` binary, and comparing a
//! device's output with a CPU reference.

// Every test binary compiles this module and uses a part of it.
#![allow(dead_code)]

pub mod negatives;
pub mod op_cases;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The binary under test; `INVASPREAD_EXE` overrides the build path (scripts/device-check.sh
/// runs these tests on a machine where the build folder does not exist).
pub fn exe() -> String {
    std::env::var("INVASPREAD_EXE").unwrap_or_else(|_| env!("CARGO_BIN_EXE_invaspread").to_string())
}

/// Runs the binary under test and waits for it.
pub fn invaspread(args: &[&str]) -> Output {
    Command::new(exe())
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

/// ROOT/{train,test}/{horizontal,vertical}/NN.png: 16 x 16 stripes of two orientations with a
/// per-image phase, period and colour, `per_class` training and half as many test images each.
pub fn write_stripes(root: &Path, per_class: usize) {
    for (split, count) in [("train", per_class), ("test", per_class / 2)] {
        for (class, vertical) in [("horizontal", false), ("vertical", true)] {
            let dir = root.join(split).join(class);
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..count {
                let seed = i + if split == "test" { 100 } else { 0 };
                let period = 3 + seed % 4;
                let colour = [(40 * seed % 200) as u8, 90, (255 - 30 * seed % 200) as u8];
                let img = image::RgbImage::from_fn(16, 16, |x, y| {
                    let t = if vertical { x } else { y } as usize + seed;
                    if (t / period).is_multiple_of(2) {
                        image::Rgb(colour)
                    } else {
                        image::Rgb([250, 250, 250])
                    }
                });
                img.save(dir.join(format!("{i:02}.png"))).unwrap();
            }
        }
    }
}

/// A new empty folder for one test: its tag, the process and a per-process count, so that the
/// modules of one test binary never share a folder.
pub fn scratch_dir(tag: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("invaspread-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A [`scratch_dir`] removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Self {
        Scratch(scratch_dir(tag))
    }

    pub fn path(&self, name: &str) -> String {
        self.0.join(name).to_str().unwrap().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the binary, which must succeed without a panic; its standard error.
pub fn run_ok(args: &[&str]) -> String {
    let out = invaspread(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success() && !stderr.contains("panicked"),
        "invaspread {}\n{stderr}",
        args.join(" ")
    );
    stderr
}

/// The losses of steps.csv in the run folder `run`.
pub fn step_losses(run: &str) -> Vec<f64> {
    std::fs::read_to_string(Path::new(run).join("steps.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(1).unwrap().parse().unwrap())
        .collect()
}

/// Central finite differences of `f` at `x` with step `h`, one coordinate at a time.
pub fn numerical_gradient(x: &[f64], h: f64, f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    let mut x = x.to_vec();
    (0..x.len())
        .map(|i| {
            let orig = x[i];
            x[i] = orig + h;
            let plus = f(&x);
            x[i] = orig - h;
            let minus = f(&x);
            x[i] = orig;
            (plus - minus) / (2.0 * h)
        })
        .collect()
}

/// Skips (visibly) without a GPU, or with fewer real GPUs than `ranks` (the virtual GPU has as
/// many as asked for); false then.
pub fn ranks_or_skip(name: &str, ranks: usize) -> bool {
    use std::io::Write;
    let Some(gpu) = invaspread::testing::gpu_or_skip(name) else {
        return false;
    };
    if !gpu.is_virtual() && invaspread::cuda::device_count().unwrap_or(0) < ranks {
        // Straight to the terminal, as testing::gpu_or_skip does (eprintln! is captured).
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED (fewer than {ranks} GPUs): {name}"
        );
        return false;
    }
    true
}

/// Whether the crate was built with its `test-hooks` feature (`cargo test --features
/// test-hooks`, as `.ci/run` tests); prints `SKIPPED (no test-hooks feature): test` when not.
pub fn hooks_or_skip(test: &str) -> bool {
    if invaspread::test_hooks::ENABLED {
        return true;
    }
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED (no test-hooks feature; cargo test --features test-hooks): {test}"
    );
    false
}
