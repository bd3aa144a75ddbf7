//! Image folders, `ROOT/train/<class>/*` and `ROOT/test/<class>/*`, or a `.tar.gz` of such a
//! tree (the CIFAR-10 JPEG copy is read in place).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use super::{Dataset, OnBadImage, Split};
use crate::error::{Error, Result};

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
