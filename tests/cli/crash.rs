//! Crash consistency of `invaspread train`: the process is aborted (as `kill -9` would end it)
//! at every write event of a run, two per file written (after its temporary is synced, after
//! the rename; `INVASPREAD_CRASH_AT_WRITE`, src/durable.rs), and then resumed. Every such run,
//! and every run crashed again while it resumes, must end in the same files, byte for byte, as
//! a run that never stopped. A full disk (a file size limit) in the middle of a save must leave
//! the previous state resumable.
use crate::common::exe;

use crate::common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

struct Case {
    root: PathBuf,
    data: String,
}

impl Case {
    fn new(tag: &str) -> Case {
        let root =
            std::env::temp_dir().join(format!("invaspread-crash-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let data = root.join("stripes");
        common::write_stripes(&data, 16); // 32 training images: 4 steps an epoch at batch 8
        let data = data.to_str().unwrap().to_string();
        Case { root, data }
    }

    /// 9 steps: epochs end (and save) after steps 4, 8 and 9.
    fn train(&self, out: &Path, resume: bool) -> Command {
        self.train_steps(out, resume, "9")
    }

    fn train_steps(&self, out: &Path, resume: bool, steps: &str) -> Command {
        let mut cmd = Command::new(exe());
        cmd.args([
            "--threads",
            "1",
            "train",
            "--dataset",
            "folder",
            "--data-dir",
            &self.data,
        ])
        .args([
            "--steps", steps, "--batch", "8", "--k", "5", "--seed", "3", "--out",
        ])
        .arg(out);
        if resume {
            cmd.arg("--resume");
        }
        cmd
    }

    fn run(&self, out: &Path, resume: bool, crash_at: Option<u64>) -> Output {
        let mut cmd = self.train(out, resume);
        if let Some(n) = crash_at {
            cmd.env("INVASPREAD_CRASH_AT_WRITE", n.to_string());
        }
        cmd.output().unwrap()
    }
}

/// Whether the run was aborted by the hook (SIGABRT, no exit code).
fn crashed(out: &Output) -> bool {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    if out.status.code().is_none() {
        assert!(
            err.contains("INVASPREAD_CRASH_AT_WRITE"),
            "died otherwise: {err}"
        );
        true
    } else {
        assert!(out.status.success(), "failed: {err}");
        false
    }
}

/// The end state that must match, file by file: the checkpoints (model, momentum) and the step
/// log, which hold everything of the state file but the wall-clock seconds of its metrics
/// history (metrics.csv is compared without them).
const COMPARED: [&str; 5] = [
    "last.safetensors",
    "last.optimizer.safetensors",
    "best.safetensors",
    "steps.csv",
    "metrics.png",
];

fn assert_same_end(got: &Path, want: &Path, what: &str) {
    for file in COMPARED {
        let (a, b) = (
            std::fs::read(got.join(file)),
            std::fs::read(want.join(file)).unwrap(),
        );
        assert!(
            a.as_ref().is_ok_and(|a| *a == b),
            "{what}: {file} differs from the uninterrupted run's"
        );
    }
    let columns = |dir: &Path| -> Vec<String> {
        std::fs::read_to_string(dir.join("metrics.csv"))
            .unwrap()
            .lines()
            .map(|l| l.rsplit_once(',').unwrap().0.to_string())
            .collect()
    };
    assert_eq!(columns(got), columns(want), "{what}: metrics.csv");
    let leftovers: Vec<_> = std::fs::read_dir(got)
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(".invaspread-tmp-")
        })
        .collect();
    assert!(
        leftovers.is_empty(),
        "{what}: temporaries left: {leftovers:?}"
    );
}

#[test]
fn a_crash_at_any_write_then_resume_ends_as_the_uninterrupted_run() {
    if !crate::common::hooks_or_skip(
        "a_crash_at_any_write_then_resume_ends_as_the_uninterrupted_run",
    ) {
        return;
    }
    let case = Case::new("writes");
    let whole = case.root.join("whole");
    assert!(!crashed(&case.run(&whole, false, None)));

    // A fresh run crashed at write n, then resumed without crashing.
    let mut n = 1;
    let mut mid = None;
    loop {
        let out = case.root.join(format!("at-{n}"));
        if !crashed(&case.run(&out, false, Some(n))) {
            break; // n is past the last write: every write was a crash point
        }
        if mid.is_none() && out.join("state.safetensors").exists() {
            mid = Some(n); // the first crash with a committed state: resumed below, crashed again
        }
        assert!(
            !crashed(&case.run(&out, true, None)),
            "resume after a crash at write {n}"
        );
        assert_same_end(&out, &whole, &format!("crash at write {n}"));
        std::fs::remove_dir_all(&out).unwrap();
        n += 1;
    }
    assert!(
        n > 20,
        "only {} write events: the hook is not reached",
        n - 1
    );

    // A run crashed after its first commit, then crashed again at every write of its resume.
    let first = mid.expect("a crash point after the first commit");
    let mut m = 1;
    loop {
        let out = case.root.join(format!("again-{m}"));
        assert!(crashed(&case.run(&out, false, Some(first))));
        if !crashed(&case.run(&out, true, Some(m))) {
            break;
        }
        assert!(
            !crashed(&case.run(&out, true, None)),
            "second resume, crash at {m}"
        );
        assert_same_end(
            &out,
            &whole,
            &format!("crash at {first}, then at {m} while resuming"),
        );
        std::fs::remove_dir_all(&out).unwrap();
        m += 1;
    }
    eprintln!("crash points: {} in a run, {} in a resume", n - 1, m - 1);
    std::fs::remove_dir_all(&case.root).unwrap();
}

#[test]
fn a_full_disk_mid_save_keeps_the_last_state_and_the_run_resumes_once_there_is_room() {
    let case = Case::new("full-disk");
    let whole = case.root.join("whole");
    assert!(!crashed(&case.run(&whole, false, None)));
    // The first commit's state file, then a limit just above it: the later, larger commits
    // (more step losses, more metrics) fail as on a full disk.
    let first = case.root.join("first");
    let out = case.train_steps(&first, false, "4").output().unwrap();
    assert!(out.status.success());
    let limit = std::fs::metadata(first.join("state.safetensors"))
        .unwrap()
        .len()
        + 8;
    let full = case.root.join("full");
    let mut cmd = case.train(&full, false);
    // SAFETY: between fork and exec only async-signal-safe calls (setrlimit, signal).
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            libc::setrlimit(libc::RLIMIT_FSIZE, &lim);
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN); // a write past it fails with EFBIG
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("state.safetensors") && !err.contains("panicked"),
        "{err}"
    );
    // The first commit is intact and resumable, and the end is the uninterrupted run's.
    assert!(!crashed(&case.run(&full, true, None)));
    assert_same_end(&full, &whole, "full disk at the second commit");
    std::fs::remove_dir_all(&case.root).unwrap();
}
