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
