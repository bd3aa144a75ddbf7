//! `invaspread train`, `eval` and `embed` with `--device cuda`, end to end through the binary:
//! the same run on the GPU and on the CPU gives the same step losses to float32 tolerance, and
//! the GPU's checkpoint loads and embeds on the CPU as on the GPU.
//!
//! The data is a tiny image folder written by the test (two classes of stripes, 16 x 16), so
//! that the kNN evaluations at the start and end of a run stay cheap on the virtual GPU.
//! Without a GPU the commands must fail with a clear error; with REQUIRE_GPU=1 that fails.

use crate::common;

use std::io::Write;

use std::path::Path;

use crate::common::{invaspread, run_ok, step_losses, Scratch};
use invaspread::testing::{gpu_or_skip, virtual_gpu_note};

fn embeddings(path: &str) -> Vec<f32> {
    invaspread::npy::read(Path::new(path)).unwrap().to_f32()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// config.json of `run` records the CUDA backend with this loss kernel and GEMM precision.
fn assert_backend(run: &str, loss: &str, precision: &str) {
    let text = std::fs::read_to_string(Path::new(run).join("config.json")).unwrap();
    let config: serde_json::Value = serde_json::from_str(&text).unwrap();
    let backend = &config["backend"];
    assert_eq!(
        (&backend["device"], &backend["loss"], &backend["precision"]),
        (&"cuda".into(), &loss.into(), &precision.into()),
        "{text}"
    );
}

/// Without a GPU (the test already skipped): the command fails and says why.
fn assert_clear_error(args: &[&str]) {
    let out = invaspread(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && !stderr.contains("panicked"),
        "{stderr}"
    );
    assert!(
        stderr.contains("no CUDA device is available") || stderr.contains("kernels were not built"),
        "{stderr}"
    );
}

/// `train --device cuda --precision f32 --steps S` with `common` flags into `out`.
fn cuda_train_args<'a>(common: &[&'a str], steps: &'a str, out: &'a str) -> Vec<&'a str> {
    let on_cuda = [
        "train",
        "--device",
        "cuda",
        "--precision",
        "f32",
        "--steps",
        steps,
    ];
    [&on_cuda[..], common, &["--out", out][..]].concat()
}

/// The baselines on CUDA: their loss runs on the host from the encoder's output, so the same
/// steps on both devices give the same losses to float32 rounding (the encoder's).
#[test]
fn baselines_train_on_cuda_as_on_the_cpu() {
    let scratch = Scratch::new("gpu-baselines");
    let data = scratch.0.join("stripes");
    common::write_stripes(&data, 8);
    let data = data.to_str().unwrap().to_string();
    for method in ["npid", "nce", "exemplar"] {
        let common = [
            "--dataset",
            "folder",
            "--data-dir",
            &data,
            "--batch",
            "8",
            "--k",
            "5",
            "--method",
            method,
            "--no-pixel-baseline",
        ];
        let gpu_run = scratch.path(&format!("{method}-cuda"));
        let Some(_gpu) = gpu_or_skip("baselines_train_on_cuda_as_on_the_cpu") else {
            assert_clear_error(&cuda_train_args(&common, "2", &gpu_run));
            return;
        };
        run_ok(&cuda_train_args(&common, "2", &gpu_run));
        let cpu_run = scratch.path(&format!("{method}-cpu"));
        let on_cpu = [
            "train", "--device", "cpu", "--steps", "2", "--out", &cpu_run,
        ];
        run_ok(&[&on_cpu[..], &common[..]].concat());
        let (on_gpu, on_cpu) = (step_losses(&gpu_run), step_losses(&cpu_run));
        assert_eq!(on_gpu.len(), 2, "{method}: {on_gpu:?}");
        for (step, (g, c)) in on_gpu.iter().zip(&on_cpu).enumerate() {
            assert!(
                (g - c).abs() <= 1e-4 * c.abs(),
                "{method} step {}: loss {g} on CUDA, {c} on the CPU",
                step + 1
            );
        }
    }
}

#[test]
fn train_eval_embed_on_cuda_match_the_cpu() {
    let scratch = Scratch::new("gpu-cli");
    let data = scratch.0.join("stripes");
    common::write_stripes(&data, 16);
    let data = data.to_str().unwrap().to_string();
    let (gpu_run, cpu_run) = (scratch.path("cuda"), scratch.path("cpu"));
    // 3 steps of 8 images (16 rows), float32 GEMMs on the GPU, the same seed on both devices.
    let common = [
        "--dataset",
        "folder",
        "--data-dir",
        &data,
        "--batch",
        "8",
        "--k",
        "5",
        "--seed",
        "3",
    ];
    let train_gpu = |steps, out| cuda_train_args(&common, steps, out);
    let Some(_gpu) = gpu_or_skip("train_eval_embed_on_cuda_match_the_cpu") else {
        assert_clear_error(&train_gpu("3", &gpu_run));
        return;
    };
    let stderr = run_ok(&train_gpu("3", &gpu_run));
    assert!(stderr.contains("training on"), "{stderr}");
    let on_cpu = [
        "train", "--device", "cpu", "--steps", "3", "--out", &cpu_run,
    ];
    run_ok(&[&on_cpu[..], &common[..]].concat());

    // The same losses step by step: two float32 paths (fused-v2 on the GPU, the fused CPU loss).
    let (on_gpu, on_cpu) = (step_losses(&gpu_run), step_losses(&cpu_run));
    assert_eq!(on_gpu.len(), 3, "{on_gpu:?}");
    for (step, (g, c)) in on_gpu.iter().zip(&on_cpu).enumerate() {
        assert!(
            (g - c).abs() <= 2e-5 * c.abs(),
            "step {}: loss {g} on CUDA, {c} on the CPU",
            step + 1
        );
    }
    assert_backend(&gpu_run, "fused-v2", "f32");

    // Stopped after 2 steps and resumed to 3 on CUDA: the same step losses, bit for bit (the
    // optimizer's momentum, batchnorm's statistics and the data order all come back).
    let resumed = scratch.path("cuda-resumed");
    run_ok(&train_gpu("2", &resumed));
    run_ok(&[&train_gpu("3", &resumed)[..], &["--resume"][..]].concat());
    let read = |run: &str| std::fs::read_to_string(Path::new(run).join("steps.csv")).unwrap();
    assert_eq!(
        read(&resumed),
        read(&gpu_run),
        "the resumed CUDA run differs"
    );

    // The GPU's checkpoint on the CPU: eval runs, and its embeddings match the CPU run's (same
    // steps to float32 rounding) and the GPU's own embeddings of it.
    let checkpoint = format!("{gpu_run}/last.safetensors");
    let on_data = ["--dataset", "folder", "--data-dir", &data];
    let eval = |device: &str| {
        let args = [
            &[
                "eval",
                "--checkpoint",
                &checkpoint,
                "--device",
                device,
                "--k",
                "5",
                "--json",
            ][..],
            &on_data[..],
        ]
        .concat();
        let out = invaspread(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        json["knn_top1"].as_f64().unwrap()
    };
    let (knn_cpu, knn_gpu) = (eval("cpu"), eval("cuda"));
    assert!(
        (knn_cpu - knn_gpu).abs() <= 1e-9,
        "kNN top-1 {knn_cpu} on the CPU, {knn_gpu} on CUDA"
    );
    let embed = |checkpoint: &str, device: &str, out: &str| {
        let args = [
            &[
                "embed",
                "--checkpoint",
                checkpoint,
                "--device",
                device,
                "--split",
                "test",
            ][..],
            &["--out", out][..],
            &on_data[..],
        ]
        .concat();
        run_ok(&args);
        embeddings(out)
    };
    let gpu_ckpt_on_cpu = embed(&checkpoint, "cpu", &scratch.path("a.npy"));
    let gpu_ckpt_on_gpu = embed(&checkpoint, "cuda", &scratch.path("b.npy"));
    let cpu_ckpt_on_cpu = embed(
        &format!("{cpu_run}/last.safetensors"),
        "cpu",
        &scratch.path("c.npy"),
    );
    // Unit rows: float32 rounding of a forward pass, and of 3 steps of training.
    let d = max_abs_diff(&gpu_ckpt_on_cpu, &gpu_ckpt_on_gpu);
    assert!(
        d <= 1e-4,
        "the GPU's checkpoint embeds {d} apart on the CPU and on CUDA"
    );
    let d = max_abs_diff(&gpu_ckpt_on_cpu, &cpu_ckpt_on_cpu);
    assert!(
        d <= 1e-3,
        "the GPU-trained and CPU-trained embeddings differ by {d}"
    );
}

#[test]
fn train_on_cuda_two_epochs_the_loss_falls() {
    let scratch = Scratch::new("gpu-cli-epochs");
    let out = scratch.path("run");
    let args = [
        "train", "--device", "cuda", "--epochs", "2", "--batch", "64", "--k", "50", "--out", &out,
    ];
    let Some(gpu) = gpu_or_skip("train_on_cuda_two_epochs_the_loss_falls") else {
        assert_clear_error(&args);
        return;
    };
    if gpu.is_virtual() {
        // 62 steps of 128 rows and two kNN passes over 2,500 images: minutes on the emulator.
        virtual_gpu_note(
            "train_on_cuda_two_epochs_the_loss_falls",
            "left to a real GPU (train_eval_embed_on_cuda_match_the_cpu covers the path)",
        );
        return;
    }
    let stderr = run_ok(&args);
    assert!(stderr.contains("training on"), "{stderr}");
    let csv = std::fs::read_to_string(Path::new(&out).join("metrics.csv")).unwrap();
    let rows: Vec<&str> = csv.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "{csv}");
    let loss = |row: &str| row.split(',').nth(2).unwrap().parse::<f64>().unwrap();
    assert!(
        loss(rows[1]) < loss(rows[0]),
        "the loss did not fall: {csv}"
    );
    assert_backend(&out, "fused-v2", "tf32");
}

/// `bench-loss --ranks 2` starts two ranks (one process and device each), every rank checks
/// its rows of the gathered loss against the float64 truth of the global batch, and rank 0
/// prints one row per kernel version.
#[test]
fn bench_loss_over_two_ranks_checks_every_version() {
    let Some(gpu) = gpu_or_skip("bench_loss_over_two_ranks_checks_every_version") else {
        return;
    };
    if !gpu.is_virtual() && invaspread::cuda::device_count().unwrap_or(0) < 2 {
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED (fewer than 2 GPUs): bench_loss_over_two_ranks_checks_every_version"
        );
        return;
    }
    let args = [
        "bench-loss",
        "--device",
        "cuda",
        "--ranks",
        "2",
        "--n",
        "24",
        "--d",
        "8",
        "--min-seconds",
        "0",
    ];
    let out = invaspread(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "invaspread {}\n{stdout}\n{stderr}",
        args.join(" ")
    );
    for version in [
        "unfused",
        "fused-v1",
        "fused-v2",
        "fused-v3-tf32",
        "fused-v3-bf16",
    ] {
        let row = stdout
            .lines()
            .find(|l| l.starts_with(&format!("| {version} | 24 | 8 | 2 |")))
            .unwrap_or_else(|| panic!("no row for {version}:\n{stdout}"));
        assert!(!row.contains("unchecked"), "{row}");
    }
    let own = stdout
        .lines()
        .find(|l| l.starts_with("| fused-v2 own rows | 24 | 8 | 2 |"))
        .unwrap_or_else(|| panic!("no row for fused-v2's own rows:\n{stdout}"));
    assert!(!own.contains("unchecked"), "{own}");
}
