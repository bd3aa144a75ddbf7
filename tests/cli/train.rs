//! `invaspread train`, `eval` and `embed` end to end on the generated default dataset.

use crate::common::invaspread;

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
        stderr.contains("kNN top-1")
            && stderr.contains("at initialisation (raw pixels")
            && stderr.contains("epoch   1"),
        "{stderr}"
    );
    let csv = std::fs::read_to_string(dir.join("metrics.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "epoch,step,loss,knn_top1,knn_top5,recall_at_1,lr,seconds"
    );
    assert!(
        lines[1].starts_with("0,0,,0."),
        "the initialised network: {csv}"
    );
    assert!(lines[2].starts_with("1,31,"), "{csv}");

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
    for key in ["knn_top1", "knn_top5", "recall_at_1", "recall_at_8", "nmi"] {
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
        stderr.contains("--loss fused-v2 runs on CUDA: add --device cuda"),
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

/// The digits set in ../shared (CI has it); None, with a visible skip, where it is absent.
fn digits(test: &str) -> Option<std::path::PathBuf> {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/sklearn-digits");
    if path.exists() {
        Some(path)
    } else {
        eprintln!("SKIPPED (no ../shared/data): {test}");
        None
    }
}

#[test]
fn eval_every_milestones_and_no_pixel_baseline_shape_the_run() {
    let Some(data) = digits("eval_every_milestones_and_no_pixel_baseline_shape_the_run") else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("invaspread-cli-every-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (data, out) = (data.to_str().unwrap(), dir.to_str().unwrap());
    let run = invaspread(&[
        "train",
        "--dataset",
        "digits",
        "--data-dir",
        data,
        "--epochs",
        "5",
        "--batch",
        "64",
        "--eval-every",
        "2",
        "--milestones",
        "2,4",
        "--no-pixel-baseline",
        "--k",
        "20",
        "--augment",
        "flip,crop",
        "--out",
        out,
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(!stderr.contains("raw pixels"), "{stderr}");
    let rows = invaspread::trainer::outputs::parse_metrics_csv(&dir.join("metrics.csv")).unwrap();
    let evaluated: Vec<usize> = rows
        .iter()
        .filter(|r| r.knn_top1.is_some() && r.knn_top5.is_some())
        .map(|r| r.epoch)
        .collect();
    assert_eq!(
        evaluated,
        [0, 2, 4, 5],
        "epoch 0, every second epoch and the last"
    );
    assert!(rows[0].loss.is_none() && rows[1..].iter().all(|r| r.loss.is_some()));
    let lrs: Vec<f64> = rows[1..].iter().map(|r| r.lr).collect();
    let expected = [0.03, 0.03, 0.003, 0.003, 0.0003];
    for (lr, want) in lrs.iter().zip(expected) {
        assert!(
            (lr - want).abs() < 1e-12,
            "lr per epoch {lrs:?}, expected {expected:?}"
        );
    }
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(config["schedule"]["milestones"], serde_json::json!([2, 4]));
    assert_eq!(config["knn"]["every"], 2);
    assert_eq!(config["knn"]["pixel_baseline"], false);
    assert_eq!(config["augment"], serde_json::json!(["crop", "flip"]));

    // A resume must keep them: another --eval-every is refused naming both values.
    let again = invaspread(&[
        "train",
        "--resume",
        "--epochs",
        "6",
        "--eval-every",
        "3",
        "--out",
        out,
    ]);
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(!again.status.success(), "{stderr}");
    assert!(
        stderr.contains("--eval-every") && stderr.contains("knn.every = 3"),
        "{stderr}"
    );

    // The linear probe beside the other metrics.
    let ckpt = dir.join("last.safetensors");
    let eval = invaspread(&[
        "eval",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--dataset",
        "digits",
        "--data-dir",
        data,
        "--linear",
        "--json",
    ]);
    assert!(
        eval.status.success(),
        "{}",
        String::from_utf8_lossy(&eval.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&eval.stdout).unwrap();
    let linear = json["linear_top1"].as_f64().unwrap();
    assert!(
        linear > 0.5 && linear <= 1.0,
        "digits are easy for a linear probe: {json}"
    );
    assert!(json["knn_top5"].as_f64().unwrap() >= json["knn_top1"].as_f64().unwrap());

    // `plot` draws runs side by side; bad arguments are named.
    let png = dir.join("curves.png");
    let plot = invaspread(&[
        "plot",
        out,
        out,
        "--labels",
        "one,two",
        "--top5",
        "--out",
        png.to_str().unwrap(),
    ]);
    assert!(
        plot.status.success(),
        "{}",
        String::from_utf8_lossy(&plot.stderr)
    );
    let img = image::open(&png).unwrap();
    assert_eq!((img.width(), img.height()), (1640, 540), "two panels");
    let missing = dir.join("no-such-run");
    for (args, expected) in [
        (
            vec!["plot", out, out, "--labels", "one"],
            "--labels gives 1 names for 2 runs",
        ),
        (
            vec!["plot", missing.to_str().unwrap()],
            "no-such-run: no metrics.csv",
        ),
    ] {
        let mut args = args;
        args.extend(["--out", png.to_str().unwrap()]);
        let bad = invaspread(&args);
        let stderr = String::from_utf8_lossy(&bad.stderr);
        assert!(
            !bad.status.success() && stderr.contains(expected),
            "{stderr}"
        );
    }

    for (flag, value, expected) in [
        ("--milestones", "4,2", "increasing order"),
        ("--milestones", "0", "1 <= milestones"),
        ("--milestones", "3,x", "not a whole number"),
        ("--eval-every", "0", "1 <= eval_every"),
        (
            "--augment",
            "crop,blur",
            "\"blur\": expected a comma-separated subset of crop",
        ),
    ] {
        let bad = invaspread(&["train", "--epochs", "1", flag, value, "--out", out]);
        let stderr = String::from_utf8_lossy(&bad.stderr);
        assert_eq!(bad.status.code(), Some(2), "{flag} {value}: {stderr}");
        assert!(stderr.contains(expected), "{flag} {value}: {stderr}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_unseen_class_run_reports_recall_and_eval_and_embed_use_only_those_classes() {
    let Some(data) =
        digits("an_unseen_class_run_reports_recall_and_eval_and_embed_use_only_those_classes")
    else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("invaspread-cli-unseen-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (data, out) = (data.to_str().unwrap(), dir.to_str().unwrap());
    let run = invaspread(&[
        "train",
        "--dataset",
        "digits",
        "--data-dir",
        data,
        "--epochs",
        "2",
        "--batch",
        "64",
        "--classes",
        "0-4",
        "--eval-classes",
        "5,6,7-9",
        "--no-pixel-baseline",
        "--out",
        out,
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(
        stderr.contains("training on 5 classes (0, 1, 2, 3, 4)")
            && stderr.contains("trained on 0, 1, 2, 3, 4; evaluated on 5, 6, 7, 8, 9"),
        "{stderr}"
    );
    let rows = invaspread::trainer::outputs::parse_metrics_csv(&dir.join("metrics.csv")).unwrap();
    assert_eq!(rows.len(), 3);
    assert!(
        rows.iter()
            .all(|r| r.knn_top1.is_none() && r.recall_at_1.is_some()),
        "{rows:?}"
    );
    assert!(
        dir.join("best.safetensors").exists(),
        "best picked by Recall@1"
    );
    // 11 steps an epoch: the 5 training classes' 720-odd images, not all 1438.
    assert_eq!(rows[1].step, 11, "{rows:?}");

    let ckpt = dir.join("last.safetensors");
    let eval = invaspread(&[
        "eval",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--dataset",
        "digits",
        "--data-dir",
        data,
        "--classes",
        "5-9",
        "--json",
    ]);
    assert!(
        eval.status.success(),
        "{}",
        String::from_utf8_lossy(&eval.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&eval.stdout).unwrap();
    assert_eq!(
        json["classes"],
        serde_json::json!(["5", "6", "7", "8", "9"])
    );
    assert_eq!(json["clusters"], 5);
    let recall = json["recall_at_1"].as_f64().unwrap();
    let run_recall = rows[2].recall_at_1.unwrap();
    assert!(
        (recall - run_recall).abs() < 1e-12,
        "eval's Recall@1 {recall} on the held-out classes is the run's last {run_recall}"
    );

    let emb = dir.join("unseen.npy");
    let e = invaspread(&[
        "embed",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--dataset",
        "digits",
        "--data-dir",
        data,
        "--classes",
        "5-9",
        "--out",
        emb.to_str().unwrap(),
        "--png",
        dir.join("unseen.png").to_str().unwrap(),
    ]);
    assert!(e.status.success(), "{}", String::from_utf8_lossy(&e.stderr));
    let arr = invaspread::npy::read(&emb).unwrap();
    let all = invaspread::data::digits(std::path::Path::new(data)).unwrap();
    let held_out = all.test.labels.iter().filter(|&&l| l >= 5).count();
    assert_eq!(arr.shape, vec![held_out, 128]);
    let png = image::open(dir.join("unseen.png")).unwrap();
    assert_eq!((png.width(), png.height()), (900, 760), "the PCA picture");

    let bad = invaspread(&[
        "eval",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--dataset",
        "digits",
        "--data-dir",
        data,
        "--classes",
        "5-12",
    ]);
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success() && stderr.contains("past the last index, 9"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn eval_regenerates_the_synthetic_set_with_the_checkpoint_seed() {
    let dir = std::env::temp_dir().join(format!("invaspread-cli-seed-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = dir.to_str().unwrap();
    let run = invaspread(&[
        "train", "--steps", "0", "--seed", "3", "--k", "20", "--out", out,
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let rows = invaspread::trainer::outputs::parse_metrics_csv(&dir.join("metrics.csv")).unwrap();
    let ckpt = dir.join("last.safetensors");
    let eval = invaspread(&[
        "eval",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--k",
        "20",
        "--json",
    ]);
    assert!(
        eval.status.success(),
        "{}",
        String::from_utf8_lossy(&eval.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&eval.stdout).unwrap();
    assert_eq!(
        json["knn_top1"].as_f64().unwrap(),
        rows[0].knn_top1.unwrap(),
        "the run's own data (seed 3), not seed 0's"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
