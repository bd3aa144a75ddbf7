//! Datasets, decoded once and held as u8 HWC images, and the augmentation of the recipe.
//!
//! | name | source | notes |
//! |---|---|---|
//! | `synthetic` | generated from the seed, no file | the default: 10 classes of oriented stripes, 32 x 32 |
//! | `digits` | `digits.csv.gz` (scikit-learn's 8 x 8 digits) | every 5th image is the test split |
//! | `cifar10` | the binary release (`data_batch_{1..5}.bin`, `test_batch.bin`) | 32 x 32 |
//! | `stl10` | the binary release (`train_X.bin`, `train_y.bin`, `test_X.bin`, `test_y.bin`, optionally `unlabeled_X.bin`) | 96 x 96 |
//! | `folder` | `ROOT/train/<class>/*`, `ROOT/test/<class>/*`, or a `.tar.gz` of such a tree | any format `image` decodes |

pub mod augment;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use rand::Rng;

use crate::error::{Error, Result};
use crate::testing::rng;

/// One split: `n` images of `size x size x 3` u8 (HWC) and their labels.
#[derive(Debug, Clone, Default)]
pub struct Split {
    pub images: Vec<u8>,
    pub labels: Vec<i64>,
}

impl Split {
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    /// Image `i` as HWC u8.
    pub fn image(&self, i: usize, size: usize) -> &[u8] {
        let len = size * size * 3;
        &self.images[i * len..(i + 1) * len]
    }
}

/// A labelled dataset with a train and a test split of square RGB images.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub name: String,
    pub classes: Vec<String>,
    /// Height and width.
    pub size: usize,
    pub train: Split,
    pub test: Split,
    /// Extra training images without labels (STL-10's unlabeled_X.bin), used for training
    /// batches only; kNN's memory bank is the labelled training split.
    pub unlabeled: Split,
    /// Files that could not be decoded and were skipped.
    pub skipped: usize,
}

impl Dataset {
    /// Images a training step draws from: the training split, then the unlabelled images.
    pub fn training_len(&self) -> usize {
        self.train.len() + self.unlabeled.len()
    }
}

/// Which dataset to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DatasetKind {
    Synthetic,
    Digits,
    Cifar10,
    Stl10,
    Folder,
}

/// What to do with a file that cannot be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum OnBadImage {
    /// Stop with an error naming the file.
    #[default]
    Stop,
    /// Skip it and count it.
    Skip,
}

/// Loading options.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    pub data_dir: Option<PathBuf>,
    /// STL-10: also train on unlabeled_X.bin (the paper's "train + 100k unlabelled").
    pub stl10_unlabeled: bool,
    pub image_size: Option<usize>,
    pub on_bad_image: OnBadImage,
    pub seed: u64,
}

/// Loads `kind` with `opts`.
pub fn load(kind: DatasetKind, opts: &LoadOptions) -> Result<Dataset> {
    let need_dir = |what: &str| {
        opts.data_dir
            .clone()
            .ok_or_else(|| Error::invalid(format!("--dataset {what} needs --data-dir")))
    };
    let ds = match kind {
        DatasetKind::Synthetic => synthetic(opts.seed, 200, 50),
        DatasetKind::Digits => digits(&need_dir("digits")?)?,
        DatasetKind::Cifar10 => cifar10_binary(&need_dir("cifar10")?)?,
        DatasetKind::Stl10 => stl10_binary(&need_dir("stl10")?, opts.stl10_unlabeled)?,
        DatasetKind::Folder => folder(&need_dir("folder")?, opts.image_size, opts.on_bad_image)?,
    };
    match opts.image_size {
        Some(s) if s != ds.size && kind != DatasetKind::Folder => resize_dataset(ds, s),
        _ => Ok(ds),
    }
}

/// Ten classes of stripes at orientations k * 18 degrees, with random frequency, phase,
/// colours and noise; `per_class` train and `test_per_class` test images, 32 x 32. Generated
/// from the seed, so it needs no file: the default of `invaspread train`.
pub fn synthetic(seed: u64, per_class: usize, test_per_class: usize) -> Dataset {
    let size = 32;
    let make = |count: usize, salt: u64| {
        let mut r = rng(seed ^ salt);
        let mut split = Split::default();
        for i in 0..count * 10 {
            let class = i % 10;
            let angle = class as f64 * std::f64::consts::PI / 10.0 + r.random_range(-0.05..0.05);
            let freq = r.random_range(0.12..0.3) * std::f64::consts::TAU;
            let phase = r.random_range(0.0..std::f64::consts::TAU);
            let c1: [f64; 3] = [r.random(), r.random(), r.random()];
            let c2: [f64; 3] = [r.random(), r.random(), r.random()];
            let (ca, sa) = (angle.cos(), angle.sin());
            for y in 0..size {
                for x in 0..size {
                    let t = ((x as f64 * ca + y as f64 * sa) * freq + phase).sin() * 0.5 + 0.5;
                    for ch in 0..3 {
                        let v = c1[ch] * t + c2[ch] * (1.0 - t) + r.random_range(-0.08..0.08);
                        split.images.push((v.clamp(0.0, 1.0) * 255.0).round() as u8);
                    }
                }
            }
            split.labels.push(class as i64);
        }
        split
    };
    Dataset {
        name: "synthetic".into(),
        classes: (0..10).map(|k| format!("stripes-{}deg", k * 18)).collect(),
        size,
        train: make(per_class, 0x7472),
        test: make(test_per_class, 0x7465),
        unlabeled: Split::default(),
        skipped: 0,
    }
}

fn read_gz(path: &Path) -> Result<Vec<u8>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(file)
        .read_to_end(&mut out)
        .map_err(|e| Error::bad_file(path, format!("not a readable gzip file: {e}")))?;
    Ok(out)
}

/// scikit-learn's digits: `dir/digits.csv.gz` (or the file itself), 65 integers a row.
pub fn digits(dir: &Path) -> Result<Dataset> {
    let path = if dir.is_dir() {
        dir.join("digits.csv.gz")
    } else {
        dir.to_path_buf()
    };
    let text =
        String::from_utf8(read_gz(&path)?).map_err(|_| Error::bad_file(&path, "not UTF-8 text"))?;
    let (mut train, mut test) = (Split::default(), Split::default());
    for (row, line) in text.lines().enumerate() {
        let values: Vec<u32> = line
            .split(',')
            .map(|v| v.trim().parse::<u32>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| {
                Error::bad_file(
                    &path,
                    format!("row {}: expected 65 integers, got {line:?}", row + 1),
                )
            })?;
        if values.len() != 65 || values[..64].iter().any(|&v| v > 16) || values[64] > 9 {
            return Err(Error::bad_file(
                &path,
                format!("row {}: expected 64 values 0..16 and a label 0..9", row + 1),
            ));
        }
        let split = if row % 5 == 4 { &mut test } else { &mut train };
        for &v in &values[..64] {
            let g = (v * 255 / 16) as u8;
            split.images.extend_from_slice(&[g, g, g]);
        }
        split.labels.push(i64::from(values[64]));
    }
    Ok(Dataset {
        name: "digits".into(),
        classes: (0..10).map(|d| d.to_string()).collect(),
        size: 8,
        train,
        test,
        unlabeled: Split::default(),
        skipped: 0,
    })
}

/// The CIFAR-10 binary release: records of 1 label byte and 3072 bytes (CHW 32 x 32).
pub fn cifar10_binary(dir: &Path) -> Result<Dataset> {
    let read_batch = |name: &str, split: &mut Split| -> Result<()> {
        let path = dir.join(name);
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        if bytes.is_empty() || bytes.len() % 3073 != 0 {
            return Err(Error::bad_file(
                &path,
                format!(
                    "{} bytes is not a whole number of 3073-byte records",
                    bytes.len()
                ),
            ));
        }
        for record in bytes.chunks_exact(3073) {
            if record[0] > 9 {
                return Err(Error::bad_file(
                    &path,
                    format!("label {} is not 0..9", record[0]),
                ));
            }
            split.labels.push(i64::from(record[0]));
            let chw = &record[1..];
            for p in 0..1024 {
                split
                    .images
                    .extend_from_slice(&[chw[p], chw[1024 + p], chw[2048 + p]]);
            }
        }
        Ok(())
    };
    let (mut train, mut test) = (Split::default(), Split::default());
    for b in 1..=5 {
        read_batch(&format!("data_batch_{b}.bin"), &mut train)?;
    }
    read_batch("test_batch.bin", &mut test)?;
    let classes = [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ];
    Ok(Dataset {
        name: "cifar10".into(),
        classes: classes.map(String::from).to_vec(),
        size: 32,
        train,
        test,
        unlabeled: Split::default(),
        skipped: 0,
    })
}

/// The STL-10 binary release: 96 x 96 images stored channel by channel in column-major order;
/// labels 1..10. With `unlabeled`, unlabeled_X.bin is read too (labels -1).
pub fn stl10_binary(dir: &Path, unlabeled: bool) -> Result<Dataset> {
    const S: usize = 96;
    let read_images = |xb: &[u8], split: &mut Split| {
        for img in xb.chunks_exact(S * S * 3) {
            for yy in 0..S {
                for xx in 0..S {
                    for c in 0..3 {
                        split.images.push(img[c * S * S + xx * S + yy]);
                    }
                }
            }
        }
    };
    let read = |x: &str, y: &str| -> Result<Split> {
        let (xp, yp) = (dir.join(x), dir.join(y));
        let xb = std::fs::read(&xp).map_err(|e| Error::io(&xp, e))?;
        let yb = std::fs::read(&yp).map_err(|e| Error::io(&yp, e))?;
        if xb.len() != yb.len() * S * S * 3 {
            return Err(Error::bad_file(
                &xp,
                format!(
                    "{} bytes, expected {} for the {} labels of {}",
                    xb.len(),
                    yb.len() * S * S * 3,
                    yb.len(),
                    yp.display()
                ),
            ));
        }
        let mut split = Split::default();
        for (i, &label) in yb.iter().enumerate() {
            if !(1..=10).contains(&label) {
                return Err(Error::bad_file(
                    &yp,
                    format!("label {label} at {i} is not 1..10"),
                ));
            }
            split.labels.push(i64::from(label) - 1);
        }
        read_images(&xb, &mut split);
        Ok(split)
    };
    let mut extra = Split::default();
    if unlabeled {
        let up = dir.join("unlabeled_X.bin");
        let ub = std::fs::read(&up).map_err(|e| Error::io(&up, e))?;
        if ub.len() % (S * S * 3) != 0 {
            return Err(Error::bad_file(
                &up,
                format!("{} bytes is not a whole number of 96x96x3 images", ub.len()),
            ));
        }
        read_images(&ub, &mut extra);
        extra.labels = vec![-1; ub.len() / (S * S * 3)];
    }
    let classes = [
        "airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck",
    ];
    Ok(Dataset {
        name: "stl10".into(),
        classes: classes.map(String::from).to_vec(),
        size: S,
        train: read("train_X.bin", "train_y.bin")?,
        test: read("test_X.bin", "test_y.bin")?,
        unlabeled: extra,
        skipped: 0,
    })
}

/// (split, class, path, bytes) of every file under `train/<class>/` and `test/<class>/`,
/// from a folder or a .tar.gz holding such a tree (at any depth).
type RawFile = (String, String, String, Vec<u8>);

fn split_and_class(path: &str) -> Option<(String, String)> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let i = parts.iter().rposition(|p| *p == "train" || *p == "test")?;
    (parts.len() == i + 3).then(|| (parts[i].to_string(), parts[i + 1].to_string()))
}

fn raw_files(root: &Path) -> Result<Vec<RawFile>> {
    let mut files = Vec::new();
    let name = root.to_string_lossy();
    if root.is_file() && (name.ends_with(".tar.gz") || name.ends_with(".tgz")) {
        let file = std::fs::File::open(root).map_err(|e| Error::io(root, e))?;
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
        let entries = archive
            .entries()
            .map_err(|e| Error::bad_file(root, e.to_string()))?;
        for entry in entries {
            let mut entry =
                entry.map_err(|e| Error::bad_file(root, format!("corrupt archive: {e}")))?;
            if !entry.header().entry_type().is_file() {
                continue;
            }
            let path = entry
                .path()
                .map_err(|e| Error::bad_file(root, e.to_string()))?
                .to_string_lossy()
                .to_string();
            if let Some((split, class)) = split_and_class(&path) {
                let mut bytes = Vec::new();
                entry
                    .read_to_end(&mut bytes)
                    .map_err(|e| Error::bad_file(root, format!("{path}: {e}")))?;
                files.push((split, class, format!("{}:{path}", root.display()), bytes));
            }
        }
        return Ok(files);
    }
    for split in ["train", "test"] {
        let dir = root.join(split);
        let classes = std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))?;
        for class in classes {
            let class = class.map_err(|e| Error::io(&dir, e))?;
            if !class.path().is_dir() {
                continue;
            }
            let cname = class.file_name().to_string_lossy().to_string();
            for f in std::fs::read_dir(class.path()).map_err(|e| Error::io(&class.path(), e))? {
                let f = f.map_err(|e| Error::io(&class.path(), e))?;
                let bytes = std::fs::read(f.path()).map_err(|e| Error::io(&f.path(), e))?;
                files.push((
                    split.to_string(),
                    cname.clone(),
                    f.path().display().to_string(),
                    bytes,
                ));
            }
        }
    }
    Ok(files)
}

/// An image folder (or its .tar.gz): classes sorted by name, grey images become RGB,
/// `image_size` resizes (bilinear); without it every image must share one size.
pub fn folder(root: &Path, image_size: Option<usize>, on_bad: OnBadImage) -> Result<Dataset> {
    let mut files = raw_files(root)?;
    files.sort_by(|a, b| (&a.0, &a.1, &a.2).cmp(&(&b.0, &b.1, &b.2)));
    let classes: Vec<String> = files
        .iter()
        .map(|f| f.1.clone())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    if classes.is_empty() {
        return Err(Error::bad_file(
            root,
            "no images under train/<class>/ or test/<class>/",
        ));
    }
    let class_index: BTreeMap<&str, i64> = classes
        .iter()
        .enumerate()
        .map(|(i, c)| (c.as_str(), i as i64))
        .collect();
    // Decode in parallel; order is kept.
    use rayon::prelude::*;
    let decoded: Vec<std::result::Result<image::RgbImage, String>> = files
        .par_iter()
        .map(|(_, _, path, bytes)| {
            image::load_from_memory(bytes)
                .map(|im| im.to_rgb8())
                .map_err(|e| format!("{path}: cannot decode: {e}"))
        })
        .collect();
    let mut size = image_size;
    let (mut train, mut test, mut skipped) = (Split::default(), Split::default(), 0usize);
    for ((split, class, path, _), img) in files.iter().zip(decoded) {
        let img = match img {
            Ok(img) => img,
            Err(msg) if on_bad == OnBadImage::Skip => {
                eprintln!("warning: skipped {msg}");
                skipped += 1;
                continue;
            }
            Err(msg) => {
                return Err(Error::invalid(format!(
                    "{msg} (pass --on-bad-image skip to skip such files)"
                )))
            }
        };
        let s = *size.get_or_insert(img.width() as usize);
        let img = if image_size.is_some()
            && (img.width() as usize != s || img.height() as usize != s)
        {
            image::imageops::resize(
                &img,
                s as u32,
                s as u32,
                image::imageops::FilterType::Triangle,
            )
        } else if img.width() as usize != s || img.height() as usize != s {
            return Err(Error::invalid(format!(
                "{path} is {}x{} but earlier images are {s}x{s}: pass --image-size S to resize all images",
                img.width(),
                img.height()
            )));
        } else {
            img
        };
        let target = if split == "train" {
            &mut train
        } else {
            &mut test
        };
        target.images.extend_from_slice(img.as_raw());
        target.labels.push(class_index[class.as_str()]);
    }
    let size = size.ok_or_else(|| Error::bad_file(root, "no decodable images"))?;
    Ok(Dataset {
        name: format!("folder:{}", root.display()),
        classes,
        size,
        train,
        test,
        unlabeled: Split::default(),
        skipped,
    })
}

fn resize_dataset(mut ds: Dataset, s: usize) -> Result<Dataset> {
    for split in [&mut ds.train, &mut ds.test, &mut ds.unlabeled] {
        let mut out = Vec::with_capacity(split.len() * s * s * 3);
        for i in 0..split.len() {
            let img = image::RgbImage::from_raw(
                ds.size as u32,
                ds.size as u32,
                split.image(i, ds.size).to_vec(),
            )
            .ok_or_else(|| Error::invalid("image buffer size"))?;
            out.extend_from_slice(
                image::imageops::resize(
                    &img,
                    s as u32,
                    s as u32,
                    image::imageops::FilterType::Triangle,
                )
                .as_raw(),
            );
        }
        split.images = out;
    }
    ds.size = s;
    Ok(ds)
}
