//! `invaspread embed`: the embeddings of a split as a float32 N x 128 .npy, labels beside it.

use std::path::PathBuf;

use invaspread::backend::Cpu;
use invaspread::nn::embed::embed_split_host;
use invaspread::nn::models::EMBED_DIM;
use invaspread::nn::Encoder;
use invaspread::npy;

use super::data::DataArgs;
use super::eval::cuda_backend;
use super::{checkpoint, Device};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SplitArg {
    Train,
    Test,
}

#[derive(Debug, clap::Args)]
pub struct EmbedArgs {
    #[arg(long)]
    checkpoint: PathBuf,
    #[command(flatten)]
    data: DataArgs,
    #[arg(long, value_enum, default_value_t = SplitArg::Test)]
    split: SplitArg,
    /// Output: float32 N x 128; the labels go to a sibling .labels.npy (int64).
    #[arg(long, value_name = "E.npy")]
    out: PathBuf,
    /// Also draw the embeddings' projection on their first two principal components,
    /// coloured by class, into this PNG.
    #[arg(long, value_name = "FILE.png")]
    png: Option<PathBuf>,
    /// Where the encoder runs.
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    device: Device,
}

pub fn run(args: EmbedArgs) -> invaspread::Result<()> {
    match args.device {
        Device::Cpu => embed_on(args, Cpu::<f32>::new()),
        Device::Cuda => embed_on(args, cuda_backend()?),
    }
}

fn embed_on<B: Encoder>(args: EmbedArgs, backend: B) -> invaspread::Result<()> {
    let (mut graph, model, meta) = checkpoint::load_with_metadata(&args.checkpoint, backend)?;
    let ds = checkpoint::dataset_for(&args.data, &meta, &args.checkpoint)?;
    // Before the work: no output may be the checkpoint just read (the writes check again).
    let labels_path = args.out.with_extension("labels.npy");
    for out in [Some(&args.out), Some(&labels_path), args.png.as_ref()]
        .into_iter()
        .flatten()
    {
        invaspread::files::check_output(out)?;
    }
    let split = if args.split == SplitArg::Train {
        &ds.train
    } else {
        &ds.test
    };
    let emb = embed_split_host(&mut graph, &model, split, ds.size)?;
    npy::write(&args.out, &[split.len(), EMBED_DIM], &emb)?;
    npy::write(&labels_path, &[split.len()], &split.labels)?;
    eprintln!("wrote {} and {}", args.out.display(), labels_path.display());
    if let Some(png) = &args.png {
        let p = invaspread::eval::pca_2d(&emb, EMBED_DIM)?;
        let split_name = if args.split == SplitArg::Train {
            "train"
        } else {
            "test"
        };
        let caption = format!(
            "{} {split_name} split, {} embeddings: PCA",
            ds.name,
            split.len()
        );
        let axes = (
            format!("PC 1 ({:.1}% of the variance)", 100.0 * p.explained[0]),
            format!("PC 2 ({:.1}% of the variance)", 100.0 * p.explained[1]),
        );
        invaspread::plot::scatter_png(
            &p.points,
            &split.labels,
            &ds.classes,
            &caption,
            (&axes.0, &axes.1),
            png,
        )?;
        eprintln!("wrote {}", png.display());
    }
    Ok(())
}
