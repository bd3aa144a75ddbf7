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
fn train_on_cuda_runs_or_says_why_not() {
    let gpu = invaspread::cuda::kernels::BUILT && invaspread::cuda::device_count().unwrap_or(0) > 0;
    if !gpu && invaspread::testing::gpu_required() {
        panic!("REQUIRE_GPU=1 but no usable GPU: train_on_cuda_runs_or_says_why_not");
    }
    let dir = std::env::temp_dir().join(format!("invaspread-cli-cuda-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let run = invaspread(&[
        "train",
        "--device",
        "cuda",
        "--epochs",
        "2",
        "--batch",
        "64",
        "--k",
        "50",
        "--out",
        dir.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    if gpu {
        assert!(run.status.success(), "{stderr}");
        assert!(stderr.contains("training on"), "{stderr}");
        let csv = std::fs::read_to_string(dir.join("metrics.csv")).unwrap();
        let rows: Vec<&str> = csv.lines().skip(1).collect();
        assert_eq!(rows.len(), 2, "{csv}");
        let loss = |row: &str| row.split(',').nth(2).unwrap().parse::<f64>().unwrap();
        assert!(
            loss(rows[1]) < loss(rows[0]),
            "the loss did not fall: {csv}"
        );
        let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
        assert!(cfg.contains("\"loss\": \"cuda fused-v2 tf32\""), "{cfg}");
        std::fs::remove_dir_all(&dir).unwrap();
    } else {
        eprintln!(
            "SKIPPED (no GPU): train_on_cuda_runs_or_says_why_not (checked its error instead)"
        );
        assert!(!run.status.success());
        assert!(
            stderr.contains("no CUDA device is available")
                || stderr.contains("kernels were not built"),
            "{stderr}"
        );
    }
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
