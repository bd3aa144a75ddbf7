//! `unfused` and `unfused-cublas`: one kernel per step of the math, N x N matrices stored, as
//! eager PyTorch would run it (the baseline the fused versions are measured against).
//!
//! normalize_rows_fwd_v1; S = F F^T (matmul_v1, or a cuBLAS GEMM); E = exp((S - 1)/tau) with a
//! zero diagonal (unfused_exp_v1); with a hard/easy selection, E = 0 for the negatives each
//! row leaves out (unfused_select_v1); per row D_a, b* and the partner term (unfused_row_sums_v1);
//! l_a, R_a, g_ap, g_ab* (unfused_row_terms_v1); then with a gradient G (unfused_grad_matrix_v1),
//! dF = G F / (N tau) (+ G^T F both-sides) and normalize_rows_bwd_v1; finally row_mean_v1.

use super::{LossParams, Scratch as LossScratch};
use crate::cuda::{phase, Carve, DevPtr, DevPtrMut, Geometry, Kernel, KernelArgs, Queue, BLOCK};
use crate::cuda::{Gemm, GemmPrecision};
use crate::error::{Error, Result};
use crate::ops::matmul::{cuda::matmul_v1, Strides};
use crate::ops::{normalize_rows, reduce};

const EXP_V1: Kernel = Kernel::new("instance_loss_unfused", "unfused_exp_v1");
const SELECT_V1: Kernel = Kernel::new("instance_loss_unfused", "unfused_select_v1");
const ROW_SUMS_V1: Kernel = Kernel::new("instance_loss_unfused", "unfused_row_sums_v1");
const ROW_TERMS_V1: Kernel = Kernel::new("instance_loss_unfused", "unfused_row_terms_v1");
const GRAD_MATRIX_V1: Kernel = Kernel::new("instance_loss_unfused", "unfused_grad_matrix_v1");

/// The chain's N x N matrices and its extra row scalars.
pub struct Scratch<'a> {
    pub s: DevPtrMut<'a, f32>,
    pub e: DevPtrMut<'a, f32>,
    pub g: DevPtrMut<'a, f32>,
    pub x_partner: DevPtrMut<'a, f32>,
    pub denom: DevPtrMut<'a, f64>,
    pub one_minus_q_max: DevPtrMut<'a, f64>,
    pub q_max: DevPtrMut<'a, f64>,
}

impl<'a> Scratch<'a> {
    pub fn carve(c: &mut Carve<'a>, n: usize) -> Result<Self> {
        let nn = n
            .checked_mul(n)
            .filter(|nn| nn.checked_mul(12).is_some())
            .ok_or_else(|| Error::invalid(format!("N = {n} is too large for the unfused chain")))?;
        Ok(Scratch {
            s: c.take(nn)?,
            e: c.take(nn)?,
            g: c.take(nn)?,
            x_partner: c.take(n)?,
            denom: c.take(n)?,
            one_minus_q_max: c.take(n)?,
            q_max: c.take(n)?,
        })
    }
}

/// The three products of the chain.
#[derive(Debug, Clone, Copy)]
enum Product {
    /// S (N x N) = F F^T
    Similarity,
    /// dF (N x d) = alpha G F
    GradQuery,
    /// dF += alpha G^T F
    GradKey,
}

/// Queues the chain; `cublas` picks cuBLAS for the three products instead of matmul_v1.
pub fn enqueue(
    q: &impl Queue,
    cublas: bool,
    z: DevPtr<'_, f32>,
    dz: Option<DevPtrMut<'_, f32>>,
    p: &LossParams,
    s: &mut LossScratch<'_>,
    loss: DevPtrMut<'_, f64>,
) -> Result<()> {
    let (n, d) = (p.n as usize, p.d as usize);
    let missing = || Error::Cuda("the unfused chain's scratch is missing".into());
    let (Some(f), Some(df), Some(u)) = (s.f.as_mut(), s.df.as_mut(), s.unfused.as_mut()) else {
        return Err(missing());
    };
    let rows = &mut s.rows;
    {
        let _p = phase("normalize rows");
        let v = normalize_rows::Version::V1;
        normalize_rows::cuda::forward(q, v, z, f.reborrow(), s.norms.reborrow(), (n, d))?;
    }
    {
        let _p = phase("similarity matrix");
        product(q, cublas, Product::Similarity, 1.0, (n, d), f, df, u)?;
    }
    {
        let _p = phase("masked exp");
        let mut args = KernelArgs::new();
        args.input(u.s.as_const())
            .output(&mut u.e)
            .value(p.n)
            .value(p.inv_tau);
        // SAFETY: unfused_exp_v1(const float* S, float* E, int n, float inv_tau); N x N each.
        unsafe { q.launch(EXP_V1, Geometry::grid_stride(n * n), &mut args) }?;
    }
    if (p.keep as usize) < n - 2 {
        let _p = phase("negative selection");
        let mut args = KernelArgs::new();
        args.input(u.s.as_const()).output(&mut u.e).value(*p);
        // SAFETY: unfused_select_v1(const float* S, float* E, LossParams p); N x N each, one
        // block per row.
        unsafe { q.launch(SELECT_V1, Geometry::blocks(n, BLOCK), &mut args) }?;
    }
    {
        let _p = phase("row sums");
        let mut args = KernelArgs::new();
        args.input(u.s.as_const())
            .input(u.e.as_const())
            .value(*p)
            .output(&mut u.x_partner)
            .output(&mut rows.dominant)
            .output(&mut u.denom)
            .output(&mut u.one_minus_q_max)
            .output(&mut u.q_max);
        // SAFETY: unfused_row_sums_v1(const float* S, const float* E, LossParams p,
        // float* x_partner, int* dominant, double* denom, double* one_minus_q_max,
        // double* q_max); one block per row, every row buffer holds N.
        unsafe { q.launch(ROW_SUMS_V1, Geometry::blocks(n, BLOCK), &mut args) }?;
    }
    {
        let _p = phase("row terms");
        let mut args = KernelArgs::new();
        args.input(u.e.as_const())
            .value(*p)
            .input(u.x_partner.as_const())
            .input(rows.dominant.as_const())
            .input(u.denom.as_const())
            .input(u.one_minus_q_max.as_const())
            .input(u.q_max.as_const())
            .output(&mut rows.row_loss)
            .output(&mut rows.r)
            .output(&mut rows.g_partner)
            .output(&mut rows.g_dominant);
        // SAFETY: unfused_row_terms_v1(const float* E, LossParams p, const float* x_partner,
        // const int* dominant, const double* denom, const double* one_minus_q_max,
        // const double* q_max, double* row_loss, float* r, float* g_partner,
        // float* g_dominant); one block per row.
        unsafe { q.launch(ROW_TERMS_V1, Geometry::blocks(n, BLOCK), &mut args) }?;
    }
    if let Some(dz) = dz {
        {
            let _p = phase("gradient matrix");
            let mut args = KernelArgs::new();
            args.input(u.e.as_const())
                .value(*p)
                .input(u.denom.as_const())
                .input(rows.dominant.as_const())
                .input(rows.r.as_const())
                .input(rows.g_partner.as_const())
                .input(rows.g_dominant.as_const())
                .output(&mut u.g);
            // SAFETY: unfused_grad_matrix_v1(const float* E, LossParams p, const double* denom,
            // const int* dominant, const float* r, const float* g_partner,
            // const float* g_dominant, float* G); N x N.
            unsafe { q.launch(GRAD_MATRIX_V1, Geometry::grid_stride(n * n), &mut args) }?;
        }
        {
            let _p = phase("G F");
            product(
                q,
                cublas,
                Product::GradQuery,
                p.grad_scale,
                (n, d),
                f,
                df,
                u,
            )?;
            if p.both_sides != 0 {
                product(q, cublas, Product::GradKey, p.grad_scale, (n, d), f, df, u)?;
            }
        }
        let _p = phase("normalization backward");
        let v = normalize_rows::Version::V1;
        let (f, df, norms) = (f.as_const(), df.as_const(), s.norms.as_const());
        normalize_rows::cuda::backward(q, v, f, norms, df, dz, (n, d))?;
    }
    let _p = phase("loss mean");
    reduce::cuda::mean(q, s.rows.row_loss.as_const(), loss)
}

/// One of the chain's products through matmul_v1 or cuBLAS.
#[allow(clippy::too_many_arguments)] // the product's operands, all of the chain's scratch
fn product(
    q: &impl Queue,
    cublas: bool,
    product: Product,
    alpha: f32,
    (n, d): (usize, usize),
    f: &mut DevPtrMut<'_, f32>,
    df: &mut DevPtrMut<'_, f32>,
    u: &mut Scratch<'_>,
) -> Result<()> {
    if cublas {
        // Row-major products through the one cuBLAS front (src/cuda/blas.rs).
        let (trans_a, m, cols, k, a, lda, beta, c, ldc) = match product {
            Product::Similarity => (false, n, n, d, f.as_const(), d, 0.0, u.s.reborrow(), n),
            Product::GradQuery => (false, n, d, n, u.g.as_const(), n, 0.0, df.reborrow(), d),
            Product::GradKey => (true, n, d, n, u.g.as_const(), n, 1.0, df.reborrow(), d),
        };
        let trans_b = matches!(product, Product::Similarity);
        return q.gemm(&Gemm {
            trans_a,
            trans_b,
            m,
            n: cols,
            k,
            alpha,
            a,
            lda,
            b: f.as_const(),
            ldb: d,
            beta,
            c,
            ldc,
            precision: GemmPrecision::F32,
        });
    }
    // A(i, k) = a[i a_rs + k a_cs], B(k, j) = b[k b_rs + j b_cs].
    let (strides, a, beta, out) = match product {
        Product::Similarity => (
            Strides {
                m: n,
                n,
                k: d,
                a_rs: d,
                a_cs: 1,
                b_rs: 1,
                b_cs: d,
                ldc: n,
            },
            f.as_const(),
            0.0,
            u.s.reborrow(),
        ),
        Product::GradQuery => (
            Strides {
                m: n,
                n: d,
                k: n,
                a_rs: n,
                a_cs: 1,
                b_rs: d,
                b_cs: 1,
                ldc: d,
            },
            u.g.as_const(),
            0.0,
            df.reborrow(),
        ),
        Product::GradKey => (
            Strides {
                m: n,
                n: d,
                k: n,
                a_rs: 1,
                a_cs: n,
                b_rs: d,
                b_cs: 1,
                ldc: d,
            },
            u.g.as_const(),
            1.0,
            df.reborrow(),
        ),
    };
    matmul_v1(q, &strides, alpha, a, f.as_const(), beta, out)
}
