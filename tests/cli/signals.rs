//! SIGINT and SIGTERM in every phase of `invaspread train`: before the first step (loading, the
//! first evaluation) the process ends at once with 128 + signal and saves nothing; during
//! training it stops after a step, saves, and ends with 128 + signal; `--resume` then finishes a
//! run whose checkpoints and step log are byte-identical to an uninterrupted run's.
use crate::common::exe;

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn scratch(tag: &str) -> PathBuf {
    crate::common::scratch_dir(&format!("signals-{tag}"))
}

fn spawn(args: &[&str], log: &Path) -> Child {
    Command::new(exe())
        .args(args)
        .stderr(Stdio::from(std::fs::File::create(log).unwrap()))
        .spawn()
        .unwrap()
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

/// Waits until `ready` holds (polling), failing after a minute.
fn wait_for(what: &str, ready: impl Fn() -> bool) {
    let start = Instant::now();
    while !ready() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The exit status of `child`, which must end within `limit`.
fn exit_code_within(child: &mut Child, limit: Duration) -> Option<i32> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        assert!(
            start.elapsed() < limit,
            "the run did not end within {limit:?} of the signal"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The checkpoints, the step log and the plot of two runs are byte-identical.
fn assert_same_files(cut: &Path, whole: &Path) {
    let files = [
        "last.safetensors",
        "last.optimizer.safetensors",
        "best.safetensors",
        "steps.csv",
        "metrics.png",
    ];
    for file in files {
        let (a, b) = (
            std::fs::read(cut.join(file)).unwrap(),
            std::fs::read(whole.join(file)).unwrap(),
        );
        assert!(
            a == b,
            "{file} differs between the resumed and the uninterrupted run"
        );
    }
}

const RUN: [&str; 7] = ["train", "--epochs", "3", "--batch", "64", "--k", "20"];

#[test]
fn sigint_during_the_first_evaluation_ends_at_once_with_130() {
    let dir = scratch("first-knn");
    let out = dir.to_str().unwrap();
    let log = std::env::temp_dir().join(format!(
        "invaspread-signals-first-{}.log",
        std::process::id()
    ));
    let mut child = spawn(&[&RUN[..], &["--out", out]].concat(), &log);
    // The lock is taken once the data is loaded, right before the first evaluation.
    let pid = child.id().to_string();
    wait_for("the lock", || {
        std::fs::read_to_string(dir.join(".lock")).unwrap_or_default() == pid
    });
    signal(&child, libc::SIGINT);
    assert_eq!(
        exit_code_within(&mut child, Duration::from_secs(5)),
        Some(130)
    );
    let err = std::fs::read_to_string(&log).unwrap();
    assert!(
        err.contains("before training started: nothing to save"),
        "{err}"
    );
    assert!(!dir.join("last.safetensors").exists());
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_file(&log).unwrap();
}

#[test]
fn sigint_while_the_data_loads_ends_at_once_with_130() {
    let cifar = common::repo().join("../shared/data/cifar10-jpg/cifar10-jpg.tar.gz");
    if !cifar.exists() {
        eprintln!("SKIPPED (no ../shared): sigint_while_the_data_loads_ends_at_once_with_130");
        return;
    }
    let dir = scratch("loading");
    let out = dir.to_str().unwrap();
    let log = std::env::temp_dir().join(format!(
        "invaspread-signals-load-{}.log",
        std::process::id()
    ));
    let args = [
        "train",
        "--dataset",
        "folder",
        "--data-dir",
        cifar.to_str().unwrap(),
        "--epochs",
        "1",
    ];
    let mut child = spawn(&[&args[..], &["--out", out]].concat(), &log);
    // Decoding 60,000 JPEGs takes seconds; half a second in, it is loading.
    std::thread::sleep(Duration::from_millis(500));
    signal(&child, libc::SIGINT);
    assert_eq!(
        exit_code_within(&mut child, Duration::from_secs(5)),
        Some(130)
    );
    assert!(
        !dir.join(".lock").exists(),
        "it had finished loading: the test did not test loading"
    );
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::remove_file(&log).unwrap();
}

#[test]
fn sigterm_mid_training_saves_exits_143_and_resume_ends_as_an_uninterrupted_run() {
    let (cut, whole) = (scratch("cut"), scratch("whole"));
    let log =
        std::env::temp_dir().join(format!("invaspread-signals-cut-{}.log", std::process::id()));
    let mut child = spawn(
        &[&RUN[..], &["--out", cut.to_str().unwrap()]].concat(),
        &log,
    );
    // A few steps into the first epoch (its progress line follows the first evaluation).
    wait_for("training", || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("initialisation")
    });
    std::thread::sleep(Duration::from_millis(1500));
    signal(&child, libc::SIGTERM);
    assert_eq!(
        exit_code_within(&mut child, Duration::from_secs(30)),
        Some(143)
    );
    let err = std::fs::read_to_string(&log).unwrap();
    assert!(
        err.contains("SIGTERM received") && err.contains("continue with --resume"),
        "{err}"
    );

    let resume =
        common::invaspread(&[&RUN[..], &["--out", cut.to_str().unwrap(), "--resume"]].concat());
    assert!(
        resume.status.success(),
        "{}",
        String::from_utf8_lossy(&resume.stderr)
    );
    let full = common::invaspread(&[&RUN[..], &["--out", whole.to_str().unwrap()]].concat());
    assert!(
        full.status.success(),
        "{}",
        String::from_utf8_lossy(&full.stderr)
    );
    assert_same_files(&cut, &whole);
    std::fs::remove_dir_all(&cut).unwrap();
    std::fs::remove_dir_all(&whole).unwrap();
    std::fs::remove_file(&log).unwrap();
}

#[test]
fn a_signal_during_an_epochs_evaluation_saves_it_pending_and_resume_evaluates_it() {
    let name = "a_signal_during_an_epochs_evaluation_saves_it_pending_and_resume_evaluates_it";
    if !common::hooks_or_skip(name) {
        return;
    }
    let dir = scratch("eval");
    let data = dir.join("data");
    common::write_stripes(&data, 16); // 4 steps an epoch at batch 8
    let run = |out: &Path, resume: bool, hook: bool| {
        let mut cmd = Command::new(exe());
        cmd.args([
            "train",
            "--dataset",
            "folder",
            "--data-dir",
            data.to_str().unwrap(),
        ])
        .args([
            "--steps",
            "9",
            "--batch",
            "8",
            "--k",
            "5",
            "--out",
            out.to_str().unwrap(),
        ]);
        if resume {
            cmd.arg("--resume");
        }
        if hook {
            // SIGTERM as the first end-of-epoch evaluation begins (trainer::signals).
            cmd.env("INVASPREAD_SIGNAL_AT_EVAL", "1");
        }
        cmd.output().unwrap()
    };
    let (cut, whole) = (dir.join("cut"), dir.join("whole"));
    let out = run(&cut, false, true);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(143), "{err}");
    assert!(
        err.contains("interrupted during the evaluation of epoch 1: saved step 4"),
        "{err}"
    );
    assert!(
        !cut.join("metrics.csv").exists()
            || !std::fs::read_to_string(cut.join("metrics.csv"))
                .unwrap()
                .contains("\n1,4,")
    );
    assert!(run(&cut, true, false).status.success());
    assert!(run(&whole, false, false).status.success());
    assert_same_files(&cut, &whole);
    let rows = |d: &Path| {
        std::fs::read_to_string(d.join("metrics.csv"))
            .unwrap()
            .lines()
            .count()
    };
    assert_eq!(rows(&cut), rows(&whole), "the pending evaluation's row");
    std::fs::remove_dir_all(&dir).unwrap();
}
