//! The convolution on a [`Queue`]: per group of images, `im2col_v1` + a GEMM, and the layout
//! permutes between NCHW and the GEMM's [C][B P] (`kernels/conv2d.cu`); backward adds dW
//! through a second GEMM and forms dx with a third GEMM and `col2im_v1`.
//!
//! The caller owns the scratch ([`Workspace`]); the group size is what the workspace holds, so
//! a small workspace runs the same code in more groups (the tests use that).

use super::{Backward, Conv, ConvGeom, Forward, Version};
use crate::cuda::{check_len, to_i32, DevPtr, DevPtrMut, Geometry, Kernel, KernelArgs, Queue};
use crate::cuda::{Gemm, GemmPrecision};
use crate::error::{Error, Result};
use crate::ops::Shape4;

const IM2COL_V1: Kernel = Kernel::new("conv2d", "im2col_v1");
const COL2IM_V1: Kernel = Kernel::new("conv2d", "col2im_v1");
const BCP_TO_CBP_V1: Kernel = Kernel::new("conv2d", "bcp_to_cbp_v1");
const CBP_TO_BCP_V1: Kernel = Kernel::new("conv2d", "cbp_to_bcp_v1");
const IM2COL_V2: Kernel = Kernel::new("conv2d", "im2col_v2");
const COL2IM_V2: Kernel = Kernel::new("conv2d", "col2im_v2");
const BCP_TO_CBP_V2: Kernel = Kernel::new("conv2d", "bcp_to_cbp_v2");
const CBP_TO_BCP_V2: Kernel = Kernel::new("conv2d", "cbp_to_bcp_v2");

/// The kernels of one version for a group whose largest buffer holds `values` floats: v2's
/// 32-bit indices need fewer than 2^31, else v1's kernels run.
struct Kernels {
    im2col: Kernel,
    col2im: Kernel,
    bcp_to_cbp: Kernel,
    cbp_to_bcp: Kernel,
}

fn kernels(version: Version, values: usize) -> Kernels {
    match version {
        Version::V2 if values < i32::MAX as usize => Kernels {
            im2col: IM2COL_V2,
            col2im: COL2IM_V2,
            bcp_to_cbp: BCP_TO_CBP_V2,
            cbp_to_bcp: CBP_TO_BCP_V2,
        },
        _ => Kernels {
            im2col: IM2COL_V1,
            col2im: COL2IM_V1,
            bcp_to_cbp: BCP_TO_CBP_V1,
            cbp_to_bcp: CBP_TO_BCP_V1,
        },
    }
}

/// The largest buffer a group of `b` images touches: col (K x B P), x, y or dy.
fn group_values(xs: Shape4, conv: &Conv, b: usize) -> usize {
    let ys = conv.out_shape(xs);
    let col = conv.patch() * b * ys.h * ys.w;
    col.max(b * xs.image()).max(b * ys.image())
}

/// The convolution's scratch: the column matrix of a group, and the GEMM's [C][B P] block.
pub struct Workspace<'a> {
    pub col: DevPtrMut<'a, f32>,
    pub gemm: DevPtrMut<'a, f32>,
}

/// Floats of (col, gemm) for convolving `xs` with `conv` in groups whose column buffer stays
/// within `cap` floats (at least one image a group).
pub fn workspace_len(xs: Shape4, conv: &Conv, cap: usize) -> (usize, usize) {
    let p = conv.out_shape(xs).h * conv.out_shape(xs).w;
    let per_image = conv.patch().max(conv.c_out) * p;
    let group = (cap / per_image.max(1)).clamp(1, xs.n.max(1));
    (conv.patch() * group * p, conv.c_out * group * p)
}

/// Images per group that `ws` holds.
fn group_size(ws: &Workspace<'_>, xs: Shape4, conv: &Conv) -> Result<usize> {
    let ys = conv.out_shape(xs);
    let p = ys.h * ys.w;
    let group = (ws.col.len() / (conv.patch() * p).max(1))
        .min(ws.gemm.len() / (conv.c_out * p).max(1))
        .min(xs.n.max(1));
    if group == 0 {
        return Err(Error::invalid(format!(
            "conv2d workspace of {} + {} floats holds no image of {xs:?}",
            ws.col.len(),
            ws.gemm.len()
        )));
    }
    Ok(group)
}

/// y = conv(x, w) on `q`.
pub fn forward(
    q: &impl Queue,
    version: Version,
    a: Forward<DevPtr<'_, f32>, DevPtrMut<'_, f32>>,
    ws: &mut Workspace<'_>,
    precision: GemmPrecision,
) -> Result<()> {
    let Forward {
        x,
        xs,
        w,
        conv,
        mut y,
    } = a;
    let ys = conv.out_shape(xs);
    let (k, p) = (conv.patch(), ys.h * ys.w);
    check_len("conv2d x", x.len(), xs.len())?;
    check_len("conv2d w", w.len(), conv.c_out * k)?;
    check_len("conv2d y", y.len(), ys.len())?;
    let group = group_size(ws, xs, &conv)?;
    let mut n0 = 0;
    while n0 < xs.n {
        let b = group.min(xs.n - n0);
        let geom = ConvGeom::new(xs, &conv, b)?;
        let ld = b * p;
        let kernels = kernels(version, group_values(xs, &conv, b));
        im2col(
            q,
            kernels.im2col,
            x.slice(n0 * xs.image()..(n0 + b) * xs.image())?,
            &geom,
            &mut ws.col,
        )?;
        // Y' (C_out x B P) = W (C_out x K) col (K x B P); operands as exact views (the
        // workspace may be larger than this group, and bf16 mode converts whole operands).
        q.gemm(&Gemm {
            trans_a: false,
            trans_b: false,
            m: conv.c_out,
            n: ld,
            k,
            alpha: 1.0,
            a: w,
            lda: k,
            b: ws.col.slice(0..k * ld)?,
            ldb: ld,
            beta: 0.0,
            c: ws.gemm.slice_mut(0..conv.c_out * ld)?,
            ldc: ld,
            precision,
        })?;
        permute(
            q,
            kernels.cbp_to_bcp,
            ws.gemm.slice(0..conv.c_out * ld)?,
            &mut y.slice_mut(n0 * ys.image()..(n0 + b) * ys.image())?,
            (b, conv.c_out, p),
        )?;
        n0 += b;
    }
    Ok(())
}

/// dw += ..., dx (=|+=) conv^T(dy) when asked for, on `q`.
pub fn backward(
    q: &impl Queue,
    version: Version,
    a: Backward<DevPtr<'_, f32>, DevPtrMut<'_, f32>>,
    ws: &mut Workspace<'_>,
    precision: GemmPrecision,
) -> Result<()> {
    let Backward {
        x,
        xs,
        w,
        conv,
        dy,
        mut dx,
        mut dw,
    } = a;
    let ys = conv.out_shape(xs);
    let (k, p) = (conv.patch(), ys.h * ys.w);
    check_len("conv2d x", x.len(), xs.len())?;
    check_len("conv2d dy", dy.len(), ys.len())?;
    check_len("conv2d dw", dw.len(), conv.c_out * k)?;
    if let Some(dx) = &dx {
        check_len("conv2d dx", dx.buf.len(), xs.len())?;
    }
    let group = group_size(ws, xs, &conv)?;
    let mut n0 = 0;
    while n0 < xs.n {
        let b = group.min(xs.n - n0);
        let geom = ConvGeom::new(xs, &conv, b)?;
        let ld = b * p;
        let kernels = kernels(version, group_values(xs, &conv, b));
        im2col(
            q,
            kernels.im2col,
            x.slice(n0 * xs.image()..(n0 + b) * xs.image())?,
            &geom,
            &mut ws.col,
        )?;
        permute(
            q,
            kernels.bcp_to_cbp,
            dy.slice(n0 * ys.image()..(n0 + b) * ys.image())?,
            &mut ws.gemm.slice_mut(0..conv.c_out * ld)?,
            (b, conv.c_out, p),
        )?;
        // dW (C_out x K) += dY' (C_out x B P) col^T
        q.gemm(&Gemm {
            trans_a: false,
            trans_b: true,
            m: conv.c_out,
            n: k,
            k: ld,
            alpha: 1.0,
            a: ws.gemm.slice(0..conv.c_out * ld)?,
            lda: ld,
            b: ws.col.slice(0..k * ld)?,
            ldb: ld,
            beta: 1.0,
            c: dw.reborrow(),
            ldc: k,
            precision,
        })?;
        if let Some(dx) = dx.as_mut() {
            // dcol (K x B P) = W^T dY', written over col (its last reader is queued above).
            q.gemm(&Gemm {
                trans_a: true,
                trans_b: false,
                m: k,
                n: ld,
                k: conv.c_out,
                alpha: 1.0,
                a: w,
                lda: k,
                b: ws.gemm.slice(0..conv.c_out * ld)?,
                ldb: ld,
                beta: 0.0,
                c: ws.col.slice_mut(0..k * ld)?,
                ldc: ld,
                precision,
            })?;
            let mut dxg = dx.buf.slice_mut(n0 * xs.image()..(n0 + b) * xs.image())?;
            let col = ws.col.as_const();
            col2im(q, kernels.col2im, col, &geom, &mut dxg, dx.accumulate)?;
        }
        n0 += b;
    }
    Ok(())
}

fn im2col(
    q: &impl Queue,
    kernel: Kernel,
    x: DevPtr<'_, f32>,
    geom: &ConvGeom,
    col: &mut DevPtrMut<'_, f32>,
) -> Result<()> {
    let patch = (geom.c_in * geom.k * geom.k) as usize;
    let total = patch * (geom.images * geom.h_out * geom.w_out) as usize;
    check_len(
        "im2col x",
        x.len(),
        (geom.images * geom.c_in * geom.h * geom.w) as usize,
    )?;
    check_len("im2col col", col.len(), total)?;
    let mut args = KernelArgs::new();
    args.input(x).value(*geom).output(col);
    // SAFETY: im2col_v1|v2(const float* x, ConvGeom g, float* col); x holds the group's
    // images and col at least K x B P floats (checked above); v2 only below 2^31 of them.
    unsafe { q.launch(kernel, Geometry::grid_stride(total), &mut args) }
}

fn col2im(
    q: &impl Queue,
    kernel: Kernel,
    col: DevPtr<'_, f32>,
    geom: &ConvGeom,
    dx: &mut DevPtrMut<'_, f32>,
    accumulate: bool,
) -> Result<()> {
    let image = (geom.c_in * geom.h * geom.w) as usize;
    let total = geom.images as usize * image;
    check_len("col2im dx", dx.len(), total)?;
    let patch = (geom.c_in * geom.k * geom.k) as usize;
    check_len(
        "col2im col",
        col.len(),
        patch * (geom.images * geom.h_out * geom.w_out) as usize,
    )?;
    let mut args = KernelArgs::new();
    args.input(col)
        .value(*geom)
        .output(dx)
        .value(i32::from(accumulate));
    // SAFETY: col2im_v1|v2(const float* col, ConvGeom g, float* dx, int accumulate); col
    // holds K x B P floats, dx the group's B C_in H W (checked above).
    unsafe { q.launch(kernel, Geometry::grid_stride(total), &mut args) }
}

/// `bcp_to_cbp_v*` (NCHW [B][C][P] into the GEMM layout [C][B P]) or `cbp_to_bcp_v*` (back).
fn permute(
    q: &impl Queue,
    kernel: Kernel,
    src: DevPtr<'_, f32>,
    dst: &mut DevPtrMut<'_, f32>,
    (b, c, p): (usize, usize, usize),
) -> Result<()> {
    let total = b * c * p;
    check_len(kernel.name, src.len(), total)?;
    check_len(kernel.name, dst.len(), total)?;
    let mut args = KernelArgs::new();
    args.input(src)
        .output(dst)
        .value(to_i32("B", b)?)
        .value(to_i32("C", c)?)
        .value(to_i32("P", p)?);
    // SAFETY: (const float* src, float* dst, int b, int c, int p); both hold B C P floats.
    unsafe { q.launch(kernel, Geometry::grid_stride(total), &mut args) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The host's guard for v2's 32-bit indices: a group of 2^31 - 1 values or more runs v1's
    /// kernels. (Their grid-stride counters are 64-bit, tests/cpu/layout.rs checks, so a total
    /// just below the guard, within one stride of 2^31, cannot wrap either.)
    #[test]
    fn v2_runs_only_below_2_pow_31_values() {
        let below = (i32::MAX - 1) as usize;
        assert_eq!(kernels(Version::V2, below).im2col, IM2COL_V2);
        for at_or_above in [i32::MAX as usize, 1 << 31, 3 << 31] {
            assert_eq!(kernels(Version::V2, at_or_above).im2col, IM2COL_V1);
            assert_eq!(kernels(Version::V2, at_or_above).col2im, COL2IM_V1);
        }
        assert_eq!(kernels(Version::V1, 10).im2col, IM2COL_V1);
        // ResNet18-CIFAR's first 3x3 layer (64 channels at 32 x 32): col = 576 x B x 1024 floats
        // passes 2^31 - 1 at B = 3,641; one group of that batch takes v1, one image less v2.
        let xs = |n| Shape4 {
            n,
            c: 64,
            h: 32,
            w: 32,
        };
        let conv = Conv {
            c_in: 64,
            c_out: 64,
            k: 3,
            stride: 1,
            pad: 1,
        };
        assert_eq!(
            kernels(Version::V2, group_values(xs(3641), &conv, 3641)).im2col,
            IM2COL_V1
        );
        assert_eq!(
            kernels(Version::V2, group_values(xs(3640), &conv, 3640)).im2col,
            IM2COL_V2
        );
    }
}
