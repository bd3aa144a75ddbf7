//! `invaspread info`: what this binary and this machine offer.

use clap::ValueEnum;
use invaspread::cuda::{self, kernels, Gpu};
use invaspread::loss::{CpuLossVersion, CudaLossVersion};
use invaspread::names::Named;
use invaspread::ops::{batchnorm, conv2d, elementwise, linear, normalize_rows, pool, sgd, topk};

#[derive(Debug, clap::Args)]
pub struct InfoArgs {
    /// Also print ptxas's per-kernel report (registers, spills, shared memory).
    #[arg(long)]
    kernels: bool,
}

pub fn run(args: InfoArgs) -> invaspread::Result<()> {
    println!("invaspread {}", env!("CARGO_PKG_VERSION"));
    println!("cpu threads:   {}", rayon::current_num_threads());
    let levels: Vec<&str> = invaspread::simd::Level::available()
        .into_iter()
        .map(|l| l.name())
        .collect();
    println!(
        "cpu simd:      {} (this CPU runs {}; chosen at run time)",
        invaspread::simd::current_level().name(),
        levels.join(", ")
    );
    if kernels::BUILT {
        let names: Vec<&str> = kernels::MODULES.iter().map(|(name, _)| *name).collect();
        println!("cuda kernels:  built by nvcc ({})", kernels::NVCC_VERSION);
        println!("  targets:     {}", kernels::GENCODE);
        println!("  modules:     {}", names.join(", "));
    } else {
        println!("cuda kernels:  not built ({})", kernels::NOT_BUILT_REASON);
    }
    match cuda::driver_version() {
        Some((major, minor)) => println!("cuda driver:   supports CUDA {major}.{minor}"),
        None => println!("cuda driver:   not found (libcuda is not installed)"),
    }
    // SAFETY: only tries to open the library.
    if unsafe { cudarc::cublas::sys::is_culib_present() } {
        println!("cublas:        found (training with --device cuda needs it)");
    } else {
        println!("cublas:        not found (--device cuda training needs libcublas.so.13 on LD_LIBRARY_PATH)");
    }
    match cuda::device_count() {
        Ok(0) => println!("cuda devices:  none"),
        Ok(count) => {
            for ordinal in 0..count {
                match Gpu::try_new_ordinal(ordinal) {
                    Ok(Some(gpu)) => {
                        let (major, minor) = gpu.compute_capability()?;
                        let mem = gpu.total_memory()? as f64 / (1u64 << 30) as f64;
                        println!(
                            "cuda device {ordinal}: {} (sm_{major}{minor}, {mem:.1} GiB)",
                            gpu.name()?
                        );
                    }
                    Ok(None) => println!("cuda device {ordinal}: unavailable"),
                    Err(e) => println!("cuda device {ordinal}: error: {e}"),
                }
            }
        }
        Err(e) => println!("cuda devices:  error: {e}"),
    }
    let active = if cuda::virtual_gpu::is_active() {
        "in use (INVASPREAD_GPU=virtual)"
    } else {
        "not in use (INVASPREAD_GPU=virtual selects it)"
    };
    match cuda::virtual_gpu::library_dir() {
        Ok(dir) => println!("virtual GPU:   {active}\nvirtual GPU libraries: {dir}"),
        Err(why) => println!("virtual GPU:   {why}"),
    }
    if args.kernels {
        println!();
        print_versions();
        println!();
        if kernels::BUILT {
            println!("ptxas report (-Xptxas -v):");
            print!("{}", kernels::PTXAS_REPORT);
        } else {
            println!("no ptxas report: kernels were not built");
        }
    }
    Ok(())
}

/// Every op's kernel versions, as `train --loss` and `train --kernels` take them.
fn print_versions() {
    fn names<V: ValueEnum>() -> String {
        let names: Vec<String> = V::value_variants().iter().map(|v| v.name()).collect();
        names.join(" ")
    }
    println!("loss versions (--loss of train, loss, bench-loss, bench-train):");
    println!("  cpu:            {}", names::<CpuLossVersion>());
    println!("  cuda:           {}", names::<CudaLossVersion>());
    println!("kernel versions (train --kernels op=version; the last is the default):");
    for (op, versions) in [
        ("conv2d", names::<conv2d::Version>()),
        ("batchnorm", names::<batchnorm::Version>()),
        ("elementwise", names::<elementwise::Version>()),
        ("pool", names::<pool::Version>()),
        ("linear", names::<linear::Version>()),
        ("sgd", names::<sgd::Version>()),
        ("topk", names::<topk::Version>()),
        ("normalize_rows", names::<normalize_rows::Version>()),
    ] {
        println!("  {op:<15} {versions}");
    }
}
