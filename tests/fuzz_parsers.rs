//! Mutation fuzzing of every parser, on stable Rust, in CI: a valid sample of each format is
//! mutated by a seeded generator (bit flips, random byte runs, truncation, duplicated chunks,
//! huge or negative numbers written over fields) and parsed. Every parse must return (Ok or a
//! clear Err), never panic, and allocate at most its bound, measured by a counting global
//! allocator: what a hostile file can make the process hold is bounded by the code, not by
//! the file's headers.
//!
//! Formats: `.npy`, safetensors model, optimizer and run-state files, `config.json`, the digits
//! CSV (gzip), the CIFAR-10 and STL-10 binary releases, a `.tar.gz` image folder and a plain
//! image folder (PNG). `INVASPREAD_FUZZ_CASES` scales the cases per format (default 200).

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use invaspread::backend::Cpu;
use invaspread::data::{self, DataConfig};
use invaspread::nn::checkpoint;
use invaspread::nn::models::{Model, ModelKind};
use invaspread::nn::optim::{Sgd, SgdConfig};
use invaspread::tape::params::ParamStore;
use invaspread::trainer::{config, TrainConfig};
use rand::{Rng, SeedableRng};

/// The global allocator, counting the bytes live and their peak.
struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed to the system allocator unchanged; the counters only observe.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            let now = LIVE.fetch_add(new_size, Ordering::Relaxed) + new_size;
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `parse` and returns the most it held at once beyond what was live before, or the
/// panic's message.
fn measured(parse: &mut dyn FnMut()) -> Result<usize, String> {
    let before = LIVE.load(Ordering::SeqCst);
    PEAK.store(before, Ordering::SeqCst);
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(parse));
    let peak = PEAK.load(Ordering::SeqCst).saturating_sub(before);
    outcome.map(|_| peak).map_err(|e| {
        e.downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default()
    })
}

/// A mutation of `sample`: one to three random edits.
fn mutate(sample: &[u8], r: &mut impl Rng) -> Vec<u8> {
    let mut b = sample.to_vec();
    for _ in 0..r.random_range(1..=3) {
        if b.is_empty() {
            b.push(r.random());
            continue;
        }
        let at = r.random_range(0..b.len());
        match r.random_range(0..7) {
            0 => b[at] ^= 1 << r.random_range(0..8),
            1 => {
                let n = r.random_range(1..=16).min(b.len() - at);
                r.fill(&mut b[at..at + n]);
            }
            2 => b.truncate(at),
            3 => {
                let end = (at + r.random_range(1..=64)).min(b.len());
                let chunk = b[at..end].to_vec();
                b.splice(at..at, chunk);
            }
            4 => {
                // A field read as a little-endian u64 or u32 set to a huge value.
                let n = [8, 4][r.random_range(0..2)].min(b.len() - at);
                b[at..at + n].fill(0xff);
            }
            5 => {
                // Text formats: a number that no field expects.
                let words = [
                    "99999999999999999999",
                    "-1",
                    "1e308",
                    "NaN",
                    "-0",
                    "4294967296",
                    "\"\"",
                ];
                let word = words[r.random_range(0..words.len())].as_bytes();
                b.splice(at..at, word.iter().copied());
            }
            _ => {
                let n = r.random_range(1..=8).min(b.len() - at);
                b.drain(at..at + n);
            }
        }
    }
    b
}

fn cases() -> usize {
    std::env::var("INVASPREAD_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200)
}

/// One format: its sample file at `target` (inside `dir`), mutated `cases()` times, each
/// parsed by `parse(dir)` within `bound` bytes. Returns the failures.
fn fuzz(name: &str, target: &Path, bound: usize, parse: &mut dyn FnMut() -> bool) -> Vec<String> {
    let sample = std::fs::read(target).unwrap();
    let mut failures = Vec::new();
    let (mut accepted, mut worst) = (0usize, 0usize);
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(name.len() as u64 * 7919);
    // The sample itself first: it must parse.
    let mut ok = false;
    measured(&mut || ok = parse()).unwrap();
    assert!(ok, "{name}: the valid sample does not parse");
    for case in 0..cases() {
        let bytes = mutate(&sample, &mut r);
        std::fs::write(target, &bytes).unwrap();
        let mut parsed = false;
        match measured(&mut || parsed = parse()) {
            Ok(peak) => {
                worst = worst.max(peak);
                accepted += usize::from(parsed);
                if peak > bound {
                    failures.push(format!(
                        "{name} case {case}: held {peak} bytes, bound {bound}"
                    ));
                }
            }
            Err(panic) => failures.push(format!("{name} case {case}: panicked: {panic}")),
        }
    }
    std::fs::write(target, &sample).unwrap();
    eprintln!(
        "{name}: {} mutations, {accepted} still parsed, largest allocation {:.1} MB (bound {} MB)",
        cases(),
        worst as f64 / 1e6,
        bound >> 20
    );
    failures
}

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("invaspread-fuzz-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn gzip(path: &Path, bytes: &[u8]) {
    let mut gz = flate2::write::GzEncoder::new(
        std::fs::File::create(path).unwrap(),
        flate2::Compression::fast(),
    );
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap();
}

fn png_bytes(seed: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(8, 8, |x, y| image::Rgb([seed, x as u8 * 30, y as u8 * 30]));
    let mut out = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

const MB: usize = 1 << 20;

/// `path`'s safetensors file with metadata `key` set to `value`, written to `to`.
fn with_metadata(path: &Path, key: &str, value: &str, to: &Path) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header["__metadata__"][key] = serde_json::Value::String(value.to_string());
    let header = serde_json::to_vec(&header).unwrap();
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(to, out).unwrap();
}

/// Checkpoints whose metadata holds hostile values, for every key a command reads (the model
/// to build, the image size and seed of eval and embed, the run's position, its checksum),
/// read by the functions the commands use. Each must return (Ok or Err), never panic, hold at
/// most the bound, and never accept an image size outside the flag's range.
fn hostile_metadata(model: &Path, state: &Path, backend: &Cpu<f32>) -> Vec<String> {
    let long = "9".repeat(1 << 20);
    let values = [
        "",
        "0",
        "-1",
        "1",
        "1024",
        "1025",
        "4096",
        "100000",
        "18446744073709551616",
        "NaN",
        "inf",
        "1e9",
        " 32",
        "abc",
        "resnet18\0",
        "convnet-small ",
        "RESNET18",
        &long,
    ];
    let keys = [
        "model",
        "image_size",
        "seed",
        "step",
        "sgd_step",
        "epoch_loss_sum",
        "metrics",
        checkpoint::CHECKSUM,
    ];
    let hostile = model.with_file_name("hostile.safetensors");
    let mut failures = Vec::new();
    let (mut cases, mut refused, mut worst) = (0, 0, 0);
    for (sample, kind) in [(model, "model"), (state, "run state")] {
        for key in keys {
            for value in values {
                with_metadata(sample, key, value, &hostile);
                cases += 1;
                let mut outcome = Ok(());
                let run = &mut || {
                    outcome = (|| {
                        let mut store = ParamStore::default();
                        let mut sgd = Sgd::new(SgdConfig::default());
                        let meta = if kind == "model" {
                            checkpoint::load_any_model(&hostile, backend)?.2
                        } else {
                            let _ = Model::new(ModelKind::ConvnetSmall, &mut store, backend, 0)?;
                            checkpoint::load_run_state(&mut store, &mut sgd, backend, &hostile)?.0
                        };
                        if let Some(size) = checkpoint::image_size(&hostile, &meta)? {
                            assert!((1..=1024).contains(&size), "image size {size} accepted");
                        }
                        checkpoint::seed(&hostile, &meta)?;
                        checkpoint::integer::<usize>(&hostile, &meta, "step")?;
                        Ok::<(), invaspread::Error>(())
                    })();
                };
                match measured(run) {
                    Ok(peak) => {
                        worst = worst.max(peak);
                        refused += usize::from(outcome.is_err());
                        if peak > 24 * MB {
                            failures.push(format!(
                                "{kind} metadata {key} = {value:.20}: held {peak} bytes"
                            ));
                        }
                    }
                    Err(panic) => failures.push(format!(
                        "{kind} metadata {key} = {value:.20}: panicked: {panic}"
                    )),
                }
            }
        }
    }
    eprintln!(
        "hostile checkpoint metadata: {cases} files, {refused} refused, largest allocation {:.1} MB",
        worst as f64 / 1e6
    );
    failures
}

#[test]
fn no_parser_panics_or_overallocates_on_mutated_files() {
    let dir = scratch("all");
    let mut failures = Vec::new();

    // .npy
    let npy = dir.join("z.npy");
    invaspread::npy::write(
        &npy,
        &[6, 4],
        &(0..24).map(|i| i as f32).collect::<Vec<_>>(),
    )
    .unwrap();
    failures.extend(fuzz("npy", &npy, 4 * MB, &mut || {
        invaspread::npy::read(&npy).is_ok()
    }));

    // Checkpoints: model, optimizer and run state of convnet-small (about 1.2 MB each).
    let backend = Cpu::<f32>::new();
    let mut store = ParamStore::default();
    let _model = Model::new(ModelKind::ConvnetSmall, &mut store, &backend, 0).unwrap();
    let mut sgd = Sgd::new(SgdConfig::default());
    let meta = std::collections::HashMap::from([("step".to_string(), "0".to_string())]);
    let (model, opt, state) = (
        dir.join("m.safetensors"),
        dir.join("o.safetensors"),
        dir.join("s.safetensors"),
    );
    checkpoint::save_model(&store, &backend, &model, meta.clone()).unwrap();
    checkpoint::save_optimizer(&store, &sgd, &backend, &opt, meta.clone()).unwrap();
    checkpoint::save_run_state(&store, &sgd, &backend, &[1.5, 2.5], &[], &state, meta).unwrap();
    let bound = 24 * MB;
    failures.extend(fuzz("model checkpoint", &model, bound, &mut || {
        checkpoint::load_model(&mut store, &backend, &model).is_ok()
    }));
    failures.extend(fuzz("optimizer file", &opt, bound, &mut || {
        checkpoint::load_optimizer(&mut store, &mut sgd, &backend, &opt).is_ok()
    }));
    failures.extend(fuzz("run state", &state, bound, &mut || {
        checkpoint::load_run_state(&mut store, &mut sgd, &backend, &state).is_ok()
    }));

    failures.extend(hostile_metadata(&model, &state, &backend));

    // config.json
    let cfg = dir.join("config.json");
    std::fs::write(
        &cfg,
        serde_json::to_string_pretty(&TrainConfig::default()).unwrap(),
    )
    .unwrap();
    failures.extend(fuzz("config.json", &cfg, 4 * MB, &mut || {
        config::read(&cfg).is_ok()
    }));

    // The digits CSV: mutated before compression (the parser) and after (the gzip layer).
    let row = |label: usize| {
        let mut v: Vec<String> = (0..64).map(|i| ((i + label) % 17).to_string()).collect();
        v.push((label % 10).to_string());
        v.join(",") + "\n"
    };
    let csv: String = (0..20).map(row).collect();
    let (csv_path, gz_path) = (dir.join("digits.csv"), dir.join("digits.csv.gz"));
    std::fs::write(&csv_path, &csv).unwrap();
    gzip(&gz_path, csv.as_bytes());
    let bound = 300 * MB; // the 256 MB decompression cap, and its buffer
    failures.extend(fuzz("digits csv", &csv_path, 4 * MB, &mut || {
        gzip(&gz_path, &std::fs::read(&csv_path).unwrap());
        data::digits::digits(&gz_path).is_ok()
    }));
    gzip(&gz_path, csv.as_bytes());
    failures.extend(fuzz("digits gzip", &gz_path, bound, &mut || {
        data::digits::digits(&gz_path).is_ok()
    }));

    // CIFAR-10 binary: two records per batch file; the mutated file is data_batch_1.bin.
    let cifar = dir.join("cifar");
    std::fs::create_dir_all(&cifar).unwrap();
    let record = |l: u8| {
        std::iter::once(l)
            .chain((0..3072).map(|i| (i % 251) as u8))
            .collect::<Vec<u8>>()
    };
    for name in [
        "data_batch_1.bin",
        "data_batch_2.bin",
        "data_batch_3.bin",
        "data_batch_4.bin",
        "data_batch_5.bin",
        "test_batch.bin",
    ] {
        std::fs::write(cifar.join(name), [record(1), record(7)].concat()).unwrap();
    }
    failures.extend(fuzz(
        "cifar-10 binary",
        &cifar.join("data_batch_1.bin"),
        8 * MB,
        &mut || data::cifar10::cifar10_binary(&cifar).is_ok(),
    ));

    // STL-10 binary: two 96 x 96 images per split; the mutated files are train_X and train_y.
    let stl = dir.join("stl");
    std::fs::create_dir_all(&stl).unwrap();
    for split in ["train", "test"] {
        std::fs::write(
            stl.join(format!("{split}_X.bin")),
            vec![17u8; 2 * 96 * 96 * 3],
        )
        .unwrap();
        std::fs::write(stl.join(format!("{split}_y.bin")), [3u8, 10]).unwrap();
    }
    for file in ["train_X.bin", "train_y.bin"] {
        failures.extend(fuzz(
            &format!("stl-10 {file}"),
            &stl.join(file),
            8 * MB,
            &mut || data::stl10::stl10_binary(&stl, false).is_ok(),
        ));
    }

    // An image folder as a .tar.gz (the tar mutated, then compressed) and as a tree (a PNG
    // mutated). Decoding is bounded per image (512 MB) and done one image per thread.
    let tarball = dir.join("images.tar.gz");
    let tar_path = dir.join("images.tar");
    let mut tar = tar::Builder::new(Vec::new());
    for (i, path) in [
        "d/train/a/0.png",
        "d/train/b/1.png",
        "d/test/a/2.png",
        "d/test/b/3.png",
    ]
    .iter()
    .enumerate()
    {
        let png = png_bytes(i as u8);
        let mut header = tar::Header::new_gnu();
        header.set_size(png.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, path, png.as_slice()).unwrap();
    }
    std::fs::write(&tar_path, tar.into_inner().unwrap()).unwrap();
    let opts = DataConfig {
        image_size: Some(8),
        ..DataConfig::default()
    };
    failures.extend(fuzz("tar.gz image folder", &tar_path, 64 * MB, &mut || {
        gzip(&tarball, &std::fs::read(&tar_path).unwrap());
        data::folder::folder(&tarball, &opts).is_ok()
    }));
    let tree = dir.join("tree");
    for (split, class, i) in [
        ("train", "a", 0u8),
        ("train", "b", 1),
        ("test", "a", 2),
        ("test", "b", 3),
    ] {
        std::fs::create_dir_all(tree.join(split).join(class)).unwrap();
        std::fs::write(
            tree.join(split).join(class).join(format!("{i}.png")),
            png_bytes(i),
        )
        .unwrap();
    }
    failures.extend(fuzz(
        "png in an image folder",
        &tree.join("train/a/0.png"),
        1100 * MB,
        &mut || data::folder::folder(&tree, &opts).is_ok(),
    ));

    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
