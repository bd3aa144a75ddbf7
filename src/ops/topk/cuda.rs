//! The kNN search on a [`Queue`]: per block of queries, a float32 GEMM of similarities against
//! the bank (whatever precision training uses), then `topk_rows_v1` (`kernels/topk.cu`) and a
//! read-back of the k best of each row, sorted on the host.

use super::{by_similarity, Neighbours, Version};
use crate::cuda::{
    check_len, to_i32, DevPtr, DevPtrMut, Geometry, Kernel, KernelArgs, Queue, BLOCK,
};
use crate::cuda::{Gemm, GemmPrecision};
use crate::error::{Error, Result};

const TOPK_ROWS_V1: Kernel = Kernel::new("topk", "topk_rows_v1");

/// The largest similarity block, in floats (512 MB).
pub const MAX_BLOCK: usize = 1 << 27;

/// The search's scratch for blocks of `rows` queries: similarities (rows x bank) and the
/// selected values and indices (rows x k).
pub struct Scratch<'a> {
    pub sims: DevPtrMut<'a, f32>,
    pub values: DevPtrMut<'a, f32>,
    pub indices: DevPtrMut<'a, i32>,
}

/// Queries per block for `queries` against a bank of `bank` rows: the similarity block stays
/// within `cap` floats.
pub fn block_rows(queries: usize, bank: usize, cap: usize) -> usize {
    (cap / bank.max(1)).clamp(1, queries.max(1))
}

/// For each row of `queries` (L2-normalized, `d` wide), its `k` most similar rows of `keys`.
pub fn nearest(
    q: &impl Queue,
    version: Version,
    queries: DevPtr<'_, f32>,
    keys: DevPtr<'_, f32>,
    d: usize,
    k: usize,
    s: &mut Scratch<'_>,
) -> Result<Neighbours> {
    let Version::V1 = version;
    if d == 0 || !queries.len().is_multiple_of(d) || !keys.len().is_multiple_of(d) {
        return Err(Error::invalid(format!(
            "kNN: {} query and {} key values are not rows of {d}",
            queries.len(),
            keys.len()
        )));
    }
    let (nq, nk) = (queries.len() / d, keys.len() / d);
    let k = k.min(nk);
    if k == 0 || nq == 0 {
        return Ok(vec![Vec::new(); nq]);
    }
    let rows_per_block = (s.sims.len() / nk)
        .min(s.values.len() / k)
        .min(s.indices.len() / k)
        .min(nq);
    if rows_per_block == 0 {
        return Err(Error::invalid(format!(
            "kNN scratch of {} similarities holds no row of a bank of {nk}",
            s.sims.len()
        )));
    }
    let (cols, ki) = (to_i32("bank size", nk)?, to_i32("k", k)?);
    let mut out = Vec::with_capacity(nq);
    let (mut vals, mut idx) = (Vec::new(), Vec::new());
    let mut q0 = 0;
    while q0 < nq {
        let rows = rows_per_block.min(nq - q0);
        // S (rows x nk) = Q K^T, in float32 whatever the training GEMMs use.
        q.gemm(&Gemm {
            trans_a: false,
            trans_b: true,
            m: rows,
            n: nk,
            k: d,
            alpha: 1.0,
            a: queries.slice(q0 * d..(q0 + rows) * d)?,
            lda: d,
            b: keys,
            ldb: d,
            beta: 0.0,
            c: s.sims.slice_mut(0..rows * nk)?,
            ldc: nk,
            precision: GemmPrecision::F32,
        })?;
        topk_rows_v1(q, s, rows, (cols, ki))?;
        vals.resize(rows * k, 0.0f32);
        idx.resize(rows * k, 0i32);
        q.read(s.values.slice(0..rows * k)?, &mut vals)?;
        q.read(s.indices.slice(0..rows * k)?, &mut idx)?;
        for r in 0..rows {
            let mut row: Vec<(f32, usize)> = vals[r * k..(r + 1) * k]
                .iter()
                .zip(&idx[r * k..(r + 1) * k])
                .map(|(&sim, &j)| (sim, j as usize))
                .collect();
            row.sort_by(by_similarity);
            out.push(row);
        }
        q0 += rows;
    }
    Ok(out)
}

/// The k largest of each of `rows` similarity rows into the scratch's values and indices.
fn topk_rows_v1(
    q: &impl Queue,
    s: &mut Scratch<'_>,
    rows: usize,
    (cols, k): (i32, i32),
) -> Result<()> {
    check_len("topk similarities", s.sims.len(), rows * cols as usize)?;
    check_len("topk values", s.values.len(), rows * k as usize)?;
    check_len("topk indices", s.indices.len(), rows * k as usize)?;
    let mut args = KernelArgs::new();
    args.input(s.sims.as_const())
        .value(to_i32("queries", rows)?)
        .value(cols)
        .value(k)
        .output(&mut s.values)
        .output(&mut s.indices);
    // SAFETY: topk_rows_v1(const float* s, int rows, int cols, int k, float* val, int* idx);
    // s holds rows x cols, the outputs rows x k, 1 <= k <= cols (checked above and by the
    // caller).
    unsafe { q.launch(TOPK_ROWS_V1, Geometry::blocks(rows, BLOCK), &mut args) }
}
