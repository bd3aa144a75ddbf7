//! `invaspread random`: seeded random embeddings as .npy, an input for `loss` and benchmarks.

use std::path::PathBuf;

use invaspread::rng::{random_matrix, rng};
use invaspread::{npy, Error};

#[derive(Debug, clap::Args)]
pub struct RandomArgs {
    /// Rows (an even number: two views of N/2 images).
    #[arg(long, default_value_t = 256)]
    n: usize,
    /// Columns (the embedding dimension).
    #[arg(long, default_value_t = 128)]
    d: usize,
    /// Seed of the generator; the same seed gives the same file.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write float64 instead of float32.
    #[arg(long)]
    f64: bool,
    /// Output .npy file.
    #[arg(long, value_name = "Z.npy")]
    out: PathBuf,
}

pub fn run(args: RandomArgs) -> invaspread::Result<()> {
    if args.n == 0 || args.d == 0 {
        return Err(Error::InvalidInput(format!(
            "--n {} --d {}: expected both >= 1",
            args.n, args.d
        )));
    }
    let z = random_matrix(&mut rng(args.seed), args.n, args.d);
    if args.f64 {
        let z64: Vec<f64> = z.iter().map(|&x| f64::from(x)).collect();
        npy::write(&args.out, &[args.n, args.d], &z64)?;
    } else {
        npy::write(&args.out, &[args.n, args.d], &z)?;
    }
    eprintln!(
        "wrote {} x {} {} to {}",
        args.n,
        args.d,
        if args.f64 { "float64" } else { "float32" },
        args.out.display()
    );
    Ok(())
}
