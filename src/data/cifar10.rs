//! The CIFAR-10 binary release (`data_batch_{1..5}.bin`, `test_batch.bin`).

use std::path::Path;

use super::{Dataset, Split};
use crate::error::{Error, Result};

/// The CIFAR-10 binary release: records of 1 label byte and 3072 bytes (CHW 32 x 32).
pub fn cifar10_binary(dir: &Path) -> Result<Dataset> {
    let read_batch = |name: &str, split: &mut Split| -> Result<()> {
        let path = dir.join(name);
        let bytes = super::read_file(&path)?;
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
