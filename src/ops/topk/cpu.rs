//! The kNN search on the CPU: a GEMM per block of 64 queries, then a partial selection per
//! query (rayon over blocks).

use rayon::prelude::*;

use super::{by_similarity, Neighbours};
use crate::error::{Error, Result};
use crate::linalg::{matmul, MatRef};

const QUERY_BLOCK: usize = 64;

/// For each query row, the `k` most similar rows of `keys` as (similarity, index), best first;
/// `exclude_self` drops key i for query i (queries and keys the same set).
pub fn nearest(
    queries: &[f32],
    keys: &[f32],
    d: usize,
    k: usize,
    exclude_self: bool,
) -> Result<Neighbours> {
    if d == 0 || !queries.len().is_multiple_of(d) || !keys.len().is_multiple_of(d) {
        return Err(Error::invalid(format!(
            "kNN: {} query and {} key values are not rows of {d}",
            queries.len(),
            keys.len()
        )));
    }
    let nk = keys.len() / d;
    if nk == 0 {
        return Ok(vec![Vec::new(); queries.len() / d]);
    }
    let blocks: Vec<Result<Neighbours>> = queries
        .par_chunks(QUERY_BLOCK * d)
        .enumerate()
        .map(|(b, qblock)| {
            let rows = qblock.len() / d;
            let mut sims = vec![0.0f32; rows * nk];
            matmul(
                MatRef::row_major(qblock, rows, d),
                MatRef::transposed(keys, nk, d),
                &mut sims,
                nk,
                1.0,
                false,
            )?;
            Ok(sims
                .chunks_exact(nk)
                .enumerate()
                .map(|(i, row)| select(row, b * QUERY_BLOCK + i, k, exclude_self))
                .collect())
        })
        .collect();
    let mut out = Vec::with_capacity(queries.len() / d);
    for b in blocks {
        out.extend(b?);
    }
    Ok(out)
}

/// The `k` best of one query's similarity row.
fn select(row: &[f32], query: usize, k: usize, exclude_self: bool) -> Vec<(f32, usize)> {
    let mut cand: Vec<(f32, usize)> = row
        .iter()
        .copied()
        .enumerate()
        .filter(|&(j, _)| !(exclude_self && j == query))
        .map(|(j, s)| (s, j))
        .collect();
    let kk = k.min(cand.len());
    if kk > 0 && kk < cand.len() {
        cand.select_nth_unstable_by(kk - 1, by_similarity);
        cand.truncate(kk);
        cand.shrink_to_fit(); // else every query keeps a row-sized allocation
    }
    cand.sort_by(by_similarity);
    cand
}
