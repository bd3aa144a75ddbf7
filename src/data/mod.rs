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
pub mod cifar10;
pub mod classes;
pub mod digits;
pub mod folder;
pub mod stl10;
pub mod synthetic;

pub use cifar10::cifar10_binary;
pub use digits::digits;
pub use folder::folder;
pub use stl10::stl10_binary;
pub use synthetic::synthetic;

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

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
crate::serde_by_name!(DatasetKind);

/// What to do with a file that cannot be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum OnBadImage {
    /// Stop with an error naming the file.
    #[default]
    Stop,
    /// Skip it and count it.
    Skip,
}
crate::serde_by_name!(OnBadImage);

impl Dataset {
    /// A cheap fingerprint of the decoded data (64-bit FNV-1a over the size, the class names,
    /// and every split's labels and pixels, 8 bytes a step): a resumed run checks with it that
    /// its dataset is the one it started on. Not a defence against an adversary.
    pub fn fingerprint(&self) -> String {
        const PRIME: u64 = 0x0000_0100_0000_01b3;
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut mix = |bytes: &[u8]| {
            let mut words = bytes.chunks_exact(8);
            for w in &mut words {
                let word = u64::from_le_bytes(w.try_into().unwrap_or_default());
                h = (h ^ word).wrapping_mul(PRIME);
            }
            for &b in words.remainder() {
                h = (h ^ u64::from(b)).wrapping_mul(PRIME);
            }
            // The length too, so that [ab][c] and [a][bc] differ.
            h = (h ^ bytes.len() as u64).wrapping_mul(PRIME);
        };
        mix(&(self.size as u64).to_le_bytes());
        for class in &self.classes {
            mix(class.as_bytes());
        }
        for split in [&self.train, &self.test, &self.unlabeled] {
            mix(bytemuck::cast_slice(&split.labels));
            mix(&split.images);
        }
        format!("{h:016x}")
    }
}

/// Which dataset a run reads and how (the `data` object of config.json).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    pub dataset: DatasetKind,
    /// The dataset's folder or file (digits.csv.gz, a .tar.gz of an image folder).
    pub data_dir: Option<PathBuf>,
    /// Resize every image to S x S.
    pub image_size: Option<usize>,
    pub on_bad_image: OnBadImage,
    /// STL-10: also train on unlabeled_X.bin (the paper's "train + 100k unlabelled").
    pub stl10_unlabeled: bool,
    /// Image folders: read symbolic links that point outside the folder (never followed
    /// otherwise).
    #[serde(default)]
    pub follow_links: bool,
    /// The classes used (`--classes`, [`classes::select`]); None: all. Applied by the user of
    /// the dataset (training, eval, embed), not by [`load`], so that a run can evaluate on
    /// classes it did not train on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classes: Option<String>,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            dataset: DatasetKind::Synthetic,
            data_dir: None,
            image_size: None,
            on_bad_image: OnBadImage::Stop,
            stl10_unlabeled: false,
            follow_links: false,
            classes: None,
        }
    }
}

/// Loads the dataset `opts` names; `seed` generates the synthetic one.
pub fn load(opts: &DataConfig, seed: u64) -> Result<Dataset> {
    let kind = opts.dataset;
    let need_dir = |what: &str| {
        opts.data_dir
            .clone()
            .ok_or_else(|| Error::invalid(format!("--dataset {what} needs --data-dir")))
    };
    let ds = match kind {
        DatasetKind::Synthetic => synthetic::synthetic(seed, 200, 50),
        DatasetKind::Digits => digits::digits(&need_dir("digits")?)?,
        DatasetKind::Cifar10 => cifar10::cifar10_binary(&need_dir("cifar10")?)?,
        DatasetKind::Stl10 => stl10::stl10_binary(&need_dir("stl10")?, opts.stl10_unlabeled)?,
        DatasetKind::Folder => folder::folder(&need_dir("folder")?, opts)?,
    };
    for (split, len) in [("training", ds.train.len()), ("test", ds.test.len())] {
        if len == 0 {
            return Err(Error::invalid(format!(
                "dataset {}: its {split} split is empty; training needs both splits (the \
                 per-epoch kNN runs on the test split, against the training split) and eval \
                 measures the test split",
                ds.name
            )));
        }
    }
    match opts.image_size {
        Some(s) if s != ds.size && kind != DatasetKind::Folder => resize_dataset(ds, s),
        _ => Ok(ds),
    }
}

/// The most a gzip file the datasets read (the digits CSV: 360 kB) may decompress to; more is
/// refused before it is held (a gzip bomb of a few MB can unpack to gigabytes).
pub const MAX_GZ_BYTES: u64 = 256 << 20;

/// The largest dataset file read whole: STL-10's unlabeled_X.bin is 2.8 GB.
pub const MAX_DATA_FILE_BYTES: u64 = 4 << 30;

/// Opens `path` when it is a regular file (a FIFO or a device would hang or never end) of at
/// most `max` bytes; returns it with its size.
fn open_regular(path: &Path, max: u64) -> Result<(std::fs::File, u64)> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::bad_file(
            path,
            "is not a regular file (a device, a FIFO or a socket)",
        ));
    }
    if meta.len() > max {
        return Err(Error::bad_file(
            path,
            format!(
                "is {} bytes, more than the {} MB expected at most",
                meta.len(),
                max >> 20
            ),
        ));
    }
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    Ok((file, meta.len()))
}

/// The whole of a regular dataset file of at most [`MAX_DATA_FILE_BYTES`].
fn read_file(path: &Path) -> Result<Vec<u8>> {
    let (file, len) = open_regular(path, MAX_DATA_FILE_BYTES)?;
    let mut out = Vec::with_capacity(len as usize);
    file.take(MAX_DATA_FILE_BYTES)
        .read_to_end(&mut out)
        .map_err(|e| Error::io(path, e))?;
    Ok(out)
}

/// The whole content of a gzip file, at most [`MAX_GZ_BYTES`].
fn read_gz(path: &Path) -> Result<Vec<u8>> {
    let (file, _) = open_regular(path, MAX_DATA_FILE_BYTES)?;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(file)
        .take(MAX_GZ_BYTES + 1)
        .read_to_end(&mut out)
        .map_err(|e| Error::bad_file(path, format!("not a readable gzip file: {e}")))?;
    if out.len() as u64 > MAX_GZ_BYTES {
        return Err(Error::bad_file(
            path,
            format!(
                "decompresses to more than {} MB; refused",
                MAX_GZ_BYTES >> 20
            ),
        ));
    }
    Ok(out)
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
