//! Hostile dataset files: each case ends in a clear error (or a bounded load), never a panic, a
//! hang or memory that the file, not the user's flags, decides. Each case was a panic, a hang or
//! an unbounded allocation before it had a check.
use crate::common::exe;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::invaspread;

fn scratch(tag: &str) -> PathBuf {
    crate::common::scratch_dir(&format!("hostile-{tag}"))
}

/// `train --steps 0` on `dataset` at `data`: loads it, evaluates, saves the initial network.
fn load_args<'a>(dataset: &'a str, data: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--steps",
        "0",
        "--k",
        "3",
        "--dataset",
        dataset,
        "--data-dir",
        data,
        "--out",
        out,
    ]
}

/// A failure (status 1) whose stderr holds every needle and no panic.
fn assert_error(args: &[&str], needles: &[&str]) -> String {
    let out = invaspread(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "invaspread {}: {err}",
        args.join(" ")
    );
    assert!(!err.contains("panicked"), "{err}");
    for needle in needles {
        assert!(err.contains(needle), "expected {needle:?} in\n{err}");
    }
    err
}

fn small_png(path: &Path) {
    image::RgbImage::from_pixel(8, 8, image::Rgb([9, 99, 199]))
        .save(path)
        .unwrap();
}

/// train/a/0.png and test/a/0.png, small and valid.
fn minimal_folder(root: &Path) {
    for split in ["train", "test"] {
        std::fs::create_dir_all(root.join(split).join("a")).unwrap();
        small_png(&root.join(split).join("a").join("0.png"));
    }
}

#[test]
fn large_images_are_resized_one_at_a_time() {
    let dir = scratch("large");
    let root = dir.join("data");
    minimal_folder(&root);
    // 12 images of 6000 x 6000 (108 MB each decoded) for a 32 x 32 dataset: held all at once
    // at full size before (1.3 GB), now one per thread.
    let big = dir.join("big.png");
    image::RgbImage::from_pixel(6000, 6000, image::Rgb([1, 2, 3]))
        .save(&big)
        .unwrap();
    for i in 0..12 {
        std::fs::copy(&big, root.join("train/a").join(format!("big{i}.png"))).unwrap();
    }
    let out = dir.join("run");
    let mut args = vec!["--threads", "1"];
    args.extend(load_args(
        "folder",
        root.to_str().unwrap(),
        out.to_str().unwrap(),
    ));
    args.extend(["--image-size", "32", "--batch", "2"]);
    let status = Command::new(exe()).args(&args).status().unwrap();
    assert!(status.success());
    // SAFETY: getrusage fills the struct it is given.
    let peak_kib = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
        usage.ru_maxrss
    };
    assert!(peak_kib < 700 * 1024, "peak memory {} MB", peak_kib / 1024);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn oversized_archive_entries_and_files_are_refused_before_reading() {
    let dir = scratch("sizes");
    // A tarball whose one entry is 65 MB (of zeros, a few kB compressed).
    let tar_path = dir.join("data.tar.gz");
    let gz = flate2::write::GzEncoder::new(
        std::fs::File::create(&tar_path).unwrap(),
        flate2::Compression::fast(),
    );
    let mut tar = tar::Builder::new(gz);
    let mut header = tar::Header::new_gnu();
    header.set_size(65 << 20);
    header.set_mode(0o644);
    header.set_cksum();
    tar.append_data(
        &mut header,
        "data/train/a/huge.png",
        std::io::repeat(0).take(65 << 20),
    )
    .unwrap();
    tar.into_inner().unwrap().finish().unwrap();
    let out = dir.join("run");
    assert_error(
        &load_args("folder", tar_path.to_str().unwrap(), out.to_str().unwrap()),
        &["huge.png is 68157440 bytes", "more than the 64 MB"],
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

use std::io::Read;

#[test]
fn links_out_of_the_folder_devices_and_fifos_are_not_read() {
    let dir = scratch("special");
    let root = dir.join("data");
    minimal_folder(&root);
    let out = dir.join("run");
    let args = load_args("folder", root.to_str().unwrap(), out.to_str().unwrap());
    // A link to /dev/zero read forever before.
    let link = root.join("train/a/zero.png");
    std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
    assert_error(
        &args,
        &["zero.png", "outside the image folder", "--follow-links"],
    );
    let mut follow = args.clone();
    follow.push("--follow-links");
    assert_error(&follow, &["zero.png", "is not a regular file"]);
    std::fs::remove_file(&link).unwrap();
    // A FIFO hung the loader before; the child is given 60 s.
    let fifo = root.join("train/a/pipe.png");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    let mut child = Command::new(exe())
        .args(&args)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the loader hangs on a FIFO"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(
        err.contains("pipe.png") && err.contains("is not a regular file"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// digits.csv.gz with `body` as its decompressed text.
fn digits_file(dir: &Path, body: &mut dyn FnMut(&mut dyn Write)) -> PathBuf {
    let path = dir.join("digits.csv.gz");
    let mut gz = flate2::write::GzEncoder::new(
        std::fs::File::create(&path).unwrap(),
        flate2::Compression::fast(),
    );
    body(&mut gz);
    gz.finish().unwrap();
    path
}

#[test]
fn a_gzip_bomb_a_giant_line_and_empty_splits_are_clear_errors() {
    let dir = scratch("digits");
    let out = dir.join("run");
    let out = out.to_str().unwrap();
    // 300 MB of text from a file of 300 kB: refused at 256 MB, not held.
    let bomb = digits_file(&dir, &mut |w| {
        let chunk = vec![b'1'; 1 << 20];
        for _ in 0..300 {
            w.write_all(&chunk).unwrap();
        }
    });
    assert_error(
        &load_args("digits", bomb.to_str().unwrap(), out),
        &["decompresses to more than 256 MB"],
    );
    // A 10 MB line: the error quotes a short excerpt, not the line (3 GB before, in the bomb).
    let line = digits_file(&dir, &mut |w| w.write_all(&vec![b'7'; 10 << 20]).unwrap());
    let err = assert_error(
        &load_args("digits", line.to_str().unwrap(), out),
        &["expected 65 integers", "bytes)"],
    );
    assert!(err.len() < 1000, "an error of {} bytes", err.len());
    // 4 rows: 4 training images and no test image. k-means panicked on it, training reported
    // 0% kNN for every epoch.
    let row = "0,0,5,13,9,1,0,0,0,0,13,15,10,15,5,0,0,3,15,2,0,11,8,0,0,4,12,0,0,8,8,0,0,5,8,0,0,9,8,0,0,4,11,0,1,12,7,0,0,2,14,5,10,12,0,0,0,0,6,13,10,0,0,0,0\n";
    let four = digits_file(&dir, &mut |w| {
        w.write_all(row.repeat(4).as_bytes()).unwrap()
    });
    assert_error(
        &load_args("digits", four.to_str().unwrap(), out),
        &["its test split is empty"],
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_zero_sized_step_batch_is_an_error() {
    let dir = scratch("step");
    let run = dir.join("run");
    let init = invaspread(&[
        "train",
        "--steps",
        "0",
        "--k",
        "5",
        "--out",
        run.to_str().unwrap(),
    ]);
    assert!(init.status.success());
    let batch = dir.join("batch.npy");
    invaspread::npy::write(&batch, &[4, 3, 0, 0], &[] as &[f32]).unwrap();
    let ckpt = run.join("last.safetensors");
    let after = dir.join("after.safetensors");
    assert_error(
        &[
            "step",
            "--checkpoint",
            ckpt.to_str().unwrap(),
            "--input",
            batch.to_str().unwrap(),
            "--out",
            after.to_str().unwrap(),
        ],
        &["batch.npy", "H, W >= 1"],
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
