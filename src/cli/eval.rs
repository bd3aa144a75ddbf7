//! `invaspread eval`: kNN top-1, Recall@1/2/4/8 and k-means NMI of a checkpoint.

use std::path::PathBuf;
use std::sync::Arc;

use invaspread::backend::Cpu;
use invaspread::backend::CudaBackend;
use invaspread::cuda::Gpu;
use invaspread::eval;
use invaspread::nn::embed::{embed_split, weighted_knn, EVAL_BATCH};
use invaspread::nn::models::EMBED_DIM;
use invaspread::nn::Encoder;
use invaspread::trainer::KnnConfig;
use serde::Serialize;

use super::data::DataArgs;
use super::{checkpoint, Device};

#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// A model checkpoint written by `train`.
    #[arg(long)]
    checkpoint: PathBuf,
    #[command(flatten)]
    data: DataArgs,
    /// kNN neighbours [1 <= k <= 100000].
    #[arg(long, default_value_t = KnnConfig::default().k, value_parser = super::ranges::k)]
    k: usize,
    /// kNN temperature [0.001 <= sigma <= 100].
    #[arg(long, default_value_t = KnnConfig::default().sigma, value_parser = super::ranges::sigma, allow_negative_numbers = true)]
    sigma: f64,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Also fit a linear probe: multinomial logistic regression on the frozen embeddings of the
    /// train split, reported on the test split (the protocol is in src/eval/linear.rs).
    #[arg(long)]
    linear: bool,
    /// Where the embeddings and the kNN search run (Recall@K and k-means stay on the CPU).
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    device: Device,
}

/// What `eval --json` prints.
#[derive(Debug, Serialize)]
struct Report {
    knn_top1: f64,
    knn_top5: f64,
    k: usize,
    sigma: f64,
    recall_at_1: f64,
    recall_at_2: f64,
    recall_at_4: f64,
    recall_at_8: f64,
    nmi: f64,
    /// k-means starts behind `nmi` (the lowest inertia kept).
    kmeans_starts: usize,
    /// The classes evaluated (all of the dataset's, or those of --classes).
    classes: Vec<String>,
    /// Clusters of the k-means behind `nmi`: one per evaluated class.
    clusters: usize,
    /// The linear probe's test top-1 (with --linear).
    #[serde(skip_serializing_if = "Option::is_none")]
    linear_top1: Option<f64>,
}

/// The CUDA backend for `eval` and `embed` (float32 GEMMs: the CPU's numbers to rounding).
pub fn cuda_backend() -> invaspread::Result<CudaBackend> {
    CudaBackend::new(Arc::new(Gpu::require()?))
}

pub fn run(args: EvalArgs) -> invaspread::Result<()> {
    match args.device {
        Device::Cpu => eval_on(args, Cpu::<f32>::new()),
        Device::Cuda => eval_on(args, cuda_backend()?),
    }
}

fn eval_on<B: Encoder>(args: EvalArgs, backend: B) -> invaspread::Result<()> {
    let (mut graph, model, meta) = checkpoint::load_with_metadata(&args.checkpoint, backend)?;
    let ds = checkpoint::dataset_for(&args.data, &meta, &args.checkpoint)?;
    let train = embed_split(&mut graph, &model, &ds.train, ds.size, EVAL_BATCH)?;
    let test = embed_split(&mut graph, &model, &ds.test, ds.size, EVAL_BATCH)?;
    let b = &graph.backend;
    let (labels_train, labels_test) = (&ds.train.labels, &ds.test.labels);
    let classes = ds.classes.len();
    let knn = weighted_knn(
        b,
        &train,
        labels_train,
        &test,
        labels_test,
        classes,
        args.k,
        args.sigma,
    )?;
    let test = b.download(&test)?;
    let recall = eval::recall_at_k(&test, labels_test, EMBED_DIM, &[1, 2, 4, 8])?;
    let clusters = eval::kmeans(&test, EMBED_DIM, classes, eval::KMEANS_STARTS, 0)?.assign;
    let labels: Vec<usize> = labels_test.iter().map(|&l| l as usize).collect();
    let nmi = eval::nmi(&clusters, &labels);
    let linear = if args.linear {
        let bank = b.download(&train)?;
        let cfg = eval::LinearProbeConfig::default();
        let probe = eval::linear_probe(
            &bank,
            labels_train,
            &test,
            labels_test,
            EMBED_DIM,
            classes,
            &cfg,
        )?;
        Some(probe)
    } else {
        None
    };
    if args.json {
        let report = Report {
            knn_top1: knn.top1,
            knn_top5: knn.top5,
            k: args.k,
            sigma: args.sigma,
            recall_at_1: recall[0],
            recall_at_2: recall[1],
            recall_at_4: recall[2],
            recall_at_8: recall[3],
            nmi,
            kmeans_starts: eval::KMEANS_STARTS,
            linear_top1: linear.map(|p| p.test_top1),
            classes: ds.classes.clone(),
            clusters: classes,
        };
        let text = serde_json::to_string(&report)
            .map_err(|e| invaspread::Error::invalid(format!("eval JSON: {e}")))?;
        println!("{text}");
    } else {
        println!(
            "kNN (k={}, sigma={}): top-1 {:.2}%, top-5 {:.2}%",
            args.k,
            args.sigma,
            100.0 * knn.top1,
            100.0 * knn.top5
        );
        println!(
            "Recall@1/2/4/8: {:.2}% {:.2}% {:.2}% {:.2}%",
            100.0 * recall[0],
            100.0 * recall[1],
            100.0 * recall[2],
            100.0 * recall[3]
        );
        println!(
            "NMI (k-means, {classes} clusters, best of {} starts): {nmi:.4}",
            eval::KMEANS_STARTS
        );
        if let Some(p) = linear {
            println!(
                "linear probe top-1: {:.2}% (train split {:.2}%)",
                100.0 * p.test_top1,
                100.0 * p.train_top1
            );
        }
    }
    Ok(())
}
