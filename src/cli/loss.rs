//! `invaspread loss`: the instance loss of a .npy file, and dL/dz on request.

use std::path::PathBuf;

use invaspread::loss::{reference, GradSemantics, LossConfig};
use invaspread::{npy, Error};

use super::Device;

#[derive(Debug, clap::Args)]
pub struct LossArgs {
    /// N x d raw embeddings, float32 or float64, C order; rows 0..N/2 are view A, N/2..N view B.
    #[arg(long, value_name = "Z.npy")]
    input: PathBuf,
    /// Temperature.
    #[arg(long, default_value_t = 0.1)]
    tau: f64,
    /// Weight of the negatives (negM); at least 1.
    #[arg(long, default_value_t = 1.0)]
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
}

pub fn run(args: LossArgs) -> invaspread::Result<()> {
    let cfg = LossConfig {
        tau: args.tau,
        mu: args.mu,
        semantics: args.grad_semantics,
    };
    cfg.validate()?;
    let (n, d, array) = npy::read_matrix(&args.input)?;
    let z = array.to_f64();
    let with_grad = args.grad_out.is_some();
    let out = match args.device {
        Device::Cpu => reference::instance_loss(&z, n, d, &cfg, with_grad)
            .map_err(|e| e.in_file(&args.input))?,
        Device::Cuda => {
            return Err(Error::InvalidInput(
                "--device cuda: the loss kernels are not implemented yet; use --device cpu".into(),
            ))
        }
    };
    println!("{}", out.loss);
    if let (Some(path), Some(grad)) = (&args.grad_out, &out.grad_z) {
        let grad32: Vec<f32> = grad.iter().map(|&x| x as f32).collect();
        npy::write(path, &[n, d], &grad32)?;
    }
    Ok(())
}
