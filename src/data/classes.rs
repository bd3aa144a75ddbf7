//! Class splits: `--classes SPEC` picks classes of a dataset by name or by index in its class
//! list (0-based, as `invaspread info`-style listings and `eval --json` give them), and
//! [`Dataset::restrict`] keeps the images of those classes only, relabelled 0..k in the order
//! of the class list. The unseen-category experiment (RQ4) trains on some classes and
//! evaluates on the others.

use super::{Dataset, Split};
use crate::error::{Error, Result};

/// The classes `spec` names among `classes`, as sorted, distinct indices. `spec` is a
/// comma-separated list whose items are class names, indices (`3`) or inclusive index ranges
/// (`0-4`); an item that is a class's name means that class. `flag` names the option in errors.
pub fn select(spec: &str, classes: &[String], flag: &str) -> Result<Vec<usize>> {
    let bad = |item: &str, why: String| {
        Error::invalid(format!(
            "{flag} {}: {} {why}; the classes are {}",
            crate::error::excerpt(spec),
            crate::error::excerpt(item),
            list(classes)
        ))
    };
    let index = |item: &str, s: &str| -> Result<usize> {
        let i: usize = s
            .trim()
            .parse()
            .map_err(|_| bad(item, "is neither a class name nor an index or range".into()))?;
        if i >= classes.len() {
            return Err(bad(
                item,
                format!("is past the last index, {}", classes.len() - 1),
            ));
        }
        Ok(i)
    };
    let mut picked = vec![false; classes.len()];
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if let Some(i) = classes.iter().position(|c| c == item) {
            picked[i] = true;
        } else if let Some((a, b)) = item.split_once('-') {
            let (a, b) = (index(item, a)?, index(item, b)?);
            if a > b {
                return Err(bad(item, "is a range that runs backwards".into()));
            }
            picked[a..=b].iter_mut().for_each(|p| *p = true);
        } else {
            picked[index(item, item)?] = true;
        }
    }
    let selected: Vec<usize> = (0..classes.len()).filter(|&i| picked[i]).collect();
    if selected.is_empty() {
        return Err(Error::invalid(format!(
            "{flag} {}: names no class; the classes are {}",
            crate::error::excerpt(spec),
            list(classes)
        )));
    }
    Ok(selected)
}

/// The class list as `0 airplane, 1 automobile, ...` (at most 20 shown).
pub fn list(classes: &[String]) -> String {
    let mut shown: Vec<String> = classes
        .iter()
        .enumerate()
        .take(20)
        .map(|(i, c)| format!("{i} {c}"))
        .collect();
    if classes.len() > 20 {
        shown.push(format!("... ({} in all)", classes.len()));
    }
    shown.join(", ")
}

/// The images of `split` whose label is in `selected` (sorted), relabelled by position there.
fn restrict_split(split: &Split, selected: &[usize], size: usize) -> Split {
    let per = size * size * 3;
    let mut out = Split::default();
    for i in 0..split.len() {
        let label = split.labels[i];
        if let Some(new) = selected.iter().position(|&c| c as i64 == label) {
            out.images
                .extend_from_slice(&split.images[i * per..(i + 1) * per]);
            out.labels.push(new as i64);
        }
    }
    out
}

impl Dataset {
    /// The dataset with only the classes at `selected` (sorted indices into `classes`), in
    /// both splits, relabelled 0..k; unlabelled images are dropped (their classes are
    /// unknown). An error names `flag` when a split is left empty.
    pub fn restrict(&self, selected: &[usize], flag: &str) -> Result<Dataset> {
        if selected.len() == self.classes.len() {
            return Ok(self.clone());
        }
        let ds = Dataset {
            name: self.name.clone(),
            classes: selected.iter().map(|&c| self.classes[c].clone()).collect(),
            size: self.size,
            train: restrict_split(&self.train, selected, self.size),
            test: restrict_split(&self.test, selected, self.size),
            unlabeled: Split::default(),
            skipped: self.skipped,
        };
        for (name, split) in [("training", &ds.train), ("test", &ds.test)] {
            if split.is_empty() {
                return Err(Error::invalid(format!(
                    "{flag}: the classes {} have no image in the {name} split",
                    ds.classes.join(", ")
                )));
            }
        }
        Ok(ds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        [
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
        ]
        .iter()
        .take(n)
        .map(|s| s.to_string())
        .collect()
    }

    #[test]
    fn specs_name_classes_by_name_index_and_range() {
        let c = names(10);
        assert_eq!(select("0-4", &c, "--classes").unwrap(), [0, 1, 2, 3, 4]);
        assert_eq!(select("truck, cat,1", &c, "--classes").unwrap(), [1, 3, 9]);
        assert_eq!(
            select("5-9,deer,5", &c, "--classes").unwrap(),
            [4, 5, 6, 7, 8, 9]
        );
        for (spec, expected) in [
            ("zebra", "\"zebra\" is neither a class name"),
            ("3-12", "past the last index, 9"),
            ("7-2", "runs backwards"),
            (",", "names no class"),
        ] {
            let err = select(spec, &c, "--classes").unwrap_err().to_string();
            assert!(
                err.contains(expected) && err.contains("0 airplane, 1 automobile"),
                "{err}"
            );
        }
    }

    #[test]
    fn restriction_keeps_the_images_of_the_classes_relabelled() {
        let ds = crate::data::synthetic(1, 4, 2);
        let five = ds.restrict(&[1, 3, 5, 7, 9], "--classes").unwrap();
        assert_eq!(five.classes.len(), 5);
        assert_eq!((five.train.len(), five.test.len()), (20, 10));
        assert!(five.train.labels.iter().all(|&l| (0..5).contains(&l)));
        // The first image of class 3 (new label 1) is the original's.
        let per = ds.size * ds.size * 3;
        let original = ds.train.labels.iter().position(|&l| l == 3).unwrap();
        let kept = five.train.labels.iter().position(|&l| l == 1).unwrap();
        assert_eq!(
            five.train.image(kept, ds.size),
            ds.train.image(original, ds.size)
        );
        assert_eq!(five.train.images.len(), 20 * per);
        assert_eq!(five.classes[1], ds.classes[3]);
    }
}
