//! scikit-learn's 8 x 8 digits from `digits.csv.gz`; every 5th image is the test split.

use std::path::Path;

use super::{read_gz, Dataset, Split};
use crate::error::{Error, Result};

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
                    format!(
                        "row {}: expected 65 integers, got {}",
                        row + 1,
                        crate::error::excerpt(line)
                    ),
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
