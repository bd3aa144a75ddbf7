//! The dataset flags shared by `train`, `eval` and `embed`.

use std::path::PathBuf;

use invaspread::data::{self, DataConfig, DatasetKind, OnBadImage};

/// Where the images come from.
#[derive(Debug, clap::Args)]
pub struct DataArgs {
    /// Which dataset; `synthetic` is generated and needs no file.
    #[arg(long, value_enum, default_value_t = DataConfig::default().dataset)]
    pub dataset: DatasetKind,
    /// The dataset's folder (or file: digits.csv.gz, or a .tar.gz of an image folder).
    #[arg(long, value_name = "PATH")]
    pub data_dir: Option<PathBuf>,
    /// Resize every image to S x S [1 <= image_size <= 1024].
    #[arg(long, value_name = "S", value_parser = super::ranges::image_size)]
    pub image_size: Option<usize>,
    /// What to do with an image file that cannot be decoded.
    #[arg(long, value_enum, default_value_t = DataConfig::default().on_bad_image)]
    pub on_bad_image: OnBadImage,
    /// STL-10: also train on unlabeled_X.bin (the paper's "train + 100k unlabelled").
    #[arg(long)]
    pub stl10_unlabeled: bool,
    /// Image folders: also read symbolic links that point outside the folder (only regular
    /// files are ever read: no devices or FIFOs).
    #[arg(long)]
    pub follow_links: bool,
    /// Use only these classes: a comma-separated list of class names, indices or index ranges
    /// of the dataset's class list (`0-4`, `cat,dog`, `0,2,5-7`).
    #[arg(long, value_name = "SPEC")]
    pub classes: Option<String>,
}

impl DataArgs {
    pub fn config(&self) -> DataConfig {
        DataConfig {
            dataset: self.dataset,
            data_dir: self.data_dir.clone(),
            image_size: self.image_size,
            on_bad_image: self.on_bad_image,
            stl10_unlabeled: self.stl10_unlabeled,
            follow_links: self.follow_links,
            classes: self.classes.clone(),
        }
    }
}

/// Loads the dataset `cfg` names and says what it holds.
pub fn load(cfg: &DataConfig, seed: u64) -> invaspread::Result<data::Dataset> {
    let ds = data::load(cfg, seed)?;
    eprintln!(
        "dataset {}: {} train{} and {} test images of {}x{}, {} classes{}",
        ds.name,
        ds.train.len(),
        if ds.unlabeled.is_empty() {
            String::new()
        } else {
            format!(" (+{} unlabelled)", ds.unlabeled.len())
        },
        ds.test.len(),
        ds.size,
        ds.size,
        ds.classes.len(),
        if ds.skipped > 0 {
            format!(", {} unreadable files skipped", ds.skipped)
        } else {
            String::new()
        }
    );
    Ok(ds)
}
