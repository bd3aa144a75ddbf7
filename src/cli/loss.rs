//! `invaspread loss`: the instance loss of a .npy file, and dL/dz on request.

use std::path::PathBuf;

use std::sync::Arc;

use invaspread::cuda::Gpu;
use invaspread::loss::cuda;
use invaspread::loss::{
    cpu, reference, CpuLossVersion, GradSemantics, LossConfig, LossVersion, NegativeScale,
    Negatives,
};
use invaspread::{npy, Error};

use super::Device;

#[derive(Debug, clap::Args)]
pub struct LossArgs {
    /// N x d raw embeddings, float32 or float64, C order; rows 0..N/2 are view A, N/2..N view B.
    #[arg(long, value_name = "Z.npy")]
    input: PathBuf,
    /// Temperature [0.025 <= tau <= 100].
    #[arg(long, default_value_t = 0.1, value_parser = super::ranges::tau, allow_negative_numbers = true)]
    tau: f64,
    /// Weight of the negatives (negM) [1 <= mu <= 1000].
    #[arg(long, default_value_t = 1.0, value_parser = super::ranges::mu, allow_negative_numbers = true)]
    mu: f64,
    /// Which gradient --grad-out holds.
    #[arg(long, value_enum, default_value_t = GradSemantics::QueryOnly)]
    grad_semantics: GradSemantics,
    /// Write dL/dz (with respect to the raw input) here as float32 N x d.
    #[arg(long, value_name = "G.npy")]
    grad_out: Option<PathBuf>,
    /// Where to compute.
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    device: Device,
    /// The loss implementation (default: fused-f64 on the CPU, the loss to full float64
    /// accuracy; fused-v2 on CUDA).
    #[arg(long, value_enum)]
    loss: Option<LossVersion>,
    #[command(flatten)]
    negatives: NegativeArgs,
}

pub fn run(args: LossArgs, matches: Option<&clap::ArgMatches>) -> invaspread::Result<()> {
    if args.negatives.negatives == NegativesArg::All {
        for id in ["negative_fraction", "negative_scale"] {
            if super::on_command_line(matches, id) {
                return Err(invaspread::Error::invalid(format!(
                    "--{} has no effect without --negatives hard|easy (all negatives are kept)",
                    id.replace('_', "-")
                )));
            }
        }
    }
    let cfg = LossConfig {
        tau: args.tau,
        mu: args.mu,
        semantics: args.grad_semantics,
        negatives: args.negatives.choice(),
    };
    cfg.validate()?;
    let version = match (args.loss, args.device) {
        (Some(v), device) => v.for_device(device, "--loss")?,
        (None, Device::Cpu) => LossVersion::Cpu(CpuLossVersion::FusedF64),
        (None, Device::Cuda) => LossVersion::default_on(Device::Cuda),
    };
    version.supports(&cfg)?;
    let (n, d, array) = npy::read_matrix(&args.input)?;
    let with_grad = args.grad_out.is_some();
    let in_file = |e: Error| e.in_file(&args.input);
    let as_f32 = |g: Option<Vec<f64>>| g.map(|g| g.iter().map(|&x| x as f32).collect());
    let (loss, grad): (f64, Option<Vec<f32>>) = match version {
        LossVersion::Cpu(CpuLossVersion::Reference) => {
            let out = reference::instance_loss(&array.to_f64(), n, d, &cfg, with_grad)
                .map_err(in_file)?;
            (out.loss, as_f32(out.grad_z))
        }
        LossVersion::Cpu(CpuLossVersion::FusedF64) => {
            let out =
                cpu::instance_loss(&array.to_f64(), n, d, &cfg, with_grad).map_err(in_file)?;
            (out.loss, as_f32(out.grad_z))
        }
        LossVersion::Cpu(CpuLossVersion::Fused) => {
            let out =
                cpu::instance_loss(&array.to_f32(), n, d, &cfg, with_grad).map_err(in_file)?;
            (out.loss, out.grad_z)
        }
        LossVersion::Cuda(kernel) => {
            let gpu = Arc::new(Gpu::require()?);
            cuda::instance_loss(gpu, kernel, &array.to_f32(), n, d, &cfg, with_grad)
                .map_err(in_file)?
        }
    };
    println!("{loss}");
    if let (Some(path), Some(grad)) = (&args.grad_out, grad) {
        npy::write(path, &[n, d], &grad)?;
    }
    Ok(())
}

/// Which negatives enter the loss, as `--negatives` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NegativesArg {
    /// Every negative (the method).
    All,
    /// The fraction of each query's negatives of highest similarity (the paper's ablation).
    Hard,
    /// The fraction of lowest similarity.
    Easy,
}

/// `--negatives`, `--negative-fraction` and `--negative-scale`, shared by `train` and `loss`.
#[derive(Debug, Clone, clap::Args)]
pub struct NegativeArgs {
    /// Which of each query's negatives enter its loss term: all, or the hard or easy
    /// --negative-fraction F of them (the official code's first version, negM = F).
    #[arg(long, value_enum, default_value_t = NegativesArg::All)]
    pub negatives: NegativesArg,
    /// The share F of negatives kept by --negatives hard|easy [0 < negative_fraction <= 1].
    #[arg(long, default_value_t = 0.5, value_parser = super::ranges::negative_fraction)]
    pub negative_fraction: f64,
    /// How a hard/easy loss is scaled: official (floor(N F) kept, -(A + F B) / (kept + 1), as
    /// the authors' code) or mean (round(F (N - 2)) kept, each row / (kept + 1) in the mean
    /// over rows: this crate's form before 2026-12).
    #[arg(long, value_enum, default_value_t = NegativeScale::Official)]
    pub negative_scale: NegativeScale,
}

impl NegativeArgs {
    pub fn choice(&self) -> Negatives {
        let fraction = self.negative_fraction;
        match self.negatives {
            NegativesArg::All => Negatives::All,
            NegativesArg::Hard => Negatives::hard(fraction),
            NegativesArg::Easy => Negatives::easy(fraction),
        }
        .with_scale(self.negative_scale)
    }
}
