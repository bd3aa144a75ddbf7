//! The virtual GPU's own checks, shown to work on planted bugs: a copy of kernels/ with one bug
//! is built into a kernel library (vgpu/build_vgpu.rs, the recipe build.rs uses), and a child
//! process runs the crate's own launcher on it through the unchanged CUDA path
//! (`INVASPREAD_GPU=virtual`, `INVASPREAD_VGPU_KERNELS=` the planted library). The report must
//! name the kernel, block, thread, address or shared-memory offset, and the source line.
//!
//! Skips (`SKIPPED (no virtual GPU)`) when build.rs could not build the virtual GPU; fails then
//! under REQUIRE_GPU=1.

use crate::common;
use crate::emulator::build_vgpu as vgpu_build;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use invaspread::cuda::{virtual_gpu, DevPtr, DevPtrMut, Gpu};

fn built_or_skip(test: &str) -> bool {
    match virtual_gpu::library_dir() {
        Ok(_) => true,
        Err(why) if std::env::var("REQUIRE_GPU").is_ok_and(|v| v == "1") => {
            panic!("REQUIRE_GPU=1 but the virtual GPU was not built: {why}")
        }
        Err(why) => {
            eprintln!("SKIPPED (no virtual GPU): {test} ({why})");
            false
        }
    }
}

/// kernels/ copied into a fresh folder with `file`'s text `from` replaced by `to` (which must
/// occur), built into a kernel library; returns its path.
fn planted_library(tag: &str, file: &str, from: &str, to: &str) -> PathBuf {
    let repo = common::repo();
    let dir = std::env::temp_dir().join(format!("invaspread-planted-{tag}-{}", std::process::id()));
    let kernels = dir.join("kernels");
    std::fs::create_dir_all(&kernels).unwrap();
    for entry in std::fs::read_dir(repo.join("kernels")).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, kernels.join(path.file_name().unwrap())).unwrap();
        }
    }
    let target = kernels.join(file);
    let text = std::fs::read_to_string(&target).unwrap();
    assert!(
        text.contains(from),
        "{file} no longer contains {from:?}: update the planted bug"
    );
    std::fs::write(&target, text.replacen(from, to, 1)).unwrap();
    let cxx = vgpu_build::find_cxx().expect("a C++ compiler (the virtual GPU was built with one)");
    let out = dir.join("build");
    vgpu_build::build_virtual_gpu(&cxx, &repo.join("vgpu"), &kernels, &out, true)
        .unwrap_or_else(|e| panic!("building the planted kernel library: {e}"));
    out.join("libvgpu_kernels.so")
}

/// Runs this test binary's ignored `child` test for `case` on the virtual GPU, with `library`
/// as its kernel library (or the built one) and the streams' and blocks' seed (or the default).
fn run_child(case: &str, library: Option<&Path>, seed: Option<&str>) -> Output {
    run_child_with(case, library, seed, &[])
}

fn run_child_with(
    case: &str,
    library: Option<&Path>,
    seed: Option<&str>,
    env: &[(&str, &str)],
) -> Output {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new(exe);
    cmd.args([
        "virtual_gpu::child",
        "--exact",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("INVASPREAD_GPU", "virtual")
    .env("INVASPREAD_VGPU_CHILD", case);
    if let Some(lib) = library {
        cmd.env("INVASPREAD_VGPU_KERNELS", lib);
    }
    if let Some(seed) = seed {
        cmd.env("INVASPREAD_VGPU_SEED", seed);
    }
    cmd.envs(env.iter().copied());
    cmd.output().expect("run the child test")
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_reports(out: &Output, needles: &[&str]) {
    let err = stderr_of(out);
    for needle in needles {
        assert!(
            err.contains(needle),
            "expected {needle:?} in the child's stderr:\n{err}"
        );
    }
}

/// The unchanged kernel library runs `case` with no report, and its result starts `result`.
fn assert_clean(case: &str, result: &str) {
    let err = stderr_of(&run_child(case, None, None));
    assert!(
        !err.contains("memcheck") && !err.contains("racecheck") && err.contains(result),
        "the clean kernel library reported:\n{err}"
    );
}

/// The child's side: one launch through the crate's launcher; prints what the sync returned.
#[test]
#[ignore = "run by the planted-bug tests in a child process"]
fn child() {
    let case = std::env::var("INVASPREAD_VGPU_CHILD").expect("run by the planted-bug tests");
    let gpu = std::sync::Arc::new(Gpu::try_new().unwrap().expect("the virtual GPU"));
    assert!(gpu.is_virtual());
    let stream = gpu.stream().clone();
    match case.as_str() {
        "normalize" => {
            let (n, d) = (13usize, 7usize);
            let z = stream.clone_htod(&vec![1.0f32; n * d]).unwrap();
            let mut f = stream.alloc_zeros::<f32>(n * d).unwrap();
            let mut norms = stream.alloc_zeros::<f32>(n).unwrap();
            use invaspread::ops::normalize_rows;
            normalize_rows::cuda::forward(
                &*gpu,
                normalize_rows::Version::V1,
                DevPtr::of(&z),
                DevPtrMut::of(&mut f),
                DevPtrMut::of(&mut norms),
                (n, d),
            )
            .unwrap();
            let got = stream.clone_dtoh(&norms);
            eprintln!("child result: {got:?}");
        }
        "mean" => {
            let x: Vec<f64> = (0..1000).map(f64::from).collect();
            let x = stream.clone_htod(&x).unwrap();
            let mut out = stream.alloc_zeros::<f64>(1).unwrap();
            invaspread::ops::reduce::cuda::mean(&*gpu, DevPtr::of(&x), DevPtrMut::of(&mut out))
                .unwrap();
            let got = stream.clone_dtoh(&out);
            eprintln!("child result: {got:?}");
        }
        "loss" => {
            // 100 rows, a warp per row: block 12, thread 96 writes the last row (99).
            let (n, d) = (100usize, 16usize);
            let z = invaspread::testing::random_matrix(&mut invaspread::testing::rng(3), n, d);
            let got = invaspread::loss::cuda::instance_loss(
                gpu.clone(),
                invaspread::loss::cuda::CudaLossVersion::FusedV2,
                &z,
                n,
                d,
                &Default::default(),
                false,
            )
            .map(|(loss, _)| loss);
            eprintln!("child result: {got:?}");
        }
        "unsynchronised-read" => {
            // A read-back into pinned memory, read before the stream is synchronised.
            let x = stream.clone_htod(&vec![2.0f32; 1024]).unwrap();
            // SAFETY: a raw pinned allocation of 4096 bytes and a copy of 4096 bytes into it;
            // reading it early is the planted bug.
            unsafe {
                let host = cudarc::driver::result::malloc_host(4096, 0).unwrap() as *mut f32;
                let dst = std::slice::from_raw_parts_mut(host, 1024);
                let (src, _sync) = cudarc::driver::DevicePtr::device_ptr(&x, &stream);
                cudarc::driver::result::memcpy_dtoh_async(dst, src, stream.cu_stream()).unwrap();
                let early = std::ptr::read_volatile(host);
                eprintln!("child read {early} before synchronising");
            }
        }
        "launch-bounds" => {
            // mma_probe_tf32_m16n8k8_v1 is __launch_bounds__(32): one warp and then two, with
            // room for 64 lanes so that only the bound can refuse.
            use invaspread::cuda::{Geometry, Kernel, KernelArgs, Queue};
            let a = stream.clone_htod(&vec![0u32; 64 * 4]).unwrap();
            let b = stream.clone_htod(&vec![0u32; 64 * 2]).unwrap();
            let c = stream.clone_htod(&vec![0f32; 64 * 4]).unwrap();
            let mut d = stream.alloc_zeros::<f32>(64 * 4).unwrap();
            for threads in [32u32, 64] {
                let mut d = DevPtrMut::of(&mut d);
                let mut args = KernelArgs::new();
                args.input(DevPtr::of(&a))
                    .input(DevPtr::of(&b))
                    .input(DevPtr::of(&c))
                    .output(&mut d);
                let kernel = Kernel::new("mma", "mma_probe_tf32_m16n8k8_v1");
                // SAFETY: mma_probe_tf32_m16n8k8_v1(const unsigned*, const unsigned*, const
                // float*, float*), every buffer for 64 lanes.
                let got = unsafe { gpu.launch(kernel, Geometry::blocks(1, threads), &mut args) };
                let synced = stream.synchronize();
                eprintln!("child result {threads}: {got:?} then {synced:?}");
            }
        }
        "tf32-gemm" => {
            // 1 + 3 2^-12 has 12 mantissa bits: TF32 (10) rounds it to 1 + 2^-10 to nearest
            // and to 1 by truncation; times 1 (exact) it shows the mode.
            use invaspread::cuda::{Gemm, GemmPrecision, Queue};
            let x = 1.0f32 + 3.0 * 2f32.powi(-12);
            let a = stream.clone_htod(&[x]).unwrap();
            let b = stream.clone_htod(&[1.0f32]).unwrap();
            let mut c = stream.alloc_zeros::<f32>(1).unwrap();
            gpu.gemm(&Gemm {
                trans_a: false,
                trans_b: false,
                m: 1,
                n: 1,
                k: 1,
                alpha: 1.0,
                a: DevPtr::of(&a),
                lda: 1,
                b: DevPtr::of(&b),
                ldb: 1,
                beta: 0.0,
                c: DevPtrMut::of(&mut c),
                ldc: 1,
                precision: GemmPrecision::Tf32,
            })
            .unwrap();
            let got = stream.clone_dtoh(&c).unwrap();
            eprintln!("child result: {:?}", got[0].to_bits());
        }
        other => panic!("unknown child case {other}"),
    }
}

#[test]
fn memcheck_reports_a_planted_out_of_bounds_write() {
    if !built_or_skip("memcheck_reports_a_planted_out_of_bounds_write") {
        return;
    }
    // The last row's norm written one element past the end of `norms`.
    let lib = planted_library(
        "oob",
        "normalize_rows.cu",
        "if (lane == 0) norms[row] = norm;",
        "if (lane == 0) norms[row + 1] = norm;",
    );
    let out = run_child("normalize", Some(&lib), None);
    assert_reports(
        &out,
        &[
            "memcheck: invalid global write of 4 bytes",
            "0 bytes past the end of the 52-byte allocation",
            "kernel normalize_rows_fwd_v1, block (1,0,0), thread (128,0,0)",
            "normalize_rows.cu:",
            "child result: Err",
            "an illegal memory access was encountered",
        ],
    );
    // The unchanged kernels run the same child cleanly.
    assert_clean("normalize", "child result: Ok");
}

#[test]
fn racecheck_reports_a_removed_syncthreads() {
    if !built_or_skip("racecheck_reports_a_removed_syncthreads") {
        return;
    }
    // The tree reduction's barrier between levels removed.
    let lib = planted_library(
        "race",
        "reduce.cu",
        "if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];\n        __syncthreads();",
        "if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];",
    );
    // Reported every time, whatever the schedule: run it under three seeds.
    for seed in ["1", "2", "0"] {
        let out = run_child("mean", Some(&lib), Some(seed));
        assert_reports(
            &out,
            &[
                "hazard on shared memory",
                "with no __syncthreads between",
                "kernel row_mean_v1, block (0,0,0)",
                "reduce.cu:",
            ],
        );
    }
    assert_clean("mean", "child result: Ok([499.5])");
}

#[test]
fn memcheck_sees_an_overrun_inside_carved_scratch() {
    if !built_or_skip("memcheck_sees_an_overrun_inside_carved_scratch") {
        return;
    }
    // fused-v2's inverse norms written one row on: the loss's scratch is one allocation cut
    // into pieces (Carve), so the write stays inside the allocation, in the next piece's
    // padding; it gave a wrong loss silently until the pieces were reported to the memcheck.
    let lib = planted_library(
        "carve",
        "instance_loss_fused_v2.cu",
        "inv_norms[row] = 1.f / fmaxf(norm, INVASPREAD_NORM_EPS);",
        "inv_norms[row + 1] = 1.f / fmaxf(norm, INVASPREAD_NORM_EPS);",
    );
    let out = run_child("loss", Some(&lib), None);
    assert_reports(
        &out,
        &[
            "memcheck: invalid global write of 4 bytes",
            "0 bytes past the end of the 400-byte piece at offset",
            "carved allocation",
            "kernel instance_loss_norms_v2",
            "block (12,0,0), thread (96,0,0)",
            "instance_loss_fused_v2.cu:",
            "child result: Err",
        ],
    );
    assert_clean("loss", "child result: Ok");
}

#[test]
fn a_host_read_of_an_unsynchronised_read_back_is_reported() {
    if !built_or_skip("a_host_read_of_an_unsynchronised_read_back_is_reported") {
        return;
    }
    let out = run_child("unsynchronised-read", None, None);
    assert_eq!(out.status.code(), Some(86), "{}", stderr_of(&out));
    assert_reports(
        &out,
        &[
            "host access to pinned memory",
            "while an asynchronous device-to-host copy into it may still be running",
        ],
    );
}

#[test]
fn info_names_the_virtual_gpu_and_a_bad_selection_is_an_error() {
    if !built_or_skip("info_names_the_virtual_gpu_and_a_bad_selection_is_an_error") {
        return;
    }
    let exe = std::env::var("INVASPREAD_EXE")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_invaspread").to_string());
    let out = Command::new(&exe)
        .arg("info")
        .env("INVASPREAD_GPU", "virtual")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("virtual GPU"),
        "{text}"
    );
    let out = Command::new(&exe)
        .arg("info")
        .env("INVASPREAD_GPU", "virtaul")
        .output()
        .unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        stderr_of(&out)
    );
    assert!(
        all.contains("INVASPREAD_GPU=\"virtaul\": expected one of auto, virtual, real, none"),
        "{all}"
    );
}

/// A block larger than the kernel's `__launch_bounds__` is refused as on the hardware (there it
/// fails the launch; an emulator that ran it would pass code the card rejects).
#[test]
fn a_block_beyond_the_launch_bounds_is_refused() {
    if !built_or_skip("a_block_beyond_the_launch_bounds_is_refused") {
        return;
    }
    let err = stderr_of(&run_child("launch-bounds", None, None));
    assert!(err.contains("child result 32: Ok(()) then Ok(())"), "{err}");
    assert!(
        err.contains("child result 64: Err(")
            && err.contains("a block of 64 threads exceeds its __launch_bounds__ of 32"),
        "{err}"
    );
}

/// The bound each kernel's table entry carries is its source's `__launch_bounds__` (a macro
/// such as BN_THREADS included): every kernel of kernels/*.cu has one entry, bound or 1024.
#[test]
fn every_kernel_has_its_launch_bound_in_the_table() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let files = vgpu_build::kernel_files(&root.join("kernels")).unwrap();
    let mut bounded = 0;
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let kernels = vgpu_build::kernel_bounds(&text);
        assert_eq!(
            kernels.len(),
            text.matches("extern \"C\" __global__").count(),
            "{}: a kernel the table would miss",
            f.display()
        );
        for (name, bound) in kernels {
            if let Some(bound) = bound {
                assert!(
                    bound.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                    "{name}: bound {bound:?} is not a literal or a macro name"
                );
                bounded += 1;
            }
        }
    }
    assert!(bounded >= 60, "only {bounded} kernels with a bound found");
}

/// The virtual cuBLAS's TF32 rounding of float32 operands (INVASPREAD_VGPU_TF32): to nearest
/// by default, truncation on request, and a clear stop on any other value.
#[test]
fn the_virtual_cublas_rounds_tf32_as_told() {
    if !built_or_skip("the_virtual_cublas_rounds_tf32_as_told") {
        return;
    }
    let nearest = (1.0f32 + 2f32.powi(-10)).to_bits();
    let truncated = 1.0f32.to_bits();
    for (mode, want) in [("", nearest), ("nearest", nearest), ("truncate", truncated)] {
        let out = run_child_with("tf32-gemm", None, None, &[("INVASPREAD_VGPU_TF32", mode)]);
        let err = stderr_of(&out);
        assert!(
            err.contains(&format!("child result: {want}")),
            "INVASPREAD_VGPU_TF32={mode:?}: expected bits {want}:\n{err}"
        );
    }
    let err = stderr_of(&run_child_with(
        "tf32-gemm",
        None,
        None,
        &[("INVASPREAD_VGPU_TF32", "stochastic")],
    ));
    assert!(
        err.contains("INVASPREAD_VGPU_TF32=stochastic is invalid: expected nearest or truncate"),
        "{err}"
    );
}

/// compute-sanitizer's filter (scripts/kernel-names, written by scripts/device-bundle) lists
/// every kernel that kernels/*.cu defines: the virtual GPU's table, read by its own parser.
#[test]
fn the_sanitizer_filter_lists_every_kernel() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("python3")
        .arg(root.join("scripts/kernel-names"))
        .arg(root.join("kernels"))
        .output();
    let Ok(out) = out else {
        eprintln!("SKIPPED (no python3): the_sanitizer_filter_lists_every_kernel");
        return;
    };
    assert!(out.status.success(), "{}", stderr_of(&out));
    let listed: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    let mut defined: Vec<String> = vgpu_build::kernel_files(&root.join("kernels"))
        .unwrap()
        .iter()
        .flat_map(|f| vgpu_build::kernel_names(&std::fs::read_to_string(f).unwrap()))
        .collect();
    defined.sort();
    defined.dedup();
    assert_eq!(listed, defined);
    for v3 in [
        "instance_loss_query_v3_tf32",
        "instance_loss_key_v3_bf16_select",
    ] {
        assert!(listed.iter().any(|k| k == v3), "{v3} missing");
    }
}
