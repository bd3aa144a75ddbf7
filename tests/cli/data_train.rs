//! Datasets, augmentation statistics, and the training loop: reproducibility, bit-exact
//! resume, the initialised checkpoint, and learning on real data (the CIFAR-10 JPEG copy in
//! ../shared/data, skipped with a message when it is absent).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use invaspread::data::augment::{self, crop_params, draw, view_rng, AugmentConfig};
use invaspread::data::{self, Dataset, OnBadImage};
use invaspread::trainer::{self, KnnConfig, RunOptions, TrainConfig};

fn scratch(tag: &str) -> PathBuf {
    crate::common::scratch_dir(&format!("data-{tag}"))
}

#[test]
fn crop_parameters_stay_in_the_recipe_ranges() {
    let cfg = AugmentConfig::recipe();
    let (mut min_scale, mut max_scale, mut min_ratio, mut max_ratio) =
        (f64::MAX, 0.0f64, f64::MAX, 0.0f64);
    for i in 0..5000 {
        let (top, left, h, w) =
            crop_params(&mut view_rng(1, 0, i, 0), 32, 32, cfg.scale, cfg.ratio);
        assert!(top + h <= 32 && left + w <= 32 && h > 0 && w > 0);
        let scale = (h * w) as f64 / 1024.0;
        let ratio = w as f64 / h as f64;
        // Whole-pixel rounding of w and h moves the ratio by at most half a pixel each way.
        let (hf, wf) = (h as f64, w as f64);
        assert!(
            (wf + 0.5) / (hf - 0.5) >= 0.75 && (wf - 0.5) / (hf + 0.5) <= 4.0 / 3.0,
            "crop {w}x{h} is outside the ratio range"
        );
        (min_scale, max_scale) = (min_scale.min(scale), max_scale.max(scale));
        (min_ratio, max_ratio) = (min_ratio.min(ratio), max_ratio.max(ratio));
    }
    // Rounding to whole pixels on a 32-pixel side moves the edges slightly.
    assert!(
        min_scale > 0.17 && min_scale < 0.25,
        "smallest crop {min_scale}"
    );
    assert!(max_scale > 0.9, "largest crop {max_scale}");
    assert!(
        min_ratio < 0.8 && max_ratio > 1.25,
        "ratios {min_ratio}..{max_ratio} do not span the range"
    );
}

#[test]
fn grayscale_flip_rates_and_jitter_ranges() {
    let cfg = AugmentConfig::recipe();
    let n = 20_000;
    let (mut gray, mut flip) = (0, 0);
    let mut orders = std::collections::HashSet::new();
    for i in 0..n {
        let d = draw(&mut view_rng(2, 0, i, 1), 32, &cfg);
        gray += d.grayscale as usize;
        flip += d.flip as usize;
        orders.insert(d.order);
        for k in 0..3 {
            assert!(
                (0.6..=1.4).contains(&d.factors[k]),
                "factor {k} = {}",
                d.factors[k]
            );
        }
        assert!((-0.4..=0.4).contains(&d.factors[3]));
    }
    // Binomial standard deviations: 0.0028 and 0.0035; allow 5 of them.
    let (g, f) = (gray as f64 / n as f64, flip as f64 / n as f64);
    assert!((g - 0.2).abs() < 0.015, "grayscale rate {g}");
    assert!((f - 0.5).abs() < 0.018, "flip rate {f}");
    assert_eq!(
        orders.len(),
        24,
        "all 24 orders of the four colour adjustments occur"
    );
}

#[test]
fn identity_settings_return_the_input_and_seeds_reproduce() {
    let ds = data::synthetic(5, 2, 1);
    let img = ds.train.image(3, ds.size);
    let mut out = vec![0.0f32; 3 * 32 * 32];
    augment::augment(
        img,
        32,
        &AugmentConfig::identity(),
        &mut view_rng(0, 0, 0, 0),
        &mut out,
    );
    let mut want = vec![0.0f32; out.len()];
    augment::test_transform(img, 32, &mut want);
    for (a, b) in out.iter().zip(&want) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
    let a = augment::two_view_batch(
        &[&ds.train],
        32,
        &[0, 5, 7],
        &AugmentConfig::recipe(),
        42,
        3,
    );
    let b = augment::two_view_batch(
        &[&ds.train],
        32,
        &[0, 5, 7],
        &AugmentConfig::recipe(),
        42,
        3,
    );
    let c = augment::two_view_batch(
        &[&ds.train],
        32,
        &[0, 5, 7],
        &AugmentConfig::recipe(),
        43,
        3,
    );
    assert_eq!(a, b);
    assert_ne!(a, c);
    // The two views of one image differ.
    assert_ne!(a[..3072], a[3 * 3072..4 * 3072]);
}

#[test]
fn image_folders_sort_classes_convert_grey_and_report_bad_files() {
    let root = scratch("folder");
    for (split, class, name, grey) in [
        ("train", "b", "1.png", false),
        ("train", "a", "1.png", true),
        ("test", "a", "2.png", false),
        ("test", "b", "3.png", false),
    ] {
        let dir = root.join(split).join(class);
        std::fs::create_dir_all(&dir).unwrap();
        if grey {
            image::GrayImage::from_pixel(4, 4, image::Luma([77]))
                .save(dir.join(name))
                .unwrap();
        } else {
            image::RgbImage::from_pixel(4, 4, image::Rgb([10, 20, 30]))
                .save(dir.join(name))
                .unwrap();
        }
    }
    let ds = data::folder(&root, &folder_opts(None, OnBadImage::Stop)).unwrap();
    assert_eq!(ds.classes, vec!["a", "b"]);
    assert_eq!((ds.train.len(), ds.test.len(), ds.size), (2, 2, 4));
    assert_eq!(ds.train.labels, vec![0, 1]);
    assert_eq!(
        &ds.train.image(0, 4)[..3],
        &[77, 77, 77],
        "grey becomes three equal channels"
    );

    image::RgbImage::from_pixel(6, 6, image::Rgb([1, 2, 3]))
        .save(root.join("test/b/4.png"))
        .unwrap();
    let err = data::folder(&root, &folder_opts(None, OnBadImage::Stop))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("4.png is 6x6") && err.contains("--image-size"),
        "{err}"
    );
    let resized = data::folder(&root, &folder_opts(Some(8), OnBadImage::Stop)).unwrap();
    assert_eq!((resized.size, resized.test.len()), (8, 3));

    std::fs::write(root.join("train/a/broken.png"), b"not an image").unwrap();
    let err = data::folder(&root, &folder_opts(Some(8), OnBadImage::Stop))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("broken.png") && err.contains("cannot decode"),
        "{err}"
    );
    let skipped = data::folder(&root, &folder_opts(Some(8), OnBadImage::Skip)).unwrap();
    assert_eq!(skipped.skipped, 1);
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn digits_load_when_the_shared_data_is_there() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/sklearn-digits");
    if !path.exists() {
        eprintln!("SKIPPED (no ../shared/data): digits_load_when_the_shared_data_is_there");
        return;
    }
    let ds = data::digits(&path).unwrap();
    assert_eq!((ds.train.len(), ds.test.len(), ds.size), (1438, 359, 8));
    assert_eq!(ds.train.labels[..3], [0, 1, 2]);
}

fn config(steps: usize) -> TrainConfig {
    TrainConfig {
        steps: Some(steps),
        batch: 16,
        warmup_steps: 2,
        seed: 7,
        knn: KnnConfig {
            k: 20,
            ..KnnConfig::default()
        },
        ..TrainConfig::default()
    }
}

/// Runs `cfg` into `out` (resuming when asked), without a progress bar.
fn train(
    cfg: &TrainConfig,
    out: &Path,
    resume: bool,
    ds: Arc<Dataset>,
) -> invaspread::Result<trainer::TrainSummary> {
    let opts = RunOptions {
        out: out.to_path_buf(),
        resume,
        progress: false,
        group: None,
        bucket_mb: invaspread::dist::gradient_buckets::DEFAULT_BUCKET_MB,
        allow_moved_data: false,
    };
    trainer::train(cfg, &opts, ds)
}

fn small() -> Arc<Dataset> {
    Arc::new(data::synthetic(3, 8, 4)) // 80 train images: 5 steps an epoch at batch 16
}

#[test]
fn same_seed_same_losses_and_resume_is_bit_exact() {
    let ds = small();
    let full = train(&config(12), &scratch("full"), false, ds.clone()).unwrap();
    // The second run reads its losses in windows of 3 steps, as a GPU run does in windows of
    // 10 (a window is collected one window late, and at every epoch's end: here after 5 and
    // 10 steps): the same losses, every one of them, and the same epoch means.
    let mut windowed = config(12);
    windowed.loss_read_every = Some(3);
    let again = train(&windowed, &scratch("again"), false, ds.clone()).unwrap();
    let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(
        bits(&full.step_losses),
        bits(&again.step_losses),
        "same seed and threads, same losses"
    );
    assert_eq!(full.step_losses.len(), 12);
    let epoch_losses = |s: &trainer::TrainSummary| {
        s.metrics
            .iter()
            .map(|m| m.loss.map(f64::to_bits))
            .collect::<Vec<_>>()
    };
    assert_eq!(epoch_losses(&full), epoch_losses(&again));
    assert_eq!(
        full.metrics.len(),
        4,
        "the initialised network's row and 3 epochs"
    );

    // Stop after 7 steps (mid-epoch), then resume to 12.
    let dir = scratch("resume");
    let first = train(&config(7), &dir, false, ds.clone()).unwrap();
    let rest = train(&config(12), &dir, true, ds.clone()).unwrap();
    let joined: Vec<f64> = first
        .step_losses
        .iter()
        .chain(&rest.step_losses)
        .copied()
        .collect();
    assert_eq!(
        bits(&joined),
        bits(&full.step_losses),
        "resumed run differs from the uninterrupted one"
    );
    // steps.csv holds every step once, in order, across the interruption.
    let log = std::fs::read_to_string(dir.join("steps.csv")).unwrap();
    let logged: Vec<(usize, f64)> = log
        .lines()
        .skip(1)
        .map(|l| {
            let (s, v) = l.split_once(',').unwrap();
            (s.parse().unwrap(), v.parse().unwrap())
        })
        .collect();
    assert_eq!(
        logged.iter().map(|x| x.0).collect::<Vec<_>>(),
        (1..=12).collect::<Vec<_>>()
    );
    assert_eq!(
        bits(&logged.iter().map(|x| x.1).collect::<Vec<_>>()),
        bits(&full.step_losses)
    );
    assert!(
        dir.join("metrics.csv").exists()
            && dir.join("metrics.json").exists()
            && dir.join("metrics.png").exists()
    );
    assert!(dir.join("best.safetensors").exists() && dir.join("config.json").exists());

    // A second run into the same folder without --resume is refused (nothing is overwritten).
    let err = train(&config(12), &dir, false, ds).unwrap_err().to_string();
    assert!(err.contains("already holds a run"), "{err}");
}

#[test]
fn zero_steps_writes_the_initialised_checkpoint() {
    let dir = scratch("init");
    let summary = train(&config(0), &dir, false, small()).unwrap();
    assert!(summary.knn_at_start.is_some());
    assert!(dir.join("last.safetensors").exists());
}

/// Learning happens on real images: a minute of training on part of the CIFAR-10 JPEG
/// copy lifts kNN top-1 clearly above the same network at initialisation.
#[test]
fn learning_on_cifar10_jpeg_copy_beats_initialisation() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data/cifar10-jpg/cifar10-jpg.tar.gz");
    if !path.exists() {
        eprintln!("SKIPPED (no ../shared/data/cifar10-jpg): learning_on_cifar10_jpeg_copy_beats_initialisation");
        return;
    }
    let mut ds = data::folder(&path, &folder_opts(None, OnBadImage::Stop)).unwrap();
    // 10,000 training and 2,000 test images keep the run to a couple of minutes on 2 cores.
    let keep = |split: &mut data::Split, n: usize, size: usize| {
        let order: Vec<usize> = (0..split.len())
            .filter(|i| i % (split.len() / n) == 0)
            .take(n)
            .collect();
        let images: Vec<u8> = order
            .iter()
            .flat_map(|&i| split.image(i, size).to_vec())
            .collect();
        let labels = order.iter().map(|&i| split.labels[i]).collect();
        *split = data::Split { images, labels };
    };
    let size = ds.size;
    keep(&mut ds.train, 10_000, size);
    keep(&mut ds.test, 2_000, size);
    let mut cfg = config(0);
    cfg.steps = None;
    cfg.epochs = Some(3);
    cfg.batch = 128;
    cfg.knn.k = 200;
    let summary = train(&cfg, &scratch("cifar"), false, Arc::new(ds)).unwrap();
    let start = summary.knn_at_start.unwrap().top1;
    let end = summary.metrics.last().unwrap().knn_top1.unwrap();
    eprintln!(
        "CIFAR-10 JPEG subset: kNN top-1 {:.2}% at initialisation, {:.2}% after 3 epochs",
        100.0 * start,
        100.0 * end
    );
    assert!(
        end > start + 0.08,
        "kNN top-1 rose only from {start} to {end} (expected +8 points)"
    );
}

#[test]
fn binary_releases_are_read_in_their_pixel_order() {
    // CIFAR-10: records of a label byte then R, G, B planes of 32 x 32.
    let dir = scratch("cifar-bin");
    let record = |label: u8, base: u8| {
        let mut r = vec![label];
        for c in 0..3u8 {
            r.extend((0..1024).map(|p| base.wrapping_add(c * 50).wrapping_add((p % 7) as u8)));
        }
        r
    };
    for b in 1..=5 {
        std::fs::write(
            dir.join(format!("data_batch_{b}.bin")),
            [record(b as u8, 10 * b as u8), record(9, 1)].concat(),
        )
        .unwrap();
    }
    std::fs::write(dir.join("test_batch.bin"), record(3, 100)).unwrap();
    let ds = data::cifar10_binary(&dir).unwrap();
    assert_eq!((ds.train.len(), ds.test.len(), ds.size), (10, 1, 32));
    assert_eq!(ds.train.labels[..2], [1, 9]);
    // Pixel 8 of the test image: HWC (R, G, B) = (100 + 1, 150 + 1, 200 + 1).
    assert_eq!(&ds.test.image(0, 32)[8 * 3..8 * 3 + 3], &[101, 151, 201]);
    std::fs::write(dir.join("test_batch.bin"), b"short").unwrap();
    let err = data::cifar10_binary(&dir).unwrap_err().to_string();
    assert!(
        err.contains("test_batch.bin") && err.contains("3073-byte records"),
        "{err}"
    );

    // STL-10: 96 x 96, each channel stored column-major; labels 1..10; unlabeled_X.bin.
    let dir = scratch("stl-bin");
    const S: usize = 96;
    let image = |seed: usize| -> Vec<u8> {
        let mut v = vec![0u8; 3 * S * S];
        for c in 0..3 {
            for x in 0..S {
                for y in 0..S {
                    v[c * S * S + x * S + y] = ((seed + 3 * c + 5 * x + 7 * y) % 251) as u8;
                }
            }
        }
        v
    };
    std::fs::write(dir.join("train_X.bin"), [image(1), image(2)].concat()).unwrap();
    std::fs::write(dir.join("train_y.bin"), [1u8, 10]).unwrap();
    std::fs::write(dir.join("test_X.bin"), image(3)).unwrap();
    std::fs::write(dir.join("test_y.bin"), [4u8]).unwrap();
    std::fs::write(
        dir.join("unlabeled_X.bin"),
        [image(4), image(5), image(6)].concat(),
    )
    .unwrap();
    let ds = data::stl10_binary(&dir, true).unwrap();
    assert_eq!(
        (ds.train.len(), ds.test.len(), ds.unlabeled.len(), ds.size),
        (2, 1, 3, 96)
    );
    assert_eq!(ds.train.labels, vec![0, 9]);
    assert_eq!(ds.training_len(), 5);
    // Row y = 2, column x = 5, channel 1 of test image 3: (3 + 3 + 25 + 14) % 251 = 45.
    assert_eq!(ds.test.image(0, 96)[(2 * S + 5) * 3 + 1], 45);
    assert_eq!(data::stl10_binary(&dir, false).unwrap().unlabeled.len(), 0);
    std::fs::write(dir.join("test_y.bin"), [11u8]).unwrap();
    let err = data::stl10_binary(&dir, false).unwrap_err().to_string();
    assert!(
        err.contains("test_y.bin") && err.contains("label 11"),
        "{err}"
    );
}

#[test]
fn unlabelled_images_join_training_but_not_the_knn_bank() {
    let mut ds = data::synthetic(4, 8, 2);
    let extra = data::synthetic(5, 8, 1).train;
    ds.unlabeled = data::Split {
        images: extra.images,
        labels: vec![-1; extra.labels.len()],
    };
    let summary = train(&config(10), &scratch("unlabelled"), false, Arc::new(ds)).unwrap();
    // 80 labelled + 80 unlabelled images at batch 16: 10 steps are one epoch.
    assert_eq!(summary.metrics.len(), 2, "epoch 0 and one epoch");
    assert_eq!((summary.metrics[1].epoch, summary.metrics[1].step), (1, 10));
}

/// The options of an image folder read with `image_size` and `on_bad`.
fn folder_opts(image_size: Option<usize>, on_bad: OnBadImage) -> data::DataConfig {
    data::DataConfig {
        image_size,
        on_bad_image: on_bad,
        ..data::DataConfig::default()
    }
}
