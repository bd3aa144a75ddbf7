//! `ranks-v1` (kernels/instance_loss_ranks_v1.cu): the loss rows of one data-parallel rank's
//! own queries against every key of the gathered global batch, on fused v2's tiles. What
//! `dist::data_parallel` runs for `fused-v2`, so that each of R ranks does 1/R of the loss's work
//! instead of all of it. The math is `loss::gathered::rank_step`'s (a rank's loss rows, its
//! query-side gradient, its key-side terms for every gathered row), which tests/gpu/dist.rs
//! compares against.
//!
//! One call, in the order [`RankLoss`] and `DataParallel::own_rows_loss` queue it:
//! 1. [`enqueue_rows`]: norms of the rank's rows and of the gathered batch; the own query rows
//!    (the rank's share of the loss, dF_query into dz; query-only: the normalization backward);
//!    both-sides: every gathered key's term from the own queries, in the reduce-scatter's
//!    rank-major order.
//! 2. both-sides: the reduce-scatter (the caller's), then [`enqueue_finish`]: dz += the summed
//!    key side, the normalization backward.
//! 3. the all-gather of the shares (the caller's), then [`enqueue_sum`]: the loss, their sum in
//!    rank order.

use std::sync::Arc;

use bytemuck::{Pod, Zeroable};
use cudarc::driver::CudaSlice;

use super::{fused_v2, LossParams, RowScratch};
use crate::cuda::{phase, to_i32, Carve, DevPtr, DevPtrMut, Geometry, Gpu, Kernel, KernelArgs};
use crate::cuda::{Queue, BLOCK};
use crate::error::{Error, Result};

const QUERY: Kernel = Kernel::new("instance_loss_ranks_v1", "instance_loss_query_ranks_v1");
const KEY: Kernel = Kernel::new("instance_loss_ranks_v1", "instance_loss_key_ranks_v1");
const FINISH: Kernel = Kernel::new("instance_loss_ranks_v1", "instance_loss_finish_ranks_v1");
const SUM: Kernel = Kernel::new("instance_loss_ranks_v1", "instance_loss_sum_ranks_v1");

/// A rank's own rows in the gathered batch (`OwnRows` in the kernels): m images, view A rows
/// from `first_a`, view B rows from `first_b`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Pod, Zeroable)]
pub struct OwnRows {
    pub m: i32,
    pub first_a: i32,
    pub first_b: i32,
}

impl OwnRows {
    /// Rank `rank` of `ranks`, each with `m` images (`RankLayout::single_device_rows` of an
    /// even split).
    pub fn new(rank: usize, ranks: usize, m: usize) -> Result<Self> {
        let layout = crate::loss::gathered::RankLayout::new(&vec![m; ranks])?;
        let [a, b] = layout.single_device_rows(rank);
        Ok(OwnRows {
            m: to_i32("images per rank", m)?,
            first_a: to_i32("gathered rows", a.start)?,
            first_b: to_i32("gathered rows", b.start)?,
        })
    }

    /// The rank's rows: 2m.
    pub fn rows(&self) -> usize {
        2 * self.m as usize
    }
}

/// One rank's scratch, O(N), cut from one allocation.
pub struct RankScratch<'a> {
    /// Norms of the own rows (2m) and of the gathered batch (N).
    pub q_norms: DevPtrMut<'a, f32>,
    pub q_inv: DevPtrMut<'a, f32>,
    pub k_norms: DevPtrMut<'a, f32>,
    pub k_inv: DevPtrMut<'a, f32>,
    /// The own rows' scalars (2m each).
    pub rows: RowScratch<'a>,
    pub block_loss: DevPtrMut<'a, f64>,
    pub counter: DevPtrMut<'a, u32>,
    /// The loss (the ranks' shares summed).
    pub loss: DevPtrMut<'a, f64>,
}

impl<'a> RankScratch<'a> {
    /// For `own`'s rows of a gathered batch of N rows (zeroed memory: the counter starts at 0).
    pub fn carve(c: &mut Carve<'a>, own: OwnRows, n: usize) -> Result<Self> {
        let q = own.rows();
        Ok(RankScratch {
            q_norms: c.take(q)?,
            q_inv: c.take(q)?,
            k_norms: c.take(n)?,
            k_inv: c.take(n)?,
            rows: RowScratch::carve(c, q)?,
            block_loss: c.take(q.div_ceil(fused_v2::TILE))?,
            counter: c.take(1)?,
            loss: c.take(1)?,
        })
    }

    pub fn bytes(own: OwnRows, n: usize) -> Result<usize> {
        let mut c = Carve::sizing();
        RankScratch::carve(&mut c, own, n)?;
        Ok(c.used())
    }
}

/// Launches 1 (see the module documentation): `zr` the rank's 2m rows, `zg` the gathered N
/// (p.n) rows, the rank's share of the loss into `share`, dL/dz of its rows (query side; the
/// whole of it query-only) into `dz`, and both-sides every gathered row's key-side term from
/// the own queries into `kside` (N x d, rank-major).
#[allow(clippy::too_many_arguments)] // the loss's own inputs and outputs
pub fn enqueue_rows(
    q: &impl Queue,
    zr: DevPtr<'_, f32>,
    zg: DevPtr<'_, f32>,
    own: OwnRows,
    p: &LossParams,
    s: &mut RankScratch<'_>,
    mut dz: DevPtrMut<'_, f32>,
    kside: Option<DevPtrMut<'_, f32>>,
    mut share: DevPtrMut<'_, f64>,
) -> Result<()> {
    let (n, d, rows) = (p.n as usize, p.d as usize, own.rows());
    let both_sides = p.both_sides != 0;
    if p.with_grad == 0
        || zr.len() != rows * d
        || dz.len() != rows * d
        || zg.len() != n * d
        || both_sides != kside.is_some()
        || kside.as_ref().is_some_and(|k| k.len() != n * d)
        || own.first_b as usize + own.m as usize > n
    {
        return Err(Error::invalid(format!(
            "ranks-v1: {rows} own rows of a gathered {n} x {d} with a gradient (and the key side \
             both-sides): got {}, {}, {} floats",
            zr.len(),
            zg.len(),
            dz.len()
        )));
    }
    fused_v2::launch_norms(
        q,
        zr,
        (own.m * 2, p.d),
        s.q_norms.reborrow(),
        s.q_inv.reborrow(),
    )?;
    fused_v2::launch_norms(q, zg, (p.n, p.d), s.k_norms.reborrow(), s.k_inv.reborrow())?;
    {
        let _p = phase(QUERY.name);
        let rs = &mut s.rows;
        let mut args = KernelArgs::new();
        args.input(zr)
            .input(s.q_norms.as_const())
            .input(s.q_inv.as_const())
            .input(zg)
            .input(s.k_inv.as_const())
            .value(own)
            .value(*p)
            .output(&mut rs.inv_denom)
            .output(&mut rs.r)
            .output(&mut rs.dominant)
            .output(&mut rs.g_partner)
            .output(&mut rs.g_dominant)
            .output(&mut dz)
            .output(&mut s.block_loss)
            .output(&mut s.counter)
            .output(&mut share);
        // SAFETY: instance_loss_query_ranks_v1(const float* zq, const float* q_norms,
        // const float* q_inv, const float* zk, const float* k_inv, OwnRows own, LossParams p,
        // float* inv_denom, float* r, int* dominant, float* g_partner, float* g_dominant,
        // float* dz, double* block_loss, unsigned* counter, double* loss); lengths checked
        // above and carved for 2m rows, N keys, one partial sum per 64 own rows.
        let grid = Geometry::blocks(rows.div_ceil(fused_v2::TILE), BLOCK);
        unsafe { q.launch(QUERY, grid, &mut args) }?;
    }
    if let Some(mut kside) = kside {
        let _p = phase(KEY.name);
        let rs = &s.rows;
        let mut args = KernelArgs::new();
        args.input(zg)
            .input(s.k_inv.as_const())
            .input(zr)
            .input(s.q_inv.as_const())
            .value(own)
            .value(*p)
            .input(rs.inv_denom.as_const())
            .input(rs.r.as_const())
            .input(rs.dominant.as_const())
            .input(rs.g_partner.as_const())
            .input(rs.g_dominant.as_const())
            .output(&mut kside);
        // SAFETY: instance_loss_key_ranks_v1(const float* zk, const float* k_inv,
        // const float* zq, const float* q_inv, OwnRows own, LossParams p,
        // const float* inv_denom, const float* r, const int* dominant, const float* g_partner,
        // const float* g_dominant, float* kside); kside N x d, every row written.
        let grid = Geometry::blocks(n.div_ceil(fused_v2::TILE), BLOCK);
        unsafe { q.launch(KEY, grid, &mut args) }?;
    }
    Ok(())
}

/// Launch 2, both-sides: dz += `key` (the own rows' key side summed over the ranks), then the
/// normalization backward of the own rows.
pub fn enqueue_finish(
    q: &impl Queue,
    zr: DevPtr<'_, f32>,
    d: usize,
    s: &RankScratch<'_>,
    key: DevPtr<'_, f32>,
    mut dz: DevPtrMut<'_, f32>,
) -> Result<()> {
    let rows = s.q_norms.len();
    if zr.len() != rows * d || key.len() != rows * d || dz.len() != rows * d {
        return Err(Error::invalid(format!(
            "ranks-v1 finish: {rows} x {d} rows, got {}, {} and {} floats",
            zr.len(),
            key.len(),
            dz.len()
        )));
    }
    let _p = phase(FINISH.name);
    let mut args = KernelArgs::new();
    args.input(zr)
        .input(s.q_norms.as_const())
        .input(s.q_inv.as_const())
        .value(to_i32("rows", rows)?)
        .value(to_i32("d", d)?)
        .input(key)
        .output(&mut dz);
    // SAFETY: instance_loss_finish_ranks_v1(const float* zq, const float* q_norms,
    // const float* q_inv, int nq, int d, const float* key, float* dz); one warp per row, 8 rows
    // a block, lengths checked above.
    unsafe { q.launch(FINISH, Geometry::blocks(rows.div_ceil(8), BLOCK), &mut args) }
}

/// Launch 3: the loss, the `shares` of every rank summed in rank order.
pub fn enqueue_sum(
    q: &impl Queue,
    shares: DevPtr<'_, f64>,
    mut loss: DevPtrMut<'_, f64>,
) -> Result<()> {
    let _p = phase(SUM.name);
    let mut args = KernelArgs::new();
    args.input(shares)
        .value(to_i32("ranks", shares.len())?)
        .output(&mut loss);
    // SAFETY: instance_loss_sum_ranks_v1(const double* shares, int ranks, double* loss); one
    // thread reads `ranks` doubles and writes one.
    unsafe { q.launch(SUM, Geometry::blocks(1, 32), &mut args) }
}

/// The per-row scalars of `own`'s rows against N keys, carved from `arena` (the same layout
/// in every launch).
fn scratch(arena: &mut CudaSlice<u8>, own: OwnRows, n: usize) -> Result<RankScratch<'_>> {
    RankScratch::carve(&mut Carve::from(DevPtrMut::of(arena)), own, n)
}

/// One rank's buffers for a gathered batch of N = 2 R m rows of d, on a GPU.
#[derive(Debug)]
pub struct RankLoss {
    gpu: Arc<Gpu>,
    own: OwnRows,
    ranks: usize,
    d: usize,
    arena: CudaSlice<u8>,
    /// Every gathered row's key-side term from this rank's queries (N x d, rank-major), and
    /// the own rows' sum over ranks (2m x d): the reduce-scatter's input and output.
    pub kside: CudaSlice<f32>,
    pub key_own: CudaSlice<f32>,
    /// This rank's share of the loss, and every rank's, as float64 in float32 words (the
    /// all-gather's input and output).
    pub share: CudaSlice<f32>,
    pub shares: CudaSlice<f32>,
}

impl RankLoss {
    pub fn new(gpu: Arc<Gpu>, rank: usize, ranks: usize, m: usize, d: usize) -> Result<Self> {
        let own = OwnRows::new(rank, ranks, m)?;
        let n = 2 * ranks * m;
        super::check_shape(n, d)?;
        let stream = gpu.stream().clone();
        let arena = stream.alloc_zeros::<u8>(RankScratch::bytes(own, n)?)?;
        Ok(RankLoss {
            kside: stream.alloc_zeros::<f32>(n * d)?,
            key_own: stream.alloc_zeros::<f32>(own.rows() * d)?,
            share: stream.alloc_zeros::<f32>(2)?,
            shares: stream.alloc_zeros::<f32>(2 * ranks)?,
            gpu,
            own,
            ranks,
            d,
            arena,
        })
    }

    /// N = 2 R m.
    fn gathered_rows(&self) -> usize {
        2 * self.ranks * self.own.m as usize
    }

    /// Whether these buffers are for rank `rank` of `ranks` with m images of d.
    pub fn fits(&self, rank: usize, ranks: usize, m: usize, d: usize) -> bool {
        OwnRows::new(rank, ranks, m).is_ok_and(|o| o == self.own)
            && ranks == self.ranks
            && d == self.d
    }

    /// Launches 1 (the key side into `kside` both-sides, the share into `share`).
    pub fn rows(
        &mut self,
        zr: &CudaSlice<f32>,
        zg: &CudaSlice<f32>,
        p: &LossParams,
        dz: &mut CudaSlice<f32>,
    ) -> Result<()> {
        if p.n as usize != self.gathered_rows() {
            return Err(Error::invalid(format!(
                "rank loss: a gathered batch of {} rows for buffers of {}",
                p.n,
                self.gathered_rows()
            )));
        }
        let mut s = scratch(&mut self.arena, self.own, p.n as usize)?;
        let kside = (p.both_sides != 0).then(|| DevPtrMut::of(&mut self.kside));
        let share = DevPtrMut::of(&mut self.share).cast::<f64>()?;
        let (own, global) = (self.own.rows() * self.d, p.n as usize * self.d);
        let zr = DevPtr::of(zr).slice(0..own)?;
        let zg = DevPtr::of(zg).slice(0..global)?;
        let dz = DevPtrMut::of(dz).into_slice(0..own)?;
        enqueue_rows(&*self.gpu, zr, zg, self.own, p, &mut s, dz, kside, share)
    }

    /// Launch 2 with `key_own` (after the reduce-scatter).
    pub fn finish(&mut self, zr: &CudaSlice<f32>, dz: &mut CudaSlice<f32>) -> Result<()> {
        let n = self.gathered_rows();
        let s = scratch(&mut self.arena, self.own, n)?;
        let own = self.own.rows() * self.d;
        let key = DevPtr::of(&self.key_own);
        let zr = DevPtr::of(zr).slice(0..own)?;
        let dz = DevPtrMut::of(dz).into_slice(0..own)?;
        enqueue_finish(&*self.gpu, zr, self.d, &s, key, dz)
    }

    /// Launch 3 with `shares` (after the all-gather); the loss's device float64.
    pub fn sum(&mut self) -> Result<DevPtr<'_, f64>> {
        let n = self.gathered_rows();
        let s = scratch(&mut self.arena, self.own, n)?;
        let shares = DevPtrMut::of(&mut self.shares).cast::<f64>()?;
        let mut loss = s.loss;
        enqueue_sum(&*self.gpu, shares.into_const(), loss.reborrow())?;
        Ok(loss.into_const())
    }
}
