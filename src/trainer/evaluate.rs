//! The evaluation a run prints and records: weighted kNN on the test split with the training
//! split as the memory bank, embeddings and neighbour search on the run's backend, or, for
//! classes the run did not train on, Recall@1 among their test images; the baseline it must
//! beat, kNN on raw pixels; and which classes a run trains and evaluates on.

use std::sync::Arc;

use super::ranks::embed_split_shared;
use super::{KnnConfig, TrainConfig};
use crate::data::{augment, Dataset, Split};
use crate::dist::collectives::{Collectives, SingleDevice};
use crate::error::{Error, Result};
use crate::eval;
use crate::eval::KnnAccuracy;
use crate::linalg::{matmul, MatRef};
use crate::nn::embed::weighted_knn;
use crate::nn::models::{Model, EMBED_DIM};
use crate::nn::Encoder;
use crate::ops::normalize_rows;
use crate::rng::{random_matrix, rng};
use crate::tape::Graph;

/// Weighted kNN top-1 and top-5 of the model on the dataset's test split (train split as the
/// memory bank).
pub fn knn_accuracy<B: Encoder>(
    graph: &mut Graph<B>,
    model: &Model,
    ds: &Dataset,
    knn: &KnnConfig,
) -> Result<KnnAccuracy> {
    let never = || false;
    let knn = knn_accuracy_until(&SingleDevice, graph, model, ds, knn, &never)?;
    knn.ok_or_else(|| Error::invalid("internal: an evaluation stopped unasked"))
}

/// [`knn_accuracy`], given up (None) once `stop()` holds between embedding batches.
pub fn knn_accuracy_until<B: Encoder>(
    group: &dyn Collectives<B>,
    graph: &mut Graph<B>,
    model: &Model,
    ds: &Dataset,
    knn: &KnnConfig,
    stop: &dyn Fn() -> bool,
) -> Result<Option<KnnAccuracy>> {
    let Some(bank) = embed_split_shared(group, graph, model, &ds.train, ds.size, stop)? else {
        return Ok(None);
    };
    let Some(queries) = embed_split_shared(group, graph, model, &ds.test, ds.size, stop)? else {
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
pub fn evaluate_until<B: Encoder>(
    group: &dyn Collectives<B>,
    graph: &mut Graph<B>,
    model: &Model,
    set: &EvalSet,
    knn: &KnnConfig,
    stop: &dyn Fn() -> bool,
) -> Result<Option<Evaluation>> {
    let _range = crate::cuda::phase("knn evaluation");
    // A data-parallel group evaluates together: with rank 0's BatchNorm statistics, and
    // without giving way to a signal that one rank may see before the others.
    let never = || false;
    let stop: &dyn Fn() -> bool = if group.world_size() > 1 {
        super::ranks::share_bn_statistics(group, &graph.backend, &mut graph.params)?;
        &never
    } else {
        stop
    };
    if !set.unseen {
        return Ok(
            knn_accuracy_until(group, graph, model, &set.ds, knn, stop)?.map(Evaluation::Knn)
        );
    }
    let ds = &set.ds;
    let Some(test) = embed_split_shared(group, graph, model, &ds.test, ds.size, stop)? else {
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

/// The training and evaluation datasets of a run's class split: `data.classes` restricts the
/// training images, `eval_classes` (default: the training classes) the evaluated ones; an
/// evaluated class outside the training classes makes an unseen-category run.
pub fn class_split(cfg: &TrainConfig, full: &Arc<Dataset>) -> Result<(Arc<Dataset>, EvalSet)> {
    use crate::data::classes::select;
    let all: Vec<usize> = (0..full.classes.len()).collect();
    let trained = match &cfg.data.classes {
        Some(spec) => select(spec, &full.classes, "--classes")?,
        None => all.clone(),
    };
    let evaluated = match &cfg.eval_classes {
        Some(spec) => select(spec, &full.classes, "--eval-classes")?,
        None => trained.clone(),
    };
    let unseen = evaluated.iter().any(|c| !trained.contains(c));
    if unseen && evaluated.len() < 2 {
        return Err(Error::invalid(
            "--eval-classes: Recall@1 on unseen classes needs 2 classes or more",
        ));
    }
    let restrict = |classes: &[usize], flag: &str| -> Result<Arc<Dataset>> {
        if classes.len() == full.classes.len() {
            Ok(full.clone())
        } else {
            Ok(Arc::new(full.restrict(classes, flag)?))
        }
    };
    let ds = restrict(&trained, "--classes")?;
    let eval = EvalSet {
        ds: restrict(&evaluated, "--eval-classes")?,
        unseen,
    };
    Ok((ds, eval))
}

/// Which classes a run trains and evaluates on, for its first lines.
pub fn describe_classes(ds: &Dataset, eval: &EvalSet) -> String {
    let how = if eval.unseen {
        "Recall@1 among the test images of"
    } else {
        "kNN on"
    };
    format!(
        "training on {} classes ({}); evaluating {how} {} classes ({})",
        ds.classes.len(),
        ds.classes.join(", "),
        eval.ds.classes.len(),
        eval.ds.classes.join(", ")
    )
}

/// An evaluation as the progress lines print it.
pub fn describe_evaluation(e: &Evaluation) -> String {
    match e {
        Evaluation::Knn(k) => format!(
            "kNN top-1 {:.2}% top-5 {:.2}%",
            100.0 * k.top1,
            100.0 * k.top5
        ),
        Evaluation::RecallAt1(r) => format!("Recall@1 (unseen classes) {:.2}%", 100.0 * r),
    }
}
