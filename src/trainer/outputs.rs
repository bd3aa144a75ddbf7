//! What a run writes into its folder: `metrics.csv` and `metrics.json` (one row per epoch),
//! `metrics.png` (loss and kNN top-1 per epoch), `steps.csv` (every step's loss, appended as
//! losses arrive), and the checkpoints (`last.safetensors` with its optimizer file, and
//! `best.safetensors`). Every file but the appended step log is written atomically.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::TrainConfig;
use crate::data::Dataset;
use crate::durable::write_atomically;
use crate::error::{Error, Result};
use crate::names::Named;
use crate::nn::backend::Backend;
use crate::nn::checkpoint;
use crate::nn::graph::Graph;
use crate::nn::optim::Sgd;

/// The run's state, its one source of truth (see `run.rs`): everything else is derived.
pub const STATE: &str = "state.safetensors";
pub const LAST: &str = "last.safetensors";
pub const LAST_OPT: &str = "last.optimizer.safetensors";
pub const BEST: &str = "best.safetensors";

/// One line of metrics, written after every epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    pub epoch: usize,
    pub step: usize,
    pub loss: f64,
    pub knn_top1: f64,
    pub lr: f64,
    pub seconds: f64,
}

pub fn metrics_csv(rows: &[EpochMetrics]) -> String {
    let mut s = String::from("epoch,step,loss,knn_top1,lr,seconds\n");
    for r in rows {
        s.push_str(&format!(
            "{},{},{},{},{},{:.3}\n",
            r.epoch, r.step, r.loss, r.knn_top1, r.lr, r.seconds
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
    plot_png(rows, &out.join("metrics.png"))
}

pub fn parse_metrics_csv(path: &Path) -> Result<Vec<EpochMetrics>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(path, e)),
    };
    text.lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let f: Vec<&str> = line.split(',').collect();
            let bad = || {
                Error::bad_file(
                    path,
                    format!("malformed metrics line {}", crate::error::excerpt(line)),
                )
            };
            if f.len() != 6 {
                return Err(bad());
            }
            Ok(EpochMetrics {
                epoch: f[0].parse().map_err(|_| bad())?,
                step: f[1].parse().map_err(|_| bad())?,
                loss: f[2].parse().map_err(|_| bad())?,
                knn_top1: f[3].parse().map_err(|_| bad())?,
                lr: f[4].parse().map_err(|_| bad())?,
                seconds: f[5].parse().map_err(|_| bad())?,
            })
        })
        .collect()
}

/// A PNG with two panels: the loss per epoch (left) and kNN top-1 per epoch (right), each
/// scaled to its own range; the numbers are in metrics.csv.
pub fn plot_png(rows: &[EpochMetrics], path: &Path) -> Result<()> {
    let (w, h) = (800u32, 300u32);
    let mut img = image::RgbImage::from_pixel(w, h, image::Rgb([255, 255, 255]));
    let panel = |img: &mut image::RgbImage, x0: u32, values: &[f64], colour: [u8; 3]| {
        let (pw, ph, pad) = (380u32, 260u32, 20u32);
        for x in x0 + pad..x0 + pad + pw {
            img.put_pixel(x.min(w - 1), h - pad, image::Rgb([0, 0, 0]));
        }
        for y in pad..h - pad {
            img.put_pixel(x0 + pad, y, image::Rgb([0, 0, 0]));
        }
        if values.is_empty() {
            return;
        }
        let (lo, hi) = values
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
                (a.min(v), b.max(v))
            });
        let span = if hi > lo { hi - lo } else { 1.0 };
        let point = |i: usize, v: f64| {
            let x = x0
                + pad
                + if values.len() > 1 {
                    (i as u32 * (pw - 10)) / (values.len() as u32 - 1)
                } else {
                    pw / 2
                };
            let y = h - pad - 5 - (((v - lo) / span) * f64::from(ph - 20)) as u32;
            (x as i64, y as i64)
        };
        for i in 0..values.len() {
            let (x1, y1) = point(i, values[i]);
            let (x0p, y0p) = if i == 0 {
                (x1, y1)
            } else {
                point(i - 1, values[i - 1])
            };
            let steps = (x1 - x0p).abs().max((y1 - y0p).abs()).max(1);
            for s in 0..=steps {
                let x = x0p + (x1 - x0p) * s / steps;
                let y = y0p + (y1 - y0p) * s / steps;
                for (dx, dy) in [(0, 0), (1, 0), (0, 1)] {
                    let (px, py) = (
                        (x + dx).clamp(0, i64::from(w) - 1) as u32,
                        (y + dy).clamp(0, i64::from(h) - 1) as u32,
                    );
                    img.put_pixel(px, py, image::Rgb(colour));
                }
            }
        }
    };
    panel(
        &mut img,
        0,
        &rows.iter().map(|r| r.loss).collect::<Vec<_>>(),
        [200, 30, 30],
    );
    panel(
        &mut img,
        400,
        &rows.iter().map(|r| r.knn_top1).collect::<Vec<_>>(),
        [30, 60, 200],
    );
    let mut bytes = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .map_err(|e| Error::invalid(format!("encoding the plot: {e}")))?;
    write_atomically(path, &bytes)
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
    file: std::io::BufWriter<std::fs::File>,
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
            file: std::io::BufWriter::new(file),
        })
    }

    pub fn line(&mut self, step: usize, loss: f64) -> Result<()> {
        use std::io::Write;
        writeln!(self.file, "{step},{loss}").map_err(|e| Error::io(&self.path, e))
    }

    pub fn flush(&mut self) -> Result<()> {
        use std::io::Write;
        self.file.flush().map_err(|e| Error::io(&self.path, e))
    }
}
