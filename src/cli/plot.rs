//! `invaspread plot`: several runs' kNN top-1 per epoch on one chart (the RQ3 comparison of
//! learning speed), one line per run, named by its folder or by `--labels`.

use std::path::PathBuf;

use invaspread::plot::{panels_png, Panel, Scale, Series};
use invaspread::trainer::outputs::parse_metrics_csv;
use invaspread::Error;

#[derive(Debug, clap::Args)]
pub struct PlotArgs {
    /// Run folders written by `train` (each holds metrics.csv), or metrics.csv files.
    #[arg(required = true, value_name = "RUN")]
    runs: Vec<PathBuf>,
    /// The PNG to write.
    #[arg(long)]
    out: PathBuf,
    /// Names in the legend, one per run in order (default: each run's folder name).
    #[arg(long, value_delimiter = ',', value_name = "NAME,...")]
    labels: Vec<String>,
    /// Also draw each run's kNN top-5, as a second chart beside the first.
    #[arg(long)]
    top5: bool,
}

pub fn run(args: PlotArgs) -> invaspread::Result<()> {
    if !args.labels.is_empty() && args.labels.len() != args.runs.len() {
        return Err(Error::invalid(format!(
            "--labels gives {} names for {} runs: expected one per run",
            args.labels.len(),
            args.runs.len()
        )));
    }
    let mut top1 = Vec::new();
    let mut top5 = Vec::new();
    for (i, run) in args.runs.iter().enumerate() {
        let csv = if run.is_dir() {
            run.join("metrics.csv")
        } else {
            run.clone()
        };
        if !csv.exists() {
            return Err(Error::invalid(format!(
                "{}: no metrics.csv (expected a run folder written by `invaspread train`, or its \
                 metrics.csv)",
                run.display()
            )));
        }
        let rows = parse_metrics_csv(&csv)?;
        if !rows.iter().any(|r| r.knn_top1.is_some()) {
            return Err(Error::bad_file(&csv, "holds no evaluated epoch yet"));
        }
        let label = match args.labels.get(i) {
            Some(l) => l.clone(),
            None => {
                let folder = if run.is_dir() {
                    run.as_path()
                } else {
                    csv.parent().unwrap_or(run)
                };
                folder.file_name().map_or_else(
                    || folder.display().to_string(),
                    |n| n.to_string_lossy().into(),
                )
            }
        };
        let series = |f: &dyn Fn(&invaspread::trainer::EpochMetrics) -> Option<f64>| Series {
            label: label.clone(),
            points: rows
                .iter()
                .filter_map(|r| f(r).map(|v| (r.epoch as f64, 100.0 * v)))
                .collect(),
        };
        top1.push(series(&|r| r.knn_top1));
        top5.push(series(&|r| r.knn_top5));
    }
    let panel = |caption: &str, y_desc: &str, series: Vec<Series>| Panel {
        caption: caption.into(),
        x_desc: "epoch (0: the initialised network)".into(),
        y_desc: y_desc.into(),
        series,
        scale: Scale::Percent,
    };
    let mut panels = vec![panel(
        "kNN top-1 per epoch",
        "kNN top-1 on the test split (%)",
        top1,
    )];
    if args.top5 {
        panels.push(panel(
            "kNN top-5 per epoch",
            "kNN top-5 on the test split (%)",
            top5,
        ));
    }
    panels_png(&panels, (820, 540), &args.out)?;
    eprintln!("wrote {} ({} runs)", args.out.display(), args.runs.len());
    Ok(())
}
