//! `invaspread train`, `eval` and `embed` end to end on the generated default dataset.

mod common;

use common::invaspread;

#[test]
fn train_then_eval_and_embed_the_checkpoint() {
    let dir = std::env::temp_dir().join(format!("invaspread-cli-train-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = dir.to_str().unwrap();
    let run = invaspread(&[
        "train", "--epochs", "1", "--batch", "64", "--k", "50", "--out", out,
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(
        stderr.contains("kNN top-1 at initialisation") && stderr.contains("epoch   1"),
        "{stderr}"
    );
    let csv = std::fs::read_to_string(dir.join("metrics.csv")).unwrap();
    assert!(
        csv.starts_with("epoch,step,loss,knn_top1,lr,seconds\n1,31,"),
        "{csv}"
    );

    let ckpt = dir.join("last.safetensors");
    let eval = invaspread(&[
        "eval",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--k",
        "50",
        "--json",
    ]);
    assert!(
        eval.status.success(),
        "{}",
        String::from_utf8_lossy(&eval.stderr)
    );
    let json = String::from_utf8(eval.stdout).unwrap();
    for key in ["knn_top1", "recall_at_1", "recall_at_8", "nmi"] {
        assert!(json.contains(key), "{json}");
    }

    let emb = dir.join("test.npy");
    let e = invaspread(&[
        "embed",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--split",
        "test",
        "--out",
        emb.to_str().unwrap(),
    ]);
    assert!(e.status.success(), "{}", String::from_utf8_lossy(&e.stderr));
    let arr = invaspread::npy::read(&emb).unwrap();
    assert_eq!(arr.shape, vec![500, 128]);
    assert!(dir.join("test.labels.npy").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn missing_data_dir_and_bad_checkpoint_are_clear_errors() {
    let run = invaspread(&[
        "train",
        "--dataset",
        "cifar10",
        "--epochs",
        "1",
        "--out",
        "/tmp/never-written",
    ]);
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("--dataset cifar10 needs --data-dir"));
    let bad =
        std::env::temp_dir().join(format!("invaspread-bad-{}.safetensors", std::process::id()));
    std::fs::write(&bad, b"garbage").unwrap();
    let e = invaspread(&["eval", "--checkpoint", bad.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&e.stderr);
    assert!(
        !e.status.success()
            && stderr.contains("not a safetensors file")
            && !stderr.contains("panicked"),
        "{stderr}"
    );
    std::fs::remove_file(&bad).unwrap();
}

#[test]
fn cuda_loss_kernels_need_the_cuda_device() {
    let run = invaspread(&[
        "train",
        "--loss",
        "fused-v2",
        "--steps",
        "1",
        "--out",
        "/tmp/never-written",
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(
        stderr.contains("--loss fused-v2 is a CUDA kernel; add --device cuda"),
        "{stderr}"
    );
}

/// The loss and kNN columns of a metrics.csv (the seconds differ between runs).
fn loss_and_knn(dir: &std::path::Path) -> Vec<(String, String)> {
    std::fs::read_to_string(dir.join("metrics.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[2].to_string(), f[3].to_string())
        })
        .collect()
}

#[test]
fn train_config_replays_a_finished_run_and_flags_override_its_fields() {
    let root = std::env::temp_dir().join(format!("invaspread-cli-config-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let (a, b, c) = (root.join("a"), root.join("b"), root.join("c"));
    let short = ["--steps", "6", "--batch", "32", "--k", "20", "--seed", "3"];
    let run = invaspread(
        &[
            &["--threads", "2", "train", "--out", a.to_str().unwrap()],
            &short[..],
            &["--lr", "0.05"],
        ]
        .concat(),
    );
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    // config.json is JSON with the schedule as an object, and every flag given is in it.
    let config = a.join("config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(value["schedule"]["kind"], "step", "{text}");
    assert_eq!(value["sgd"]["lr"], 0.05, "{text}");
    assert_eq!(value["seed"], 3, "{text}");
    assert_eq!(value["recorded"]["threads"], 2, "{text}");

    let cfg = config.to_str().unwrap();
    let replay = invaspread(&[
        "--threads",
        "2",
        "train",
        "--config",
        cfg,
        "--out",
        b.to_str().unwrap(),
    ]);
    assert!(
        replay.status.success(),
        "{}",
        String::from_utf8_lossy(&replay.stderr)
    );
    assert_eq!(loss_and_knn(&a), loss_and_knn(&b), "the replay differs");
    let (ra, rb) = (
        std::fs::read_to_string(a.join("steps.csv")).unwrap(),
        std::fs::read_to_string(b.join("steps.csv")).unwrap(),
    );
    assert_eq!(ra, rb, "the replay's step losses differ");

    // A flag given with --config overrides that field only.
    let over = invaspread(&[
        "--threads",
        "2",
        "train",
        "--config",
        cfg,
        "--out",
        c.to_str().unwrap(),
        "--steps",
        "3",
    ]);
    assert!(
        over.status.success(),
        "{}",
        String::from_utf8_lossy(&over.stderr)
    );
    let value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(c.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        (value["steps"].as_u64(), value["sgd"]["lr"].as_f64()),
        (Some(3), Some(0.05))
    );
    let (rc, ra) = (
        std::fs::read_to_string(c.join("steps.csv")).unwrap(),
        ra.lines().take(4).collect::<Vec<_>>().join("\n") + "\n",
    );
    assert_eq!(rc, ra, "the first 3 steps of the overridden replay differ");

    // A bad field: the error names the file, the field and the value.
    let bad = root.join("bad.json");
    std::fs::write(&bad, text.replace("\"lr\": 0.05", "\"lr\": \"fast\"")).unwrap();
    let err = invaspread(&[
        "train",
        "--config",
        bad.to_str().unwrap(),
        "--out",
        root.join("d").to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&err.stderr);
    assert!(!err.status.success());
    assert!(
        stderr.contains("bad.json") && stderr.contains("sgd.lr") && stderr.contains("\"fast\""),
        "{stderr}"
    );
    std::fs::remove_dir_all(&root).unwrap();
}
