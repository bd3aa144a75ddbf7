//! `invaspread random`: seeded random embeddings as .npy, an input for `loss` and benchmarks.

use std::path::PathBuf;

use invaspread::rng::{random_matrix, rng};
use invaspread::{npy, Error};

#[derive(Debug, clap::Args)]
pub struct RandomArgs {
    /// Rows (an even number: two views of N/2 images) [2 <= n <= 16777216].
    #[arg(long, default_value_t = 256, value_parser = super::ranges::rows)]
    n: usize,
    /// Columns (the embedding dimension) [1 <= d <= 65536].
    #[arg(long, default_value_t = 128, value_parser = super::ranges::dim)]
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
    // float32 rows, then a float64 copy when asked for: checked before anything is allocated.
    let per_element = if args.f64 { 12 } else { 4 };
    invaspread::limits::check_allocation(
        &format!("random --n {} --d {}", args.n, args.d),
        (args.n as u64)
            .checked_mul(args.d as u64)
            .and_then(|e| e.checked_mul(per_element)),
    )?;
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
