//! Subcommands of `invaspread`, one module each.

mod bench_loss;
mod bench_ranks;
mod bench_train;
mod checkpoint;
mod data;
mod embed;
mod eval;
mod info;
mod launch;
mod loss;
mod plot;
mod random;
mod ranges;
mod step;
mod train;

use clap::{ArgMatches, Parser, Subcommand};

/// Unsupervised embedding learning with the instance loss of Ye et al. (CVPR 2019):
/// fused CUDA and CPU kernels, training and evaluation.
#[derive(Debug, Parser)]
#[command(name = "invaspread", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// CPU worker threads (default: all cores) [1 <= threads <= 1024].
    #[arg(long, global = true, value_name = "T", value_parser = ranges::threads)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Version, CPU threads, the built kernels and their targets, the CUDA driver and devices.
    Info(info::InfoArgs),
    /// The instance loss (and optionally dL/dz) of an N x d .npy file of raw embeddings.
    Loss(loss::LossArgs),
    /// Train an encoder with the instance loss (metrics, plot and checkpoints in --out).
    Train(train::TrainArgs),
    /// kNN top-1, Recall@1/2/4/8 and k-means NMI of a checkpoint on a dataset's test split.
    Eval(eval::EvalArgs),
    /// Embeddings of a split as a float32 N x 128 .npy (labels beside it).
    Embed(embed::EmbedArgs),
    /// One training step of a checkpoint on a given batch (to compare with another implementation).
    Step(step::StepArgs),
    /// Time every loss implementation on one device and print a markdown table.
    BenchLoss(bench_loss::BenchLossArgs),
    /// Images per second of whole training steps on one device, as a markdown table.
    BenchTrain(bench_train::BenchTrainArgs),
    /// Several runs' kNN per epoch on one chart, with a legend (PNG).
    Plot(plot::PlotArgs),
    /// Start the ranks of a data-parallel group on this machine (as torchrun): `launch --gpus N -- <command>`.
    Launch(launch::LaunchArgs),
    /// Seeded random N x d embeddings as .npy (an input for `loss` and the benchmarks).
    Random(random::RandomArgs),
}

/// Runs the parsed command; `matches` tells which flags were given on the command line (a
/// replayed configuration keeps its own value for every flag that was not).
pub fn run(cli: Cli, matches: &ArgMatches) -> invaspread::Result<()> {
    if let Some(threads) = cli.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global()
            .map_err(|e| invaspread::Error::invalid(format!("--threads {threads}: {e}")))?;
    }
    match cli.command {
        Command::Info(args) => info::run(args),
        Command::Loss(args) => loss::run(args, matches.subcommand_matches("loss")),
        Command::Random(args) => random::run(args),
        Command::BenchLoss(args) => bench_loss::run(args),
        Command::BenchTrain(args) => bench_train::run(args),
        Command::Train(args) => train::run(args, matches.subcommand_matches("train")),
        Command::Eval(args) => eval::run(args),
        Command::Embed(args) => embed::run(args),
        Command::Step(args) => step::run(args),
        Command::Plot(args) => plot::run(args),
        Command::Launch(args) => launch::run(args),
    }
}

pub use invaspread::names::Device;

/// Whether the flag `id` was given on the command line (not a default, not a config file's).
pub(crate) fn on_command_line(matches: Option<&ArgMatches>, id: &str) -> bool {
    use clap::parser::ValueSource;
    matches.is_some_and(|m| m.value_source(id) == Some(ValueSource::CommandLine))
}
