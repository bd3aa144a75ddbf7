//! What a run writes into its folder: `metrics.csv` and `metrics.json` (the initialised
//! network's row, then one per epoch), `metrics.png` (loss and kNN per epoch, [`crate::plot`]), `steps.csv` (every step's loss, appended as
//! losses arrive), and the checkpoints (`last.safetensors` with its optimizer file, and
//! `best.safetensors`). Every file but the appended step log is written atomically.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::TrainConfig;
use crate::backend::Backend;
use crate::data::Dataset;
use crate::durable::write_atomically;
use crate::error::{Error, Result};
use crate::names::Named;
use crate::nn::checkpoint;
use crate::nn::optim::Sgd;
use crate::tape::Graph;

/// The run's state, its one source of truth (see `run.rs`): everything else is derived.
pub const STATE: &str = "state.safetensors";
pub const LAST: &str = "last.safetensors";
pub const LAST_OPT: &str = "last.optimizer.safetensors";
pub const BEST: &str = "best.safetensors";

/// Every file a run writes into its folder: a new run refuses a folder that holds any of them
/// (they would be replaced), whoever wrote them.
pub const RUN_FILES: [&str; 10] = [
    "config.json",
    "metrics.csv",
    "metrics.json",
    "metrics.png",
    "steps.csv",
    STATE,
    LAST,
    LAST_OPT,
    BEST,
    "best.optimizer.safetensors",
];

/// One line of metrics: the initialised network (epoch 0, no loss), then one per epoch; kNN is
/// empty for the epochs `--eval-every` skips.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    pub epoch: usize,
    pub step: usize,
    /// The epoch's mean training loss (None for epoch 0, the initialised network).
    pub loss: Option<f64>,
    pub knn_top1: Option<f64>,
    /// Absent from the state of runs written before top-5 was measured.
    #[serde(default)]
    pub knn_top5: Option<f64>,
    /// Recall@1 among the test images of unseen classes (their runs have no kNN).
    #[serde(default)]
    pub recall_at_1: Option<f64>,
    pub lr: f64,
    pub seconds: f64,
}

impl EpochMetrics {
    /// A row with the numbers of `evaluation` (None: not evaluated).
    pub fn new(
        epoch: usize,
        step: usize,
        loss: Option<f64>,
        evaluation: Option<super::evaluate::Evaluation>,
        lr: f64,
        seconds: f64,
    ) -> EpochMetrics {
        use super::evaluate::Evaluation;
        let knn = match evaluation {
            Some(Evaluation::Knn(k)) => Some(k),
            _ => None,
        };
        let recall_at_1 = match evaluation {
            Some(Evaluation::RecallAt1(r)) => Some(r),
            _ => None,
        };
        EpochMetrics {
            epoch,
            step,
            loss,
            knn_top1: knn.map(|k| k.top1),
            knn_top5: knn.map(|k| k.top5),
            recall_at_1,
            lr,
            seconds,
        }
    }

    /// The number the run ranks epochs by: kNN top-1, or Recall@1 for unseen classes.
    pub fn headline(&self) -> Option<f64> {
        self.knn_top1.or(self.recall_at_1)
    }
}

/// The columns of metrics.csv.
pub const METRICS_HEADER: &str = "epoch,step,loss,knn_top1,knn_top5,recall_at_1,lr,seconds";

/// The columns of metrics.csv before epoch 0 and top-5 (read when a legacy run resumes).
const LEGACY_METRICS_HEADER: &str = "epoch,step,loss,knn_top1,lr,seconds";

pub fn metrics_csv(rows: &[EpochMetrics]) -> String {
    let cell = |v: Option<f64>| v.map_or(String::new(), |v| v.to_string());
    let mut s = format!("{METRICS_HEADER}\n");
    for r in rows {
        s.push_str(&format!(
            "{},{},{},{},{},{},{},{:.3}\n",
            r.epoch,
            r.step,
            cell(r.loss),
            cell(r.knn_top1),
            cell(r.knn_top5),
            cell(r.recall_at_1),
            r.lr,
            r.seconds
        ));
    }
    s
}

/// The rows as a JSON array.
pub fn metrics_json(rows: &[EpochMetrics]) -> Result<String> {
    let mut text = serde_json::to_string_pretty(rows)
        .map_err(|e| Error::invalid(format!("serialising metrics.json: {e}")))?;
    text.push('\n');
    Ok(text)
}

/// Writes metrics.csv, metrics.json and metrics.png for `rows`.
pub fn write_metrics(rows: &[EpochMetrics], out: &Path) -> Result<()> {
    write_atomically(&out.join("metrics.csv"), metrics_csv(rows).as_bytes())?;
    write_atomically(&out.join("metrics.json"), metrics_json(rows)?.as_bytes())?;
    metrics_png(rows, &out.join("metrics.png"))
}

/// `metrics.png`: the training loss per epoch (left) and kNN top-1 and top-5 per epoch from
/// the initialised network, epoch 0, on (right, on whole tens of percent).
pub fn metrics_png(rows: &[EpochMetrics], path: &Path) -> Result<()> {
    use crate::plot::{panels_png, Panel, Scale, Series};
    let series = |label: &str, f: &dyn Fn(&EpochMetrics) -> Option<f64>| Series {
        label: label.into(),
        points: rows
            .iter()
            .filter_map(|r| f(r).map(|v| (r.epoch as f64, v)))
            .collect(),
    };
    let panels = [
        Panel {
            caption: "training loss".into(),
            x_desc: "epoch".into(),
            y_desc: "mean loss of the epoch".into(),
            series: vec![series("loss", &|r| r.loss)],
            scale: Scale::Fitted,
        },
        Panel {
            caption: "evaluation on the test split".into(),
            x_desc: "epoch (0: the initialised network)".into(),
            y_desc: "accuracy (%)".into(),
            series: if rows.iter().any(|r| r.recall_at_1.is_some()) {
                vec![series("Recall@1, unseen classes", &|r| {
                    r.recall_at_1.map(|v| 100.0 * v)
                })]
            } else {
                vec![
                    series("kNN top-1", &|r| r.knn_top1.map(|v| 100.0 * v)),
                    series("kNN top-5", &|r| r.knn_top5.map(|v| 100.0 * v)),
                ]
            },
            scale: Scale::Percent,
        },
    ];
    panels_png(&panels, (560, 420), path)
}

/// Reads metrics.csv, in either layout ([`METRICS_HEADER`] or the legacy one); a missing
/// file is no rows.
pub fn parse_metrics_csv(path: &Path) -> Result<Vec<EpochMetrics>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text = crate::files::read_input_text(path, "metrics.csv", crate::files::max_bytes::TEXT)?;
    let mut lines = text.lines();
    let legacy = match lines.next().map(str::trim) {
        Some(h) if h == METRICS_HEADER => false,
        Some(h) if h == LEGACY_METRICS_HEADER => true,
        other => {
            return Err(Error::bad_file(
                path,
                format!(
                    "header {} is not {METRICS_HEADER:?}",
                    crate::error::excerpt(other.unwrap_or(""))
                ),
            ))
        }
    };
    lines
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let mut f: Vec<&str> = line.split(',').collect();
            let bad = || {
                Error::bad_file(
                    path,
                    format!("malformed metrics line {}", crate::error::excerpt(line)),
                )
            };
            if legacy && f.len() == 6 {
                f.splice(4..4, ["", ""]);
            }
            if f.len() != 8 {
                return Err(bad());
            }
            let optional = |s: &str| -> Result<Option<f64>> {
                if s.is_empty() {
                    Ok(None)
                } else {
                    s.parse().map(Some).map_err(|_| bad())
                }
            };
            Ok(EpochMetrics {
                epoch: f[0].parse().map_err(|_| bad())?,
                step: f[1].parse().map_err(|_| bad())?,
                loss: optional(f[2])?,
                knn_top1: optional(f[3])?,
                knn_top5: optional(f[4])?,
                recall_at_1: optional(f[5])?,
                lr: f[6].parse().map_err(|_| bad())?,
                seconds: f[7].parse().map_err(|_| bad())?,
            })
        })
        .collect()
}

/// The checkpoint metadata: model, step, the running loss of the current epoch.
pub fn meta(
    cfg: &TrainConfig,
    ds: &Dataset,
    step: usize,
    epoch_sum: f64,
    epoch_count: usize,
) -> HashMap<String, String> {
    HashMap::from([
        ("model".into(), cfg.model.name()),
        ("dataset".into(), ds.name.clone()),
        ("image_size".into(), ds.size.to_string()),
        ("step".into(), step.to_string()),
        ("epoch_loss_sum".into(), format!("{epoch_sum:e}")),
        ("epoch_loss_count".into(), epoch_count.to_string()),
        ("seed".into(), cfg.seed.to_string()),
        ("format".into(), "pt".into()),
    ])
}

/// Writes last.safetensors and its optimizer file.
pub fn save_last<B: Backend>(
    graph: &Graph<B>,
    sgd: &Sgd,
    out: &Path,
    metadata: HashMap<String, String>,
) -> Result<()> {
    checkpoint::save_model(
        &graph.params,
        &graph.backend,
        &out.join(LAST),
        metadata.clone(),
    )?;
    checkpoint::save_optimizer(
        &graph.params,
        sgd,
        &graph.backend,
        &out.join(LAST_OPT),
        metadata,
    )
}

/// `steps.csv` in the output folder: `step,loss` for every step (steps counted from 1, as in
/// metrics.csv), appended as losses arrive; a resumed run first drops the lines after its
/// checkpoint's step.
pub struct StepLog {
    path: PathBuf,
    /// None: the log of a data-parallel rank other than 0, which writes nothing.
    file: Option<std::io::BufWriter<std::fs::File>>,
}

impl StepLog {
    /// Opens the log of a run whose steps so far had the losses `history` (empty: a new run),
    /// rewriting it from them: the run state holds every loss, so the log is whole again after
    /// any interruption.
    pub fn open(out: &Path, history: &[f64]) -> Result<StepLog> {
        use std::fmt::Write as _;
        let path = out.join("steps.csv");
        let mut text = String::from("step,loss\n");
        for (i, loss) in history.iter().enumerate() {
            let _ = writeln!(text, "{},{loss}", i + 1);
        }
        write_atomically(&path, text.as_bytes())?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        Ok(StepLog {
            path,
            file: Some(std::io::BufWriter::new(file)),
        })
    }

    /// A log that writes nothing (rank 0 of a data-parallel group keeps the run's).
    pub fn discard() -> StepLog {
        StepLog {
            path: PathBuf::new(),
            file: None,
        }
    }

    pub fn line(&mut self, step: usize, loss: f64) -> Result<()> {
        use std::io::Write;
        match &mut self.file {
            None => Ok(()),
            Some(f) => writeln!(f, "{step},{loss}").map_err(|e| Error::io(&self.path, e)),
        }
    }

    pub fn flush(&mut self) -> Result<()> {
        use std::io::Write;
        match &mut self.file {
            None => Ok(()),
            Some(f) => f.flush().map_err(|e| Error::io(&self.path, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_csv_round_trips_and_legacy_files_still_read() {
        let dir = std::env::temp_dir().join(format!("invaspread-metrics-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let knn = crate::eval::KnnAccuracy {
            top1: 0.25,
            top5: 0.75,
        };
        use super::super::evaluate::Evaluation;
        let rows = vec![
            EpochMetrics::new(0, 0, None, Some(Evaluation::Knn(knn)), 0.03, 0.0),
            EpochMetrics::new(1, 10, Some(5.5), None, 0.03, 1.5),
            EpochMetrics::new(
                2,
                20,
                Some(5.25),
                Some(Evaluation::RecallAt1(0.5)),
                0.003,
                3.0,
            ),
        ];
        let path = dir.join("metrics.csv");
        std::fs::write(&path, metrics_csv(&rows)).unwrap();
        assert_eq!(parse_metrics_csv(&path).unwrap(), rows);
        std::fs::write(
            &path,
            "epoch,step,loss,knn_top1,lr,seconds\n1,31,5.5,0.25,0.03,9.000\n",
        )
        .unwrap();
        let legacy = parse_metrics_csv(&path).unwrap();
        assert_eq!(legacy[0].knn_top1, Some(0.25));
        assert_eq!(
            (legacy[0].knn_top5, legacy[0].recall_at_1, legacy[0].lr),
            (None, None, 0.03)
        );
        std::fs::write(&path, "epoch,loss\n").unwrap();
        let err = parse_metrics_csv(&path).unwrap_err().to_string();
        assert!(
            err.contains("header") && err.contains("metrics.csv"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
