// Builds the virtual GPU (vgpu/) with the system C++ compiler: the kernel library
// (libvgpu_kernels.so: every kernels/*.cu on emu.h, instrumented, plus engine.cpp), the driver
// (libcuda.so), the cuBLAS stand-in (libcublas.so) and the NCCL stand-in (libnccl.so). Included by build.rs, and by the tests
// that build a copy with a planted bug (tests/emulated/virtual_gpu.rs), so there is one recipe.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The names of every `extern "C" __global__` kernel in `source` (a .cu file; the tests' list).
#[allow(dead_code)] // build.rs uses kernel_bounds
pub fn kernel_names(source: &str) -> Vec<String> {
    kernel_bounds(source)
        .into_iter()
        .map(|(name, _)| name)
        .collect()
}

/// Every `extern "C" __global__` kernel in `source` with its `__launch_bounds__` thread bound
/// (the first argument, a C++ expression such as `256` or `BN_THREADS`; None without one).
pub fn kernel_bounds(source: &str) -> Vec<(String, Option<String>)> {
    let mut kernels = Vec::new();
    for (i, _) in source.match_indices("extern \"C\" __global__ void") {
        let mut rest = source[i + "extern \"C\" __global__ void".len()..].trim_start();
        let mut bound = None;
        if let Some(after) = rest.strip_prefix("__launch_bounds__(") {
            let close = after.find(')').unwrap_or(0);
            let args = &after[..close];
            bound = Some(args.split(',').next().unwrap_or(args).trim().to_string());
            rest = after[(close + 1).min(after.len())..].trim_start();
        }
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            kernels.push((name, bound));
        }
    }
    kernels
}

/// Every `*.cu` in `kernels`, sorted.
pub fn kernel_files(kernels: &Path) -> Result<Vec<PathBuf>, String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(kernels)
        .map_err(|e| format!("{}: {e}", kernels.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    files.sort();
    Ok(files)
}

/// The C++ compiler: `$CXX`, else `c++`, else `g++`, when it runs.
pub fn find_cxx() -> Option<String> {
    let candidates = std::env::var("CXX")
        .into_iter()
        .chain(["c++".to_string(), "g++".to_string()]);
    candidates.into_iter().find(|c| {
        Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Builds the three libraries into `out` from `vgpu` (the sources) and `kernels` (the .cu files;
/// a test passes a copy with a planted bug). Only the kernel library when `kernels_only`.
pub fn build_virtual_gpu(
    cxx: &str,
    vgpu: &Path,
    kernels: &Path,
    out: &Path,
    kernels_only: bool,
) -> Result<(), String> {
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let files = kernel_files(kernels)?;
    let mut sources = String::new();
    let mut table = String::new();
    for f in &files {
        sources.push_str(&format!("#include \"{}\"\n", f.display()));
        let text = std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?;
        // A kernel's bound goes into the table (evaluated where its source is included), so
        // the driver refuses a larger block as the hardware does; 1024 without one.
        for (name, bound) in kernel_bounds(&text) {
            let bound = bound.unwrap_or_else(|| "1024".into());
            table.push_str(&format!("    KERNEL({name}, {bound}),\n"));
        }
    }
    let write = |name: &str, text: &str| {
        std::fs::write(out.join(name), text).map_err(|e| format!("{name}: {e}"))
    };
    write("kernel_sources.inc", &sources)?;
    write("kernel_table.inc", &table)?;

    let common = |cmd: &mut Command| {
        cmd.args([
            "-std=c++20",
            "-g",
            "-fPIC",
            "-pthread",
            "-Wall",
            "-Wno-unknown-pragmas",
        ])
        .arg("-I")
        .arg(vgpu)
        .arg("-I")
        .arg(out);
    };
    // The kernels with -fsanitize=thread's instrumentation only (engine.cpp is its runtime):
    // every load and store calls the memcheck and racecheck.
    let mut kernels_cmd = Command::new(cxx);
    common(&mut kernels_cmd);
    kernels_cmd
        .args([
            "-O1",
            "-fvisibility=hidden",
            "-fsanitize=thread",
            "--param=tsan-instrument-func-entry-exit=0",
            "-Wno-tsan",
        ])
        .arg("-I")
        .arg(kernels)
        .arg("-c")
        .arg(vgpu.join("kernels.cpp"))
        .arg("-o")
        .arg(out.join("kernels.o"));
    let mut engine_cmd = Command::new(cxx);
    common(&mut engine_cmd);
    engine_cmd
        .args(["-O2", "-fvisibility=hidden"])
        .arg("-c")
        .arg(vgpu.join("engine.cpp"))
        .arg("-o")
        .arg(out.join("engine.o"));
    let mut driver_cmd = Command::new(cxx);
    common(&mut driver_cmd);
    driver_cmd
        .args(["-O2", "-shared", "-Wl,-soname,libcuda.so", "-Wl,-z,defs"])
        .arg(vgpu.join("driver.cpp"))
        .arg("-o")
        .arg(out.join("libcuda.so"))
        .arg("-ldl");

    // The kernel TU dominates; the others compile beside it.
    let (kernels_res, rest) = std::thread::scope(|s| {
        let k = s.spawn(|| run(&mut kernels_cmd));
        let rest = if kernels_only {
            run(&mut engine_cmd)
        } else {
            run(&mut engine_cmd).and_then(|_| run(&mut driver_cmd))
        };
        (
            k.join()
                .unwrap_or_else(|_| Err("compiler thread panicked".into())),
            rest,
        )
    });
    kernels_res?;
    rest?;
    run(Command::new(cxx)
        .args(["-shared", "-pthread", "-Wl,-z,defs", "-o"])
        .arg(out.join("libvgpu_kernels.so"))
        .arg(out.join("kernels.o"))
        .arg(out.join("engine.o"))
        .arg("-ldl"))?;
    if !kernels_only {
        let mut blas_cmd = Command::new(cxx);
        common(&mut blas_cmd);
        run(blas_cmd
            .args([
                "-O3",
                "-shared",
                "-Wl,-soname,libcublas.so",
                "-Wl,-rpath,$ORIGIN",
            ])
            .arg(vgpu.join("cublas.cpp"))
            .arg("-o")
            .arg(out.join("libcublas.so"))
            .arg(out.join("libcuda.so")))?;
        let mut nccl_cmd = Command::new(cxx);
        common(&mut nccl_cmd);
        run(nccl_cmd
            .args([
                "-O2",
                "-shared",
                "-Wl,-soname,libnccl.so",
                "-Wl,-rpath,$ORIGIN",
            ])
            .arg(vgpu.join("nccl.cpp"))
            .arg("-o")
            .arg(out.join("libnccl.so"))
            .arg(out.join("libcuda.so")))?;
    }
    Ok(())
}
