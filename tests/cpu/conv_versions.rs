//! Every CPU convolution version (im2col + GEMM, Winograd F(4x4, 3x3)) against the direct sum
//! in float64 with plain loops, forward, dW and dx (written and accumulated), in float32 and
//! float64, on odd sizes, stride 2, padding 0, 1 and 2, 1 x 1 kernels, maps smaller than a tile,
//! image counts that leave a group short, and near-duplicate inputs.

use invaspread::ops::conv2d::{cpu, winograd, Backward, Conv, CpuVersion, Forward};
use invaspread::ops::{Grad, Shape4};
use invaspread::simd::CpuFloat;
use invaspread::testing::{random_matrix, rng};

/// Calls `term(yi, xi, wi)` for every product w[wi] x[xi] of the direct sum
/// y[n][co][oy][ox] = sum_{c, ki, kj} w[co][c][ki][kj] x[n][c][oy s + ki - p][ox s + kj - p]
/// (padding contributes no terms), in plain loops.
fn direct_terms(xs: Shape4, conv: &Conv, mut term: impl FnMut(usize, usize, usize)) {
    let ys = conv.out_shape(xs);
    for n in 0..xs.n {
        for co in 0..conv.c_out {
            for oy in 0..ys.h {
                for ox in 0..ys.w {
                    let yi = ((n * ys.c + co) * ys.h + oy) * ys.w + ox;
                    for c in 0..conv.c_in {
                        for ki in 0..conv.k {
                            for kj in 0..conv.k {
                                let iy = (oy * conv.stride + ki) as isize - conv.pad as isize;
                                let ix = (ox * conv.stride + kj) as isize - conv.pad as isize;
                                if iy < 0 || ix < 0 || iy >= xs.h as isize || ix >= xs.w as isize {
                                    continue;
                                }
                                let xi = ((n * xs.c + c) * xs.h + iy as usize) * xs.w + ix as usize;
                                let wi = ((co * conv.c_in + c) * conv.k + ki) * conv.k + kj;
                                term(yi, xi, wi);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// y = the direct sum, in float64.
fn direct_forward(x: &[f64], xs: Shape4, w: &[f64], conv: &Conv) -> Vec<f64> {
    let mut y = vec![0.0; conv.out_shape(xs).len()];
    direct_terms(xs, conv, |yi, xi, wi| y[yi] += w[wi] * x[xi]);
    y
}

/// dW and dx of `sum(dy * y)`: each product of the forward sum sends dy times the other
/// factor to its two operands.
fn direct_backward(
    x: &[f64],
    xs: Shape4,
    w: &[f64],
    conv: &Conv,
    dy: &[f64],
) -> (Vec<f64>, Vec<f64>) {
    let (mut dw, mut dx) = (vec![0.0; w.len()], vec![0.0; x.len()]);
    direct_terms(xs, conv, |yi, xi, wi| {
        dw[wi] += dy[yi] * x[xi];
        dx[xi] += dy[yi] * w[wi];
    });
    (dw, dx)
}

/// ||a - b|| / ||b||.
fn relative_error(a: &[f64], b: &[f64]) -> f64 {
    let diff: f64 = a.iter().zip(b).map(|(p, q)| (p - q) * (p - q)).sum();
    let norm: f64 = b.iter().map(|q| q * q).sum();
    (diff / norm.max(1e-300)).sqrt()
}

struct Case {
    conv: Conv,
    xs: Shape4,
    near_duplicates: bool,
}

fn case(
    c_in: usize,
    c_out: usize,
    k: usize,
    stride: usize,
    pad: usize,
    (n, h, w): (usize, usize, usize),
) -> Case {
    Case {
        conv: Conv {
            c_in,
            c_out,
            k,
            stride,
            pad,
        },
        xs: Shape4 { n, c: c_in, h, w },
        near_duplicates: false,
    }
}

fn cases() -> Vec<Case> {
    let mut v = vec![
        // ResNet-like 3 x 3 stride 1 pad 1, tiles that fit and tiles that do not.
        case(8, 16, 3, 1, 1, (3, 8, 8)),
        case(5, 7, 3, 1, 1, (5, 11, 9)),
        case(8, 9, 3, 1, 1, (2, 1, 1)),
        case(9, 8, 3, 1, 1, (17, 4, 4)),
        case(11, 8, 3, 1, 1, (2, 5, 13)),
        // Padding 0 and 2.
        case(8, 10, 3, 1, 0, (2, 7, 10)),
        case(8, 12, 3, 1, 2, (2, 6, 5)),
        case(8, 8, 3, 1, 0, (1, 3, 3)),
        // Too few channels for Winograd: im2col.
        case(3, 32, 3, 1, 1, (2, 6, 6)),
        // Not Winograd's: stride 2, 1 x 1, 5 x 5, padding 3.
        case(4, 6, 3, 2, 1, (3, 9, 8)),
        // The pairwise stride-2 path (3 x 3, pad 1, even width) at its edges, and the strided
        // general path beside it (odd width, pad 0 and 2, stride 3).
        case(5, 3, 3, 2, 1, (2, 2, 2)),
        case(3, 4, 3, 2, 1, (2, 7, 12)),
        case(3, 4, 3, 2, 1, (2, 8, 9)),
        case(3, 4, 3, 2, 0, (2, 8, 10)),
        case(3, 4, 5, 2, 2, (2, 9, 10)),
        case(3, 4, 3, 3, 1, (2, 10, 11)),
        case(6, 5, 1, 1, 0, (2, 5, 7)),
        case(6, 8, 1, 2, 0, (2, 8, 8)),
        case(3, 4, 5, 1, 2, (2, 7, 6)),
        case(3, 4, 3, 1, 3, (1, 4, 4)),
    ];
    let mut dup = case(16, 8, 3, 1, 1, (4, 12, 12));
    dup.near_duplicates = true;
    v.push(dup);
    v
}

fn inputs(c: &Case, seed: u64) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut r = rng(seed);
    let ys = c.conv.out_shape(c.xs);
    let wide = |v: Vec<f32>| v.into_iter().map(f64::from).collect::<Vec<f64>>();
    let mut x = wide(random_matrix(&mut r, 1, c.xs.len()));
    if c.near_duplicates {
        // Every image a copy of the first with a 1e-4 perturbation: sums of nearly equal terms.
        let image = c.xs.image();
        let first = x[..image].to_vec();
        for (i, v) in x.iter_mut().enumerate() {
            *v = first[i % image] + 1e-4 * *v;
        }
    }
    let w = wide(random_matrix(&mut r, 1, c.conv.c_out * c.conv.patch()));
    let dy = wide(random_matrix(&mut r, 1, ys.len()));
    (x, w, dy)
}

/// Runs `version` in element type T and returns (y, dw, dx written, dx accumulated onto ones).
fn run<T: CpuFloat>(
    version: CpuVersion,
    c: &Case,
    x: &[f64],
    w: &[f64],
    dy: &[f64],
) -> [Vec<f64>; 4] {
    let to = |v: &[f64]| v.iter().map(|&e| T::of(e)).collect::<Vec<T>>();
    let back = |v: &[T]| v.iter().map(|&e| e.into()).collect::<Vec<f64>>();
    let (x, w, dy) = (to(x), to(w), to(dy));
    let ys = c.conv.out_shape(c.xs);
    let mut y = vec![T::of(f64::NAN); ys.len()];
    cpu::forward_by(
        version,
        Forward {
            x: &x,
            xs: c.xs,
            w: &w,
            conv: c.conv,
            y: &mut y,
        },
    )
    .unwrap();
    let mut dw = vec![T::ZERO; w.len()];
    let backward = |dx: &mut [T], accumulate: bool, dw: &mut [T]| {
        let a = Backward {
            x: &x[..],
            xs: c.xs,
            w: &w[..],
            conv: c.conv,
            dy: &dy[..],
            dx: Some(Grad::new(dx, accumulate)),
            dw,
        };
        cpu::backward_by(version, a).unwrap();
    };
    let mut dx = vec![T::of(f64::NAN); x.len()];
    backward(&mut dx, false, &mut dw);
    // Accumulating: dx onto ones, and dw onto the dw just computed (so twice the gradient).
    let mut dx_acc = vec![T::ONE; x.len()];
    backward(&mut dx_acc, true, &mut dw);
    let half: Vec<f64> = back(&dw).iter().map(|v| v / 2.0).collect();
    [back(&y), half, back(&dx), back(&dx_acc)]
}

fn check(version: CpuVersion, tol32: f64, tol64: f64) {
    let mut worst32 = 0.0f64;
    for (i, c) in cases().iter().enumerate() {
        let (x, w, dy) = inputs(c, 100 + i as u64);
        let y = direct_forward(&x, c.xs, &w, &c.conv);
        let (dw, dx) = direct_backward(&x, c.xs, &w, &c.conv, &dy);
        let dx_acc: Vec<f64> = dx.iter().map(|v| v + 1.0).collect();
        let truth = [y, dw, dx, dx_acc];
        let names = ["y", "dw", "dx", "dx accumulated"];
        for (label, got, tol) in [
            ("f32", run::<f32>(version, c, &x, &w, &dy), tol32),
            ("f64", run::<f64>(version, c, &x, &w, &dy), tol64),
        ] {
            for q in 0..4 {
                assert!(
                    got[q].iter().all(|v| v.is_finite()),
                    "{version:?} {label} {}: non-finite output, {:?}",
                    names[q],
                    c.conv
                );
                let err = relative_error(&got[q], &truth[q]);
                if label == "f32" {
                    worst32 = worst32.max(err);
                }
                assert!(
                    err <= tol,
                    "{version:?} {label} {}: relative error {err:.2e} > {tol:.0e} for {:?} on {:?}",
                    names[q],
                    c.conv,
                    c.xs
                );
            }
        }
    }
    println!("{version:?}: worst float32 relative error {worst32:.2e}");
}

#[test]
fn im2col_matches_the_direct_sum_in_float64() {
    check(CpuVersion::Im2col, 1e-6, 1e-13);
}

#[test]
fn winograd_matches_the_direct_sum_in_float64() {
    check(CpuVersion::Winograd, winograd::F32_ERROR_BOUND, 1e-12);
}

#[test]
fn winograd_applies_to_3x3_stride_1_only() {
    let conv = |k, stride, pad| Conv {
        c_in: 8,
        c_out: 8,
        k,
        stride,
        pad,
    };
    let xs = Shape4 {
        n: 1,
        c: 8,
        h: 8,
        w: 8,
    };
    assert!(winograd::applies(&conv(3, 1, 1), xs));
    assert!(winograd::applies(&conv(3, 1, 0), xs));
    assert!(!winograd::applies(&conv(3, 2, 1), xs));
    assert!(!winograd::applies(&conv(1, 1, 0), xs));
    assert!(!winograd::applies(&conv(3, 1, 3), xs));
    let few = Conv {
        c_in: 3,
        ..conv(3, 1, 1)
    };
    assert!(!winograd::applies(&few, Shape4 { c: 3, ..xs }));
}

/// A ResNet18 layer's shape (64 channels, 32 x 32) in float32: the error bound holds at the
/// depth of the real sums too (576 terms per output, 8,192 per weight gradient).
#[test]
fn winograd_error_at_a_resnet_layer_shape() {
    let c = case(64, 64, 3, 1, 1, (8, 32, 32));
    let (x, w, dy) = inputs(&c, 7);
    let y = direct_forward(&x, c.xs, &w, &c.conv);
    let (dw, dx) = direct_backward(&x, c.xs, &w, &c.conv, &dy);
    for version in [CpuVersion::Im2col, CpuVersion::Winograd] {
        let got = run::<f32>(version, &c, &x, &w, &dy);
        let errs = [
            relative_error(&got[0], &y),
            relative_error(&got[1], &dw),
            relative_error(&got[2], &dx),
        ];
        println!(
            "{version:?} at 64 x 64 x 32 x 32: relative errors y {:.2e}, dw {:.2e}, dx {:.2e}",
            errs[0], errs[1], errs[2]
        );
        for e in errs {
            assert!(e <= winograd::F32_ERROR_BOUND, "{version:?}: {e:.2e}");
        }
    }
}
