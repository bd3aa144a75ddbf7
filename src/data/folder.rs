//! Image folders, `ROOT/train/<class>/*` and `ROOT/test/<class>/*`, or a `.tar.gz` of such a
//! tree (the CIFAR-10 JPEG copy is read in place).
//!
//! Bounded by what the user asked for, whatever the files hold:
//! - only regular files are read (no devices, FIFOs or sockets); a symbolic link is followed
//!   when it stays inside the folder, or anywhere with `--follow-links`;
//! - a file or archive entry above [`MAX_FILE_BYTES`] is refused before it is read;
//! - each image is decoded under the `image` crate's limits ([`MAX_SIDE`], [`MAX_DECODED_BYTES`])
//!   and resized at once, on rayon's threads, so at most one full-size image per thread is held
//!   and the dataset is stored at its output size only;
//! - the decoded dataset's size is checked against the memory available before decoding.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use super::{DataConfig, Dataset, OnBadImage, Split};
use crate::error::{Error, Result};

/// The largest image file (or archive entry) read: 64 MB.
pub const MAX_FILE_BYTES: u64 = 64 << 20;
/// The largest image side decoded.
pub const MAX_SIDE: u32 = 16_384;
/// The most one image's decoding may allocate: 512 MB.
pub const MAX_DECODED_BYTES: u64 = 512 << 20;

/// (split, class, path, bytes) of every file under `train/<class>/` and `test/<class>/`,
/// from a folder or a .tar.gz holding such a tree (at any depth).
type RawFile = (String, String, String, Vec<u8>);

fn split_and_class(path: &str) -> Option<(String, String)> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let i = parts.iter().rposition(|p| *p == "train" || *p == "test")?;
    (parts.len() == i + 3).then(|| (parts[i].to_string(), parts[i + 1].to_string()))
}

fn too_large(what: &str, bytes: u64) -> String {
    format!(
        "{what} is {bytes} bytes, more than the {} MB an image file may have",
        MAX_FILE_BYTES >> 20
    )
}

fn tar_files(root: &Path) -> Result<Vec<RawFile>> {
    let mut files = Vec::new();
    let file = std::fs::File::open(root).map_err(|e| Error::io(root, e))?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let entries = archive
        .entries()
        .map_err(|e| Error::bad_file(root, e.to_string()))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::bad_file(root, format!("corrupt archive: {e}")))?;
        // Regular files only: links, devices and FIFOs in an archive are not images.
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry
            .path()
            .map_err(|e| Error::bad_file(root, e.to_string()))?
            .to_string_lossy()
            .to_string();
        if let Some((split, class)) = split_and_class(&path) {
            let size = entry.size();
            if size > MAX_FILE_BYTES {
                return Err(Error::bad_file(root, too_large(&path, size)));
            }
            let mut bytes = Vec::with_capacity(size as usize);
            entry
                .take(MAX_FILE_BYTES)
                .read_to_end(&mut bytes)
                .map_err(|e| Error::bad_file(root, format!("{path}: {e}")))?;
            files.push((split, class, format!("{}:{path}", root.display()), bytes));
        }
    }
    Ok(files)
}

/// A file of the folder tree, read when it is a regular file within the limits; a link must
/// stay inside `root` unless `follow_links`.
fn read_tree_file(root: &Path, path: &Path, follow_links: bool) -> Result<Vec<u8>> {
    let link = std::fs::symlink_metadata(path).map_err(|e| Error::io(path, e))?;
    if link.file_type().is_symlink() && !follow_links {
        let target = path.canonicalize().map_err(|e| Error::io(path, e))?;
        let root = root.canonicalize().map_err(|e| Error::io(root, e))?;
        if !target.starts_with(&root) {
            return Err(Error::bad_file(
                path,
                format!(
                    "is a link to {}, outside the image folder; pass --follow-links to read it",
                    target.display()
                ),
            ));
        }
    }
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::bad_file(
            path,
            "is not a regular file (a device, a FIFO or a socket): not an image",
        ));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(Error::bad_file(path, too_large("the file", meta.len())));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_FILE_BYTES).read_to_end(&mut bytes))
        .map_err(|e| Error::io(path, e))?;
    Ok(bytes)
}

fn raw_files(root: &Path, follow_links: bool) -> Result<Vec<RawFile>> {
    let name = root.to_string_lossy();
    if root.is_file() && (name.ends_with(".tar.gz") || name.ends_with(".tgz")) {
        return tar_files(root);
    }
    let mut files = Vec::new();
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
                let bytes = read_tree_file(root, &f.path(), follow_links)?;
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

/// One image decoded under the limits, as RGB at `size` (resized when it differs and
/// `resize`), or why not.
fn decode(bytes: &[u8], size: Option<u32>) -> std::result::Result<image::RgbImage, String> {
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| format!("cannot read: {e}"))?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_DECODED_BYTES);
    reader.limits(limits);
    let img = reader
        .decode()
        .map_err(|e| format!("cannot decode: {e}"))?
        .to_rgb8();
    Ok(match size {
        Some(s) if img.width() != s || img.height() != s => {
            image::imageops::resize(&img, s, s, image::imageops::FilterType::Triangle)
        }
        _ => img,
    })
}

/// An image folder (or its .tar.gz): classes sorted by name, grey images become RGB,
/// `image_size` resizes (bilinear); without it every image must share one size.
pub fn folder(root: &Path, opts: &DataConfig) -> Result<Dataset> {
    let (image_size, on_bad) = (opts.image_size, opts.on_bad_image);
    let mut files = raw_files(root, opts.follow_links)?;
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
    // Without --image-size, every image must have the first one's size.
    let size = match image_size {
        Some(s) => s as u32,
        None => {
            let first = files.iter().find_map(|f| decode(&f.3, None).ok());
            first.map_or(0, |im| im.width())
        }
    };
    let per_image = 3 * u64::from(size) * u64::from(size);
    crate::limits::check_allocation(
        &format!(
            "{}: {} images of {size} x {size}",
            root.display(),
            files.len()
        ),
        per_image.checked_mul(files.len() as u64),
    )?;
    // Decode and resize in parallel, one image at a time per thread; order is kept.
    use rayon::prelude::*;
    let decoded: Vec<std::result::Result<image::RgbImage, String>> = files
        .par_iter()
        .map(|(_, _, path, bytes)| {
            decode(bytes, image_size.map(|s| s as u32)).map_err(|e| format!("{path}: {e}"))
        })
        .collect();
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
        if img.width() != size || img.height() != size {
            return Err(Error::invalid(format!(
                "{path} is {}x{} but earlier images are {size}x{size}: pass --image-size S to resize all images",
                img.width(),
                img.height()
            )));
        }
        let target = if split == "train" {
            &mut train
        } else {
            &mut test
        };
        target.images.extend_from_slice(img.as_raw());
        target.labels.push(class_index[class.as_str()]);
    }
    if train.len() + test.len() == 0 {
        return Err(Error::bad_file(root, "no decodable images"));
    }
    Ok(Dataset {
        name: format!("folder:{}", root.display()),
        classes,
        size: size as usize,
        train,
        test,
        unlabeled: Split::default(),
        skipped,
    })
}
