//! Every CUDA kernel's own source, run on the CPU by the emulator in tests/emulator/ (each CUDA
//! thread an OS thread, real barriers and warp exchanges), launched by the crate's own
//! launchers (`ops::<op>::cuda`, `loss::cuda`) through the `Queue` trait: the geometry and
//! argument lists under test are the ones a GPU run uses, written once. The results are
//! compared with the CPU implementations (`ops::<op>::cpu`) and, for the loss, the float64
//! reference, both gradient semantics. This checks the kernels' arithmetic, indexing, tail
//! masking and barrier use, and the launchers' sizes and arguments, on a machine without a
//! GPU; it is not a run on a GPU (timing, the driver, cuBLAS and hardware concurrency between
//! blocks are not exercised).
//!
//! The emulator is built with the system C++ compiler ($CXX, else g++); without one the tests
//! print `SKIPPED (no C++ compiler)` and pass.

use crate::emulator;

use invaspread::cuda::blas::to_bf16;
use invaspread::cuda::GemmPrecision;
use invaspread::cuda::{Carve, DevPtr, DevPtrMut};
use invaspread::loss::cuda::ranks_v1::{
    enqueue_finish, enqueue_rows, enqueue_sum, OwnRows, RankScratch,
};
use invaspread::loss::cuda::{self as loss_cuda, CudaLossVersion, LossParams, Scratch};
use invaspread::loss::gathered::RankLayout;
use invaspread::loss::{reference, GradSemantics, LossConfig};
use invaspread::names::Named;
use invaspread::ops::batchnorm::cpu::BnSaved;
use invaspread::ops::conv2d::Conv;
use invaspread::ops::sgd::{SgdStep, SGD_CHUNK};
use invaspread::ops::{
    batchnorm, conv2d, elementwise, linear, mma, normalize_rows, pool, sgd, topk, Grad, Shape4,
};
use invaspread::testing::{adversarial_matrix, random_matrix, rng, scaled_grad_error};

use crate::common::assert_close;
use crate::emulator::{emulator, Emulator};

fn host(v: &[f32]) -> DevPtr<'_, f32> {
    DevPtr::host(v)
}
fn host_mut(v: &mut [f32]) -> DevPtrMut<'_, f32> {
    DevPtrMut::host(v)
}

/// The convolution forward and backward through `ops::conv2d::cuda`, with a workspace of
/// `group` images (so that several groups run when it is smaller than the batch).
fn emulated_conv(
    e: &Emulator,
    (x, xs, w, conv): (&[f32], Shape4, &[f32], Conv),
    dy: &[f32],
    (dx, dx_accumulate): (&mut [f32], bool),
    dw: &mut [f32],
    (group, v): (usize, conv2d::Version),
) -> Vec<f32> {
    let ys = conv.out_shape(xs);
    let p = ys.h * ys.w;
    let (mut col, mut gemm) = (
        vec![f32::NAN; conv.patch() * group * p],
        vec![f32::NAN; conv.c_out * group * p],
    );
    let mut ws = conv2d::cuda::Workspace {
        col: host_mut(&mut col),
        gemm: host_mut(&mut gemm),
    };
    let mut y = vec![f32::NAN; ys.len()];
    let fwd = conv2d::Forward {
        x: host(x),
        xs,
        w: host(w),
        conv,
        y: host_mut(&mut y),
    };
    conv2d::cuda::forward(e, v, fwd, &mut ws, GemmPrecision::F32).unwrap();
    let bwd = conv2d::Backward {
        x: host(x),
        xs,
        w: host(w),
        conv,
        dy: host(dy),
        dx: Some(Grad::new(host_mut(dx), dx_accumulate)),
        dw: host_mut(dw),
    };
    conv2d::cuda::backward(e, v, bwd, &mut ws, GemmPrecision::F32).unwrap();
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
            conv2d::cpu::forward(conv2d::Forward {
                x: &x[..],
                xs,
                w: &wt[..],
                conv,
                y: &mut y_cpu[..],
            })
            .unwrap();
            let (mut dx_cpu, mut dw_cpu) = (dx0.clone(), dw0.clone());
            conv2d::cpu::backward(conv2d::Backward {
                x: &x[..],
                xs,
                w: &wt[..],
                conv,
                dy: &dy[..],
                dx: Some(Grad::new(&mut dx_cpu[..], acc)),
                dw: &mut dw_cpu[..],
            })
            .unwrap();
            // One group of every image, and groups of one image (the workspace a large batch
            // gets on a GPU).
            for (group, v) in [
                (n, conv2d::Version::V1),
                (1, conv2d::Version::V1),
                (n, conv2d::Version::V2),
                (1, conv2d::Version::V2),
            ] {
                let (mut dx_emu, mut dw_emu) = (dx0.clone(), dw0.clone());
                let args = (&x[..], xs, &wt[..], conv);
                let ws = (group, v);
                let y_emu = emulated_conv(e, args, &dy, (&mut dx_emu, acc), &mut dw_emu, ws);
                let tag = format!("conv {v:?} case {i} accumulate {acc} group {group}");
                assert_close(&format!("{tag}: y"), &y_emu, &y_cpu, 1e-5);
                assert_close(&format!("{tag}: dx"), &dx_emu, &dx_cpu, 1e-5);
                assert_close(&format!("{tag}: dw"), &dw_emu, &dw_cpu, 1e-5);
            }
        }
    }
}

/// x, gamma, beta and the running mean and variance before the forward.
type BnInputs<'a> = (&'a [f32], &'a [f32], &'a [f32], &'a [f32], &'a [f32]);

/// Batchnorm forward then backward on the CPU (`None`) or the emulator; returns y, the
/// running statistics, dx, dgamma and dbeta.
fn batchnorm_run(
    e: Option<&Emulator>,
    xs: Shape4,
    (x, gamma, beta, rm0, rv0): BnInputs<'_>,
    (dy, dx0): (&[f32], &[f32]),
    (training, v): (bool, batchnorm::Version),
) -> Vec<Vec<f32>> {
    let (mut rm, mut rv) = (rm0.to_vec(), rv0.to_vec());
    let mut y = vec![f32::NAN; xs.len()];
    let (mut dx, mut dg, mut db) = (dx0.to_vec(), vec![0.5f32; xs.c], vec![-0.5f32; xs.c]);
    let fwd = batchnorm::Forward {
        x,
        xs,
        gamma,
        beta,
        running_mean: &mut rm[..],
        running_var: &mut rv[..],
        training,
        relu: false,
        y: &mut y[..],
    };
    let mut cpu_saved = BnSaved::default();
    // Zeroed, as the backend allocates it (v2's counters start at zero).
    let mut emu_saved = vec![0.0; batchnorm::cuda::saved_len(v, xs)];
    match e {
        None => batchnorm::cpu::forward(fwd, &mut cpu_saved),
        Some(e) => {
            let mut saved = host_mut(&mut emu_saved);
            batchnorm::cuda::forward(e, v, fwd.map(host, host_mut), &mut saved).unwrap()
        }
    }
    let bwd = batchnorm::Backward {
        x,
        xs,
        gamma,
        running_mean: &rm[..],
        running_var: &rv[..],
        training,
        relu: false,
        dy,
        dx: Some(Grad::new(&mut dx[..], true)),
        dgamma: &mut dg[..],
        dbeta: &mut db[..],
    };
    match e {
        None => batchnorm::cpu::backward(bwd, &cpu_saved),
        Some(e) => {
            let mut saved = host_mut(&mut emu_saved);
            batchnorm::cuda::backward(e, v, bwd.map(host, host_mut), &mut saved).unwrap()
        }
    }
    vec![y, rm, rv, dx, dg, db]
}

#[test]
fn batchnorm_kernels_match_the_cpu_batchnorm() {
    let Some(e) = emulator("batchnorm_kernels_match_the_cpu_batchnorm") else {
        return;
    };
    // v2 splits each channel's images into chunks: 3 of one image (3 x 4), 7 of 3 images with a
    // last of 2 (20 x 64), one chunk (1 x 2).
    for (seed, (n, c, h, w)) in [
        (50u64, (3, 4, 5, 3)),
        (51, (20, 64, 3, 2)),
        (52, (1, 2, 3, 3)),
    ] {
        let xs = Shape4 { n, c, h, w };
        if (n, c) == (20, 64) {
            assert_eq!(batchnorm::cuda::chunks(xs), (7, 3));
        }
        let mut r = rng(seed);
        let mut x = random_matrix(&mut r, 1, xs.len());
        x.iter_mut().for_each(|v| *v = *v * 2.0 + 7.0); // an offset the variance must handle
        let (gamma, beta) = (random_matrix(&mut r, 1, c), random_matrix(&mut r, 1, c));
        let rm0 = random_matrix(&mut r, 1, c);
        let rv0: Vec<f32> = random_matrix(&mut r, 1, c)
            .iter()
            .map(|v| v.abs() + 0.5)
            .collect();
        let dy = random_matrix(&mut r, 1, xs.len());
        let dx0 = random_matrix(&mut r, 1, xs.len());
        let inputs = (&x[..], &gamma[..], &beta[..], &rm0[..], &rv0[..]);
        for v in [batchnorm::Version::V1, batchnorm::Version::V2] {
            for training in [true, false] {
                let want = batchnorm_run(None, xs, inputs, (&dy, &dx0), (training, v));
                let got = batchnorm_run(Some(e), xs, inputs, (&dy, &dx0), (training, v));
                for (k, what) in ["y", "running mean", "running var", "dx", "dgamma", "dbeta"]
                    .iter()
                    .enumerate()
                {
                    assert_close(
                        &format!("batchnorm {v:?} {xs:?} training {training}: {what}"),
                        &got[k],
                        &want[k],
                        1e-5,
                    );
                }
            }
        }
    }
}

#[test]
fn elementwise_pooling_and_linear_kernels_match_the_cpu() {
    let Some(e) = emulator("elementwise_pooling_and_linear_kernels_match_the_cpu") else {
        return;
    };
    let v = elementwise::Version::V1;
    let mut r = rng(60);
    let len = 1000usize; // not a multiple of the block, several blocks of grid stride
    let x = random_matrix(&mut r, 1, len);
    let dy = random_matrix(&mut r, 1, len);
    let mut y = vec![f32::NAN; len];
    elementwise::cuda::relu_forward(e, v, host(&x), host_mut(&mut y)).unwrap();
    let mut want = vec![0.0f32; len];
    elementwise::cpu::relu_forward(&x, &mut want);
    assert_eq!(y, want, "relu forward");
    for acc in [false, true] {
        let (mut dx, mut want_dx) = (x.clone(), x.clone());
        elementwise::cpu::relu_backward(&y, &dy, Grad::new(&mut want_dx[..], acc));
        let g = Grad::new(host_mut(&mut dx), acc);
        elementwise::cuda::relu_backward(e, v, host(&y), host(&dy), g).unwrap();
        assert_eq!(dx, want_dx, "relu backward accumulate {acc}");
        let (mut out, mut want_out) = (dy.clone(), dy.clone());
        elementwise::cpu::copy_or_add(&x, Grad::new(&mut want_out[..], acc));
        let g = Grad::new(host_mut(&mut out), acc);
        elementwise::cuda::copy_or_add(e, v, host(&x), g).unwrap();
        assert_eq!(out, want_out, "add accumulate {acc}");
        // axpy: the kernel fuses the multiply-add (fmaf) where the CPU rounds twice.
        let alpha = -0.37f32;
        let mut out = dy.clone();
        let want_out: Vec<f32> = dy
            .iter()
            .zip(&x)
            .map(|(&d, &xv)| {
                if acc {
                    alpha.mul_add(xv, d)
                } else {
                    alpha * xv
                }
            })
            .collect();
        let g = Grad::new(host_mut(&mut out), acc);
        elementwise::cuda::axpy(e, v, f64::from(alpha), host(&x), g).unwrap();
        assert_eq!(out, want_out, "axpy accumulate {acc}");
    }
    // bf16 rounding of the GEMM operands: the half crate's round-to-nearest-even, NaN and
    // infinities included.
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
    to_bf16(e, host(&special), &mut DevPtrMut::host(&mut h)).unwrap();
    for (i, (&got, &value)) in h.iter().zip(&special).enumerate() {
        let want = half::bf16::from_f32(value);
        if value.is_nan() {
            assert!(half::bf16::from_bits(got).is_nan(), "bf16 of NaN");
        } else {
            assert_eq!(got, want.to_bits(), "bf16 of {value} (element {i})");
        }
    }
    // f64 -> f32
    let d64: Vec<f64> = (0..len).map(|i| (i as f64) / 3.0).collect();
    let mut f = vec![0.0f32; len];
    elementwise::cuda::f64_to_f32(e, DevPtr::host(&d64), host_mut(&mut f)).unwrap();
    assert!(f.iter().zip(&d64).all(|(&g, &w)| g == w as f32));
    pooling_matches(e, &mut r);
    linear_matches(e, &mut r);
}

/// Average pooling, k = 2 and global, forward and backward.
fn pooling_matches(e: &Emulator, r: &mut impl rand::Rng) {
    let v = pool::Version::V1;
    for (h, w, k) in [(6usize, 4usize, 2usize), (4, 4, 4)] {
        let xs = Shape4 { n: 2, c: 3, h, w };
        let xin = random_matrix(r, 1, xs.len());
        let ylen = pool::out_shape(xs, k).len();
        let mut want_y = vec![0.0f32; ylen];
        pool::cpu::forward(&xin, xs, k, &mut want_y);
        let mut ey = vec![f32::NAN; ylen];
        pool::cuda::forward(e, v, host(&xin), xs, k, host_mut(&mut ey)).unwrap();
        assert_close("avgpool forward", &ey, &want_y, 1e-6);
        let gy = random_matrix(r, 1, ylen);
        let mut want_dx = xin.clone();
        pool::cpu::backward(xs, k, &gy, Grad::new(&mut want_dx[..], true));
        let mut edx = xin.clone();
        pool::cuda::backward(e, v, xs, k, host(&gy), Grad::new(host_mut(&mut edx), true)).unwrap();
        assert_close("avgpool backward", &edx, &want_dx, 1e-6);
    }
}

/// The linear layer's launchers (bias rows, column sums and their GEMMs) against the CPU's.
fn linear_matches(e: &Emulator, r: &mut impl rand::Rng) {
    let v = linear::Version::V1;
    let (rows, inp, out) = (5usize, 7usize, 300usize);
    let lx = random_matrix(r, rows, inp);
    let lw = random_matrix(r, out, inp);
    let lb = random_matrix(r, 1, out);
    let mut want = vec![0.0f32; rows * out];
    let fwd = |y| linear::Forward {
        x: &lx[..],
        n: rows,
        w: &lw[..],
        b: &lb[..],
        out,
        y,
    };
    linear::cpu::forward(fwd(&mut want[..])).unwrap();
    let mut ly = vec![f32::NAN; rows * out];
    let f = fwd(&mut ly[..]).map(host, host_mut);
    linear::cuda::forward(e, v, f, GemmPrecision::F32).unwrap();
    assert_close("linear forward", &ly, &want, 1e-6);
    let ldy = random_matrix(r, rows, out);
    let (dw0, db0, dx0) = (
        random_matrix(r, out, inp),
        random_matrix(r, 1, out),
        random_matrix(r, rows, inp),
    );
    let run = |cuda: bool| {
        let (mut dx, mut dw, mut db) = (dx0.clone(), dw0.clone(), db0.clone());
        let bwd = linear::Backward {
            x: &lx[..],
            n: rows,
            w: &lw[..],
            out,
            dy: &ldy[..],
            dx: Some(Grad::new(&mut dx[..], true)),
            dw: &mut dw[..],
            db: &mut db[..],
        };
        if cuda {
            linear::cuda::backward(e, v, bwd.map(host, host_mut), GemmPrecision::F32).unwrap();
        } else {
            linear::cpu::backward(bwd).unwrap();
        }
        [dx, dw, db]
    };
    let (got, want) = (run(true), run(false));
    for (what, (g, w)) in ["dx", "dw", "db"].iter().zip(got.iter().zip(&want)) {
        assert_close(&format!("linear {what}"), g, w, 1e-5);
    }
}

#[test]
fn multi_tensor_sgd_kernel_matches_the_cpu_update() {
    let Some(e) = emulator("multi_tensor_sgd_kernel_matches_the_cpu_update") else {
        return;
    };
    let lens = [1usize, 1023, 0, 1024, 1025, 40];
    let mut r = rng(70);
    for nesterov in [false, true] {
        for first in [true, false] {
            let step = SgdStep {
                lr: 0.03,
                momentum: 0.9,
                weight_decay: 5e-4,
                nesterov,
                first,
            };
            let w: Vec<Vec<f32>> = lens.iter().map(|&l| random_matrix(&mut r, 1, l)).collect();
            let g: Vec<Vec<f32>> = lens.iter().map(|&l| random_matrix(&mut r, 1, l)).collect();
            let v: Vec<Vec<f32>> = lens.iter().map(|&l| random_matrix(&mut r, 1, l)).collect();
            let (mut ww, mut wv) = (w.clone(), v.clone());
            for i in 0..lens.len() {
                sgd::cpu::update(&mut ww[i], &g[i], &mut wv[i], &step);
            }
            let refs: Vec<sgd::cuda::TensorRef<'_>> = (0..lens.len())
                .map(|i| sgd::cuda::TensorRef {
                    w: host(&w[i]),
                    g: host(&g[i]),
                    v: host(&v[i]),
                })
                .collect();
            let (table, blocks) = sgd::cuda::table(&refs).unwrap();
            drop(refs);
            let want_blocks: usize = lens.iter().map(|l| l.div_ceil(SGD_CHUNK)).sum();
            assert_eq!(blocks, want_blocks);
            // SAFETY: the table addresses w, g and v, which nothing else touches until the
            // emulator's synchronous launch returns.
            unsafe {
                sgd::cuda::update_all(e, sgd::Version::V1, DevPtr::host(&table), blocks, &step)
            }
            .unwrap();
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
    let keys = normalize_rows::cpu::forward(&keys, 600, d).unwrap().0;
    let queries = normalize_rows::cpu::forward(&queries, 3, d).unwrap().0;
    let (nq, nk) = (3usize, 600usize);
    for k in [1usize, 2, 4, 50, 600] {
        let want = topk::cpu::nearest(&queries, &keys, d, k, false).unwrap();
        // Scratch for two queries a block: the search runs in two blocks.
        let rows = 2;
        let (mut sims, mut vals, mut idx) = (
            vec![f32::NAN; rows * nk],
            vec![f32::NAN; rows * k],
            vec![-1i32; rows * k],
        );
        let mut scratch = topk::cuda::Scratch {
            sims: host_mut(&mut sims),
            values: host_mut(&mut vals),
            indices: DevPtrMut::host(&mut idx),
        };
        let v = topk::Version::V1;
        let got =
            topk::cuda::nearest(e, v, host(&queries), host(&keys), d, k, &mut scratch).unwrap();
        assert_eq!(got.len(), nq);
        for q in 0..nq {
            // The host GEMM and the CPU path's may round differently: compare similarities,
            // and for the exact ties of query 0 the indices (lowest first).
            let gv: Vec<f32> = got[q].iter().map(|x| x.0).collect();
            let wv: Vec<f32> = want[q].iter().map(|x| x.0).collect();
            assert_close(&format!("top-{k} of query {q}"), &gv, &wv, 1e-6);
            if q == 0 && k >= 4 {
                let gi: Vec<usize> = got[q][..4].iter().map(|x| x.1).collect();
                assert_eq!(gi, [0, 5, 77, 599], "tied neighbours of query 0 (k = {k})");
            }
            let mut distinct: Vec<usize> = got[q].iter().map(|x| x.1).collect();
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
    let (f_cpu, norms_cpu) = normalize_rows::cpu::forward(&z, n, d).unwrap();
    let dz_cpu = normalize_rows::cpu::backward(&f_cpu, &norms_cpu, &gf, n, d).unwrap();
    let (mut f, mut norms, mut dz) = (
        vec![f32::NAN; n * d],
        vec![f32::NAN; n],
        vec![f32::NAN; n * d],
    );
    let v = normalize_rows::Version::V1;
    normalize_rows::cuda::forward(
        e,
        v,
        host(&z),
        host_mut(&mut f),
        host_mut(&mut norms),
        (n, d),
    )
    .unwrap();
    normalize_rows::cuda::backward(
        e,
        v,
        host(&f),
        host(&norms),
        host(&gf),
        host_mut(&mut dz),
        (n, d),
    )
    .unwrap();
    assert_close("normalize forward", &f, &f_cpu, 1e-6);
    assert_close("norms", &norms, &norms_cpu, 1e-6);
    assert_close("normalize backward", &dz, &dz_cpu, 1e-5);
}

/// One loss version through `loss::cuda::enqueue`, its scratch carved from a host arena as
/// `CudaLoss` carves it from device memory.
fn emulated_loss(
    e: &Emulator,
    version: CudaLossVersion,
    z: &[f32],
    (n, d): (usize, usize),
    cfg: &LossConfig,
) -> (f64, Vec<f32>) {
    let bytes = Scratch::bytes(version, n, d).unwrap();
    let mut arena = vec![0u64; bytes.div_ceil(8) + 32]; // zeroed, as CudaLoss allocates it
    let words = arena.len() * 8;
    // SAFETY: reinterpreting the u64 arena as bytes (any bit pattern is a valid u8).
    let arena_bytes =
        unsafe { std::slice::from_raw_parts_mut(arena.as_mut_ptr() as *mut u8, words) };
    let mut carve = Carve::from(DevPtrMut::host(arena_bytes));
    let mut scratch = Scratch::carve(&mut carve, version, n, d).unwrap();
    let mut dz = vec![f32::NAN; n * d];
    let mut loss = [f64::NAN];
    loss_cuda::enqueue(
        e,
        version,
        host(z),
        Some(host_mut(&mut dz)),
        (n, d),
        cfg,
        &mut scratch,
        DevPtrMut::host(&mut loss),
    )
    .unwrap();
    (loss[0], dz)
}

#[test]
fn loss_kernels_match_the_float64_reference() {
    let Some(e) = emulator("loss_kernels_match_the_float64_reference") else {
        return;
    };
    // Sizes around fused v2's and v3's 64-row tiles, 32-column (v3 bf16: 64) chunks and
    // 128-column sweeps (N = 130, d = 130: three row blocks, a masked tail, two sweeps), random
    // and adversarial inputs.
    // The one-block-per-row versions (unfused, v1) run fewer cases: the emulator spawns an OS
    // thread per CUDA thread, N blocks of 256 each, and v1 synchronises often (~10 s a case).
    // Above the small sizes, the tiled versions only (fused-v2 and later).
    let versions = |n: usize, adversarial: bool| -> Vec<CudaLossVersion> {
        let all = CudaLossVersion::all();
        if n <= 6 || (n <= 70 && !adversarial) {
            all.collect()
        } else {
            all.skip_while(|&v| v != CudaLossVersion::FusedV2).collect()
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
                    ..LossConfig::default()
                };
                let want = reference::instance_loss(&z, n, d, &cfg, true).unwrap();
                for version in versions(n, adversarial) {
                    let tolerance = version.tolerance(cfg.tau, d, adversarial);
                    let (tol, grad_tol) = (tolerance.loss, tolerance.grad);
                    let (loss, dz) = emulated_loss(e, version, &z, (n, d), &cfg);
                    let case = format!(
                        "{} N={n} d={d} adversarial={adversarial} {cfg:?}",
                        version.name()
                    );
                    let rel = (loss - want.loss).abs() / want.loss.abs();
                    assert!(
                        rel < tol,
                        "{case}: loss {loss} vs {} (rel {rel:e})",
                        want.loss
                    );
                    let g: Vec<f64> = dz.iter().map(|&x| f64::from(x)).collect();
                    assert!(g.iter().all(|x| x.is_finite()), "{case}: not finite");
                    if let Some(grad_tol) = grad_tol {
                        let err = scaled_grad_error(&g, want.grad_z.as_ref().unwrap(), &z, d);
                        assert!(err < grad_tol, "{case}: gradient error {err:e}");
                    }
                }
                i += 1;
            }
        }
    }
}

#[test]
fn the_kernel_table_is_read_from_the_sources() {
    let names = emulator::kernel_names(
        "extern \"C\" __global__ void __launch_bounds__(256, 1)\nfoo_v1(int n) {}\n\
         extern \"C\" __global__ void bar_v2(float* x) {}",
    );
    assert_eq!(names, ["foo_v1", "bar_v2"]);
}

/// The kernel versions the tests above run: a new version fails this until its op's test runs
/// it too (and then joins the list).
#[test]
fn every_kernel_version_is_under_test() {
    use clap::ValueEnum;
    fn names<V: ValueEnum>() -> Vec<String> {
        V::value_variants().iter().map(|v| v.name()).collect()
    }
    let v1 = ["v1"];
    assert_eq!(names::<conv2d::Version>(), ["v1", "v2"], "conv2d");
    assert_eq!(names::<batchnorm::Version>(), ["v1", "v2"], "batchnorm");
    assert_eq!(names::<elementwise::Version>(), v1, "elementwise");
    assert_eq!(names::<pool::Version>(), v1, "pool");
    assert_eq!(names::<linear::Version>(), v1, "linear");
    assert_eq!(names::<sgd::Version>(), v1, "sgd");
    assert_eq!(names::<topk::Version>(), v1, "topk");
    assert_eq!(names::<normalize_rows::Version>(), v1, "normalize_rows");
    // The loss test above runs CudaLossVersion::all(), the loss registry's CUDA rows; every
    // version must have one.
    assert_eq!(
        CudaLossVersion::all().collect::<Vec<_>>(),
        CudaLossVersion::value_variants()
    );
}

/// The tensor-core products alone: every lane's registers placed by the PTX ISA's fragment
/// tables (`ops::mma`, written from the ISA apart from the emulator), D compared exactly.
#[test]
fn mma_fragment_layouts() {
    let Some(e) = emulator("mma_fragment_layouts") else {
        return;
    };
    for shape in mma::Shape::ALL {
        for seed in 0..4 {
            let p = mma::Probe::random(shape, 40 + seed);
            let mut d = vec![f32::NAN; p.expected_d.len()];
            mma::cuda::probe(
                e,
                shape,
                DevPtr::host(&p.a_regs),
                DevPtr::host(&p.b_regs),
                host(&p.c),
                host_mut(&mut d),
            )
            .unwrap();
            assert_eq!(d, p.expected_d, "{shape:?} seed {seed}");
        }
    }
}

// ---- the data-parallel loss rows (loss::cuda::ranks_v1) ------------------------------------
// Every rank of a group in this one process, the collectives done on the host (the
// reduce-scatter of the key side, the all-gather of the shares): the ranks together must give
// one device's float64 loss and each rank its rows of dL/dz.

/// A zeroed host arena of `bytes`, aligned for every scratch piece.
fn arena(bytes: usize) -> Vec<u64> {
    vec![0u64; bytes.div_ceil(8) + 32]
}

fn carve_of(arena: &mut [u64]) -> Carve<'_> {
    let words = arena.len() * 8;
    // SAFETY: reinterpreting the u64 arena as bytes (any bit pattern is a valid u8).
    let bytes = unsafe { std::slice::from_raw_parts_mut(arena.as_mut_ptr() as *mut u8, words) };
    Carve::from(DevPtrMut::host(bytes))
}

/// Every rank's loss and rows of dL/dz for the global batch `global` (one device's layout),
/// `ranks` ranks of m images each.
fn ranks_on_the_emulator(
    e: &Emulator,
    global: &[f32],
    (ranks, m, d): (usize, usize, usize),
    cfg: &LossConfig,
) -> (f64, Vec<Vec<f32>>) {
    let n = 2 * ranks * m;
    let layout = RankLayout::new(&vec![m; ranks]).unwrap();
    let p = LossParams::new(n, d, cfg, true).unwrap();
    let both_sides = cfg.semantics == GradSemantics::BothSides;
    let own: Vec<OwnRows> = (0..ranks)
        .map(|r| OwnRows::new(r, ranks, m).unwrap())
        .collect();
    let z: Vec<Vec<f32>> = (0..ranks)
        .map(|r| layout.take_rank_rows(global, d, r))
        .collect();
    let mut arenas: Vec<Vec<u64>> = own
        .iter()
        .map(|&o| arena(RankScratch::bytes(o, n).unwrap()))
        .collect();
    let mut dz = vec![vec![f32::NAN; 2 * m * d]; ranks];
    let mut kside = vec![vec![f32::NAN; n * d]; ranks];
    let mut shares = vec![f64::NAN; ranks];
    for r in 0..ranks {
        let mut s = RankScratch::carve(&mut carve_of(&mut arenas[r]), own[r], n).unwrap();
        let key = both_sides.then(|| DevPtrMut::host(&mut kside[r][..]));
        let share = DevPtrMut::host(&mut shares[r..r + 1]);
        let (zr, zg) = (DevPtr::host(&z[r][..]), DevPtr::host(global));
        let dzr = DevPtrMut::host(&mut dz[r][..]);
        enqueue_rows(e, zr, zg, own[r], &p, &mut s, dzr, key, share).unwrap();
    }
    if both_sides {
        // The reduce-scatter: rank r receives rows r 2m .. (r + 1) 2m of the sum over ranks.
        for r in 0..ranks {
            let rows = r * 2 * m * d..(r + 1) * 2 * m * d;
            let summed: Vec<f32> = rows.map(|i| kside.iter().map(|k| k[i]).sum()).collect();
            let s = RankScratch::carve(&mut carve_of(&mut arenas[r]), own[r], n).unwrap();
            let (zr, key) = (DevPtr::host(&z[r][..]), DevPtr::host(&summed[..]));
            enqueue_finish(e, zr, d, &s, key, DevPtrMut::host(&mut dz[r][..])).unwrap();
        }
    }
    let mut loss = [f64::NAN];
    enqueue_sum(e, DevPtr::host(&shares), DevPtrMut::host(&mut loss)).unwrap();
    (loss[0], dz)
}

#[test]
fn rank_rows_kernels_give_one_devices_loss_and_gradient() {
    let Some(e) = emulator("rank_rows_kernels_give_one_devices_loss_and_gradient") else {
        return;
    };
    // 3 ranks of 1 image (N = 6); 2 ranks of 37 (own rows over two 64-row tiles, N = 148 not a
    // multiple of the tile) with d = 130 (two 128-column sweeps, not a multiple of 4).
    let mut seed = 700;
    for (ranks, m, d) in [(3usize, 1usize, 3usize), (2, 37, 130)] {
        let n = 2 * ranks * m;
        for adversarial in [false, true] {
            seed += 1;
            let global = if adversarial {
                adversarial_matrix(&mut rng(seed), n, d)
            } else {
                random_matrix(&mut rng(seed), n, d)
            };
            for semantics in [GradSemantics::QueryOnly, GradSemantics::BothSides] {
                let cfg = LossConfig {
                    semantics,
                    ..LossConfig::default()
                };
                let case =
                    format!("{ranks} ranks x {m}, d {d}, adversarial {adversarial}, {semantics:?}");
                let want = reference::instance_loss(&global, n, d, &cfg, true).unwrap();
                let want_grad = want.grad_z.unwrap();
                let (loss, dz) = ranks_on_the_emulator(e, &global, (ranks, m, d), &cfg);
                let tol = CudaLossVersion::FusedV2.tolerance(cfg.tau, d, adversarial);
                let rel = (loss - want.loss).abs() / want.loss.abs();
                assert!(
                    rel < tol.loss,
                    "{case}: loss {loss} vs {} (rel {rel:e})",
                    want.loss
                );
                let layout = RankLayout::new(&vec![m; ranks]).unwrap();
                let mut got = vec![0.0f64; n * d];
                for (r, rows) in dz.iter().enumerate() {
                    let rows: Vec<f64> = rows.iter().map(|&x| f64::from(x)).collect();
                    layout.put_rank_rows(&rows, d, r, &mut got);
                }
                assert!(got.iter().all(|x| x.is_finite()), "{case}: not finite");
                if let Some(grad_tol) = tol.grad {
                    let err = scaled_grad_error(&got, &want_grad, &global, d);
                    assert!(err < grad_tol, "{case}: gradient error {err:e}");
                }
            }
        }
    }
}
