//! The run's files: its claim on `--out` (the lock, and the removal of temporaries an
//! interrupted write left), the atomic commits of `state.safetensors` and the files derived
//! from it, and the resume from them. Rank 0 of a data-parallel group (or the one device)
//! writes; the other ranks hold a checkpointer that writes nothing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::reporter::Reporter;
use super::{Learner, Position};
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::methods;
use crate::names::Named;
use crate::nn::checkpoint;
use crate::nn::Encoder;
use crate::trainer::lock::RunLock;
use crate::trainer::losses::EpochLoss;
use crate::trainer::outputs::{self, EpochMetrics, BEST, LAST, LAST_OPT, STATE};
use crate::trainer::{RunOptions, TrainConfig};

/// See the module documentation.
pub(super) struct Checkpointer {
    out: PathBuf,
    /// This process's claim on `--out`, held until the run is dropped; None on the ranks that
    /// do not write.
    lock: Option<RunLock>,
}

impl Checkpointer {
    /// Claims `--out` for this process (creating it) when it is the one that `writes`, and
    /// removes what an interrupted write left.
    pub fn claim(opts: &RunOptions, writes: bool, report: &Reporter) -> Result<Checkpointer> {
        let out = opts.out.clone();
        if !writes {
            return Ok(Checkpointer { out, lock: None });
        }
        check_out_folder(&out)?;
        std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
        let lock = RunLock::acquire(&out)?;
        let leftovers = crate::durable::remove_leftovers(&out)?;
        if leftovers > 0 {
            report.line(&format!(
                "removed {leftovers} temporary file(s) of an interrupted write in {}",
                out.display()
            ));
        }
        Ok(Checkpointer {
            out,
            lock: Some(lock),
        })
    }

    /// Whether this process writes the run's files.
    pub fn writes(&self) -> bool {
        self.lock.is_some()
    }

    /// For a new run: `--out` must hold none of the files a run writes (an earlier run's, or
    /// the user's own `config.json` or `metrics.csv`, which the run would replace).
    pub fn check_new(&self) -> Result<()> {
        let held: Vec<&str> = outputs::RUN_FILES
            .into_iter()
            .filter(|f| std::fs::symlink_metadata(self.out.join(f)).is_ok())
            .collect();
        if held.is_empty() {
            return Ok(());
        }
        let what = if held.contains(&STATE) || held.contains(&LAST) {
            "a run"
        } else {
            "files a new run would replace"
        };
        Err(Error::invalid(format!(
            "{} already holds {what} ({}); pass --resume to continue the run there, or choose another --out",
            self.out.display(),
            held.join(", ")
        )))
    }

    /// `--resume`: the model, the optimizer, the method's state, the position, the metrics and
    /// every step's loss from the run's state file (or the files of a run from before it).
    pub fn resume<B: Encoder>(
        &self,
        cfg: &TrainConfig,
        learner: &mut Learner<B>,
        at: &mut Position,
        report: &Reporter,
    ) -> Result<()> {
        let (state, last) = (self.out.join(STATE), self.out.join(LAST));
        if state.exists() {
            self.resume_state(cfg, &state, learner, at)
        } else if last.exists() {
            self.resume_legacy(cfg, &last, learner, at)
        } else {
            report.line(&format!(
                "{} holds no saved state yet: starting the run from the beginning",
                self.out.display()
            ));
            Ok(())
        }
    }

    /// Loads everything from `state.safetensors`.
    fn resume_state<B: Encoder>(
        &self,
        cfg: &TrainConfig,
        state: &Path,
        learner: &mut Learner<B>,
        at: &mut Position,
    ) -> Result<()> {
        let (g, sgd) = (&mut learner.graph, &mut learner.sgd);
        let (m, losses) = checkpoint::load_run_state(&mut g.params, sgd, &g.backend, state)?;
        position(cfg, state, &m, at)?;
        if sgd.step != at.start as u64 {
            return Err(Error::bad_file(
                state,
                format!(
                    "metadata sgd_step = {} disagrees with step = {}: the file is inconsistent; restore it from a copy",
                    sgd.step, at.start
                ),
            ));
        }
        if losses.len() != at.start {
            return Err(Error::bad_file(
                state,
                format!(
                    "holds {} step losses for step {}: the file is inconsistent; restore it from a copy",
                    losses.len(),
                    at.start
                ),
            ));
        }
        at.history = losses;
        at.committed = Some(at.start);
        if !learner.method.tensors().is_empty() {
            let extra = checkpoint::load_extra_tensors(state)?;
            let get = |name: &str| extra.get(name).cloned();
            methods::restore(&mut *learner.method, &get)
                .map_err(|e| Error::bad_file(state, e.to_string()))?;
        }
        let metrics = m
            .get("metrics")
            .ok_or_else(|| Error::bad_file(state, "metadata has no metrics"))?;
        at.metrics = serde_json::from_str(metrics)
            .map_err(|e| Error::bad_file(state, format!("metrics: {e}")))?;
        Ok(())
    }

    /// A run written before the state file existed: `last.safetensors` and its optimizer
    /// file, which must be of the same step (two files renamed one after the other can be
    /// from different saves if the writer died between the renames), and steps.csv.
    fn resume_legacy<B: Encoder>(
        &self,
        cfg: &TrainConfig,
        last: &Path,
        learner: &mut Learner<B>,
        at: &mut Position,
    ) -> Result<()> {
        // Those files hold the encoder and SGD only: a method's own state (a memory bank, a
        // classifier) lives in state.safetensors alone, so without it the run cannot go on.
        if !learner.method.tensors().is_empty() {
            return Err(Error::bad_file(
                &self.out.join(STATE),
                format!(
                    "is missing, and --method {} keeps its state (its memory bank or classifier) there: {} cannot be resumed from {} alone; restore the file or start a new run",
                    crate::names::Named::name(&cfg.method),
                    self.out.display(),
                    last.display()
                ),
            ));
        }
        let g = &mut learner.graph;
        let m = checkpoint::load_model(&mut g.params, &g.backend, last)?;
        let opt = self.out.join(LAST_OPT);
        checkpoint::load_optimizer(&mut g.params, &mut learner.sgd, &g.backend, &opt)?;
        position(cfg, last, &m, at)?;
        if learner.sgd.step != at.start as u64 {
            return Err(Error::bad_file(
                &opt,
                format!(
                    "is from step {} but {} from step {}: a save was interrupted between them; \
                     the run cannot be resumed from this pair",
                    learner.sgd.step,
                    last.display(),
                    at.start
                ),
            ));
        }
        at.metrics = outputs::parse_metrics_csv(&self.out.join("metrics.csv"))?;
        let steps = self.out.join("steps.csv");
        let log = if steps.exists() {
            crate::files::read_input_text(&steps, "step log", crate::files::max_bytes::TEXT)?
        } else {
            String::new()
        };
        at.history = log
            .lines()
            .skip(1)
            .filter_map(|l| l.split_once(',').and_then(|(_, v)| v.parse().ok()))
            .take(at.start)
            .collect();
        if at.history.len() != at.start {
            return Err(Error::bad_file(
                &self.out.join("steps.csv"),
                format!(
                    "holds {} step losses, the checkpoint is at step {}",
                    at.history.len(),
                    at.start
                ),
            ));
        }
        Ok(())
    }

    /// Commits the state after `step` steps (the current epoch's running loss in `epoch`), with
    /// every step's loss `losses` and the `metrics` so far; `best.safetensors` first when
    /// `best`. Nothing on a rank that does not write.
    #[allow(clippy::too_many_arguments)] // the run's configuration, data, learner and position
    pub fn commit<B: Encoder>(
        &self,
        cfg: &TrainConfig,
        ds: &Dataset,
        learner: &Learner<B>,
        metrics: &[EpochMetrics],
        losses: &[f64],
        (step, epoch): (usize, EpochLoss),
        best: bool,
    ) -> Result<()> {
        if !self.writes() {
            return Ok(());
        }
        let g = &learner.graph;
        let mut meta = outputs::meta(cfg, ds, step, epoch.sum, epoch.count);
        if losses.len() != step {
            return Err(Error::invalid(format!(
                "internal: {} losses collected at step {step}",
                losses.len()
            )));
        }
        if best {
            checkpoint::save_model(&g.params, &g.backend, &self.out.join(BEST), meta.clone())?;
        }
        let metrics = serde_json::to_string(metrics)
            .map_err(|e| Error::invalid(format!("serialising the metrics: {e}")))?;
        meta.insert("metrics".into(), metrics);
        checkpoint::save_run_state(
            &g.params,
            &learner.sgd,
            &g.backend,
            losses,
            &learner.method.tensors(),
            &self.out.join(STATE),
            meta,
        )
    }

    /// The files derived from the state at `(step, epoch)`: last.safetensors (+ its optimizer
    /// file) and metrics.*. Nothing on a rank that does not write.
    pub fn write_derived<B: Encoder>(
        &self,
        cfg: &TrainConfig,
        ds: &Dataset,
        learner: &Learner<B>,
        metrics: &[EpochMetrics],
        (step, epoch): (usize, EpochLoss),
    ) -> Result<()> {
        if !self.writes() {
            return Ok(());
        }
        let meta = outputs::meta(cfg, ds, step, epoch.sum, epoch.count);
        outputs::save_last(&learner.graph, &learner.sgd, &self.out, meta)?;
        outputs::write_metrics(metrics, &self.out)
    }

    /// Where the last checkpoint lies, for messages.
    pub fn last(&self) -> PathBuf {
        self.out.join(LAST)
    }

    /// Where the state lies, for messages.
    pub fn state(&self) -> PathBuf {
        self.out.join(STATE)
    }
}

/// The model name, step and current epoch's running loss from a saved file's metadata.
fn position(
    cfg: &TrainConfig,
    path: &Path,
    m: &HashMap<String, String>,
    at: &mut Position,
) -> Result<()> {
    let model = cfg.model.name();
    if m.get("model") != Some(&model) {
        return Err(Error::bad_file(
            path,
            format!("holds model {:?}, not {model}", m.get("model")),
        ));
    }
    // A state copied from another run: its dataset or seed is not this configuration's.
    let kind = cfg.data.dataset.name();
    let saved_kind = m
        .get("dataset")
        .map(|d| d.split(':').next().unwrap_or_default());
    if saved_kind.is_some_and(|k| k != kind) {
        return Err(Error::bad_file(
            path,
            format!(
                "was trained on dataset {:?}, but the run's config.json names {kind}: the state is another run's; restore this run's state or start a new run",
                m.get("dataset").map_or("", String::as_str)
            ),
        ));
    }
    if let Some(seed) = m.get("seed").filter(|s| **s != cfg.seed.to_string()) {
        return Err(Error::bad_file(
            path,
            format!(
                "was trained with seed {seed}, but the run's config.json gives seed {}: the state is another run's; restore this run's state or start a new run",
                cfg.seed
            ),
        ));
    }
    at.start = checkpoint::integer(path, m, "step")?;
    let sum = m
        .get("epoch_loss_sum")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::bad_file(path, "metadata epoch_loss_sum is not a number"))?;
    at.epoch = EpochLoss {
        sum,
        count: checkpoint::integer(path, m, "epoch_loss_count")?,
    };
    Ok(())
}

/// `--out` must be a folder or not exist: a file, a dangling link or a link loop gets an error
/// that says which (creating the folder only says "File exists").
fn check_out_folder(out: &Path) -> Result<()> {
    let Ok(link) = std::fs::symlink_metadata(out) else {
        return Ok(()); // nothing there: created next
    };
    let problem = match std::fs::metadata(out) {
        Ok(meta) if meta.is_dir() => return Ok(()),
        Ok(_) => "is a file, not a folder".to_string(),
        Err(_) if link.file_type().is_symlink() => match std::fs::read_link(out) {
            Ok(target) if target.as_os_str().is_empty() => "is an empty symbolic link".into(),
            Ok(target) => match std::fs::symlink_metadata(
                out.parent().unwrap_or(Path::new(".")).join(&target),
            ) {
                Ok(_) => format!(
                    "is a symbolic link that loops (through {})",
                    target.display()
                ),
                Err(_) => format!(
                    "is a symbolic link to {}, which does not exist",
                    target.display()
                ),
            },
            Err(e) => format!("is a symbolic link that cannot be read ({e})"),
        },
        Err(e) => format!("cannot be read ({e})"),
    };
    Err(Error::invalid(format!(
        "--out {} {problem}: expected a folder for the run (a new one, or the run's own to resume)",
        out.display()
    )))
}
