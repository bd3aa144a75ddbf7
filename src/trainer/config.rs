//! `config.json`: a run's [`TrainConfig`] as JSON (serde), with what the run found recorded
//! beside it. `train --config FILE` reads it back; an error names the file, the field (its
//! path, e.g. `sgd.lr`) and the value serde rejected.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::TrainConfig;
use crate::data::Dataset;
use crate::durable::write_atomically;
use crate::error::{Error, Result};
use crate::names::Named;

/// Facts of a run that are not configuration: what the dataset turned out to be (its identity,
/// which a resume checks), and the thread count (results reproduce only with the same one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recorded {
    pub dataset: String,
    pub image_size: usize,
    pub train_images: usize,
    pub test_images: usize,
    pub threads: usize,
    pub invaspread_version: String,
    /// The dataset's folder or file as an absolute path (None: the built-in data, or a run
    /// from before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// The class names, in label order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classes: Option<Vec<String>>,
    /// [`Dataset::fingerprint`] of the data trained on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
}

impl Recorded {
    /// The facts of `ds`, loaded from `cfg.data`.
    pub fn of(cfg: &TrainConfig, ds: &Dataset) -> Recorded {
        Recorded {
            dataset: ds.name.clone(),
            image_size: ds.size,
            train_images: ds.train.len(),
            test_images: ds.test.len(),
            threads: rayon::current_num_threads(),
            invaspread_version: env!("CARGO_PKG_VERSION").into(),
            data_dir: cfg.data.data_dir.as_ref().map(|d| absolute(d)),
            classes: Some(ds.classes.clone()),
            fingerprint: Some(ds.fingerprint()),
        }
    }

    /// What differs between the dataset a run started on (`self`) and the one it resumes on
    /// (`now`), one line each; a different path is allowed when `moved` (the same data in a new
    /// place: every other fact still has to agree). A fact a run from before it was recorded
    /// lacks is not compared.
    pub fn changes(&self, now: &Recorded, moved: bool) -> Vec<String> {
        let mut changes = Vec::new();
        let mut differ = |what: &str, was: String, is: String| {
            if was != is {
                changes.push(format!("{what}: the run started on {was}, now {is}"));
            }
        };
        // The path, and the name an image folder takes from it.
        if !moved {
            differ("dataset", self.dataset.clone(), now.dataset.clone());
            if let Some(was) = &self.data_dir {
                let show =
                    |d: Option<&PathBuf>| d.map_or("none".into(), |d| d.display().to_string());
                differ("data_dir", show(Some(was)), show(now.data_dir.as_ref()));
            }
        }
        if let (Some(was), Some(is)) = (&self.classes, &now.classes) {
            differ("classes", was.join(", "), is.join(", "));
        }
        differ(
            "image size",
            self.image_size.to_string(),
            now.image_size.to_string(),
        );
        differ(
            "training images",
            self.train_images.to_string(),
            now.train_images.to_string(),
        );
        differ(
            "test images",
            self.test_images.to_string(),
            now.test_images.to_string(),
        );
        if let (Some(was), Some(is)) = (&self.fingerprint, &now.fingerprint) {
            differ("fingerprint of the images", was.clone(), is.clone());
        }
        changes
    }
}

/// `path` made absolute (resolved when it exists), so that a run resumed from another working
/// directory can tell that a relative `data_dir` now leads elsewhere.
fn absolute(path: &Path) -> PathBuf {
    path.canonicalize()
        .or_else(|_| std::path::absolute(path))
        .unwrap_or_else(|_| path.to_path_buf())
}

/// Writes `cfg` with the facts `recorded` to `out/config.json`.
pub fn write(cfg: &TrainConfig, recorded: Recorded, out: &Path) -> Result<()> {
    let mut cfg = cfg.clone();
    cfg.recorded = Some(recorded);
    let mut text = serde_json::to_string_pretty(&cfg)
        .map_err(|e| Error::invalid(format!("serialising config.json: {e}")))?;
    text.push('\n');
    write_atomically(&out.join("config.json"), text.as_bytes())
}

/// Reads a configuration written by [`write()`] (or by hand) and checks every value's range
/// ([`validate`]). `recorded` is kept for the caller to compare with; a run writes its own in
/// its place.
pub fn read(path: &Path) -> Result<TrainConfig> {
    let text = crate::files::read_input_text(path, "configuration", crate::files::max_bytes::TEXT)?;
    let cfg = parse(&text).map_err(|message| Error::bad_file(path, message))?;
    validate(&cfg).map_err(|e| Error::bad_file(path, e.to_string()))?;
    Ok(cfg)
}

/// Every numeric setting within its range ([`crate::limits`]: the ranges the flags take), so a
/// configuration file or a library caller cannot pass what the command line refuses.
pub fn validate(cfg: &TrainConfig) -> Result<()> {
    use crate::limits;
    limits::TAU.check(cfg.loss.tau)?;
    limits::MU.check(cfg.loss.mu)?;
    if let Some((fraction, _)) = cfg.loss.negatives.selection() {
        limits::NEGATIVE_FRACTION.check(fraction)?;
    }
    limits::LR.check(cfg.sgd.lr)?;
    limits::MOMENTUM.check(cfg.sgd.momentum)?;
    limits::WEIGHT_DECAY.check(cfg.sgd.weight_decay)?;
    limits::SIGMA.check(cfg.knn.sigma)?;
    limits::K.check_usize(cfg.knn.k)?;
    limits::EVAL_EVERY.check_usize(cfg.knn.every)?;
    limits::BATCH.check_usize(cfg.batch)?;
    limits::WARMUP_STEPS.check_usize(cfg.warmup_steps)?;
    if let (Some(e), Some(s)) = (cfg.epochs, cfg.steps) {
        return Err(Error::invalid(format!(
            "epochs = {e} and steps = {s} are both set: expected one of the two (as --epochs and --steps)"
        )));
    }
    if let Some(e) = cfg.epochs {
        limits::EPOCHS.check_usize(e)?;
    }
    if let Some(s) = cfg.steps {
        limits::STEPS.check_usize(s)?;
    }
    if let Some(s) = cfg.data.image_size {
        limits::IMAGE_SIZE.check_usize(s)?;
    }
    if let Some(n) = cfg.loss_read_every {
        limits::STEPS.check_usize(n.max(1))?;
        if n == 0 {
            return Err(Error::invalid(
                "loss_read_every = 0: expected at least 1 step",
            ));
        }
    }
    validate_ranks(cfg)?;
    if let crate::nn::optim::Schedule::Step { gamma, milestones } = &cfg.schedule {
        for &m in milestones {
            limits::MILESTONE.check_usize(m)?;
        }
        if milestones.windows(2).any(|w| w[0] >= w[1]) {
            return Err(Error::invalid(format!(
                "schedule.milestones = {milestones:?}: expected epochs in increasing order"
            )));
        }
        if !(gamma.is_finite() && *gamma > 0.0 && *gamma <= 1.0) {
            return Err(Error::invalid(format!(
                "schedule.gamma = {gamma}: expected 0 < gamma <= 1 (the factor at each milestone)"
            )));
        }
    }
    Ok(())
}

/// Steps per epoch and in all, or an error naming the flag at fault.
pub fn step_counts(cfg: &TrainConfig, ds: &Dataset) -> Result<(usize, usize)> {
    if cfg.batch < 2 {
        return Err(Error::invalid(format!(
            "--batch {}: expected at least 2 images (4 rows)",
            cfg.batch
        )));
    }
    let steps_per_epoch = ds.training_len() / cfg.batch;
    if steps_per_epoch == 0 {
        return Err(Error::invalid(format!(
            "--batch {} is larger than the {} training images",
            cfg.batch,
            ds.train.len()
        )));
    }
    let total_steps = match (cfg.steps, cfg.epochs) {
        (Some(s), _) => s,
        (None, Some(e)) => e.checked_mul(steps_per_epoch).ok_or_else(|| {
            Error::invalid(format!(
                "--epochs {e} x {steps_per_epoch} steps per epoch overflows the step count"
            ))
        })?,
        (None, None) => return Err(Error::invalid("give --epochs E or --steps S")),
    };
    Ok((steps_per_epoch, total_steps))
}

/// A data-parallel run: CUDA, the method itself, a global batch that the ranks split evenly.
fn validate_ranks(cfg: &TrainConfig) -> Result<()> {
    let ranks = cfg.ranks;
    if ranks == 0 {
        return Err(Error::invalid("ranks = 0: expected at least one rank"));
    }
    if ranks == 1 {
        return Ok(());
    }
    if !matches!(cfg.backend, super::BackendChoice::Cuda { .. }) {
        return Err(Error::invalid(format!(
            "WORLD_SIZE={ranks}: data-parallel training runs on CUDA (one GPU per rank); add \
             --device cuda, or run one process on the CPU"
        )));
    }
    if cfg.method != crate::methods::MethodKind::Invaspread {
        return Err(Error::invalid(format!(
            "WORLD_SIZE={ranks}: --method {} trains on one device (its memory bank or classifier \
             is not split over ranks); run it without a launcher",
            cfg.method.name()
        )));
    }
    if !cfg.batch.is_multiple_of(ranks) {
        return Err(Error::invalid(format!(
            "--batch {} over WORLD_SIZE={ranks} ranks: the global batch must be a multiple of the \
             ranks (each takes batch / ranks images); try --batch {}",
            cfg.batch,
            (cfg.batch / ranks).max(1) * ranks
        )));
    }
    Ok(())
}

/// Parses a configuration; the error says which field (as a path) and why.
pub fn parse(text: &str) -> std::result::Result<TrainConfig, String> {
    let de = &mut serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner();
        if field.is_empty() || field == "." {
            format!("{inner}")
        } else {
            format!("field `{field}`: {inner}")
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_configuration_round_trips_with_the_schedule_as_an_object() {
        let cfg = TrainConfig::default();
        let text = serde_json::to_string_pretty(&cfg).unwrap();
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["schedule"]["kind"], "step");
        assert_eq!(
            value["schedule"]["milestones"],
            serde_json::json!([120, 160])
        );
        assert_eq!(value["model"], "convnet-small");
        assert_eq!(value["backend"]["device"], "cpu");
        assert_eq!(value["loss"]["grad_semantics"], "query-only");
        assert_eq!(parse(&text).unwrap(), cfg);
    }

    #[test]
    fn out_of_range_values_in_a_file_name_the_field() {
        let mut value = serde_json::to_value(TrainConfig::default()).unwrap();
        value["sgd"]["momentum"] = serde_json::json!(1.5);
        let cfg = parse(&value.to_string()).unwrap();
        let err = validate(&cfg).unwrap_err().to_string();
        assert!(
            err.contains("sgd.momentum in config.json") && err.contains("1.5"),
            "{err}"
        );
        value["sgd"]["momentum"] = serde_json::json!(0.9);
        value["schedule"]["gamma"] = serde_json::json!(-1.0);
        let err = validate(&parse(&value.to_string()).unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("schedule.gamma = -1"), "{err}");
        assert!(validate(&TrainConfig::default()).is_ok());
    }

    #[test]
    fn errors_name_the_field_and_the_value() {
        let mut value = serde_json::to_value(TrainConfig::default()).unwrap();
        value["sgd"]["lr"] = serde_json::json!("fast");
        let err = parse(&value.to_string()).unwrap_err();
        assert!(
            err.contains("`sgd.lr`") && err.contains("\"fast\""),
            "{err}"
        );
        value["sgd"]["lr"] = serde_json::json!(0.1);
        value["model"] = serde_json::json!("resnet50");
        let err = parse(&value.to_string()).unwrap_err();
        assert!(err.contains("`model`") && err.contains("resnet50"), "{err}");
        assert!(err.contains("resnet18-cifar, convnet-small"), "{err}");
        value["model"] = serde_json::json!("convnet-small");
        value["sgd"]["lrr"] = serde_json::json!(0.1);
        let err = parse(&value.to_string()).unwrap_err();
        assert!(err.contains("lrr"), "{err}");
    }

    #[test]
    fn a_configuration_from_before_the_newer_fields_keeps_what_it_ran() {
        let mut value = serde_json::to_value(TrainConfig::default()).unwrap();
        assert_eq!(value["backend"]["conv"], "winograd", "new runs: Winograd");
        value["backend"].as_object_mut().unwrap().remove("conv");
        value.as_object_mut().unwrap().remove("augment");
        value["knn"].as_object_mut().unwrap().remove("every");
        value["knn"]
            .as_object_mut()
            .unwrap()
            .remove("pixel_baseline");
        let cfg = parse(&value.to_string()).unwrap();
        assert_eq!(cfg.augment, crate::data::augment::Augmentations::all());
        assert_eq!(cfg.knn, crate::trainer::KnnConfig::default());
        assert_eq!(
            cfg.backend,
            crate::trainer::BackendChoice::Cpu {
                loss: crate::loss::CpuLossVersion::Fused,
                conv: crate::ops::conv2d::CpuVersion::Im2col,
            }
        );
    }
}
