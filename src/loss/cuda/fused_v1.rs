//! `fused-v1`: one block per query row, three sweeps over the keys recomputing dot products
//! (`kernels/instance_loss_fused_v1.cu`): normalize_rows_fwd_v1, instance_loss_query_v1 (row
//! scalars, the loss terms, dF of the queries), both-sides instance_loss_key_v1 (the keys'
//! term), normalize_rows_bwd_v1, row_mean_v1. Stores F and dF (N d), nothing N x N.

use super::{LossParams, Scratch};
use crate::cuda::{phase, DevPtr, DevPtrMut, Geometry, Kernel, KernelArgs, Queue, BLOCK};
use crate::error::{Error, Result};
use crate::ops::{normalize_rows, reduce};

const QUERY_V1: Kernel = Kernel::new("instance_loss_fused_v1", "instance_loss_query_v1");
const KEY_V1: Kernel = Kernel::new("instance_loss_fused_v1", "instance_loss_key_v1");

pub fn enqueue(
    q: &impl Queue,
    z: DevPtr<'_, f32>,
    dz: Option<DevPtrMut<'_, f32>>,
    p: &LossParams,
    s: &mut Scratch<'_>,
    loss: DevPtrMut<'_, f64>,
) -> Result<()> {
    let (n, d) = (p.n as usize, p.d as usize);
    let (Some(f), Some(df)) = (s.f.as_mut(), s.df.as_mut()) else {
        return Err(Error::Cuda("fused v1's F and dF scratch is missing".into()));
    };
    let v = normalize_rows::Version::V1;
    {
        let _p = phase("normalize rows");
        normalize_rows::cuda::forward(q, v, z, f.reborrow(), s.norms.reborrow(), (n, d))?;
    }
    let rows = &mut s.rows;
    {
        let _p = phase("fused v1: query rows");
        let mut args = KernelArgs::new();
        args.input(f.as_const())
            .value(*p)
            .output(&mut rows.row_loss)
            .output(&mut rows.inv_denom)
            .output(&mut rows.r)
            .output(&mut rows.dominant)
            .output(&mut rows.g_partner)
            .output(&mut rows.g_dominant)
            .output(df);
        // SAFETY: instance_loss_query_v1(const float* f, LossParams p, double* row_loss,
        // float* inv_denom, float* r, int* dominant, float* g_partner, float* g_dominant,
        // float* df); one block per row, row buffers of N, F and dF of N x d.
        unsafe { q.launch(QUERY_V1, Geometry::blocks(n, BLOCK), &mut args) }?;
    }
    if p.with_grad != 0 && p.both_sides != 0 {
        let _p = phase("fused v1: key rows");
        let mut args = KernelArgs::new();
        args.input(f.as_const())
            .value(*p)
            .input(rows.inv_denom.as_const())
            .input(rows.r.as_const())
            .input(rows.dominant.as_const())
            .input(rows.g_partner.as_const())
            .input(rows.g_dominant.as_const())
            .output(df);
        // SAFETY: instance_loss_key_v1(const float* f, LossParams p, const float* inv_denom,
        // const float* r, const int* dominant, const float* g_partner,
        // const float* g_dominant, float* df); one block per key row.
        unsafe { q.launch(KEY_V1, Geometry::blocks(n, BLOCK), &mut args) }?;
    }
    if let Some(dz) = dz {
        let _p = phase("normalization backward");
        let (f, df, norms) = (f.as_const(), df.as_const(), s.norms.as_const());
        normalize_rows::cuda::backward(q, v, f, norms, df, dz, (n, d))?;
    }
    let _p = phase("loss mean");
    reduce::cuda::mean(q, s.rows.row_loss.as_const(), loss)
}
