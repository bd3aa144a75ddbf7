//! `invaspread step`: one training step of a checkpoint on a given batch (fresh SGD state, the
//! recipe's hyper-parameters), to compare the whole step with another implementation.

use std::collections::HashMap;
use std::path::PathBuf;

use invaspread::backend::{Backend, Cpu};
use invaspread::loss::LossConfig;
use invaspread::names::Named;
use invaspread::nn::checkpoint as nn_checkpoint;
use invaspread::nn::optim::{Sgd, SgdConfig};
use invaspread::nn::step::train_step;
use invaspread::ops::conv2d::CpuVersion;
use invaspread::ops::Shape4;
use invaspread::{npy, Error};

use super::checkpoint;

#[derive(Debug, clap::Args)]
pub struct StepArgs {
    /// The model before the step (a checkpoint written by `train`).
    #[arg(long)]
    checkpoint: PathBuf,
    /// The batch: float32 N x 3 x H x W, already normalized; rows 0..N/2 view A, N/2..N view B.
    #[arg(long, value_name = "X.npy")]
    input: PathBuf,
    /// Where to write the model after the step.
    #[arg(long)]
    out: PathBuf,
    /// Learning rate [0 < lr <= 10].
    #[arg(long, default_value_t = SgdConfig::default().lr, value_parser = super::ranges::lr, allow_negative_numbers = true)]
    lr: f64,
    /// Temperature [0.025 <= tau <= 100].
    #[arg(long, default_value_t = LossConfig::default().tau, value_parser = super::ranges::tau, allow_negative_numbers = true)]
    tau: f64,
    /// The convolution's version (as `train --cpu-conv`).
    #[arg(long, value_enum, default_value_t = CpuVersion::Winograd)]
    cpu_conv: CpuVersion,
}

pub fn run(args: StepArgs) -> invaspread::Result<()> {
    let (mut graph, model) = checkpoint::load(
        &args.checkpoint,
        Cpu::<f32>::new().with_option(args.cpu_conv),
    )?;
    let array = npy::read(&args.input)?;
    let shape = match array.shape[..] {
        [n, 3, h, w] => Shape4 { n, c: 3, h, w },
        _ => {
            return Err(Error::bad_file(
                &args.input,
                format!("shape {:?}, expected N x 3 x H x W", array.shape),
            ))
        }
    };
    let mut sgd = Sgd::new(SgdConfig {
        lr: args.lr,
        ..SgdConfig::default()
    });
    let cfg = LossConfig {
        tau: args.tau,
        ..LossConfig::default()
    };
    let loss = train_step(
        &mut graph,
        &model,
        &mut sgd,
        &array.to_f32(),
        shape,
        &cfg,
        args.lr,
    )
    .map_err(|e| e.in_file(&args.input))?;
    println!("{loss}");
    let meta = HashMap::from([
        ("model".to_string(), model.kind.name()),
        ("format".to_string(), "pt".to_string()),
    ]);
    nn_checkpoint::save_model(&graph.params, &graph.backend, &args.out, meta)
}
