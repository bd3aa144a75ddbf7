//! The STL-10 binary release (`train_X.bin`, `train_y.bin`, `test_X.bin`, `test_y.bin`, and
//! optionally `unlabeled_X.bin`).

use std::path::Path;

use super::{Dataset, Split};
use crate::error::{Error, Result};

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
        let xb = super::read_file(&xp)?;
        let yb = super::read_file(&yp)?;
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
        let ub = super::read_file(&up)?;
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
