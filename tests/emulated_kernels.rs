//! Every CUDA kernel's own source, run on the CPU by the emulator in tests/emulator/ (each CUDA
//! thread an OS thread, real barriers and warp exchanges), against the crate's CPU references:
//! the encoder's kernels against `nn::cpu_ops` and the CPU backend, the loss kernels (unfused,
//! fused v1, fused v2) against the float64 reference, both gradient semantics, with the launch
//! sequences and geometries of the Rust launchers. This checks the kernels' arithmetic,
//! indexing, tail masking and barrier use on a machine without a GPU; it is not a run on a GPU
//! (timing, the driver, cuBLAS and hardware concurrency between blocks are not exercised).
//!
//! The emulator is built with the system C++ compiler ($CXX, else g++); without one the tests
//! print `SKIPPED (no C++ compiler)` and pass.

// The emulated launch sequences take every buffer explicitly, as the CUDA launchers do.
#![allow(clippy::too_many_arguments)]

mod common;

use std::ffi::{c_char, c_void, CString};
use std::process::Command;
use std::sync::OnceLock;

use invaspread::loss::cuda::LossParams;
use invaspread::loss::{reference, GradSemantics, LossConfig};
use invaspread::nn::backend::{Backend, Cpu};
use invaspread::nn::cpu_ops::{self, Conv, Shape4};
use invaspread::nn::cuda_backend::{ConvGeom, SgdParams, SgdTensor, SGD_CHUNK};
use invaspread::ops::normalize_rows;
use invaspread::testing::{adversarial_matrix, random_matrix, rng, scaled_grad_error};

use common::assert_close;

type LaunchFn = unsafe extern "C" fn(*const c_char, u32, u32, u32, *mut *mut c_void) -> i32;

struct Emulator {
    launch: LaunchFn,
}

// SAFETY: the library's entry point is a plain function; every launch is self-contained.
unsafe impl Sync for Emulator {}
unsafe impl Send for Emulator {}

fn build() -> Option<Emulator> {
    let repo = common::repo();
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
    let dir = std::env::temp_dir().join(format!("invaspread-emulator-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let lib = dir.join("libkernels_emulated.so");
    let out = match Command::new(&cxx)
        .args([
            "-std=c++20",
            "-O1",
            "-pthread",
            "-shared",
            "-fPIC",
            "-Wno-unknown-pragmas",
        ])
        .arg("-I")
        .arg(repo.join("kernels"))
        .arg(repo.join("tests/emulator/all_kernels.cpp"))
        .arg("-o")
        .arg(&lib)
        .output()
    {
        Ok(out) => out,
        Err(_) => return None, // no compiler
    };
    assert!(
        out.status.success(),
        "building the kernel emulator failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = CString::new(lib.to_str().unwrap()).unwrap();
    // SAFETY: dlopen/dlsym of the library just built; the symbol has the LaunchFn signature
    // (all_kernels.cpp). The handle is never closed (the tests hold the function for good).
    unsafe {
        let handle = libc::dlopen(path.as_ptr(), libc::RTLD_NOW);
        assert!(!handle.is_null(), "dlopen of the kernel emulator failed");
        let sym = libc::dlsym(handle, c"emu_launch".as_ptr());
        assert!(!sym.is_null(), "emu_launch missing");
        Some(Emulator {
            launch: std::mem::transmute::<*mut c_void, LaunchFn>(sym),
        })
    }
}

fn emulator(test: &str) -> Option<&'static Emulator> {
    static EMU: OnceLock<Option<Emulator>> = OnceLock::new();
    let e = EMU.get_or_init(build).as_ref();
    if e.is_none() {
        eprintln!("SKIPPED (no C++ compiler): {test}");
    }
    e
}

/// A kernel argument: the address of the value the parameter takes (as cuLaunchKernel wants).
fn a<T>(v: &T) -> *mut c_void {
    v as *const T as *mut c_void
}

impl Emulator {
    fn run(&self, name: &str, grid: (u32, u32), threads: u32, args: &mut [*mut c_void]) {
        let c = CString::new(name).unwrap();
        // SAFETY: each call site passes one pointer per kernel parameter, to a value of the
        // parameter's C type, and buffers of the sizes the kernel reads and writes.
        let rc = unsafe { (self.launch)(c.as_ptr(), grid.0, grid.1, threads, args.as_mut_ptr()) };
        assert_eq!(rc, 0, "no kernel {name} in the emulator");
    }
}

/// Row-major C (m x n) = op(A) op(B) (+ C when `accumulate`), float64 sums: what the CUDA
/// backend asks cuBLAS for.
fn gemm(
    (ta, tb): (bool, bool),
    (m, n, k): (usize, usize, usize),
    x: &[f32],
    y: &[f32],
    c: &mut [f32],
    accumulate: bool,
) {
    let (lda, ldb) = (if ta { m } else { k }, if tb { k } else { n });
    for i in 0..m {
        for j in 0..n {
            let s: f64 = (0..k)
                .map(|l| {
                    let av = if ta { x[l * lda + i] } else { x[i * lda + l] };
                    let bv = if tb { y[j * ldb + l] } else { y[l * ldb + j] };
                    f64::from(av) * f64::from(bv)
                })
                .sum();
            c[i * n + j] = if accumulate {
                (f64::from(c[i * n + j]) + s) as f32
            } else {
                s as f32
            };
        }
    }
}

/// The CUDA backend's convolution, forward and backward, for one group of images: im2col_v1,
/// the GEMMs (here in float64 on the host), bcp/cbp permutes and col2im_v1.
fn emulated_conv(
    e: &Emulator,
    x: &[f32],
    xs: Shape4,
    w: &[f32],
    conv: &Conv,
    dy: &[f32],
    dx: &mut [f32],
    dx_accumulate: bool,
    dw: &mut [f32],
) -> Vec<f32> {
    let ys = conv.out_shape(xs);
    let (k, p) = (conv.patch(), ys.h * ys.w);
    let ld = xs.n * p;
    let g = ConvGeom::new(xs, conv, xs.n).unwrap();
    let mut col = vec![f32::NAN; k * ld];
    let (xp, colp) = (x.as_ptr(), col.as_mut_ptr());
    e.run("im2col_v1", (3, 1), 256, &mut [a(&xp), a(&g), a(&colp)]);
    let mut yg = vec![0.0f32; conv.c_out * ld];
    gemm((false, false), (conv.c_out, ld, k), w, &col, &mut yg, false);
    let mut y = vec![f32::NAN; ys.len()];
    let (ygp, yp) = (yg.as_ptr(), y.as_mut_ptr());
    let (b, c, pp) = (xs.n as i32, conv.c_out as i32, p as i32);
    e.run(
        "cbp_to_bcp_v1",
        (2, 1),
        256,
        &mut [a(&ygp), a(&yp), a(&b), a(&c), a(&pp)],
    );
    // Backward.
    let mut dyg = vec![f32::NAN; conv.c_out * ld];
    let (dyp, dygp) = (dy.as_ptr(), dyg.as_mut_ptr());
    e.run(
        "bcp_to_cbp_v1",
        (2, 1),
        256,
        &mut [a(&dyp), a(&dygp), a(&b), a(&c), a(&pp)],
    );
    let mut dw_new = vec![0.0f32; dw.len()];
    gemm(
        (false, true),
        (conv.c_out, k, ld),
        &dyg,
        &col,
        &mut dw_new,
        false,
    );
    for (d, n) in dw.iter_mut().zip(dw_new) {
        *d += n;
    }
    gemm((true, false), (k, ld, conv.c_out), w, &dyg, &mut col, false);
    let (colp, dxp, acc) = (col.as_ptr(), dx.as_mut_ptr(), i32::from(dx_accumulate));
    e.run(
        "col2im_v1",
        (3, 1),
        256,
        &mut [a(&colp), a(&g), a(&dxp), a(&acc)],
    );
    y
}

#[test]
fn conv_kernels_match_the_cpu_convolution() {
    let Some(e) = emulator("conv_kernels_match_the_cpu_convolution") else {
        return;
    };
    // (images, C_in, H, W, C_out, k, stride, pad): odd sizes, stride 2, 1x1, no padding.
    for (i, (n, c_in, h, w, c_out, k, stride, pad)) in [
        (2, 3, 7, 5, 4, 3, 1, 1),
        (3, 2, 8, 8, 5, 3, 2, 1),
        (2, 4, 6, 6, 3, 1, 2, 0),
        (1, 2, 5, 5, 2, 3, 1, 0),
    ]
    .into_iter()
    .enumerate()
    {
        let conv = Conv {
            c_in,
            c_out,
            k,
            stride,
            pad,
        };
        let xs = Shape4 { n, c: c_in, h, w };
        let ys = conv.out_shape(xs);
        let mut r = rng(40 + i as u64);
        let x = random_matrix(&mut r, 1, xs.len());
        let wt = random_matrix(&mut r, 1, c_out * conv.patch());
        let dy = random_matrix(&mut r, 1, ys.len());
        let dx0 = random_matrix(&mut r, 1, xs.len());
        let dw0 = random_matrix(&mut r, 1, wt.len());
        for acc in [false, true] {
            let mut y_cpu = vec![0.0f32; ys.len()];
            cpu_ops::conv2d_forward(&x, xs, &wt, &conv, &mut y_cpu).unwrap();
            let (mut dx_cpu, mut dw_cpu) = (dx0.clone(), dw0.clone());
            cpu_ops::conv2d_backward(&x, xs, &wt, &conv, &dy, Some(&mut dx_cpu), acc, &mut dw_cpu)
                .unwrap();
            let (mut dx_emu, mut dw_emu) = (dx0.clone(), dw0.clone());
            let y_emu = emulated_conv(e, &x, xs, &wt, &conv, &dy, &mut dx_emu, acc, &mut dw_emu);
            let tag = format!("conv case {i} accumulate {acc}");
            assert_close(&format!("{tag}: y"), &y_emu, &y_cpu, 1e-5);
            assert_close(&format!("{tag}: dx"), &dx_emu, &dx_cpu, 1e-5);
            assert_close(&format!("{tag}: dw"), &dw_emu, &dw_cpu, 1e-5);
        }
    }
}

#[test]
fn batchnorm_kernels_match_the_cpu_batchnorm() {
    let Some(e) = emulator("batchnorm_kernels_match_the_cpu_batchnorm") else {
        return;
    };
    let cpu = Cpu::<f32>::new();
    let xs = Shape4 {
        n: 3,
        c: 4,
        h: 5,
        w: 3,
    };
    let mut r = rng(50);
    let mut x = random_matrix(&mut r, 1, xs.len());
    x.iter_mut().for_each(|v| *v = *v * 2.0 + 7.0); // an offset the two-pass variance handles
    let (gamma, beta) = (random_matrix(&mut r, 1, 4), random_matrix(&mut r, 1, 4));
    let (rm0, rv0): (Vec<f32>, Vec<f32>) = (
        random_matrix(&mut r, 1, 4),
        random_matrix(&mut r, 1, 4)
            .iter()
            .map(|v| v.abs() + 0.5)
            .collect(),
    );
    let dy = random_matrix(&mut r, 1, xs.len());
    let dx0 = random_matrix(&mut r, 1, xs.len());
    for training in [true, false] {
        // CPU backend.
        let (mut rm, mut rv) = (rm0.clone(), rv0.clone());
        let mut y = vec![0.0f32; xs.len()];
        let mut saved = Default::default();
        cpu.batchnorm_forward(
            &x, xs, &gamma, &beta, &mut rm, &mut rv, training, &mut saved, &mut y,
        )
        .unwrap();
        let (mut dx, mut dg, mut db) = (dx0.clone(), vec![0.5f32; 4], vec![-0.5f32; 4]);
        cpu.batchnorm_backward(
            &x,
            xs,
            &gamma,
            &rm,
            &rv,
            training,
            &mut saved,
            &dy,
            Some(&mut dx),
            true,
            &mut dg,
            &mut db,
        )
        .unwrap();
        // Emulated kernels, the CUDA backend's sequence.
        let (mut erm, mut erv) = (rm0.clone(), rv0.clone());
        let mut esaved = vec![f32::NAN; 16];
        let (n, c, hw) = (3i32, 4i32, 15i32);
        let (mom, eps) = (0.1f32, 1e-5f32);
        let (xp, sp, rmp, rvp) = (
            x.as_ptr(),
            esaved.as_mut_ptr(),
            erm.as_mut_ptr(),
            erv.as_mut_ptr(),
        );
        if training {
            e.run(
                "batchnorm_train_stats_v1",
                (4, 1),
                512,
                &mut [
                    a(&xp),
                    a(&n),
                    a(&c),
                    a(&hw),
                    a(&mom),
                    a(&eps),
                    a(&sp),
                    a(&rmp),
                    a(&rvp),
                ],
            );
        } else {
            e.run(
                "batchnorm_eval_stats_v1",
                (1, 1),
                256,
                &mut [a(&rmp), a(&rvp), a(&c), a(&eps), a(&sp)],
            );
        }
        let mut ey = vec![f32::NAN; xs.len()];
        let (gp, bp, eyp) = (gamma.as_ptr(), beta.as_ptr(), ey.as_mut_ptr());
        e.run(
            "batchnorm_apply_v1",
            (2, 1),
            256,
            &mut [
                a(&xp),
                a(&gp),
                a(&bp),
                a(&sp),
                a(&n),
                a(&c),
                a(&hw),
                a(&eyp),
            ],
        );
        let (mut edx, mut edg, mut edb) = (dx0.clone(), vec![0.5f32; 4], vec![-0.5f32; 4]);
        let (dyp, dgp, dbp) = (dy.as_ptr(), edg.as_mut_ptr(), edb.as_mut_ptr());
        e.run(
            "batchnorm_bwd_reduce_v1",
            (4, 1),
            512,
            &mut [
                a(&xp),
                a(&dyp),
                a(&n),
                a(&c),
                a(&hw),
                a(&sp),
                a(&dgp),
                a(&dbp),
            ],
        );
        let (tr, acc, dxp) = (i32::from(training), 1i32, edx.as_mut_ptr());
        e.run(
            "batchnorm_bwd_dx_v1",
            (2, 1),
            256,
            &mut [
                a(&xp),
                a(&dyp),
                a(&gp),
                a(&sp),
                a(&n),
                a(&c),
                a(&hw),
                a(&tr),
                a(&dxp),
                a(&acc),
            ],
        );
        let tag = format!("batchnorm training {training}");
        assert_close(&format!("{tag}: y"), &ey, &y, 1e-5);
        assert_close(&format!("{tag}: running mean"), &erm, &rm, 1e-5);
        assert_close(&format!("{tag}: running var"), &erv, &rv, 1e-5);
        assert_close(&format!("{tag}: dx"), &edx, &dx, 1e-5);
        assert_close(&format!("{tag}: dgamma"), &edg, &dg, 1e-5);
        assert_close(&format!("{tag}: dbeta"), &edb, &db, 1e-5);
    }
}

#[test]
fn elementwise_pooling_and_linear_kernels_match_the_cpu() {
    let Some(e) = emulator("elementwise_pooling_and_linear_kernels_match_the_cpu") else {
        return;
    };
    let mut r = rng(60);
    let len = 1000usize; // not a multiple of the block, two blocks of grid stride
    let x = random_matrix(&mut r, 1, len);
    let dy = random_matrix(&mut r, 1, len);
    let n = len as i64;
    // relu
    let mut y = vec![f32::NAN; len];
    let (xp, yp) = (x.as_ptr(), y.as_mut_ptr());
    e.run("relu_fwd_v1", (2, 1), 256, &mut [a(&xp), a(&yp), a(&n)]);
    let mut want = vec![0.0f32; len];
    cpu_ops::relu_forward(&x, &mut want);
    assert_eq!(y, want, "relu forward");
    for acc in [0i32, 1] {
        let mut dx = x.clone();
        let mut want_dx = x.clone();
        cpu_ops::relu_backward(&y, &dy, &mut want_dx, acc == 1);
        let (yp, dyp, dxp) = (y.as_ptr(), dy.as_ptr(), dx.as_mut_ptr());
        e.run(
            "relu_bwd_v1",
            (2, 1),
            256,
            &mut [a(&yp), a(&dyp), a(&dxp), a(&n), a(&acc)],
        );
        assert_eq!(dx, want_dx, "relu backward accumulate {acc}");
        // add / copy
        let mut out = dy.clone();
        let mut want_out = dy.clone();
        cpu_ops::copy_or_add(&x, &mut want_out, acc == 1);
        let op = out.as_mut_ptr();
        e.run("add_v1", (2, 1), 256, &mut [a(&xp), a(&op), a(&n), a(&acc)]);
        assert_eq!(out, want_out, "add accumulate {acc}");
        // axpy
        let alpha = -0.37f32;
        let mut out = dy.clone();
        let want_out: Vec<f32> = dy
            .iter()
            .zip(&x)
            .map(|(&d, &v)| {
                if acc == 1 {
                    alpha.mul_add(v, d)
                } else {
                    alpha * v
                }
            })
            .collect();
        let op = out.as_mut_ptr();
        e.run(
            "axpy_v1",
            (2, 1),
            256,
            &mut [a(&alpha), a(&xp), a(&op), a(&n), a(&acc)],
        );
        assert_eq!(out, want_out, "axpy accumulate {acc}");
    }
    // bf16 rounding: the half crate's round-to-nearest-even, NaN and infinities included.
    let mut special = x.clone();
    special[..6].copy_from_slice(&[
        f32::NAN,
        f32::INFINITY,
        -f32::INFINITY,
        1.0 + f32::EPSILON * 64.0, // a tie in bf16: rounds to even
        f32::MAX,
        -0.0,
    ]);
    let mut h = vec![0u16; len];
    let (sp, hp) = (special.as_ptr(), h.as_mut_ptr());
    e.run("f32_to_bf16_v1", (2, 1), 256, &mut [a(&sp), a(&hp), a(&n)]);
    for (i, (&got, &v)) in h.iter().zip(&special).enumerate() {
        let want = half::bf16::from_f32(v);
        if v.is_nan() {
            assert!(half::bf16::from_bits(got).is_nan(), "bf16 of NaN");
        } else {
            assert_eq!(got, want.to_bits(), "bf16 of {v} (element {i})");
        }
    }
    // f64 -> f32
    let d64: Vec<f64> = (0..len).map(|i| (i as f64) / 3.0).collect();
    let mut f = vec![0.0f32; len];
    let (dp, fp) = (d64.as_ptr(), f.as_mut_ptr());
    e.run("f64_to_f32_v1", (2, 1), 256, &mut [a(&dp), a(&fp), a(&n)]);
    assert!(f.iter().zip(&d64).all(|(&g, &w)| g == w as f32));
    // Average pooling, k = 2 and global.
    let cpu = Cpu::<f32>::new();
    for (h, w, k) in [(6usize, 4usize, 2usize), (4, 4, 4)] {
        let xs = Shape4 { n: 2, c: 3, h, w };
        let xin = random_matrix(&mut r, 1, xs.len());
        let ylen = xs.len() / (k * k);
        let mut want_y = vec![0.0f32; ylen];
        cpu.avgpool_forward(&xin, xs, k, &mut want_y).unwrap();
        let mut ey = vec![f32::NAN; ylen];
        let (planes, hi, wi, ki) = (6i32, h as i32, w as i32, k as i32);
        let (xp, eyp) = (xin.as_ptr(), ey.as_mut_ptr());
        e.run(
            "avgpool_fwd_v1",
            (1, 1),
            256,
            &mut [a(&xp), a(&planes), a(&hi), a(&wi), a(&ki), a(&eyp)],
        );
        assert_close("avgpool forward", &ey, &want_y, 1e-6);
        let gy = random_matrix(&mut r, 1, ylen);
        let mut want_dx = xin.clone();
        cpu.avgpool_backward(xs, k, &gy, &mut want_dx, true)
            .unwrap();
        let mut edx = xin.clone();
        let (gyp, dxp, acc) = (gy.as_ptr(), edx.as_mut_ptr(), 1i32);
        e.run(
            "avgpool_bwd_v1",
            (1, 1),
            256,
            &mut [
                a(&gyp),
                a(&planes),
                a(&hi),
                a(&wi),
                a(&ki),
                a(&dxp),
                a(&acc),
            ],
        );
        assert_close("avgpool backward", &edx, &want_dx, 1e-6);
    }
    // Linear: bias rows + GEMM forward; column sums backward.
    let (rows, inp, out) = (5usize, 7usize, 300usize);
    let lx = random_matrix(&mut r, rows, inp);
    let lw = random_matrix(&mut r, out, inp);
    let lb = random_matrix(&mut r, 1, out);
    let mut want = vec![0.0f32; rows * out];
    cpu_ops::linear_forward(&lx, rows, &lw, &lb, out, &mut want).unwrap();
    let mut ly = vec![f32::NAN; rows * out];
    let (bp, lyp, ri, ci) = (lb.as_ptr(), ly.as_mut_ptr(), rows as i32, out as i32);
    e.run(
        "bias_rows_v1",
        (2, 1),
        256,
        &mut [a(&bp), a(&lyp), a(&ri), a(&ci)],
    );
    gemm((false, true), (rows, out, inp), &lx, &lw, &mut ly, true);
    assert_close("linear forward", &ly, &want, 1e-6);
    let ldy = random_matrix(&mut r, rows, out);
    let (mut want_dw, mut want_db) = (vec![0.0f32; out * inp], random_matrix(&mut r, 1, out));
    let mut db = want_db.clone();
    cpu_ops::linear_backward(
        &lx,
        rows,
        &lw,
        out,
        &ldy,
        None,
        false,
        &mut want_dw,
        &mut want_db,
    )
    .unwrap();
    let (dyp, dbp) = (ldy.as_ptr(), db.as_mut_ptr());
    e.run(
        "column_sums_v1",
        (2, 1),
        256,
        &mut [a(&dyp), a(&dbp), a(&ri), a(&ci)],
    );
    assert_close("linear db", &db, &want_db, 1e-6);
}

#[test]
fn multi_tensor_sgd_kernel_matches_the_cpu_update() {
    let Some(e) = emulator("multi_tensor_sgd_kernel_matches_the_cpu_update") else {
        return;
    };
    let cpu = Cpu::<f32>::new();
    let lens = [1usize, 1023, 0, 1024, 1025, 40];
    let mut r = rng(70);
    for nesterov in [false, true] {
        for first in [true, false] {
            let mut w: Vec<Vec<f32>> = lens.iter().map(|&l| random_matrix(&mut r, 1, l)).collect();
            let g: Vec<Vec<f32>> = lens.iter().map(|&l| random_matrix(&mut r, 1, l)).collect();
            let mut v: Vec<Vec<f32>> = lens.iter().map(|&l| random_matrix(&mut r, 1, l)).collect();
            let (mut ww, mut wv) = (w.clone(), v.clone());
            for i in 0..lens.len() {
                cpu.sgd_update(
                    &mut ww[i], &g[i], &mut wv[i], 0.03, 0.9, 5e-4, nesterov, first,
                )
                .unwrap();
            }
            let mut table = Vec::new();
            let mut blocks = 0i64;
            for i in 0..lens.len() {
                // Host addresses stand for device ones on the emulator.
                table.push(SgdTensor {
                    w: w[i].as_mut_ptr() as u64,
                    g: g[i].as_ptr() as u64,
                    v: v[i].as_mut_ptr() as u64,
                    len: lens[i] as i64,
                    first_block: blocks,
                });
                blocks += lens[i].div_ceil(SGD_CHUNK) as i64;
            }
            let p = SgdParams::new(0.03, 0.9, 5e-4, nesterov, first, lens.len()).unwrap();
            let tp = table.as_ptr();
            e.run(
                "sgd_multi_tensor_v1",
                (blocks as u32, 1),
                256,
                &mut [a(&tp), a(&p)],
            );
            for i in 0..lens.len() {
                assert_close(&format!("sgd w {i}"), &w[i], &ww[i], 1e-6);
                assert_close(&format!("sgd v {i}"), &v[i], &wv[i], 1e-6);
            }
        }
    }
}

#[test]
fn topk_kernel_matches_the_cpu_neighbour_search() {
    let Some(e) = emulator("topk_kernel_matches_the_cpu_neighbour_search") else {
        return;
    };
    let d = 8;
    let mut r = rng(80);
    let mut keys = random_matrix(&mut r, 600, d);
    let dup = keys[..d].to_vec();
    for row in [5usize, 77, 599] {
        keys[row * d..(row + 1) * d].copy_from_slice(&dup); // exact ties
    }
    let mut queries = random_matrix(&mut r, 3, d);
    queries[..d].copy_from_slice(&dup);
    invaspread::eval::normalise_rows(&mut keys, d);
    invaspread::eval::normalise_rows(&mut queries, d);
    let (nq, nk) = (3usize, 600usize);
    let mut sims = vec![0.0f32; nq * nk];
    gemm(
        (false, true),
        (nq, nk, d),
        &queries,
        &keys,
        &mut sims,
        false,
    );
    for k in [1usize, 2, 4, 50, 600] {
        let want = invaspread::eval::nearest(&queries, &keys, d, k, false).unwrap();
        let (mut val, mut idx) = (vec![f32::NAN; nq * k], vec![-1i32; nq * k]);
        let (sp, rows, cols, ki) = (sims.as_ptr(), nq as i32, nk as i32, k as i32);
        let (vp, ip) = (val.as_mut_ptr(), idx.as_mut_ptr());
        e.run(
            "topk_rows_v1",
            (nq as u32, 1),
            256,
            &mut [a(&sp), a(&rows), a(&cols), a(&ki), a(&vp), a(&ip)],
        );
        for q in 0..nq {
            let mut got: Vec<(f32, usize)> = (0..k)
                .map(|j| (val[q * k + j], idx[q * k + j] as usize))
                .collect();
            got.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
            // The host GEMM and the CPU path's may round differently: compare similarities,
            // and for the exact ties of query 0 the indices (lowest first).
            let gv: Vec<f32> = got.iter().map(|x| x.0).collect();
            let wv: Vec<f32> = want[q].iter().map(|x| x.0).collect();
            assert_close(&format!("top-{k} of query {q}"), &gv, &wv, 1e-6);
            if q == 0 && k >= 4 {
                let gi: Vec<usize> = got[..4].iter().map(|x| x.1).collect();
                assert_eq!(gi, [0, 5, 77, 599], "tied neighbours of query 0 (k = {k})");
            }
            let mut distinct: Vec<usize> = got.iter().map(|x| x.1).collect();
            distinct.sort_unstable();
            distinct.dedup();
            assert_eq!(distinct.len(), k, "top-{k}: an index twice");
        }
    }
}

#[test]
fn normalize_rows_kernels_match_the_cpu() {
    let Some(e) = emulator("normalize_rows_kernels_match_the_cpu") else {
        return;
    };
    let (n, d) = (13usize, 37usize);
    let mut r = rng(90);
    let mut z = random_matrix(&mut r, n, d);
    z[2 * d..3 * d].fill(0.0); // the clamp's branch
    let gf = random_matrix(&mut r, n, d);
    let (f_cpu, norms_cpu) = normalize_rows::forward_cpu(&z, n, d).unwrap();
    let dz_cpu = normalize_rows::backward_cpu(&f_cpu, &norms_cpu, &gf, n, d).unwrap();
    let (mut f, mut norms, mut dz) = (
        vec![f32::NAN; n * d],
        vec![f32::NAN; n],
        vec![f32::NAN; n * d],
    );
    let (zp, fp, np, ni, di) = (
        z.as_ptr(),
        f.as_mut_ptr(),
        norms.as_mut_ptr(),
        n as i32,
        d as i32,
    );
    let grid = (n.div_ceil(8) as u32, 1);
    e.run(
        "normalize_rows_fwd_v1",
        grid,
        256,
        &mut [a(&zp), a(&fp), a(&np), a(&ni), a(&di)],
    );
    let (gp, dzp) = (gf.as_ptr(), dz.as_mut_ptr());
    e.run(
        "normalize_rows_bwd_v1",
        grid,
        256,
        &mut [a(&fp), a(&np), a(&gp), a(&dzp), a(&ni), a(&di)],
    );
    assert_close("normalize forward", &f, &f_cpu, 1e-6);
    assert_close("norms", &norms, &norms_cpu, 1e-6);
    assert_close("normalize backward", &dz, &dz_cpu, 1e-5);
}

/// The three loss versions' launch sequences (src/loss/cuda.rs) on the emulator.
#[derive(Debug, Clone, Copy)]
enum LossVersion {
    Unfused,
    FusedV1,
    FusedV2,
}

fn emulated_loss(
    e: &Emulator,
    version: LossVersion,
    z: &[f32],
    n: usize,
    d: usize,
    cfg: &LossConfig,
) -> (f64, Vec<f32>) {
    let p = LossParams {
        n: n as i32,
        d: d as i32,
        inv_tau: (1.0 / cfg.tau) as f32,
        mu: cfg.mu as f32,
        grad_scale: (1.0 / (n as f64 * cfg.tau)) as f32,
        with_grad: 1,
        both_sides: (cfg.semantics == GradSemantics::BothSides) as i32,
    };
    let (ni, di) = (n as i32, d as i32);
    let zp = z.as_ptr();
    let mut dz = vec![f32::NAN; n * d];
    let dzp = dz.as_mut_ptr();
    let (mut row_loss, mut inv_denom, mut rr) = (vec![0.0f64; n], vec![0.0f32; n], vec![0.0f32; n]);
    let (mut dominant, mut g_partner, mut g_dominant) =
        (vec![0i32; n], vec![0.0f32; n], vec![0.0f32; n]);
    let (rlp, idp, rp) = (
        row_loss.as_mut_ptr(),
        inv_denom.as_mut_ptr(),
        rr.as_mut_ptr(),
    );
    let (domp, gpp, gdp) = (
        dominant.as_mut_ptr(),
        g_partner.as_mut_ptr(),
        g_dominant.as_mut_ptr(),
    );
    let mut loss = [f64::NAN];
    let lp = loss.as_mut_ptr();
    let (mut f, mut norms, mut df) = (vec![0.0f32; n * d], vec![0.0f32; n], vec![0.0f32; n * d]);
    let (fp, np, dfp) = (f.as_mut_ptr(), norms.as_mut_ptr(), df.as_mut_ptr());
    let row_grid = (n.div_ceil(8) as u32, 1);
    match version {
        LossVersion::FusedV2 => {
            let mut inv_norms = vec![0.0f32; n];
            let inp = inv_norms.as_mut_ptr();
            e.run(
                "instance_loss_norms_v2",
                row_grid,
                256,
                &mut [a(&zp), a(&ni), a(&di), a(&np), a(&inp)],
            );
            let blocks = n.div_ceil(64);
            let mut block_loss = vec![0.0f64; blocks];
            let mut counter = [0u32];
            let (blp, cp) = (block_loss.as_mut_ptr(), counter.as_mut_ptr());
            e.run(
                "instance_loss_query_v2",
                (blocks as u32, 1),
                256,
                &mut [
                    a(&zp),
                    a(&np),
                    a(&inp),
                    a(&p),
                    a(&idp),
                    a(&rp),
                    a(&domp),
                    a(&gpp),
                    a(&gdp),
                    a(&dzp),
                    a(&blp),
                    a(&cp),
                    a(&lp),
                ],
            );
            if p.both_sides != 0 {
                e.run(
                    "instance_loss_key_v2",
                    (blocks as u32, 1),
                    256,
                    &mut [
                        a(&zp),
                        a(&np),
                        a(&inp),
                        a(&p),
                        a(&idp),
                        a(&rp),
                        a(&domp),
                        a(&gpp),
                        a(&gdp),
                        a(&dzp),
                    ],
                );
            }
            return (loss[0], dz);
        }
        LossVersion::FusedV1 => {
            e.run(
                "normalize_rows_fwd_v1",
                row_grid,
                256,
                &mut [a(&zp), a(&fp), a(&np), a(&ni), a(&di)],
            );
            e.run(
                "instance_loss_query_v1",
                (n as u32, 1),
                256,
                &mut [
                    a(&fp),
                    a(&p),
                    a(&rlp),
                    a(&idp),
                    a(&rp),
                    a(&domp),
                    a(&gpp),
                    a(&gdp),
                    a(&dfp),
                ],
            );
            if p.both_sides != 0 {
                e.run(
                    "instance_loss_key_v1",
                    (n as u32, 1),
                    256,
                    &mut [
                        a(&fp),
                        a(&p),
                        a(&idp),
                        a(&rp),
                        a(&domp),
                        a(&gpp),
                        a(&gdp),
                        a(&dfp),
                    ],
                );
            }
        }
        LossVersion::Unfused => {
            e.run(
                "normalize_rows_fwd_v1",
                row_grid,
                256,
                &mut [a(&zp), a(&fp), a(&np), a(&ni), a(&di)],
            );
            let (mut s, mut ex, mut g) = (
                vec![0.0f32; n * n],
                vec![0.0f32; n * n],
                vec![0.0f32; n * n],
            );
            let (sp, ep, gp) = (s.as_mut_ptr(), ex.as_mut_ptr(), g.as_mut_ptr());
            let (mut xpart, mut denom, mut omq, mut qmax) = (
                vec![0.0f32; n],
                vec![0.0f64; n],
                vec![0.0f64; n],
                vec![0.0f64; n],
            );
            let (xpp, dnp, omp, qmp) = (
                xpart.as_mut_ptr(),
                denom.as_mut_ptr(),
                omq.as_mut_ptr(),
                qmax.as_mut_ptr(),
            );
            // matmul_v1(M, N, K, A, a_rs, a_cs, B, b_rs, b_cs, C, ldc, alpha, beta), 64 x 64 tiles.
            let matmul = |m: i32,
                          cols: i32,
                          k: i32,
                          am: *const f32,
                          ars: i64,
                          acs: i64,
                          bm: *const f32,
                          brs: i64,
                          bcs: i64,
                          out: *mut f32,
                          ldc: i64,
                          alpha: f32,
                          beta: f32| {
                e.run(
                    "matmul_v1",
                    ((cols as u32).div_ceil(64), (m as u32).div_ceil(64)),
                    256,
                    &mut [
                        a(&m),
                        a(&cols),
                        a(&k),
                        a(&am),
                        a(&ars),
                        a(&acs),
                        a(&bm),
                        a(&brs),
                        a(&bcs),
                        a(&out),
                        a(&ldc),
                        a(&alpha),
                        a(&beta),
                    ],
                );
            };
            let (nl, dl) = (n as i64, d as i64);
            matmul(ni, ni, di, fp, dl, 1, fp, 1, dl, sp, nl, 1.0, 0.0);
            e.run(
                "unfused_exp_v1",
                (2, 1),
                256,
                &mut [a(&sp), a(&ep), a(&ni), a(&p.inv_tau)],
            );
            e.run(
                "unfused_row_sums_v1",
                (n as u32, 1),
                256,
                &mut [
                    a(&sp),
                    a(&ep),
                    a(&p),
                    a(&xpp),
                    a(&domp),
                    a(&dnp),
                    a(&omp),
                    a(&qmp),
                ],
            );
            e.run(
                "unfused_row_terms_v1",
                (n as u32, 1),
                256,
                &mut [
                    a(&ep),
                    a(&p),
                    a(&xpp),
                    a(&domp),
                    a(&dnp),
                    a(&omp),
                    a(&qmp),
                    a(&rlp),
                    a(&rp),
                    a(&gpp),
                    a(&gdp),
                ],
            );
            e.run(
                "unfused_grad_matrix_v1",
                (2, 1),
                256,
                &mut [
                    a(&ep),
                    a(&p),
                    a(&dnp),
                    a(&domp),
                    a(&rp),
                    a(&gpp),
                    a(&gdp),
                    a(&gp),
                ],
            );
            matmul(ni, di, ni, gp, nl, 1, fp, dl, 1, dfp, dl, p.grad_scale, 0.0);
            if p.both_sides != 0 {
                matmul(ni, di, ni, gp, 1, nl, fp, dl, 1, dfp, dl, p.grad_scale, 1.0);
            }
        }
    }
    e.run(
        "normalize_rows_bwd_v1",
        row_grid,
        256,
        &mut [a(&fp), a(&np), a(&dfp), a(&dzp), a(&ni), a(&di)],
    );
    e.run("row_mean_v1", (1, 1), 256, &mut [a(&rlp), a(&ni), a(&lp)]);
    (loss[0], dz)
}

#[test]
fn loss_kernels_match_the_float64_reference() {
    let Some(e) = emulator("loss_kernels_match_the_float64_reference") else {
        return;
    };
    // Sizes around fused v2's 64-row tiles, 32-column chunks and 128-column sweeps (N = 130,
    // d = 130: three row blocks, a masked tail, two sweeps), random and adversarial inputs.
    // The one-block-per-row versions (unfused, v1) run fewer cases: the emulator spawns an OS
    // thread per CUDA thread, N blocks of 256 each, and v1 synchronises often (~10 s a case).
    const ALL: [LossVersion; 3] = [
        LossVersion::Unfused,
        LossVersion::FusedV1,
        LossVersion::FusedV2,
    ];
    let versions = |n: usize, adversarial: bool| -> &'static [LossVersion] {
        if n <= 6 || (n <= 70 && !adversarial) {
            &ALL
        } else {
            &ALL[2..]
        }
    };
    let mut i = 0u64;
    for (n, d) in [(6usize, 3usize), (70, 33), (130, 130)] {
        for adversarial in [false, true] {
            let z = if adversarial {
                adversarial_matrix(&mut rng(900 + i), n, d)
            } else {
                random_matrix(&mut rng(900 + i), n, d)
            };
            for semantics in [GradSemantics::QueryOnly, GradSemantics::BothSides] {
                let cfg = LossConfig {
                    tau: [0.1, 0.05, 0.5][i as usize % 3],
                    mu: [1.0, 2.0][i as usize % 2],
                    semantics,
                };
                let want = reference::instance_loss(&z, n, d, &cfg, true).unwrap();
                let tol = if adversarial { 2e-4 } else { 5e-5 };
                for &version in versions(n, adversarial) {
                    let (loss, dz) = emulated_loss(e, version, &z, n, d, &cfg);
                    let case = format!("{version:?} N={n} d={d} adversarial={adversarial} {cfg:?}");
                    let rel = (loss - want.loss).abs() / want.loss.abs();
                    assert!(
                        rel < tol,
                        "{case}: loss {loss} vs {} (rel {rel:e})",
                        want.loss
                    );
                    let g: Vec<f64> = dz.iter().map(|&x| f64::from(x)).collect();
                    let err = scaled_grad_error(&g, want.grad_z.as_ref().unwrap(), &z, d);
                    assert!(err < tol, "{case}: gradient error {err:e}");
                }
                i += 1;
            }
        }
    }
}
