//! Every encoder op's CUDA launchers against its CPU implementation, one body per op, run on
//! any [`TestDevice`]: the CPU kernel emulator (`tests/emulated`, in seconds, in CI) and a GPU,
//! real or virtual (`tests/gpu`). The bodies run every kernel version of the op, forward and
//! backward, written and accumulated gradients, and sizes that are no multiple of a block;
//! each caller picks its sizes (the emulator's small ones, a GPU's larger ones as well) and
//! its bound (a GPU's float32 reductions stray further from the CPU's float64 sums than the
//! emulator's).

use bytemuck::Pod;
use cudarc::driver::{CudaSlice, DeviceRepr};

use invaspread::cuda::blas::to_bf16;
use invaspread::cuda::{DevPtr, DevPtrMut, GemmPrecision, Gpu, Queue};
use invaspread::ops::batchnorm::cpu::BnSaved;
use invaspread::ops::conv2d::Conv;
use invaspread::ops::sgd::{SgdStep, SGD_CHUNK};
use invaspread::ops::{
    batchnorm, conv2d, elementwise, linear, normalize_rows, pool, sgd, topk, Grad, Shape4,
};
use invaspread::testing::{random_matrix, rng};

use super::assert_close;

/// An element type of a test buffer.
pub trait Elem: Pod + DeviceRepr {}
impl<T: Pod + DeviceRepr> Elem for T {}

/// Where the launchers run: buffers filled from the host and read back, their pointers, and the
/// queue the launchers take.
pub trait TestDevice {
    type Q: Queue;
    type Buf<T: Elem>;
    fn queue(&self) -> &Self::Q;
    fn upload<T: Elem>(&self, host: &[T]) -> Self::Buf<T>;
    fn download<T: Elem>(&self, buf: &Self::Buf<T>) -> Vec<T>;
    fn ptr<T: Elem>(buf: &Self::Buf<T>) -> DevPtr<'_, T>;
    fn ptr_mut<T: Elem>(buf: &mut Self::Buf<T>) -> DevPtrMut<'_, T>;
    /// Whether equal inputs give bit-equal GEMM results at every position (the emulator and the
    /// virtual GPU sum in float64; cuBLAS may tile positions differently).
    fn exact_ties(&self) -> bool {
        true
    }
}

/// A GPU, real or virtual: buffers in device memory (one element at least: a zero-byte
/// allocation is an error there), read back after the stream has run.
pub struct GpuDevice<'a>(pub &'a Gpu);

impl TestDevice for GpuDevice<'_> {
    type Q = Gpu;
    type Buf<T: Elem> = (CudaSlice<T>, usize);
    fn queue(&self) -> &Gpu {
        self.0
    }
    fn upload<T: Elem>(&self, host: &[T]) -> (CudaSlice<T>, usize) {
        let stream = self.0.stream();
        let buf = if host.is_empty() {
            stream.clone_htod(&[T::zeroed()]).unwrap()
        } else {
            stream.clone_htod(host).unwrap()
        };
        (buf, host.len())
    }
    fn download<T: Elem>(&self, buf: &(CudaSlice<T>, usize)) -> Vec<T> {
        let mut all = self.0.stream().clone_dtoh(&buf.0).unwrap();
        all.truncate(buf.1);
        all
    }
    fn ptr<T: Elem>(buf: &(CudaSlice<T>, usize)) -> DevPtr<'_, T> {
        DevPtr::of(&buf.0).slice(0..buf.1).unwrap()
    }
    fn ptr_mut<T: Elem>(buf: &mut (CudaSlice<T>, usize)) -> DevPtrMut<'_, T> {
        let len = buf.1;
        DevPtrMut::of(&mut buf.0).into_slice(0..len).unwrap()
    }
    fn exact_ties(&self) -> bool {
        self.0.is_virtual()
    }
}

/// (images, C_in, H, W, C_out, k, stride, pad) as an input shape and a convolution.
pub type ConvGeometry = (usize, usize, usize, usize, usize, usize, usize, usize);

/// The convolution forward and backward through `conv2d::cuda` with every version, in one
/// group of all images and in groups of one (the workspace a large batch gets), against the
/// CPU's im2col, dx written and accumulated; within `tol` of the largest value.
pub fn conv<D: TestDevice>(d: &D, cases: &[ConvGeometry], tol: f64) {
    for (i, &(n, c_in, h, w, c_out, k, stride, pad)) in cases.iter().enumerate() {
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
            for v in [conv2d::Version::V1, conv2d::Version::V2] {
                for group in [n, 1] {
                    let tag = format!("conv {v:?} case {i} accumulate {acc} group {group}");
                    let inputs = ConvInputs {
                        x: &x,
                        xs,
                        w: &wt,
                        conv,
                        dy: &dy,
                    };
                    let (y, dx, dw) = conv_on(d, inputs, (&dx0, acc), &dw0, (group, v));
                    assert_close(&format!("{tag}: y"), &y, &y_cpu, tol);
                    assert_close(&format!("{tag}: dx"), &dx, &dx_cpu, tol);
                    assert_close(&format!("{tag}: dw"), &dw, &dw_cpu, tol);
                }
            }
        }
    }
}

/// A convolution's inputs.
struct ConvInputs<'a> {
    x: &'a [f32],
    xs: Shape4,
    w: &'a [f32],
    conv: Conv,
    dy: &'a [f32],
}

/// y, dx and dw of one convolution on `d`, with a workspace of `group` images.
fn conv_on<D: TestDevice>(
    d: &D,
    a: ConvInputs<'_>,
    (dx0, accumulate): (&[f32], bool),
    dw0: &[f32],
    (group, v): (usize, conv2d::Version),
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (conv, xs) = (a.conv, a.xs);
    let ys = conv.out_shape(xs);
    let p = ys.h * ys.w;
    let mut col = d.upload(&vec![f32::NAN; conv.patch() * group * p]);
    let mut gemm = d.upload(&vec![f32::NAN; conv.c_out * group * p]);
    let mut ws = conv2d::cuda::Workspace {
        col: D::ptr_mut(&mut col),
        gemm: D::ptr_mut(&mut gemm),
    };
    let (x, w, dy) = (d.upload(a.x), d.upload(a.w), d.upload(a.dy));
    let mut y = d.upload(&vec![f32::NAN; ys.len()]);
    let fwd = conv2d::Forward {
        x: D::ptr(&x),
        xs,
        w: D::ptr(&w),
        conv,
        y: D::ptr_mut(&mut y),
    };
    conv2d::cuda::forward(d.queue(), v, fwd, &mut ws, GemmPrecision::F32).unwrap();
    let (mut dx, mut dw) = (d.upload(dx0), d.upload(dw0));
    let bwd = conv2d::Backward {
        x: D::ptr(&x),
        xs,
        w: D::ptr(&w),
        conv,
        dy: D::ptr(&dy),
        dx: Some(Grad::new(D::ptr_mut(&mut dx), accumulate)),
        dw: D::ptr_mut(&mut dw),
    };
    conv2d::cuda::backward(d.queue(), v, bwd, &mut ws, GemmPrecision::F32).unwrap();
    (d.download(&y), d.download(&dx), d.download(&dw))
}

/// x, gamma, beta and the running mean and variance before the forward.
type BnInputs<'a> = (&'a [f32], &'a [f32], &'a [f32], &'a [f32], &'a [f32]);

/// Batchnorm forward then backward on the CPU (`None`) or `d`; returns y, the running
/// statistics, dx, dgamma and dbeta.
fn batchnorm_run<D: TestDevice>(
    d: Option<&D>,
    xs: Shape4,
    (x, gamma, beta, rm0, rv0): BnInputs<'_>,
    (dy, dx0): (&[f32], &[f32]),
    (training, v): (bool, batchnorm::Version),
) -> Vec<Vec<f32>> {
    let Some(d) = d else {
        let (mut rm, mut rv) = (rm0.to_vec(), rv0.to_vec());
        let mut y = vec![f32::NAN; xs.len()];
        let (mut dx, mut dg, mut db) = (dx0.to_vec(), vec![0.5f32; xs.c], vec![-0.5f32; xs.c]);
        let mut saved = BnSaved::default();
        batchnorm::cpu::forward(
            batchnorm::Forward {
                x,
                xs,
                gamma,
                beta,
                running_mean: &mut rm[..],
                running_var: &mut rv[..],
                training,
                relu: false,
                y: &mut y[..],
            },
            &mut saved,
        );
        batchnorm::cpu::backward(
            batchnorm::Backward {
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
            },
            &saved,
        );
        return vec![y, rm, rv, dx, dg, db];
    };
    let (xb, gb, bb) = (d.upload(x), d.upload(gamma), d.upload(beta));
    let (mut rm, mut rv) = (d.upload(rm0), d.upload(rv0));
    let mut y = d.upload(&vec![f32::NAN; xs.len()]);
    // Zeroed, as the backend allocates it (v2's counters start at zero).
    let mut saved = d.upload(&vec![0.0f32; batchnorm::cuda::saved_len(v, xs)]);
    let fwd = batchnorm::Forward {
        x: D::ptr(&xb),
        xs,
        gamma: D::ptr(&gb),
        beta: D::ptr(&bb),
        running_mean: D::ptr_mut(&mut rm),
        running_var: D::ptr_mut(&mut rv),
        training,
        relu: false,
        y: D::ptr_mut(&mut y),
    };
    batchnorm::cuda::forward(d.queue(), v, fwd, &mut D::ptr_mut(&mut saved)).unwrap();
    let dyb = d.upload(dy);
    let (mut dx, mut dg, mut db) = (
        d.upload(dx0),
        d.upload(&vec![0.5f32; xs.c]),
        d.upload(&vec![-0.5f32; xs.c]),
    );
    let bwd = batchnorm::Backward {
        x: D::ptr(&xb),
        xs,
        gamma: D::ptr(&gb),
        running_mean: D::ptr(&rm),
        running_var: D::ptr(&rv),
        training,
        relu: false,
        dy: D::ptr(&dyb),
        dx: Some(Grad::new(D::ptr_mut(&mut dx), true)),
        dgamma: D::ptr_mut(&mut dg),
        dbeta: D::ptr_mut(&mut db),
    };
    batchnorm::cuda::backward(d.queue(), v, bwd, &mut D::ptr_mut(&mut saved)).unwrap();
    [&y, &rm, &rv, &dx, &dg, &db]
        .into_iter()
        .map(|b| d.download(b))
        .collect()
}

/// Batchnorm in training and eval, every version, on each of `shapes` (N, C, H, W), against
/// the CPU's float64 statistics; within `tol`. Every channel is offset from zero, channel 0 by
/// `far` more (the two-pass variance must not cancel).
pub fn batchnorm<D: TestDevice>(
    d: &D,
    shapes: &[(usize, usize, usize, usize)],
    far: f32,
    tol: f64,
) {
    for (i, &(n, c, h, w)) in shapes.iter().enumerate() {
        let xs = Shape4 { n, c, h, w };
        let mut r = rng(50 + i as u64);
        let mut x = random_matrix(&mut r, 1, xs.len());
        for (j, v) in x.iter_mut().enumerate() {
            let first = (j / (h * w)) % c == 0;
            *v = *v * 2.0 + 7.0 + if first { far } else { 0.0 };
        }
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
                let want = batchnorm_run::<D>(None, xs, inputs, (&dy, &dx0), (training, v));
                let got = batchnorm_run(Some(d), xs, inputs, (&dy, &dx0), (training, v));
                for (k, what) in ["y", "running mean", "running var", "dx", "dgamma", "dbeta"]
                    .iter()
                    .enumerate()
                {
                    assert_close(
                        &format!("batchnorm {v:?} {xs:?} training {training}: {what}"),
                        &got[k],
                        &want[k],
                        tol,
                    );
                }
            }
        }
    }
}

/// relu, copy-or-add, axpy on `len` values (grid-stride: more than a block), the bf16 rounding
/// of GEMM operands and the f64 -> f32 copy: bit for bit the CPU's.
pub fn elementwise<D: TestDevice>(d: &D, len: usize) {
    let (q, v) = (d.queue(), elementwise::Version::V1);
    let mut r = rng(60);
    let x = random_matrix(&mut r, 1, len);
    let dy = random_matrix(&mut r, 1, len);
    let (xb, dyb) = (d.upload(&x), d.upload(&dy));
    let mut yb = d.upload(&vec![f32::NAN; len]);
    elementwise::cuda::relu_forward(q, v, D::ptr(&xb), D::ptr_mut(&mut yb)).unwrap();
    let y = d.download(&yb);
    let mut want = vec![0.0f32; len];
    elementwise::cpu::relu_forward(&x, &mut want);
    assert_eq!(y, want, "relu forward");
    for acc in [false, true] {
        let mut want_dx = x.clone();
        elementwise::cpu::relu_backward(&y, &dy, Grad::new(&mut want_dx[..], acc));
        let mut dx = d.upload(&x);
        let g = Grad::new(D::ptr_mut(&mut dx), acc);
        elementwise::cuda::relu_backward(q, v, D::ptr(&yb), D::ptr(&dyb), g).unwrap();
        assert_eq!(d.download(&dx), want_dx, "relu backward accumulate {acc}");
        let mut want_out = dy.clone();
        elementwise::cpu::copy_or_add(&x, Grad::new(&mut want_out[..], acc));
        let mut out = d.upload(&dy);
        let g = Grad::new(D::ptr_mut(&mut out), acc);
        elementwise::cuda::copy_or_add(q, v, D::ptr(&xb), g).unwrap();
        assert_eq!(d.download(&out), want_out, "add accumulate {acc}");
        // axpy: the kernel fuses the multiply-add (fmaf) where the CPU rounds twice.
        let alpha = -0.37f32;
        let want_out: Vec<f32> = dy
            .iter()
            .zip(&x)
            .map(|(&dv, &xv)| {
                if acc {
                    alpha.mul_add(xv, dv)
                } else {
                    alpha * xv
                }
            })
            .collect();
        let mut out = d.upload(&dy);
        let g = Grad::new(D::ptr_mut(&mut out), acc);
        elementwise::cuda::axpy(q, v, f64::from(alpha), D::ptr(&xb), g).unwrap();
        assert_eq!(d.download(&out), want_out, "axpy accumulate {acc}");
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
    let sb = d.upload(&special);
    let mut hb = d.upload(&vec![0u16; len]);
    to_bf16(q, D::ptr(&sb), &mut D::ptr_mut(&mut hb)).unwrap();
    for (i, (&got, &value)) in d.download(&hb).iter().zip(&special).enumerate() {
        let want = half::bf16::from_f32(value);
        if value.is_nan() {
            assert!(half::bf16::from_bits(got).is_nan(), "bf16 of NaN");
        } else {
            assert_eq!(got, want.to_bits(), "bf16 of {value} (element {i})");
        }
    }
    let d64: Vec<f64> = (0..len).map(|i| (i as f64) / 3.0).collect();
    let db = d.upload(&d64);
    let mut fb = d.upload(&vec![0.0f32; len]);
    elementwise::cuda::f64_to_f32(q, D::ptr(&db), D::ptr_mut(&mut fb)).unwrap();
    let f = d.download(&fb);
    assert!(
        f.iter().zip(&d64).all(|(&g, &w)| g == w as f32),
        "f64 -> f32"
    );
}

/// Average pooling, k = 2 and global, forward and backward (accumulated).
pub fn pool<D: TestDevice>(d: &D) {
    let (q, v) = (d.queue(), pool::Version::V1);
    let mut r = rng(61);
    for (h, w, k) in [(6usize, 4usize, 2usize), (4, 4, 4)] {
        let xs = Shape4 { n: 2, c: 3, h, w };
        let xin = random_matrix(&mut r, 1, xs.len());
        let ylen = pool::out_shape(xs, k).len();
        let mut want_y = vec![0.0f32; ylen];
        pool::cpu::forward(&xin, xs, k, &mut want_y);
        let xb = d.upload(&xin);
        let mut yb = d.upload(&vec![f32::NAN; ylen]);
        pool::cuda::forward(q, v, D::ptr(&xb), xs, k, D::ptr_mut(&mut yb)).unwrap();
        assert_close("avgpool forward", &d.download(&yb), &want_y, 1e-6);
        let gy = random_matrix(&mut r, 1, ylen);
        let mut want_dx = xin.clone();
        pool::cpu::backward(xs, k, &gy, Grad::new(&mut want_dx[..], true));
        let (gyb, mut dxb) = (d.upload(&gy), d.upload(&xin));
        let g = Grad::new(D::ptr_mut(&mut dxb), true);
        pool::cuda::backward(q, v, xs, k, D::ptr(&gyb), g).unwrap();
        assert_close("avgpool backward", &d.download(&dxb), &want_dx, 1e-6);
    }
}

/// The linear layer's launchers (bias rows, column sums and their GEMMs) against the CPU's,
/// `rows` x `inp` -> `out`; the forward within `fwd_tol`, the gradients within `bwd_tol`.
pub fn linear<D: TestDevice>(
    d: &D,
    (rows, inp, out): (usize, usize, usize),
    (fwd_tol, bwd_tol): (f64, f64),
) {
    let (q, v) = (d.queue(), linear::Version::V1);
    let mut r = rng(62);
    let lx = random_matrix(&mut r, rows, inp);
    let lw = random_matrix(&mut r, out, inp);
    let lb = random_matrix(&mut r, 1, out);
    let mut want = vec![0.0f32; rows * out];
    linear::cpu::forward(linear::Forward {
        x: &lx[..],
        n: rows,
        w: &lw[..],
        b: &lb[..],
        out,
        y: &mut want[..],
    })
    .unwrap();
    let (xb, wb, bb) = (d.upload(&lx), d.upload(&lw), d.upload(&lb));
    let mut yb = d.upload(&vec![f32::NAN; rows * out]);
    let f = linear::Forward {
        x: D::ptr(&xb),
        n: rows,
        w: D::ptr(&wb),
        b: D::ptr(&bb),
        out,
        y: D::ptr_mut(&mut yb),
    };
    linear::cuda::forward(q, v, f, GemmPrecision::F32).unwrap();
    assert_close("linear forward", &d.download(&yb), &want, fwd_tol);
    let ldy = random_matrix(&mut r, rows, out);
    let (dw0, db0, dx0) = (
        random_matrix(&mut r, out, inp),
        random_matrix(&mut r, 1, out),
        random_matrix(&mut r, rows, inp),
    );
    let (mut dx, mut dw, mut db) = (dx0.clone(), dw0.clone(), db0.clone());
    linear::cpu::backward(linear::Backward {
        x: &lx[..],
        n: rows,
        w: &lw[..],
        out,
        dy: &ldy[..],
        dx: Some(Grad::new(&mut dx[..], true)),
        dw: &mut dw[..],
        db: &mut db[..],
    })
    .unwrap();
    let dyb = d.upload(&ldy);
    let (mut dxb, mut dwb, mut dbb) = (d.upload(&dx0), d.upload(&dw0), d.upload(&db0));
    let bwd = linear::Backward {
        x: D::ptr(&xb),
        n: rows,
        w: D::ptr(&wb),
        out,
        dy: D::ptr(&dyb),
        dx: Some(Grad::new(D::ptr_mut(&mut dxb), true)),
        dw: D::ptr_mut(&mut dwb),
        db: D::ptr_mut(&mut dbb),
    };
    linear::cuda::backward(q, v, bwd, GemmPrecision::F32).unwrap();
    assert_close("linear dx", &d.download(&dxb), &dx, bwd_tol);
    assert_close("linear dw", &d.download(&dwb), &dw, bwd_tol);
    assert_close("linear db", &d.download(&dbb), &db, bwd_tol);
}

/// The multi-tensor SGD over tensors of `lens` (empty ones, and lengths around the kernel's
/// chunk), with and without Nesterov, first and later steps, against the CPU's update.
pub fn sgd<D: TestDevice>(d: &D, lens: &[usize]) {
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
            let (wb, gb, vb): (Vec<_>, Vec<_>, Vec<_>) = (
                w.iter().map(|x| d.upload(x)).collect(),
                g.iter().map(|x| d.upload(x)).collect(),
                v.iter().map(|x| d.upload(x)).collect(),
            );
            let refs: Vec<sgd::cuda::TensorRef<'_>> = (0..lens.len())
                .map(|i| sgd::cuda::TensorRef {
                    w: D::ptr(&wb[i]),
                    g: D::ptr(&gb[i]),
                    v: D::ptr(&vb[i]),
                })
                .collect();
            let (table, blocks) = sgd::cuda::table(&refs).unwrap();
            drop(refs);
            let want_blocks: usize = lens.iter().map(|l| l.div_ceil(SGD_CHUNK)).sum();
            assert_eq!(blocks, want_blocks);
            let tb = d.upload(&table);
            // SAFETY: the table addresses w, g and v, which nothing else touches until the
            // launch has run (the downloads below wait for it).
            unsafe {
                sgd::cuda::update_all(d.queue(), sgd::Version::V1, D::ptr(&tb), blocks, &step)
            }
            .unwrap();
            for i in 0..lens.len() {
                let (gw, gv) = (d.download(&wb[i]), d.download(&vb[i]));
                assert_close(&format!("sgd w {i}"), &gw, &ww[i], 1e-6);
                assert_close(&format!("sgd v {i}"), &gv, &wv[i], 1e-6);
            }
        }
    }
}

/// The kNN search (similarity GEMM, top-k kernel) of `queries` against `keys` rows of `dim`,
/// with exact ties (key rows 5, 77 and the last equal row 0, as is query 0), in blocks of two
/// queries, for each k of `ks`, against the CPU's search; similarities within `tol`.
pub fn topk<D: TestDevice>(
    d: &D,
    (n_keys, nq, dim): (usize, usize, usize),
    ks: &[usize],
    tol: f64,
) {
    let mut r = rng(80);
    let mut keys = random_matrix(&mut r, n_keys, dim);
    let dup = keys[..dim].to_vec();
    let copies = [0usize, 5, 77, n_keys - 1];
    for &row in &copies[1..] {
        keys[row * dim..(row + 1) * dim].copy_from_slice(&dup); // exact ties
    }
    let mut queries = random_matrix(&mut r, nq, dim);
    queries[..dim].copy_from_slice(&dup);
    let keys = normalize_rows::cpu::forward(&keys, n_keys, dim).unwrap().0;
    let queries = normalize_rows::cpu::forward(&queries, nq, dim).unwrap().0;
    let (qb, kb) = (d.upload(&queries), d.upload(&keys));
    for &k in ks {
        let want = topk::cpu::nearest(&queries, &keys, dim, k, false).unwrap();
        // Scratch for two queries a block: the search runs in several blocks.
        let rows = 2;
        let (mut sims, mut vals, mut idx) = (
            d.upload(&vec![f32::NAN; rows * n_keys]),
            d.upload(&vec![f32::NAN; rows * k]),
            d.upload(&vec![-1i32; rows * k]),
        );
        let mut scratch = topk::cuda::Scratch {
            sims: D::ptr_mut(&mut sims),
            values: D::ptr_mut(&mut vals),
            indices: D::ptr_mut(&mut idx),
        };
        let v = topk::Version::V1;
        let got = topk::cuda::nearest(d.queue(), v, D::ptr(&qb), D::ptr(&kb), dim, k, &mut scratch)
            .unwrap();
        assert_eq!(got.len(), nq);
        for q in 0..nq {
            // The device's GEMM and the CPU path's may round differently: compare
            // similarities, and for the exact ties of query 0 the indices.
            let gv: Vec<f32> = got[q].iter().map(|x| x.0).collect();
            let wv: Vec<f32> = want[q].iter().map(|x| x.0).collect();
            assert_close(&format!("top-{k} of query {q}"), &gv, &wv, tol);
            if q == 0 && k >= 4 {
                let mut top: Vec<usize> = got[q][..4].iter().map(|x| x.1).collect();
                if d.exact_ties() {
                    // Equal values: the lower index first.
                    assert_eq!(top, copies, "tied neighbours of query 0 (k = {k})");
                } else {
                    // cuBLAS may form the copies' dot products apart: the four copies first.
                    top.sort_unstable();
                    assert_eq!(top, copies, "query 0's nearest (k = {k})");
                }
            }
            let mut distinct: Vec<usize> = got[q].iter().map(|x| x.1).collect();
            distinct.sort_unstable();
            distinct.dedup();
            assert_eq!(distinct.len(), k, "top-{k}: an index twice");
        }
    }
}

/// Row normalization forward (a zero row: the clamp) and backward against the CPU's.
pub fn normalize_rows<D: TestDevice>(d: &D, (n, dim): (usize, usize)) {
    let mut r = rng(90);
    let mut z = random_matrix(&mut r, n, dim);
    z[2 * dim..3 * dim].fill(0.0); // the clamp's branch
    let gf = random_matrix(&mut r, n, dim);
    let (f_cpu, norms_cpu) = normalize_rows::cpu::forward(&z, n, dim).unwrap();
    let dz_cpu = normalize_rows::cpu::backward(&f_cpu, &norms_cpu, &gf, n, dim).unwrap();
    let (zb, gfb) = (d.upload(&z), d.upload(&gf));
    let (mut f, mut norms, mut dz) = (
        d.upload(&vec![f32::NAN; n * dim]),
        d.upload(&vec![f32::NAN; n]),
        d.upload(&vec![f32::NAN; n * dim]),
    );
    let (q, v) = (d.queue(), normalize_rows::Version::V1);
    normalize_rows::cuda::forward(
        q,
        v,
        D::ptr(&zb),
        D::ptr_mut(&mut f),
        D::ptr_mut(&mut norms),
        (n, dim),
    )
    .unwrap();
    normalize_rows::cuda::backward(
        q,
        v,
        D::ptr(&f),
        D::ptr(&norms),
        D::ptr(&gfb),
        D::ptr_mut(&mut dz),
        (n, dim),
    )
    .unwrap();
    assert_close("normalize forward", &d.download(&f), &f_cpu, 1e-6);
    assert_close("norms", &d.download(&norms), &norms_cpu, 1e-6);
    assert_close("normalize backward", &d.download(&dz), &dz_cpu, 1e-5);
}

/// Every encoder op's versions with the bodies above, by name, for the check that none is
/// left out (`tests/emulated/kernels.rs`' `every_kernel_version_is_under_test`).
pub const OPS_UNDER_TEST: [(&str, &[&str]); 8] = [
    ("conv2d", &["v1", "v2"]),
    ("batchnorm", &["v1", "v2"]),
    ("elementwise", &["v1"]),
    ("pool", &["v1"]),
    ("linear", &["v1"]),
    ("sgd", &["v1"]),
    ("topk", &["v1"]),
    ("normalize_rows", &["v1"]),
];
