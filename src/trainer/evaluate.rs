//! The evaluation a run prints and records: weighted kNN on the test split with the training
//! split as the memory bank, embeddings and neighbour search on the run's backend, or, for
//! classes the run did not train on, Recall@1 among their test images; and the baseline it
//! must beat, kNN on raw pixels.

use std::sync::Arc;

use super::KnnConfig;
use crate::data::{augment, Dataset, Split};
use crate::error::Result;
use crate::eval;
use crate::eval::KnnAccuracy;
use crate::linalg::{matmul, MatRef};
use crate::nn::backend::Backend;
use crate::nn::embed::{embed_split_until, weighted_knn, EVAL_BATCH};
use crate::nn::graph::Graph;
use crate::nn::models::{Model, EMBED_DIM};
use crate::ops::normalize_rows;
use crate::rng::{random_matrix, rng};

/// Weighted kNN top-1 and top-5 of the model on the dataset's test split (train split as the
/// memory bank).
pub fn knn_accuracy<B: Backend>(
    graph: &mut Graph<B>,
    model: &Model,
    ds: &Dataset,
    knn: &KnnConfig,
) -> Result<KnnAccuracy> {
    let never = || false;
    let knn = knn_accuracy_until(graph, model, ds, knn, &never)?;
    knn.ok_or_else(|| crate::error::Error::invalid("internal: an evaluation stopped unasked"))
}

/// [`knn_accuracy`], given up (None) once `stop()` holds between embedding batches.
pub fn knn_accuracy_until<B: Backend>(
    graph: &mut Graph<B>,
    model: &Model,
    ds: &Dataset,
    knn: &KnnConfig,
    stop: &dyn Fn() -> bool,
) -> Result<Option<KnnAccuracy>> {
    let Some(bank) = embed_split_until(graph, model, &ds.train, ds.size, EVAL_BATCH, stop)? else {
        return Ok(None);
    };
    let Some(queries) = embed_split_until(graph, model, &ds.test, ds.size, EVAL_BATCH, stop)?
    else {
        return Ok(None);
    };
    weighted_knn(
        &graph.backend,
        &bank,
        &ds.train.labels,
        &queries,
        &ds.test.labels,
        ds.classes.len(),
        knn.k,
        knn.sigma,
    )
    .map(Some)
}

/// The classes a run evaluates and how.
#[derive(Debug, Clone)]
pub struct EvalSet {
    /// The dataset restricted to the evaluated classes.
    pub ds: Arc<Dataset>,
    /// Some evaluated class is not trained on: Recall@1 among the test images instead of kNN
    /// against the training images.
    pub unseen: bool,
}

/// One evaluation's numbers: kNN for classes the run trains on, Recall@1 for unseen ones.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Evaluation {
    Knn(KnnAccuracy),
    RecallAt1(f64),
}

impl Evaluation {
    /// The number a run ranks its epochs by (best.safetensors).
    pub fn headline(&self) -> f64 {
        match self {
            Evaluation::Knn(k) => k.top1,
            Evaluation::RecallAt1(r) => *r,
        }
    }
}

/// [`knn_accuracy_until`], or Recall@1 among the test images of an unseen-class set.
pub fn evaluate_until<B: Backend>(
    graph: &mut Graph<B>,
    model: &Model,
    set: &EvalSet,
    knn: &KnnConfig,
    stop: &dyn Fn() -> bool,
) -> Result<Option<Evaluation>> {
    let _range = crate::cuda::phase("knn evaluation");
    if !set.unseen {
        return Ok(knn_accuracy_until(graph, model, &set.ds, knn, stop)?.map(Evaluation::Knn));
    }
    let ds = &set.ds;
    let Some(test) = embed_split_until(graph, model, &ds.test, ds.size, EVAL_BATCH, stop)? else {
        return Ok(None);
    };
    let test = graph.backend.download(&test)?;
    let recall = eval::recall_at_k(&test, &ds.test.labels, EMBED_DIM, &[1])?;
    Ok(Some(Evaluation::RecallAt1(recall[0])))
}

/// Width of the random projection of raw pixels.
const PIXEL_DIM: usize = 128;

/// kNN top-1 on raw pixels (test transform, L2-normalized): the baseline learning must beat.
pub fn raw_pixel_knn(ds: &Dataset, knn: &KnnConfig) -> Result<KnnAccuracy> {
    // Pixels are projected to 128 dimensions by a fixed random matrix so that the same kNN code
    // applies; random projections keep cosine similarities (Johnson-Lindenstrauss).
    let dim = 3 * ds.size * ds.size;
    let proj: Vec<f32> = random_matrix(&mut rng(0xbeef), PIXEL_DIM, dim);
    let project = |split: &Split| -> Result<Vec<f32>> {
        let x = augment::test_batch(split, ds.size, 0..split.len());
        let mut out = vec![0.0f32; split.len() * PIXEL_DIM];
        matmul(
            MatRef::row_major(&x, split.len(), dim),
            MatRef::transposed(&proj, PIXEL_DIM, dim),
            &mut out,
            PIXEL_DIM,
            1.0,
            false,
        )?;
        Ok(normalize_rows::cpu::forward(&out, split.len(), PIXEL_DIM)?.0)
    };
    eval::weighted_knn(
        &project(&ds.train)?,
        &ds.train.labels,
        &project(&ds.test)?,
        &ds.test.labels,
        PIXEL_DIM,
        ds.classes.len(),
        knn.k,
        knn.sigma,
    )
}
