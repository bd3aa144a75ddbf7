//! Every encoder op's kernels against the CPU on a GPU (the bodies of tests/common/op_cases.rs,
//! which tests/emulated/kernels.rs runs on the emulator), the CUDA backend's wiring of every op
//! against the CPU backend, GEMM precisions, and whole training steps of both encoders.
//! Skips without a GPU (`SKIPPED (no GPU): ...`), fails under REQUIRE_GPU=1.

// The op bodies take every buffer explicitly, as the backend methods do.
#![allow(clippy::too_many_arguments)]

use std::sync::Arc;

use invaspread::backend::Backend;
use invaspread::backend::Cpu;
use invaspread::backend::CudaBackend;
use invaspread::cuda::GemmPrecision;
use invaspread::loss::LossConfig;
use invaspread::names::Named;
use invaspread::nn::models::{Model, ModelKind};
use invaspread::nn::optim::{Sgd, SgdConfig};
use invaspread::nn::step::train_step;
use invaspread::nn::Encoder;
use invaspread::ops::batchnorm::BatchNormDevice;
use invaspread::ops::conv2d::Conv;
use invaspread::ops::conv2d::Conv2dDevice;
use invaspread::ops::normalize_rows::cpu::forward as normalize;
use invaspread::ops::sgd::SgdStep;
use invaspread::ops::{batchnorm, conv2d, linear, Grad, Shape4};
use invaspread::tape::params::{Param, ParamStore};
use invaspread::tape::Graph;
use invaspread::testing::{gpu_or_skip, random_matrix, rng};

use crate::common::op_cases::{self, GpuDevice};
use crate::common::{assert_close, rel_err};

/// The CPU (float32) and CUDA backends, or None when the test is skipped.
fn backends(name: &str) -> Option<(Cpu<f32>, CudaBackend)> {
    let gpu = gpu_or_skip(name)?;
    let cuda = CudaBackend::new(gpu).expect("the CUDA backend starts");
    Some((Cpu::new(), cuda))
}

fn buf<B: Encoder>(b: &B, host: &[f32]) -> B::Buffer {
    let mut x = b.zeros(host.len()).unwrap();
    b.upload(host, &mut x).unwrap();
    x
}

/// The kNN search on a backend, from host rows.
fn nearest_on<B: Encoder>(
    b: &B,
    queries: &[f32],
    keys: &[f32],
    d: usize,
    k: usize,
) -> Vec<Vec<(f32, usize)>> {
    b.nearest(&buf(b, queries), &buf(b, keys), d, k).unwrap()
}

/// Convolution forward, then backward with dw += and dx written or added to random contents.
fn conv_on<B: Encoder>(
    b: &B,
    x: &[f32],
    xs: Shape4,
    w: &[f32],
    conv: &Conv,
    dy: &[f32],
    dx0: &[f32],
    dw0: &[f32],
    dx_accumulate: bool,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (xb, wb) = (buf(b, x), buf(b, w));
    let mut y = b.zeros(conv.out_shape(xs).len()).unwrap();
    let conv = *conv;
    b.conv2d_forward(conv2d::Forward {
        x: &xb,
        xs,
        w: &wb,
        conv,
        y: &mut y,
    })
    .unwrap();
    let (dyb, mut dx, mut dw) = (buf(b, dy), buf(b, dx0), buf(b, dw0));
    b.conv2d_backward(conv2d::Backward {
        x: &xb,
        xs,
        w: &wb,
        conv,
        dy: &dyb,
        dx: Some(Grad::new(&mut dx, dx_accumulate)),
        dw: &mut dw,
    })
    .unwrap();
    (
        b.download(&y).unwrap(),
        b.download(&dx).unwrap(),
        b.download(&dw).unwrap(),
    )
}

/// (images, C_in, H, W, C_out, k, stride, pad) as an input shape and a convolution.
type Geometry = (usize, usize, usize, usize, usize, usize, usize, usize);

fn conv_case(geometry: Geometry) -> (Shape4, Conv) {
    let (n, c_in, h, w, c_out, k, stride, pad) = geometry;
    (
        Shape4 { n, c: c_in, h, w },
        Conv {
            c_in,
            c_out,
            k,
            stride,
            pad,
        },
    )
}

/// Compares one convolution geometry on both backends (`tol` relative to the largest value).
fn check_conv(cpu: &Cpu<f32>, cuda: &CudaBackend, i: usize, xs: Shape4, conv: &Conv, tol: f64) {
    let ys = conv.out_shape(xs);
    let mut r = rng(100 + i as u64);
    let x = random_matrix(&mut r, 1, xs.len());
    let wt = random_matrix(&mut r, 1, conv.c_out * conv.patch());
    let dy = random_matrix(&mut r, 1, ys.len());
    let dx0 = random_matrix(&mut r, 1, xs.len());
    let dw0 = random_matrix(&mut r, 1, wt.len());
    for acc in [false, true] {
        let want = conv_on(cpu, &x, xs, &wt, conv, &dy, &dx0, &dw0, acc);
        let got = conv_on(cuda, &x, xs, &wt, conv, &dy, &dx0, &dw0, acc);
        let tag = format!(
            "conv case {i} ({:?} GEMMs) accumulate {acc}",
            cuda.gemm_precision()
        );
        assert_close(&format!("{tag}: y"), &got.0, &want.0, tol);
        assert_close(&format!("{tag}: dx"), &got.1, &want.1, tol);
        assert_close(&format!("{tag}: dw"), &got.2, &want.2, tol);
    }
}

#[test]
fn conv2d_in_tf32_and_bf16_stays_within_their_rounding() {
    let Some((cpu, cuda)) = backends("conv2d_in_tf32_and_bf16_stays_within_their_rounding") else {
        return;
    };
    // TF32 keeps 10 mantissa bits (relative rounding 2^-11), bf16 7 (2^-8); sums are float32.
    let cuda = cuda.with_gemm_precision(GemmPrecision::Tf32);
    let (xs, conv) = conv_case((8, 64, 16, 16, 64, 3, 1, 1));
    check_conv(&cpu, &cuda, 0, xs, &conv, 5e-3);
    let cuda = cuda.with_gemm_precision(GemmPrecision::Bf16);
    check_conv(&cpu, &cuda, 0, xs, &conv, 3e-2);
    // Not float32: a mode that silently fell back to SGEMM would match to 1e-6.
    let exact = CudaBackend::new(cuda.gpu().clone()).unwrap();
    let (xb, wb) = (
        random_matrix(&mut rng(1), 1, xs.len()),
        random_matrix(&mut rng(2), 1, conv.c_out * conv.patch()),
    );
    let run = |b: &CudaBackend| {
        let (x, w) = (buf(b, &xb), buf(b, &wb));
        let mut y = b.zeros(conv.out_shape(xs).len()).unwrap();
        b.conv2d_forward(conv2d::Forward {
            x: &x,
            xs,
            w: &w,
            conv,
            y: &mut y,
        })
        .unwrap();
        b.download(&y).unwrap()
    };
    assert!(
        rel_err(&run(&cuda), &run(&exact)) > 1e-6,
        "bf16 GEMMs gave float32 results"
    );
}

/// Every op through the CUDA backend (its device traits: the versions of its options, the
/// scratch of its slots) against the CPU backend, at small sizes: the backends' wiring (the
/// kernels themselves are the op bodies' above), and what compute-sanitizer (memcheck,
/// racecheck) runs quickly.
#[test]
fn sanitizer_sized_ops() {
    let Some((cpu, cuda)) = backends("sanitizer_sized_ops") else {
        return;
    };
    for (i, g) in [(3, 5, 9, 7, 6, 3, 1, 1), (2, 3, 5, 5, 4, 3, 2, 0)]
        .into_iter()
        .enumerate()
    {
        let (xs, conv) = conv_case(g);
        check_conv(&cpu, &cuda, i, xs, &conv, 1e-5);
    }
    let xs = Shape4 {
        n: 3,
        c: 5,
        h: 4,
        w: 3,
    };
    let mut r = rng(7);
    let x = random_matrix(&mut r, 1, xs.len());
    let (g, b) = (random_matrix(&mut r, 1, 5), random_matrix(&mut r, 1, 5));
    let (rm, rv) = (vec![0.0; 5], vec![1.0; 5]);
    let dy = random_matrix(&mut r, 1, xs.len());
    for training in [true, false] {
        let want = batchnorm_on(&cpu, &x, xs, (&g, &b), (&rm, &rv), training, &dy, &x);
        let got = batchnorm_on(&cuda, &x, xs, (&g, &b), (&rm, &rv), training, &dy, &x);
        for (k, (gk, wk)) in got.iter().zip(&want).enumerate() {
            assert_close(&format!("batchnorm output {k}"), gk, wk, 2e-4);
        }
    }
    let want = small_ops_on(&cpu, 9);
    let got = small_ops_on(&cuda, 9);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_close(&format!("small op output {i}"), g, w, 1e-5);
    }
    let lens = [1, 1025, 3];
    let want = sgd_on(&cpu, &lens, false);
    let got = sgd_on(&cuda, &lens, false);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_close(&format!("sgd buffer {i}"), g, w, 1e-6);
    }
    let keys = normalize(&random_matrix(&mut r, 300, 8), 300, 8).unwrap().0;
    let queries = normalize(&random_matrix(&mut r, 5, 8), 5, 8).unwrap().0;
    let want = nearest_on(&cpu, &queries, &keys, 8, 7);
    let got = nearest_on(&cuda, &queries, &keys, 8, 7);
    for (g, w) in got.iter().zip(&want) {
        let gv: Vec<f32> = g.iter().map(|x| x.0).collect();
        let wv: Vec<f32> = w.iter().map(|x| x.0).collect();
        assert_close("kNN similarities", &gv, &wv, 1e-5);
    }
}

#[test]
fn conv_kernels_match_the_cpu_convolution() {
    let Some(gpu) = gpu_or_skip("conv_kernels_match_the_cpu_convolution") else {
        return;
    };
    // (images, C_in, H, W, C_out, k, stride, pad): odd sizes, stride 2, 1x1 shortcuts, no
    // padding; every version, in one group and in groups of one image.
    let cases = [
        (3, 5, 9, 7, 6, 3, 1, 1),
        (4, 3, 8, 8, 8, 3, 2, 1),
        (5, 16, 6, 6, 32, 1, 2, 0),
        (2, 3, 5, 5, 4, 3, 1, 0),
        (1, 1, 1, 1, 1, 1, 1, 0),
    ];
    op_cases::conv(&GpuDevice(&gpu), &cases, 1e-5);
}

#[test]
fn the_backend_runs_its_conv_version_in_workspace_groups() {
    let Some((cpu, cuda)) = backends("the_backend_runs_its_conv_version_in_workspace_groups")
    else {
        return;
    };
    // The version the backend's options choose (v1; the default is the newest, v2).
    let kernels = invaspread::nn::EncoderKernels {
        conv2d: conv2d::Version::V1,
        ..Default::default()
    };
    let v1 = kernels.apply(CudaBackend::new(cuda.gpu().clone()).unwrap());
    let (xs, conv) = conv_case((4, 3, 8, 8, 8, 3, 2, 1));
    check_conv(&cpu, &v1, 0, xs, &conv, 1e-5);
    // Several im2col groups, the last one partial: 130 images at the default workspace on a
    // GPU; on the virtual GPU (38 s for that case) 9 images with a workspace of 2 images.
    let (xs, conv) = conv_case((130, 64, 32, 32, 64, 3, 1, 1));
    if cuda.gpu().is_virtual() {
        let (xs, conv) = conv_case((9, 16, 16, 16, 16, 3, 1, 1));
        let per_image = conv.patch() * conv.out_shape(xs).h * conv.out_shape(xs).w;
        invaspread::testing::virtual_gpu_note(
            "the_backend_runs_its_conv_version_in_workspace_groups",
            "the 130-image case runs as 9 images in groups of 2 (a smaller workspace)",
        );
        let cuda = cuda.with_option(invaspread::ops::conv2d::node::WorkspaceCap(2 * per_image));
        check_conv(&cpu, &cuda, 1, xs, &conv, 1e-5);
    } else {
        check_conv(&cpu, &cuda, 1, xs, &conv, 1e-5);
    }
}

/// Batchnorm forward (training or eval) and backward; returns y, dx, dgamma, dbeta and the
/// running statistics after the forward.
fn batchnorm_on<B: Encoder>(
    b: &B,
    x: &[f32],
    xs: Shape4,
    affine: (&[f32], &[f32]),
    running: (&[f32], &[f32]),
    training: bool,
    dy: &[f32],
    dx0: &[f32],
) -> Vec<Vec<f32>> {
    let (xb, g, be) = (buf(b, x), buf(b, affine.0), buf(b, affine.1));
    let (mut rm, mut rv) = (buf(b, running.0), buf(b, running.1));
    let mut y = b.zeros(xs.len()).unwrap();
    let mut saved = <B as BatchNormDevice>::Saved::default();
    b.batchnorm_forward(
        batchnorm::Forward {
            x: &xb,
            xs,
            gamma: &g,
            beta: &be,
            running_mean: &mut rm,
            running_var: &mut rv,
            training,
            relu: false,
            y: &mut y,
        },
        &mut saved,
    )
    .unwrap();
    let (dyb, mut dx) = (buf(b, dy), buf(b, dx0));
    let (mut dg, mut db) = (buf(b, &vec![0.5; xs.c]), buf(b, &vec![-0.5; xs.c]));
    b.batchnorm_backward(
        batchnorm::Backward {
            x: &xb,
            xs,
            gamma: &g,
            running_mean: &rm,
            running_var: &rv,
            training,
            relu: false,
            dy: &dyb,
            dx: Some(Grad::new(&mut dx, true)),
            dgamma: &mut dg,
            dbeta: &mut db,
        },
        &mut saved,
    )
    .unwrap();
    [&y, &dx, &dg, &db, &rm, &rv]
        .iter()
        .map(|v| b.download(v).unwrap())
        .collect()
}

#[test]
fn batchnorm_kernels_match_the_cpu_batchnorm() {
    let Some(gpu) = gpu_or_skip("batchnorm_kernels_match_the_cpu_batchnorm") else {
        return;
    };
    // Every version; (256, 64, 8, 8) runs v2 in 9 chunks: 8 of 29 images, one of 24. A channel
    // offset far from zero: the two-pass variance must not cancel. The GPU's float32
    // reductions against the CPU's float64 sums: 2e-4.
    let shapes = [(2, 3, 5, 7), (256, 64, 8, 8), (7, 5, 1, 1), (3, 130, 4, 4)];
    op_cases::batchnorm(&GpuDevice(&gpu), &shapes, 50.0, 2e-4);
}

/// relu, add, copy, axpy, average pooling and linear, forward and backward.
fn small_ops_on<B: Encoder>(b: &B, seed: u64) -> Vec<Vec<f32>> {
    let mut r = rng(seed);
    let xs = Shape4 {
        n: 3,
        c: 5,
        h: 8,
        w: 6,
    };
    let x = buf(b, &random_matrix(&mut r, 1, xs.len()));
    let other = buf(b, &random_matrix(&mut r, 1, xs.len()));
    let dy = buf(b, &random_matrix(&mut r, 1, xs.len()));
    let mut out = Vec::new();
    let mut y = b.zeros(xs.len()).unwrap();
    b.relu_forward(&x, &mut y).unwrap();
    out.push(b.download(&y).unwrap());
    let mut dx = buf(b, &random_matrix(&mut r, 1, xs.len()));
    b.relu_backward(&y, &dy, Grad::new(&mut dx, true)).unwrap();
    out.push(b.download(&dx).unwrap());
    b.relu_backward(&y, &dy, Grad::new(&mut dx, false)).unwrap();
    out.push(b.download(&dx).unwrap());
    b.copy_or_add(&x, Grad::new(&mut dx, false)).unwrap();
    b.copy_or_add(&other, Grad::new(&mut dx, true)).unwrap();
    out.push(b.download(&dx).unwrap());
    b.axpy(-0.37, &other, Grad::new(&mut dx, true)).unwrap();
    out.push(b.download(&dx).unwrap());
    b.axpy(2.5, &other, Grad::new(&mut dx, false)).unwrap();
    out.push(b.download(&dx).unwrap());
    for k in [1, 2, 4] {
        let pooled = Shape4 {
            h: xs.h / k,
            w: xs.w / k,
            ..xs
        };
        let mut py = b.zeros(pooled.len()).unwrap();
        let xs_k = Shape4 {
            h: pooled.h * k,
            w: pooled.w * k,
            ..xs
        };
        let xk = buf(b, &random_matrix(&mut r, 1, xs_k.len()));
        b.avgpool_forward(&xk, xs_k, k, &mut py).unwrap();
        out.push(b.download(&py).unwrap());
        let mut pdx = buf(b, &random_matrix(&mut r, 1, xs_k.len()));
        b.avgpool_backward(xs_k, k, &py, Grad::new(&mut pdx, true))
            .unwrap();
        out.push(b.download(&pdx).unwrap());
    }
    // Linear: 7 rows, 37 -> 13 features.
    let (n, inp, o) = (7, 37, 13);
    let lx = buf(b, &random_matrix(&mut r, n, inp));
    let lw = buf(b, &random_matrix(&mut r, o, inp));
    let lb = buf(b, &random_matrix(&mut r, 1, o));
    let mut ly = b.zeros(n * o).unwrap();
    b.linear_forward(linear::Forward {
        x: &lx,
        n,
        w: &lw,
        b: &lb,
        out: o,
        y: &mut ly,
    })
    .unwrap();
    out.push(b.download(&ly).unwrap());
    let ldy = buf(b, &random_matrix(&mut r, n, o));
    let mut ldx = buf(b, &random_matrix(&mut r, n, inp));
    let mut ldw = buf(b, &random_matrix(&mut r, o, inp));
    let mut ldb = buf(b, &random_matrix(&mut r, 1, o));
    b.linear_backward(linear::Backward {
        x: &lx,
        n,
        w: &lw,
        out: o,
        dy: &ldy,
        dx: Some(Grad::new(&mut ldx, true)),
        dw: &mut ldw,
        db: &mut ldb,
    })
    .unwrap();
    out.extend([&ldx, &ldw, &ldb].iter().map(|v| b.download(v).unwrap()));
    out
}

#[test]
fn elementwise_pooling_and_linear_kernels_match_the_cpu() {
    let Some(gpu) = gpu_or_skip("elementwise_pooling_and_linear_kernels_match_the_cpu") else {
        return;
    };
    let d = GpuDevice(&gpu);
    op_cases::elementwise(&d, 1000);
    op_cases::pool(&d);
    op_cases::linear(&d, (7, 37, 300), (1e-5, 1e-5));
    op_cases::normalize_rows(&d, (130, 37));
}

#[test]
fn loss_op_matches_cpu() {
    let Some((cpu, cuda)) = backends("loss_op_matches_cpu") else {
        return;
    };
    for (n, d) in [(6, 4), (256, 128), (250, 130)] {
        let z = random_matrix(&mut rng(n as u64), n, d);
        let cfg = LossConfig::default();
        let (lw, gw) = cpu.run(&z, n, d, &cfg);
        let (lg, gg) = cuda.run(&z, n, d, &cfg);
        // Two float32 approximations of the float64 loss (each within 5e-5 of it, see
        // tests/gpu/loss.rs and tests/cpu/cpu_loss.rs): they differ by up to the sum.
        assert_close(&format!("loss N={n} d={d}"), &lg, &lw, 5e-5);
        assert_close(&format!("dL/dz N={n} d={d}"), &gg, &gw, 3e-4);
    }
}

/// The loss op on one backend: upload z, run, download the loss and dL/dz.
trait LossOn {
    fn run(&self, z: &[f32], n: usize, d: usize, cfg: &LossConfig) -> (Vec<f32>, Vec<f32>);
}

impl<B: Encoder> LossOn for B {
    fn run(&self, z: &[f32], n: usize, d: usize, cfg: &LossConfig) -> (Vec<f32>, Vec<f32>) {
        let zb = buf(self, z);
        let (mut loss, mut dz) = (self.zeros(1).unwrap(), self.zeros(n * d).unwrap());
        self.instance_loss(&zb, (n, d), cfg, &mut loss, &mut dz)
            .unwrap();
        (self.download(&loss).unwrap(), self.download(&dz).unwrap())
    }
}

fn sgd_on<B: Encoder>(b: &B, lens: &[usize], nesterov: bool) -> Vec<Vec<f32>> {
    let mut r = rng(400);
    let params: Vec<Param<B>> = lens
        .iter()
        .enumerate()
        .map(|(i, &len)| Param {
            name: format!("p{i}"),
            shape: vec![len],
            value: buf(b, &random_matrix(&mut r, 1, len)),
            grad: buf(b, &random_matrix(&mut r, 1, len)),
            momentum: buf(b, &random_matrix(&mut r, 1, len)),
        })
        .collect();
    let mut store = ParamStore {
        params,
        bns: Vec::new(),
    };
    for first in [true, false, false] {
        let step = SgdStep {
            lr: 0.03,
            momentum: 0.9,
            weight_decay: 5e-4,
            nesterov,
            first,
        };
        b.sgd_update_all(
            &mut invaspread::ops::sgd::device::tensors(&mut store),
            &step,
        )
        .unwrap();
    }
    store
        .params
        .iter()
        .flat_map(|p| {
            [
                b.download(&p.value).unwrap(),
                b.download(&p.momentum).unwrap(),
            ]
        })
        .collect()
}

#[test]
fn multi_tensor_sgd_kernel_matches_the_cpu_update() {
    let Some(gpu) = gpu_or_skip("multi_tensor_sgd_kernel_matches_the_cpu_update") else {
        return;
    };
    // Lengths around the 1024-element chunk, one tiny, one empty, one spanning many blocks.
    op_cases::sgd(&GpuDevice(&gpu), &[1, 1023, 0, 1024, 1025, 64, 300_001]);
}

#[test]
fn topk_kernel_matches_the_cpu_neighbour_search() {
    let Some(gpu) = gpu_or_skip("topk_kernel_matches_the_cpu_neighbour_search") else {
        return;
    };
    op_cases::topk(&GpuDevice(&gpu), (3000, 37, 16), &[1, 3, 200, 3000], 1e-5);
}

/// `steps` training steps of `kind` from seed 0 on a fixed batch; returns every parameter and
/// batchnorm statistic after them, and the last loss.
fn step_on<B: Encoder>(
    b: B,
    kind: ModelKind,
    (images, side): (usize, usize),
    steps: usize,
) -> (Vec<Vec<f32>>, f64) {
    let mut store = ParamStore::default();
    let model = Model::new(kind, &mut store, &b, 0).unwrap();
    let mut graph = Graph::new(b, store);
    let mut sgd = Sgd::new(SgdConfig::default());
    let shape = Shape4 {
        n: 2 * images,
        c: 3,
        h: side,
        w: side,
    };
    let views = random_matrix(&mut rng(600), 1, shape.len());
    let mut loss = 0.0;
    for _ in 0..steps {
        loss = train_step(
            &mut graph,
            &model,
            &mut sgd,
            &views,
            shape,
            &LossConfig::default(),
            0.03,
        )
        .unwrap();
    }
    // Every parameter, then every batchnorm layer's running mean and variance.
    let b = &graph.backend;
    let mut state: Vec<Vec<f32>> = graph
        .params
        .params
        .iter()
        .map(|p| b.download(&p.value).unwrap())
        .collect();
    for bn in &graph.params.bns {
        state.push(b.download(&bn.running_mean).unwrap());
        state.push(b.download(&bn.running_var).unwrap());
    }
    (state, loss)
}

/// Steps on CUDA against the float64 CPU backend, the truth. Parameters (and running
/// statistics) are compared by their change, relative to the largest change of that tensor.
///
/// A fixed float32 tolerance is not enough: a step's gradient is ill-conditioned (batchnorm's
/// backward subtracts two nearly equal terms per channel), so two float32 paths can each be
/// percents away from float64. Measured on resnet18-cifar, 16 images: the CPU's float32 path
/// is up to 7e-2 away (layer 4), the virtual GPU (float64 GEMM sums) within 5e-5. So CUDA must
/// be within `TOLERANCE`, or no more than `SLACK` times as far as the CPU's own float32 path
/// plus `TOLERANCE`: as accurate as float32 on this step can be, and far from a broken kernel,
/// which is off by O(1).
/// `steps` steps of `kind` on `batch` = (images, side) views of side x side: CUDA's update
/// against float64, within the CPU float32 path's error.
fn compare_steps(kind: ModelKind, batch: (usize, usize), steps: usize, cuda: CudaBackend) {
    const TOLERANCE: f64 = 5e-3;
    const SLACK: f64 = 3.0;
    let before = step_on(Cpu::<f64>::new(), kind, batch, 0).0;
    let (truth, loss_f64) = step_on(Cpu::<f64>::new(), kind, batch, steps);
    let (cpu, loss_cpu) = step_on(Cpu::<f32>::new(), kind, batch, steps);
    let (got, loss_gpu) = step_on(cuda, kind, batch, steps);
    assert!(
        (loss_f64 - loss_gpu).abs() <= 1e-4 * loss_f64.abs(),
        "{}: loss {loss_gpu} on CUDA, {loss_f64} in float64 (CPU float32: {loss_cpu})",
        kind.name()
    );
    assert_eq!(got.len(), truth.len());
    let update = |after: &[f32], b0: &[f32]| -> Vec<f32> {
        after.iter().zip(b0).map(|(a, b)| a - b).collect()
    };
    let mut worst = (0.0f64, 0usize);
    for (i, ((g, c), (t, b0))) in got
        .iter()
        .zip(&cpu)
        .zip(truth.iter().zip(&before))
        .enumerate()
    {
        let du_true = update(t, b0);
        let e_gpu = rel_err(&update(g, b0), &du_true);
        let e_cpu = rel_err(&update(c, b0), &du_true);
        let bound = TOLERANCE + SLACK * e_cpu;
        assert!(
            e_gpu <= bound,
            "{} parameter or statistic {i} update: CUDA is {e_gpu:.3e} from float64, beyond \
             {bound:.3e} (the CPU's float32 path is {e_cpu:.3e} from it)",
            kind.name()
        );
        if e_gpu >= worst.0 {
            worst = (e_gpu, i);
        }
    }
    eprintln!(
        "{}: {steps} step(s) on CUDA: loss {loss_gpu} (float64 {loss_f64}); largest update \
         error against float64 {:.2e} (tensor {})",
        kind.name(),
        worst.0,
        worst.1
    );
}

#[test]
fn resnet18_training_step_matches_cpu() {
    let Some(gpu) = gpu_or_skip("resnet18_training_step_matches_cpu") else {
        return;
    };
    let cuda = CudaBackend::new(Arc::clone(&gpu)).unwrap();
    // 16 x 16 images (maps of 2 x 2 in the last stage): every layer kind at a quarter of the
    // emulator's time at 32 x 32 (CI's time).
    compare_steps(ModelKind::Resnet18Cifar, (16, 16), 1, cuda);
}

#[test]
fn convnet_three_training_steps_match_cpu() {
    let Some(gpu) = gpu_or_skip("convnet_three_training_steps_match_cpu") else {
        return;
    };
    let cuda = CudaBackend::new(gpu).unwrap();
    compare_steps(ModelKind::ConvnetSmall, (32, 32), 3, cuda);
}

/// Read-backs (the training losses, every few steps) reuse their pinned host buffers: freeing
/// page-locked memory would synchronise the device at every read.
#[test]
fn read_backs_reuse_their_pinned_buffers() {
    use invaspread::cuda::staging::{read_later, ReadBackPool};
    let Some(gpu) = gpu_or_skip("read_backs_reuse_their_pinned_buffers") else {
        return;
    };
    let pool = ReadBackPool::default();
    let stream = gpu.stream();
    for round in 0..4 {
        let values: Vec<f32> = (0..10).map(|i| (i + round) as f32).collect();
        let a = stream.clone_htod(&values).unwrap();
        let b = stream.clone_htod(&values[..3]).unwrap();
        // Two of one length in flight at once, one of another.
        let (first, second) = (
            read_later(&gpu, &pool, &a).unwrap(),
            read_later(&gpu, &pool, &a).unwrap(),
        );
        let short = read_later(&gpu, &pool, &b).unwrap();
        let want: Vec<f64> = values.iter().map(|&v| f64::from(v)).collect();
        assert_eq!(first().unwrap(), want);
        assert_eq!(second().unwrap(), want);
        assert_eq!(short().unwrap(), want[..3]);
        assert_eq!(pool.kept(), 3, "round {round}: buffers allocated again");
    }
}
