//! Embeddings of a dataset split under the test transform (batchnorm in eval mode), kept on
//! the graph's backend and L2-normalized there, and the weighted kNN over them: the neighbour
//! search runs on the backend, the vote ([`eval::weighted_vote`]) on the host.

use std::ops::Range;

use super::models::{Model, EMBED_DIM};
use super::Encoder;
use crate::data::{augment, Split};
use crate::error::Result;
use crate::eval;
use crate::ops::Shape4;
use crate::tape::Graph;

/// Images per forward pass of the evaluation.
pub const EVAL_BATCH: usize = 256;

/// The split's L2-normalized embeddings (N x 128) as one buffer of `graph`'s backend, in
/// batches of `batch` images.
pub fn embed_split<B: Encoder>(
    graph: &mut Graph<B>,
    model: &Model,
    split: &Split,
    size: usize,
    batch: usize,
) -> Result<B::Buffer> {
    let never = || false;
    let f = embed_split_until(graph, model, split, size, batch, &never)?;
    f.ok_or_else(|| crate::error::Error::invalid("internal: an embedding pass stopped unasked"))
}

/// [`embed_split`], stopping between batches once `stop()` holds (None then): how a run's
/// evaluation gives way to a signal.
pub fn embed_split_until<B: Encoder>(
    graph: &mut Graph<B>,
    model: &Model,
    split: &Split,
    size: usize,
    batch: usize,
    stop: &dyn Fn() -> bool,
) -> Result<Option<B::Buffer>> {
    embed_range_until(graph, model, split, size, 0..split.len(), batch, stop)
}

/// [`embed_split_until`] of the images `range` of the split (a data-parallel rank's share);
/// `range` is not empty.
pub fn embed_range_until<B: Encoder>(
    graph: &mut Graph<B>,
    model: &Model,
    split: &Split,
    size: usize,
    range: Range<usize>,
    batch: usize,
    stop: &dyn Fn() -> bool,
) -> Result<Option<B::Buffer>> {
    let rows = range.len();
    let mut bank = graph.backend.zeros(rows * EMBED_DIM)?;
    let mut start = range.start;
    while start < range.end {
        if stop() {
            return Ok(None);
        }
        let end = (start + batch).min(range.end);
        let x = augment::test_batch(split, size, start..end);
        graph.begin();
        let input = graph.input(
            &x,
            Shape4 {
                n: end - start,
                c: 3,
                h: size,
                w: size,
            },
        )?;
        let z = model.forward(graph, input, false)?;
        let at = (start - range.start) * EMBED_DIM;
        graph.backend.copy_into(graph.buffer(z), &mut bank, at)?;
        start = end;
    }
    let b = &graph.backend;
    let mut f = b.zeros(rows * EMBED_DIM)?;
    b.normalize_rows(&bank, (rows, EMBED_DIM), &mut f)?;
    Ok(Some(f))
}

/// [`embed_split`] on the host.
pub fn embed_split_host<B: Encoder>(
    graph: &mut Graph<B>,
    model: &Model,
    split: &Split,
    size: usize,
) -> Result<Vec<f32>> {
    let f = embed_split(graph, model, split, size, EVAL_BATCH)?;
    graph.backend.download(&f)
}

/// Weighted kNN accuracy (Wu et al. 2018; [`eval::weighted_vote`]): each of the k nearest
/// bank embeddings votes for its label with weight exp(similarity / sigma); the search runs on
/// `backend`.
#[allow(clippy::too_many_arguments)] // the bank, the queries, their labels and the kNN's k, sigma
pub fn weighted_knn<B: Encoder>(
    backend: &B,
    bank: &B::Buffer,
    bank_labels: &[i64],
    queries: &B::Buffer,
    query_labels: &[i64],
    classes: usize,
    k: usize,
    sigma: f64,
) -> Result<eval::KnnAccuracy> {
    let neighbours = backend.nearest(queries, bank, EMBED_DIM, k)?;
    eval::weighted_vote(&neighbours, bank_labels, query_labels, classes, sigma)
}
