//! Compiles every `kernels/*.cu` into a fat binary that cudarc loads at run time, and embeds it.
//!
//! - nvcc is looked for in `$NVCC`, `$CUDA_HOME/bin`, `PATH`, then `.cuda-compiler/` (filled by
//!   `scripts/install-cuda-compiler`).
//! - Targets: `INVASPREAD_CUDA_GENCODE`, a `;`-separated list of nvcc `-gencode` values. The
//!   default embeds PTX for compute_80 (JIT-compiled by any newer driver) and machine code for
//!   sm_90 (H100/H200, no JIT at load).
//! - Warnings are errors, and so is any register spill in ptxas's report; the report itself is
//!   embedded so that `invaspread info --kernels` prints it.
//! - The virtual GPU (vgpu/, `INVASPREAD_GPU=virtual`) is built with the system C++ compiler
//!   into `$OUT_DIR/vgpu`; without one the build succeeds with a cargo warning, and selecting the
//!   virtual GPU is then an error saying so.
//! - Without nvcc the build succeeds with one cargo warning and the library reports at run time
//!   that kernels were not built. `INVASPREAD_REQUIRE_KERNELS=1` turns that into a build error.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

mod vgpu_build {
    include!("vgpu/build_vgpu.rs");
}

const DEFAULT_GENCODE: &str = "arch=compute_80,code=compute_80;arch=compute_90,code=sm_90";

fn main() {
    let root =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let kernels_dir = root.join("kernels");

    for var in [
        "NVCC",
        "CUDA_HOME",
        "INVASPREAD_CUDA_GENCODE",
        "INVASPREAD_REQUIRE_KERNELS",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-changed=kernels");
    // The install script writes its stamp last, so a finished install reruns this script.
    println!("cargo:rerun-if-changed=.cuda-compiler");

    // `INVASPREAD_CHECK_ONLY=1 cargo clippy`: nothing runs from a check build, so the kernels
    // and the virtual GPU are not compiled for it (CI's lint step; the test build compiles them).
    println!("cargo:rerun-if-env-changed=INVASPREAD_CHECK_ONLY");
    if env::var("INVASPREAD_CHECK_ONLY").is_ok_and(|v| v == "1") {
        let msg = "INVASPREAD_CHECK_ONLY=1: a check build, the kernels were not compiled";
        fs::write(out_dir.join("kernels_generated.rs"), not_built_module(msg))
            .expect("write kernels_generated.rs");
        fs::write(
            out_dir.join("vgpu_generated.rs"),
            format!("pub const DIR: Result<&str, &str> = Err({msg:?});\n"),
        )
        .expect("write vgpu_generated.rs");
        return;
    }
    let require = env::var("INVASPREAD_REQUIRE_KERNELS").is_ok_and(|v| v == "1");
    let gencode =
        env::var("INVASPREAD_CUDA_GENCODE").unwrap_or_else(|_| DEFAULT_GENCODE.to_string());
    let sources = kernel_sources(&kernels_dir);

    let generated = match find_nvcc(&root) {
        None => {
            let msg =
                "nvcc not found ($NVCC, $CUDA_HOME/bin, PATH, .cuda-compiler/): CUDA kernels \
                       are not built; run scripts/install-cuda-compiler and build again";
            if require {
                panic!("INVASPREAD_REQUIRE_KERNELS=1 but {msg}");
            }
            println!("cargo:warning={msg}");
            not_built_module(msg)
        }
        Some(nvcc) => match compile_all(&nvcc, &sources, &gencode, &out_dir) {
            Ok(module) => module,
            Err(err) => panic!("kernel build failed with {}:\n{err}", nvcc.display()),
        },
    };
    fs::write(out_dir.join("kernels_generated.rs"), generated).expect("write kernels_generated.rs");

    println!("cargo:rerun-if-changed=vgpu");
    println!("cargo:rerun-if-env-changed=CXX");
    let vgpu_dir = out_dir.join("vgpu");
    let vgpu = match vgpu_build::find_cxx() {
        None => {
            Err("no C++ compiler ($CXX, c++, g++) was found when invaspread was built".to_string())
        }
        Some(cxx) => {
            vgpu_build::build_virtual_gpu(&cxx, &root.join("vgpu"), &kernels_dir, &vgpu_dir, false)
        }
    };
    let generated = match vgpu {
        Ok(()) => format!(
            "/// The folder of the virtual GPU's libraries (libcuda.so, libcublas.so, libnccl.so, libvgpu_kernels.so).\n\
             pub const DIR: Result<&str, &str> = Ok({:?});\n",
            vgpu_dir.display().to_string()
        ),
        Err(e) => {
            println!("cargo:warning=the virtual GPU was not built: {}", e.lines().next().unwrap_or(""));
            format!(
                "/// The folder of the virtual GPU's libraries, or why it was not built.\n\
                 pub const DIR: Result<&str, &str> = Err({e:?});\n"
            )
        }
    };
    fs::write(out_dir.join("vgpu_generated.rs"), generated).expect("write vgpu_generated.rs");
}

fn kernel_sources(dir: &Path) -> Vec<PathBuf> {
    let mut sources: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|ext| ext == "cu"))
        .collect();
    sources.sort();
    sources
}

fn find_nvcc(root: &Path) -> Option<PathBuf> {
    let runs = |p: &Path| {
        Command::new(p)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if let Ok(p) = env::var("NVCC") {
        return Some(PathBuf::from(p)).filter(|p| runs(p));
    }
    let mut candidates = Vec::new();
    if let Ok(home) = env::var("CUDA_HOME") {
        candidates.push(Path::new(&home).join("bin/nvcc"));
    }
    if let Some(path) = env::var_os("PATH") {
        candidates.extend(env::split_paths(&path).map(|dir| dir.join("nvcc")));
    }
    candidates.push(root.join(".cuda-compiler/nvidia/cu13/bin/nvcc"));
    candidates.into_iter().find(|p| p.is_file() && runs(p))
}

struct Compiled {
    stem: String,
    fatbin: PathBuf,
    ptxas_report: String,
}

fn compile_all(
    nvcc: &Path,
    sources: &[PathBuf],
    gencode: &str,
    out_dir: &Path,
) -> Result<String, String> {
    let version = Command::new(nvcc)
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .last()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default();
    let mut compiled = Vec::new();
    for src in sources {
        compiled.push(compile_one(nvcc, src, gencode, out_dir)?);
    }
    let spills = spilling_kernels(&compiled);
    if !spills.is_empty() {
        return Err(format!(
            "register spills (not allowed):\n{}",
            spills.join("\n")
        ));
    }

    let mut code = String::new();
    code.push_str(
        "/// Kernels were compiled by nvcc at build time.\npub const BUILT: bool = true;\n",
    );
    writeln!(code, "/// Why kernels are missing (empty when they were built).\npub const NOT_BUILT_REASON: &str = \"\";").unwrap();
    writeln!(
        code,
        "/// The nvcc that built them.\npub const NVCC_VERSION: &str = {version:?};"
    )
    .unwrap();
    writeln!(
        code,
        "/// nvcc -gencode targets, `;`-separated.\npub const GENCODE: &str = {gencode:?};"
    )
    .unwrap();
    code.push_str("/// (module name, fat binary) for every kernels/*.cu.\npub const MODULES: &[(&str, &[u8])] = &[\n");
    for c in &compiled {
        writeln!(
            code,
            "    ({:?}, include_bytes!({:?})),",
            c.stem,
            c.fatbin.display().to_string()
        )
        .unwrap();
    }
    code.push_str("];\n");
    let report: String = compiled
        .iter()
        .map(|c| format!("== kernels/{}.cu\n{}", c.stem, c.ptxas_report))
        .collect();
    writeln!(code, "/// ptxas -v output (registers, spills, shared memory per kernel).\npub const PTXAS_REPORT: &str = {report:?};").unwrap();
    Ok(code)
}

fn compile_one(nvcc: &Path, src: &Path, gencode: &str, out_dir: &Path) -> Result<Compiled, String> {
    let stem = src
        .file_stem()
        .and_then(|s| s.to_str())
        .ok_or("kernel file name is not UTF-8")?
        .to_string();
    let fatbin = out_dir.join(format!("{stem}.fatbin"));
    let mut cmd = Command::new(nvcc);
    cmd.arg("-fatbin")
        .args(["-std=c++17", "-O3", "-lineinfo"])
        .args(["-Werror", "all-warnings"])
        .args(["-Xptxas", "-v,--warn-on-spills,--warning-as-error"])
        .arg("-I")
        .arg(src.parent().unwrap_or(Path::new(".")));
    for code in gencode.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        cmd.arg(format!("-gencode={code}"));
    }
    cmd.arg("-o").arg(&fatbin).arg(src);
    let output = cmd
        .output()
        .map_err(|e| format!("cannot run {}: {e}", nvcc.display()))?;
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    if !output.status.success() {
        return Err(format!(
            "{} failed:\n{}{}",
            src.display(),
            String::from_utf8_lossy(&output.stdout),
            stderr
        ));
    }
    Ok(Compiled {
        stem,
        fatbin,
        ptxas_report: stderr,
    })
}

/// ptxas prints "N bytes spill stores, M bytes spill loads" per kernel; any non-zero is a spill.
fn spilling_kernels(compiled: &[Compiled]) -> Vec<String> {
    let mut spills = Vec::new();
    for c in compiled {
        let mut current = String::new();
        for line in c.ptxas_report.lines() {
            if let Some(rest) = line.split("Compiling entry function '").nth(1) {
                current = rest.split('\'').next().unwrap_or("").to_string();
            }
            if line.contains("spill stores")
                && !line.contains(" 0 bytes spill stores, 0 bytes spill loads")
            {
                spills.push(format!("kernels/{}.cu: {current}: {}", c.stem, line.trim()));
            }
        }
    }
    spills
}

fn not_built_module(reason: &str) -> String {
    format!(
        "/// Kernels were compiled by nvcc at build time.\npub const BUILT: bool = false;\n\
         /// Why kernels are missing (empty when they were built).\npub const NOT_BUILT_REASON: &str = {reason:?};\n\
         /// The nvcc that built them.\npub const NVCC_VERSION: &str = \"\";\n\
         /// nvcc -gencode targets, `;`-separated.\npub const GENCODE: &str = \"\";\n\
         /// (module name, fat binary) for every kernels/*.cu.\npub const MODULES: &[(&str, &[u8])] = &[];\n\
         /// ptxas -v output (registers, spills, shared memory per kernel).\npub const PTXAS_REPORT: &str = \"\";\n"
    )
}
