//! Careless and hostile input to the command line: every case must end in a clear error that
//! names the flag or file, the value and what was expected, with no panic and no abort. Each case
//! here crashed, hung, aborted or was accepted silently before it had a check.

use crate::common;

use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::common::invaspread;

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Fails with `code` and every needle in stderr, without a panic or an abort.
fn assert_refused(args: &[&str], code: i32, needles: &[&str]) {
    let out = invaspread(args);
    let err = stderr_of(&out);
    assert_eq!(
        out.status.code(),
        Some(code),
        "invaspread {}: {err}",
        args.join(" ")
    );
    assert!(
        !err.contains("panicked") && !err.contains("memory allocation"),
        "{err}"
    );
    for needle in needles {
        assert!(
            err.contains(needle),
            "invaspread {}: expected {needle:?} in\n{err}",
            args.join(" ")
        );
    }
}

#[test]
fn numeric_flags_outside_their_range_are_usage_errors() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["train", "--out", "/tmp/x", "--lr", "nan"],
            "expected 0 < lr <= 10",
        ),
        (
            &["train", "--out", "/tmp/x", "--lr", "-0.1"],
            "expected 0 < lr <= 10",
        ),
        (
            &["train", "--out", "/tmp/x", "--momentum", "nan"],
            "expected 0 <= momentum < 1",
        ),
        (
            &["train", "--out", "/tmp/x", "--weight-decay", "-1"],
            "0 <= weight_decay < 1",
        ),
        (
            &["train", "--out", "/tmp/x", "--sigma", "0"],
            "0.001 <= sigma <= 100",
        ),
        (
            &["train", "--out", "/tmp/x", "--k", "0"],
            "1 <= k <= 100000",
        ),
        (
            &["train", "--out", "/tmp/x", "--mu", "1e9"],
            "1 <= mu <= 1000",
        ),
        (
            &["train", "--out", "/tmp/x", "--tau", "1e-6"],
            "0.025 <= tau <= 100",
        ),
        (
            &["train", "--out", "/tmp/x", "--bucket-mb", "0"],
            "0 < bucket_mb <= 4096",
        ),
        (
            &["train", "--out", "/tmp/x", "--image-size", "0"],
            "1 <= image_size <= 1024",
        ),
        (
            &["train", "--out", "/tmp/x", "--image-size", "4294967297"],
            "1 <= image_size <= 1024",
        ),
        (
            &[
                "train",
                "--out",
                "/tmp/x",
                "--epochs",
                "18446744073709551615",
            ],
            "0 <= epochs <= 1000000",
        ),
        (
            &["--threads", "100000", "train", "--out", "/tmp/x"],
            "1 <= threads <= 1024",
        ),
        (
            &["eval", "--checkpoint", "x", "--k", "0"],
            "1 <= k <= 100000",
        ),
        (
            &["random", "--n", "1000000000", "--out", "/tmp/x.npy"],
            "2 <= n <= 16777216",
        ),
        (&["bench-loss", "--n", "4294967296"], "2 <= n <= 16777216"),
        (
            &["loss", "--input", "x", "--tau", "0"],
            "0.025 <= tau <= 100",
        ),
    ];
    for (args, range) in cases {
        assert_refused(args, 2, &["invalid value", range]);
    }
}

#[test]
fn sizes_beyond_memory_are_refused_before_allocating() {
    // Within the flags' ranges, but terabytes: a clear error, not an abort in the allocator.
    assert_refused(
        &[
            "random",
            "--n",
            "16777216",
            "--d",
            "65536",
            "--out",
            "/tmp/never.npy",
        ],
        1,
        &[
            "random --n 16777216 --d 65536: needs",
            "GB of memory available",
        ],
    );
    assert_refused(
        &["bench-loss", "--n", "16777216", "--d", "65536"],
        1,
        &["bench-loss --n 16777216 --d 65536: needs"],
    );
    // Under an address-space limit (`ulimit -v`, 2 GiB here) far below the machine's memory:
    // 4 GB of output is refused clearly, not aborted in the allocator after it starts.
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "ulimit -v 2097152 && exec {} random --n 1048576 --d 1024 --out /tmp/never.npy",
            common::exe()
        ))
        .output()
        .unwrap();
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("random --n 1048576 --d 1024: needs") && !err.contains("memory allocation"),
        "{err}"
    );
}

#[test]
fn a_replayed_configuration_out_of_range_names_the_field() {
    let dir = std::env::temp_dir().join(format!("invaspread-careless-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("config.json");
    let out = dir.join("run");
    let default = serde_json::to_value(invaspread::trainer::TrainConfig::default()).unwrap();
    for (field, value, needles) in [
        (
            "/sgd/momentum",
            serde_json::json!(1.5),
            ["sgd.momentum in config.json", "= 1.5", "0 <= momentum < 1"],
        ),
        (
            "/loss/negatives",
            serde_json::json!({"kind": "hard", "fraction": 1.5}),
            [
                "loss.negatives.fraction in config.json",
                "= 1.5",
                "0 < negative_fraction <= 1",
            ],
        ),
        // Unknown fields of the unit variant passed silently.
        (
            "/loss/negatives",
            serde_json::json!({"kind": "all", "bogus": 1}),
            [
                "field `loss.negatives.bogus`",
                "unknown field `bogus`",
                "`kind`, `fraction`, `scale`",
            ],
        ),
        (
            "/loss/negatives",
            serde_json::json!({"kind": "all", "fraction": 0.5}),
            [
                "field `loss.negatives`",
                "\"all\" take no `fraction` or `scale`",
                "hard or easy",
            ],
        ),
    ] {
        let mut cfg = default.clone();
        *cfg.pointer_mut(field).unwrap() = value;
        std::fs::write(&path, cfg.to_string()).unwrap();
        let args = [
            "train",
            "--config",
            path.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        let mut all = vec![path.to_str().unwrap()];
        all.extend(needles);
        assert_refused(&args, 1, &all);
        assert!(
            !out.join("config.json").exists(),
            "a refused run wrote its configuration"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn embed_refuses_to_overwrite_the_checkpoint_it_reads() {
    let dir =
        std::env::temp_dir().join(format!("invaspread-careless-embed-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let run = dir.to_str().unwrap();
    let out = invaspread(&["train", "--steps", "0", "--k", "5", "--out", run]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let ckpt = dir.join("last.safetensors");
    let before = std::fs::read(&ckpt).unwrap();
    // The same file by another spelling: ./ and a symbolic link.
    let link = dir.join("link.safetensors");
    std::os::unix::fs::symlink(&ckpt, &link).unwrap();
    for target in [
        format!("{run}/./last.safetensors"),
        link.to_str().unwrap().to_string(),
    ] {
        assert_refused(
            &[
                "embed",
                "--checkpoint",
                ckpt.to_str().unwrap(),
                "--out",
                &target,
            ],
            1,
            &[
                "is the checkpoint this command reads",
                "choose another output path",
            ],
        );
    }
    assert_eq!(
        std::fs::read(&ckpt).unwrap(),
        before,
        "the checkpoint changed"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_second_training_into_the_same_folder_is_refused_while_the_first_runs() {
    let dir = std::env::temp_dir().join(format!("invaspread-careless-lock-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = dir.to_str().unwrap();
    let exe = std::env::var("INVASPREAD_EXE")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_invaspread").to_string());
    let mut first = Command::new(&exe)
        .args([
            "train", "--epochs", "2", "--batch", "64", "--k", "20", "--out", out,
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The lock file holds the first run's process id once it is taken.
    let lock = Path::new(out).join(".lock");
    let pid = first.id().to_string();
    let start = std::time::Instant::now();
    while std::fs::read_to_string(&lock).unwrap_or_default() != pid {
        assert!(
            start.elapsed().as_secs() < 60,
            "the first run never took the lock"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_refused(
        &[
            "train", "--epochs", "2", "--batch", "64", "--k", "20", "--out", out, "--resume",
        ],
        1,
        &["is in use by another training", &format!("process {pid}")],
    );
    let status = first.wait().unwrap();
    assert!(status.success(), "the first run failed");
    // Finished, the folder is free again: a resume of the finished run is accepted.
    let again = invaspread(&[
        "train", "--epochs", "2", "--batch", "64", "--k", "20", "--out", out, "--resume",
    ]);
    assert!(again.status.success(), "{}", stderr_of(&again));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_resume_cannot_shorten_a_run_and_leaves_its_state_alone() {
    let dir =
        std::env::temp_dir().join(format!("invaspread-careless-short-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = dir.to_str().unwrap();
    let run = invaspread(&[
        "train", "--steps", "3", "--batch", "64", "--k", "5", "--out", out,
    ]);
    assert!(run.status.success(), "{}", stderr_of(&run));
    let state = std::fs::read(dir.join("state.safetensors")).unwrap();
    // It rewrote the checkpoint at step 0 before, and the next resume started over.
    assert_refused(
        &[
            "train", "--steps", "0", "--batch", "64", "--k", "5", "--out", out, "--resume",
        ],
        1,
        &["has done 3 steps", "can only be extended"],
    );
    assert_eq!(std::fs::read(dir.join("state.safetensors")).unwrap(), state);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_resume_keeps_the_saved_configuration_and_names_a_contradicting_flag() {
    let dir =
        std::env::temp_dir().join(format!("invaspread-careless-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = dir.to_str().unwrap();
    let run = invaspread(&[
        "train", "--steps", "2", "--batch", "64", "--k", "5", "--out", out,
    ]);
    assert!(run.status.success(), "{}", stderr_of(&run));
    // Accepted before, and config.json overwritten: now each is refused, naming both values.
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["--batch", "32"],
            &["--batch gives batch = 32", "started with 64"],
        ),
        (
            &["--lr", "0.05"],
            &["--lr gives sgd.lr = 0.05", "started with 0.03"],
        ),
        (
            &["--seed", "9"],
            &["--seed gives seed = 9", "started with 0"],
        ),
        (
            &["--dataset", "digits"],
            &["--dataset gives data.dataset = \"digits\""],
        ),
        (&["--schedule", "cosine"], &["--schedule gives schedule"]),
        (
            &["--cpu-conv", "im2col"],
            &[
                "--cpu-conv gives backend",
                "im2col",
                "started with",
                "winograd",
            ],
        ),
    ];
    for (flag, needles) in cases {
        let args = [&["train", "--out", out, "--resume"][..], flag].concat();
        assert_refused(&args, 1, needles);
    }
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
    assert!(
        config.contains("\"batch\": 64"),
        "config.json was rewritten: {config}"
    );
    // The flags that may change, and no flags at all (the saved settings): accepted.
    let more = invaspread(&[
        "train", "--out", out, "--resume", "--steps", "4", "--batch", "64",
    ]);
    assert!(more.status.success(), "{}", stderr_of(&more));
    let lines = std::fs::read_to_string(dir.join("steps.csv"))
        .unwrap()
        .lines()
        .count();
    assert_eq!(lines, 5, "4 steps and the header");
    let again = invaspread(&["train", "--out", out, "--resume"]);
    assert!(again.status.success(), "{}", stderr_of(&again));
    assert_refused(
        &["train", "--out", out, "--resume", "--config", "x.json"],
        2,
        &["--config"],
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_diverging_run_stops_at_its_step_and_keeps_the_last_good_state() {
    let dir = std::env::temp_dir().join(format!("invaspread-careless-nan-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    common::write_stripes(&dir.join("data"), 16); // 4 steps an epoch at batch 8
    let (data, out) = (dir.join("data"), dir.join("run"));
    // lr x weight decay near 10: every step multiplies the weights by about -9, to infinity.
    let run = invaspread(&[
        "train",
        "--dataset",
        "folder",
        "--data-dir",
        data.to_str().unwrap(),
        "--steps",
        "60",
        "--batch",
        "8",
        "--k",
        "5",
        "--lr",
        "10",
        "--weight-decay",
        "0.99",
        "--out",
        out.to_str().unwrap(),
    ]);
    let err = stderr_of(&run);
    // Before: "z[0, 0] = -inf is not finite", naming no step nor flag, or NaN checkpoints.
    assert_eq!(run.status.code(), Some(1), "{err}");
    assert!(
        err.contains("training diverged at step")
            && err.contains("still holds step")
            && err.contains("--lr (this one 10)")
            && err.contains("--weight-decay (0.99)"),
        "{err}"
    );
    // The last committed state is whole and finite: its checkpoint evaluates.
    let eval = invaspread(&[
        "eval",
        "--checkpoint",
        out.join("last.safetensors").to_str().unwrap(),
        "--dataset",
        "folder",
        "--data-dir",
        data.to_str().unwrap(),
        "--k",
        "5",
    ]);
    assert!(eval.status.success(), "{}", stderr_of(&eval));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `launch` starts every rank with its variables; when one fails, the launch fails naming it,
/// and the ranks' lines come prefixed.
#[test]
fn launch_fails_naming_the_rank_that_failed() {
    let out = invaspread(&[
        "launch",
        "--gpus",
        "2",
        "--master-port",
        "0",
        "--",
        "train",
        "--config",
        "/nonexistent/z.json",
        "--out",
        "/nonexistent/run",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("data-parallel group: rank ") && stderr.contains(" ended with exit status"),
        "{stderr}"
    );
    // Both ranks fail; whichever ends first is named, and the other may be stopped before it
    // prints anything: the named rank's own lines must be there, prefixed.
    let named = stderr
        .split("data-parallel group: rank ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .unwrap_or("?");
    assert!(
        stderr.contains(&format!("[rank {named}] ")),
        "rank {named}'s lines are not prefixed:\n{stderr}"
    );
    assert!(stderr.contains("/nonexistent/z.json"), "{stderr}");
}

#[test]
fn launch_refuses_a_node_rank_beyond_the_nodes() {
    let out = invaspread(&[
        "launch",
        "--gpus",
        "1",
        "--nnodes",
        "2",
        "--node-rank",
        "2",
        "--",
        "train",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--node-rank 2 of --nnodes 2"), "{stderr}");
}

/// `train` under a launcher: what data-parallel training cannot do is refused before any rank
/// waits for the others (the CPU, a baseline, a global batch the ranks cannot split), and a
/// resume keeps the run's number of ranks.
#[test]
fn train_over_ranks_refuses_what_it_cannot_split() {
    let dir = std::env::temp_dir().join(format!("invaspread-ranks-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    common::write_stripes(&dir.join("stripes"), 4);
    let (data, out) = (dir.join("stripes"), dir.join("run"));
    let (data, out) = (data.to_str().unwrap(), out.to_str().unwrap());
    let train = [
        "train",
        "--dataset",
        "folder",
        "--data-dir",
        data,
        "--steps",
        "1",
        "--batch",
        "4",
        "--k",
        "3",
        "--no-pixel-baseline",
        "--out",
        out,
    ];
    let launch = ["launch", "--gpus", "2", "--master-port", "0", "--"];
    let mut odd_batch = train;
    odd_batch[8] = "5"; // --batch
    let cases: [(&[&str], &[&str], &str); 3] = [
        (
            &train,
            &["--device", "cpu"],
            "data-parallel training runs on CUDA",
        ),
        (
            &odd_batch,
            &["--device", "cuda"],
            "--batch 5 over WORLD_SIZE=2 ranks",
        ),
        (
            &train,
            &["--device", "cuda", "--method", "npid"],
            "--method npid",
        ),
    ];
    for (train, flags, needle) in cases {
        let out = invaspread(&[&launch[..], train, flags].concat());
        let err = stderr_of(&out);
        assert!(!out.status.success(), "{flags:?}: {err}");
        assert!(
            err.contains(needle) && !err.contains("panicked"),
            "{flags:?}: expected {needle:?} in\n{err}"
        );
    }
    let one = invaspread(&train);
    assert!(one.status.success(), "{}", stderr_of(&one));
    let mut longer = train;
    longer[6] = "2"; // --steps
    let resume = [&launch[..], &longer[..], &["--resume"]].concat();
    let out = invaspread(&resume);
    let err = stderr_of(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("was trained on 1 rank(s), and this resume has 2"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `path`'s safetensors file written to `to` after `edit` changed its JSON header and its data
/// bytes (the header re-padded to a multiple of 8, as the format's writers do).
fn rewrite_safetensors(
    path: &Path,
    to: &Path,
    edit: impl FnOnce(&mut serde_json::Value, &mut Vec<u8>),
) {
    let bytes = std::fs::read(path).unwrap();
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + len]).unwrap();
    let mut data = bytes[8 + len..].to_vec();
    edit(&mut header, &mut data);
    let mut text = serde_json::to_vec(&header).unwrap();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&data);
    std::fs::write(to, out).unwrap();
}

/// `path`'s safetensors file with metadata `key` set to `value` (the tensors unchanged).
fn with_metadata(path: &Path, key: &str, value: &str, to: &Path) {
    rewrite_safetensors(path, to, |header, _| {
        header["__metadata__"][key] = serde_json::Value::String(value.into());
    });
}

/// A checkpoint's metadata is input like a flag: an image size of 0 divided by zero in `eval`
/// and `embed`, and 1025 .. 100000 skipped the flag's range into a terabyte allocation.
#[test]
fn checkpoint_metadata_is_held_to_the_flags_ranges() {
    let (dir, run) = small_run("careless-meta", &["--steps", "0"]);
    let hostile = dir.join("hostile.safetensors");
    for size in ["0", "1025", "4096", "100000"] {
        with_metadata(&run.join("last.safetensors"), "image_size", size, &hostile);
        let h = hostile.to_str().unwrap();
        let emb = dir.join("e.npy");
        for args in [
            vec!["eval", "--checkpoint", h],
            vec!["embed", "--checkpoint", h, "--out", emb.to_str().unwrap()],
        ] {
            assert_refused(
                &args,
                1,
                &[
                    "hostile.safetensors",
                    &format!("image_size = \"{size}\""),
                    "1 <= image_size <= 1024",
                ],
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Inputs that are not regular files: /dev/zero was read until memory ran out, a FIFO blocked
/// forever; outputs onto a FIFO or a device node were renamed over it (as root, /dev/null).
#[test]
fn devices_and_fifos_are_neither_read_nor_written() {
    let dir = common::scratch_dir("careless-fifo");
    let fifo = dir.join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo of a NUL-terminated path in the test's scratch folder.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let f = fifo.to_str().unwrap();
    let out_dir = dir.join("out");
    let o = out_dir.to_str().unwrap();
    for (input, kind) in [("/dev/zero", "a character device"), (f, "a FIFO")] {
        assert_refused(
            &["eval", "--checkpoint", input],
            1,
            &[input, kind, "expected a regular file"],
        );
        assert_refused(
            &["train", "--config", input, "--out", o],
            1,
            &[input, kind, "expected a regular file"],
        );
        assert_refused(&["loss", "--input", input], 1, &[input, kind]);
    }
    assert_refused(
        &["random", "--n", "4", "--d", "2", "--out", f],
        1,
        &[f, "is a FIFO", "an output must be a new or a regular file"],
    );
    assert!(
        std::fs::symlink_metadata(&fifo)
            .unwrap()
            .file_type()
            .is_fifo(),
        "the FIFO was replaced"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Flags the method never reads were recorded as if they mattered: refused, naming it.
#[test]
fn flags_the_method_ignores_are_refused() {
    let dir = common::scratch_dir("careless-ignored");
    let o = dir.join("run");
    let o = o.to_str().unwrap();
    for (flags, needle) in [
        (
            &["--method", "npid", "--tau", "0.2"][..],
            "--tau has no effect with --method npid",
        ),
        (
            &["--method", "npid", "--negatives", "hard"],
            "--negatives has no effect with --method npid",
        ),
        (
            &["--method", "exemplar", "--mu", "2"],
            "--mu has no effect with --method exemplar",
        ),
        (
            &["--method", "nce", "--loss", "reference"],
            "--loss has no effect with --method nce",
        ),
        (
            &["--negative-fraction", "0.3"],
            "--negative-fraction has no effect without --negatives hard|easy",
        ),
        (
            &["--negative-scale", "mean"],
            "--negative-scale has no effect without --negatives hard|easy",
        ),
    ] {
        let mut args = vec!["train", "--steps", "0", "--k", "5", "--out", o];
        args.extend_from_slice(flags);
        assert_refused(&args, 1, &[needle]);
        assert!(
            !dir.join("run").join("config.json").exists(),
            "{flags:?} recorded a run"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A resume never falls back silently: a run folder without its config.json (the flags'
/// defaults would train another method on other data over it), or a method with state but
/// without state.safetensors (its memory bank would be lost), is an error naming the file.
#[test]
fn a_resume_without_its_config_or_its_state_is_refused() {
    let (dir, run) = small_run(
        "careless-resume-files",
        &["--method", "npid", "--steps", "3"],
    );
    let r = run.to_str().unwrap();
    let (cfg, state) = (run.join("config.json"), run.join("state.safetensors"));
    let aside = dir.join("aside");
    std::fs::rename(&cfg, &aside).unwrap();
    assert_refused(
        &["train", "--steps", "5", "--out", r, "--resume"],
        1,
        &[
            "config.json: is missing",
            "holds a run",
            "restore config.json",
        ],
    );
    std::fs::rename(&aside, &cfg).unwrap();
    std::fs::rename(&state, &aside).unwrap();
    assert_refused(
        &["train", "--steps", "5", "--out", r, "--resume"],
        1,
        &[
            "state.safetensors: is missing",
            "--method npid keeps its state",
        ],
    );
    std::fs::rename(&aside, &state).unwrap();
    let out = invaspread(&[
        "--threads",
        "2",
        "train",
        "--steps",
        "5",
        "--out",
        r,
        "--resume",
    ]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A changed byte in a run's files was resumed or evaluated without a word, and a checkpoint of
/// NaN evaluated as normal: the checksum this crate writes catches the first, the finite check
/// on load the second (in a file without a checksum, as older or other writers' files are).
#[test]
fn a_corrupt_state_or_a_nan_checkpoint_is_refused() {
    let (dir, run) = small_run("careless-corrupt", &["--steps", "3"]);
    let r = run.to_str().unwrap();
    let state = run.join("state.safetensors");
    let good = std::fs::read(&state).unwrap();
    let mut bad = good.clone();
    let last = bad.len() - 100;
    bad[last] ^= 0x01;
    std::fs::write(&state, &bad).unwrap();
    assert_refused(
        &["train", "--steps", "5", "--out", r, "--resume"],
        1,
        &["state.safetensors", "checksum", "the file is corrupt"],
    );
    std::fs::write(&state, &good).unwrap();
    // NaN in the first float32 tensor of last.safetensors, with the checksum key removed.
    let nan = dir.join("nan.safetensors");
    let mut name = String::new();
    rewrite_safetensors(&run.join("last.safetensors"), &nan, |header, data| {
        header["__metadata__"]
            .as_object_mut()
            .unwrap()
            .remove("invaspread.data_fnv1a64");
        let (first, start) = header
            .as_object()
            .unwrap()
            .iter()
            .find(|(k, v)| *k != "__metadata__" && v["dtype"] == "F32")
            .map(|(k, v)| (k.clone(), v["data_offsets"][0].as_u64().unwrap() as usize))
            .unwrap();
        data[start..start + 4].copy_from_slice(&f32::NAN.to_le_bytes());
        name = first;
    });
    assert_refused(
        &["eval", "--checkpoint", nan.to_str().unwrap()],
        1,
        &[
            "nan.safetensors",
            &format!("tensor {name}[0] = NaN is not finite"),
        ],
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--schedule step --milestones 6,8` says one thing twice and was refused; with cosine the
/// milestones would be dropped.
#[test]
fn milestones_go_with_the_step_schedule_only() {
    let (dir, run) = small_run(
        "careless-milestones",
        &["--steps", "0", "--schedule", "step", "--milestones", "6,8"],
    );
    let r = run.to_str().unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["schedule"]["milestones"], serde_json::json!([6, 8]));
    assert_refused(
        &[
            "train",
            "--steps",
            "0",
            "--k",
            "5",
            "--schedule",
            "cosine",
            "--milestones",
            "6,8",
            "--out",
            r,
        ],
        1,
        &["--milestones", "--schedule cosine has none"],
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A scratch folder with a small finished run in `run/` (`extra` flags after `train`'s
/// `--k 5 --threads 2`); returns (the folder, the run).
fn small_run(tag: &str, extra: &[&str]) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = common::scratch_dir(tag);
    let run = dir.join("run");
    let mut args = vec![
        "--threads",
        "2",
        "train",
        "--k",
        "5",
        "--out",
        run.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let out = invaspread(&args);
    assert!(out.status.success(), "{}", stderr_of(&out));
    (dir, run)
}

/// `launch` of a command that is not a group (or a nested launch) ran N copies writing the same
/// files: refused, naming it, before any rank starts.
#[test]
fn launch_runs_only_commands_that_form_a_group() {
    let dir = common::scratch_dir("careless-launch");
    let out = dir.join("z.npy");
    for command in [
        &[
            "random",
            "--n",
            "4",
            "--d",
            "2",
            "--out",
            out.to_str().unwrap(),
        ][..],
        &["--threads", "2", "eval", "--checkpoint", "x.safetensors"],
        &["launch", "--gpus", "2", "--", "train"],
    ] {
        let name = command
            .iter()
            .find(|w| !w.starts_with("--") && **w != "2")
            .unwrap();
        let mut args = vec!["launch", "--gpus", "2", "--master-port", "0", "--"];
        args.extend_from_slice(command);
        assert_refused(
            &args,
            1,
            &[
                &format!("`{name}` would run one copy per rank"),
                "train, bench-loss",
            ],
        );
    }
    assert!(!out.exists(), "a rank ran");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--out` that is a file, a dangling link or a link loop said only "File exists".
#[test]
fn an_out_that_is_not_a_folder_says_what_it_is() {
    let dir = common::scratch_dir("careless-out");
    let file = dir.join("file");
    std::fs::write(&file, "mine").unwrap();
    let dangling = dir.join("dangling");
    std::os::unix::fs::symlink(dir.join("nowhere"), &dangling).unwrap();
    let (a, b) = (dir.join("a"), dir.join("b"));
    std::os::unix::fs::symlink(&b, &a).unwrap();
    std::os::unix::fs::symlink(&a, &b).unwrap();
    for (out, what) in [
        (&file, "is a file, not a folder"),
        (&dangling, "which does not exist"),
        (&a, "is a symbolic link that loops"),
    ] {
        assert_refused(
            &[
                "train",
                "--steps",
                "0",
                "--k",
                "5",
                "--out",
                out.to_str().unwrap(),
            ],
            1,
            &[
                &format!("--out {}", out.display()),
                what,
                "expected a folder for the run",
            ],
        );
    }
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "mine");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A --resume of a folder with no run said only "give --epochs E or --steps S" (a config's
/// negatives.fraction out of range: a_replayed_configuration_out_of_range_names_the_field).
#[test]
fn a_resume_of_no_run_says_so() {
    let dir = common::scratch_dir("careless-names");
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    assert_refused(
        &["train", "--resume", "--out", empty.to_str().unwrap()],
        1,
        &[
            "--resume",
            "holds no run (no config.json)",
            "give --epochs E or --steps S",
        ],
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `embed --png` onto the checkpoint it reads, `plot --out` onto the metrics.csv it reads or
/// onto a run's state.safetensors, and outputs onto a user's own file of another kind replaced
/// them: refused, naming the file, with every file intact.
#[test]
fn outputs_never_replace_an_input_or_a_file_of_another_kind() {
    let (dir, run) = small_run("careless-outputs", &["--steps", "0"]);
    let path = |p: &Path| p.to_str().unwrap().to_string();
    let (ckpt, state, csv) = (
        run.join("last.safetensors"),
        run.join("state.safetensors"),
        run.join("metrics.csv"),
    );
    let notes = dir.join("notes.txt");
    std::fs::write(&notes, "mine\n").unwrap();
    let user_npy = dir.join("mine.npy");
    std::fs::write(&user_npy, "not an array\n").unwrap();
    let keep: Vec<(std::path::PathBuf, Vec<u8>)> = [&ckpt, &state, &csv, &notes, &user_npy]
        .into_iter()
        .map(|p| (p.clone(), std::fs::read(p).unwrap()))
        .collect();
    let embed = |out: &Path, png: &Path| {
        vec![
            "embed".to_string(),
            "--checkpoint".into(),
            path(&ckpt),
            "--out".into(),
            path(out),
            "--png".into(),
            path(png),
        ]
    };
    let plot = |out: &Path| vec!["plot".to_string(), path(&run), "--out".into(), path(out)];
    let cases: Vec<(Vec<String>, Vec<String>)> = vec![
        (
            embed(&dir.join("e.npy"), &ckpt),
            vec![
                format!("{} is the checkpoint this command reads", ckpt.display()),
                "choose another output path".into(),
            ],
        ),
        (
            plot(&csv),
            vec![format!(
                "{} is the metrics.csv this command reads",
                csv.display()
            )],
        ),
        (
            plot(&state),
            vec![format!(
                "{} holds a safetensors checkpoint, and this would replace it with a PNG image",
                state.display()
            )],
        ),
        (
            plot(&notes),
            vec!["holds text, and this would replace it with a PNG image".into()],
        ),
        (
            embed(&user_npy, &dir.join("e.png")),
            vec!["mine.npy holds text, and this would replace it with a .npy array".into()],
        ),
    ];
    for (args, needles) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
        assert_refused(&args, 1, &needles);
    }
    for (p, bytes) in &keep {
        assert_eq!(&std::fs::read(p).unwrap(), bytes, "{} changed", p.display());
    }
    // A file of the output's own kind is replaced, as before.
    let png = dir.join("curves.png");
    for _ in 0..2 {
        let out = invaspread(&["plot", &path(&run), "--out", &path(&png)]);
        assert!(out.status.success(), "{}", stderr_of(&out));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A new run into a folder holding the user's own config.json and metrics.csv replaced them,
/// and a run deleted the user's files that looked like its temporaries.
#[test]
fn a_new_run_keeps_the_files_it_did_not_write() {
    let dir = common::scratch_dir("careless-own-files");
    let run = dir.join("run");
    std::fs::create_dir_all(&run).unwrap();
    let mine = [
        ("config.json", "{\"my\": \"settings\"}\n"),
        ("metrics.csv", "my,own\n1,2\n"),
    ];
    for (name, text) in mine {
        std::fs::write(run.join(name), text).unwrap();
    }
    let train = [
        "train",
        "--steps",
        "0",
        "--k",
        "5",
        "--out",
        run.to_str().unwrap(),
    ];
    assert_refused(
        &train,
        1,
        &[
            "already holds files a new run would replace (config.json, metrics.csv)",
            "pass --resume",
            "choose another --out",
        ],
    );
    for (name, text) in mine {
        assert_eq!(std::fs::read_to_string(run.join(name)).unwrap(), text);
        std::fs::remove_file(run.join(name)).unwrap();
    }
    // Names that only look like temporaries (the tool's own have a prefix of their own).
    let look_alikes = [".config.json.tmp123", "notes.tmp1", ".draft.tmp2"];
    for name in look_alikes {
        std::fs::write(run.join(name), "mine").unwrap();
    }
    let out = invaspread(&train);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let out = invaspread(&[
        "train",
        "--resume",
        "--steps",
        "2",
        "--out",
        run.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    for name in look_alikes {
        assert_eq!(std::fs::read_to_string(run.join(name)).unwrap(), "mine");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// An image folder of two classes (`a`, `b`): 6 training and 2 test images each, 8 x 8, each
/// of its own colour.
fn two_class_folder(root: &Path) {
    for (split, n) in [("train", 6u8), ("test", 2)] {
        for (c, class) in ["a", "b"].into_iter().enumerate() {
            let folder = root.join(split).join(class);
            std::fs::create_dir_all(&folder).unwrap();
            for i in 0..n {
                let colour = image::Rgb([40 * i, 120 * c as u8, 7 * i + 3]);
                image::RgbImage::from_pixel(8, 8, colour)
                    .save(folder.join(format!("{i}.png")))
                    .unwrap();
            }
        }
    }
}

/// Resume trusted that the data did not change: images added, a class removed or an image
/// altered, and a relative data_dir resumed from another working directory, all continued on
/// other data. Each is refused naming what changed; a moved dataset resumes with
/// --allow-moved-data, at its new --data-dir.
#[test]
fn a_resume_on_changed_data_is_refused_naming_the_change() {
    let dir = common::scratch_dir("careless-data");
    let data = dir.join("data");
    two_class_folder(&data);
    let run = dir.join("run");
    let in_dir = |cwd: &Path, args: &[&str]| {
        Command::new(common::exe())
            .current_dir(cwd)
            .args(["--threads", "2"])
            .args(args)
            .output()
            .unwrap()
    };
    let start = [
        "train",
        "--dataset",
        "folder",
        "--data-dir",
        "data",
        "--batch",
        "4",
        "--k",
        "3",
        "--no-pixel-baseline",
        "--steps",
        "2",
        "--out",
        "run",
    ];
    let out = in_dir(&dir, &start);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let config = std::fs::read(run.join("config.json")).unwrap();
    let resume = ["train", "--resume", "--steps", "4", "--out", "run"];
    let refused = |cwd: &Path, args: &[&str], needles: &[&str]| {
        let out = in_dir(cwd, args);
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        for needle in needles {
            assert!(err.contains(needle), "expected {needle:?} in\n{err}");
        }
        assert_eq!(std::fs::read(run.join("config.json")).unwrap(), config);
    };
    let changed = "--resume: the dataset of the run in run has changed";
    // An image added, then an image altered (same count), then a class removed.
    let extra = data.join("train/a/new.png");
    std::fs::copy(data.join("train/a/0.png"), &extra).unwrap();
    refused(
        &dir,
        &resume,
        &[changed, "training images: the run started on 12, now 13"],
    );
    std::fs::remove_file(&extra).unwrap();
    let one = data.join("train/b/1.png");
    image::RgbImage::from_pixel(8, 8, image::Rgb([1, 2, 3]))
        .save(&one)
        .unwrap();
    refused(
        &dir,
        &resume,
        &[
            changed,
            "fingerprint of the images",
            "resume with the data the run started on",
        ],
    );
    let whole = dir.join("whole");
    std::fs::rename(&data, &whole).unwrap();
    two_class_folder(&data);
    for split in ["train", "test"] {
        std::fs::remove_dir_all(data.join(split).join("b")).unwrap();
    }
    refused(
        &dir,
        &resume,
        &[changed, "classes: the run started on a, b, now a"],
    );
    std::fs::remove_dir_all(&data).unwrap();
    two_class_folder(&data);
    std::fs::remove_dir_all(&whole).unwrap();
    // Resumed from another working directory, the relative data_dir finds a copy elsewhere.
    let elsewhere = dir.join("elsewhere");
    two_class_folder(&elsewhere.join("data"));
    let elsewhere_resume = ["train", "--resume", "--steps", "4", "--out", "../run"];
    refused(
        &elsewhere,
        &elsewhere_resume,
        &[
            &format!(
                "data_dir: the run started on {}",
                data.canonicalize().unwrap().display()
            ),
            "pass --allow-moved-data",
        ],
    );
    // Moved: refused as a changed --data-dir without the flag, resumed with it.
    let moved = dir.join("moved");
    std::fs::rename(&data, &moved).unwrap();
    let mut moved_resume = resume.to_vec();
    moved_resume.extend(["--data-dir", "moved"]);
    refused(
        &dir,
        &moved_resume,
        &["--data-dir gives data.data_dir = \"moved\""],
    );
    moved_resume.push("--allow-moved-data");
    let out = in_dir(&dir, &moved_resume);
    assert!(out.status.success(), "{}", stderr_of(&out));
    // The run stopped by --steps 2 inside epoch 1 and extended to 4 has the rows of a run that
    // went to step 4 at once (epoch 1's row was written twice, its loss from step 3 alone).
    let mut straight = start.to_vec();
    let n = straight.len();
    straight[n - 3] = "4";
    straight[n - 1] = "straight";
    straight[4] = "moved";
    let out = in_dir(&dir, &straight);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let rows = |run: &str| -> Vec<String> {
        let csv = std::fs::read_to_string(dir.join(run).join("metrics.csv")).unwrap();
        csv.lines()
            .map(|l| l.rsplit_once(',').unwrap().0.to_string())
            .collect()
    };
    assert_eq!(
        rows("run"),
        rows("straight"),
        "metrics.csv of the extended run"
    );
    assert_eq!(rows("run").len(), 4, "{:?}", rows("run"));
    // Resumed again with nothing left to do, the run adds no row.
    let out = in_dir(&dir, &moved_resume);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(rows("run"), rows("straight"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A state copied in from another run (another seed), a state whose sgd_step disagrees with
/// its step, and a resume that failed on a bad metrics.csv after rewriting config.json (the
/// probe's data loss): each refused, the run's files as they were.
#[test]
fn a_resume_refuses_another_runs_state_and_changes_nothing_when_it_fails() {
    let (dir, run) = small_run("careless-state", &["--steps", "2", "--batch", "16"]);
    let (_, other) = small_run(
        "careless-state-other",
        &["--steps", "2", "--batch", "16", "--seed", "7"],
    );
    let state = run.join("state.safetensors");
    let resume = [
        "train",
        "--resume",
        "--steps",
        "4",
        "--out",
        run.to_str().unwrap(),
    ];
    let config = std::fs::read(run.join("config.json")).unwrap();
    let saved = std::fs::read(&state).unwrap();
    type Spoil<'a> = Box<dyn Fn() + 'a>;
    let cases: Vec<(Spoil, Vec<&str>)> = vec![
        (
            Box::new(|| {
                std::fs::copy(other.join("state.safetensors"), &state).unwrap();
            }),
            vec![
                "was trained with seed 7",
                "gives seed 0",
                "the state is another run's",
            ],
        ),
        (
            Box::new(|| with_metadata(&state, "sgd_step", "1", &state)),
            vec!["metadata sgd_step = 1 disagrees with step = 2"],
        ),
        (
            Box::new(|| std::fs::write(run.join("metrics.csv"), [0u8, 1, 2, 3]).unwrap()),
            vec!["metrics.csv"],
        ),
    ];
    for (spoil, needles) in cases {
        std::fs::write(&state, &saved).unwrap();
        spoil();
        assert_refused(&resume, 1, &needles);
        assert_eq!(
            std::fs::read(run.join("config.json")).unwrap(),
            config,
            "{needles:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(other.parent().unwrap());
}

/// Flags and config fields that had no effect were accepted without a word (the probe's
/// accepted-silently cases): CUDA-only flags on the CPU, --sync-bn on one process, dataset
/// flags the dataset does not read, `loss --negative-fraction` with all negatives, a config
/// with both epochs and steps or a cosine schedule with milestones.
#[test]
fn flags_and_fields_that_would_do_nothing_are_refused() {
    let dir = common::scratch_dir("careless-nothing");
    let out = dir.join("run");
    let out = out.to_str().unwrap();
    let z = dir.join("z.npy");
    let made = invaspread(&[
        "random",
        "--n",
        "8",
        "--d",
        "4",
        "--out",
        z.to_str().unwrap(),
    ]);
    assert!(made.status.success(), "{}", stderr_of(&made));
    let train = |extra: &[&'static str]| {
        let mut args = vec!["train", "--steps", "0", "--k", "5", "--out", out];
        args.extend_from_slice(extra);
        args
    };
    for (args, needles) in [
        (
            train(&["--precision", "bf16"]),
            vec!["--precision has no effect with --device cpu"],
        ),
        (
            train(&["--sync-bn"]),
            vec!["--sync-bn has no effect on one process", "launch"],
        ),
        (
            train(&["--data-dir", "/tmp"]),
            vec!["--data-dir has no effect with --dataset synthetic"],
        ),
        (
            train(&["--follow-links"]),
            vec!["--follow-links has no effect", "--dataset folder"],
        ),
        (
            train(&["--on-bad-image", "skip"]),
            vec!["--on-bad-image has no effect"],
        ),
        (
            vec![
                "loss",
                "--input",
                z.to_str().unwrap(),
                "--negative-fraction",
                "0.3",
            ],
            vec!["--negative-fraction has no effect without --negatives hard|easy"],
        ),
    ] {
        assert_refused(&args, 1, &needles);
    }
    let default = serde_json::to_value(invaspread::trainer::TrainConfig::default()).unwrap();
    let path = dir.join("config.json");
    for (edit, needle) in [
        (
            serde_json::json!({"epochs": 2, "steps": 3}),
            "epochs = 2 and steps = 3 are both set",
        ),
        (
            serde_json::json!({"steps": 1, "schedule": {"kind": "cosine", "milestones": [1]}}),
            "unknown field `milestones`",
        ),
    ] {
        let mut cfg = default.clone();
        for (k, v) in edit.as_object().unwrap() {
            cfg[k] = v.clone();
        }
        std::fs::write(&path, cfg.to_string()).unwrap();
        assert_refused(
            &["train", "--config", path.to_str().unwrap(), "--out", out],
            1,
            &[needle],
        );
    }
    assert!(!Path::new(out).exists(), "a refused run wrote its folder");
    let _ = std::fs::remove_dir_all(&dir);
}
