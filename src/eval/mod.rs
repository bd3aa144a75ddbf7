//! Metrics of embeddings, on the host: weighted kNN top-1 and top-5 (Wu et al. 2018), Recall@K,
//! NMI of k-means clusters, the linear probe ([`linear`]) and a 2-D PCA picture
//! ([`projection`]). Embeddings are rows of `d`
//! floats, L2-normalized; the neighbour search is `ops::topk` (`nn::embed::weighted_knn` runs
//! it on a training backend).

pub mod linear;
pub mod projection;

pub use linear::{linear_probe, LinearProbe, LinearProbeConfig};
pub use projection::{pca_2d, Projection};

use rand::Rng;
use rayon::prelude::*;

use crate::error::Result;
use crate::ops::topk::{cpu::nearest, Neighbours};
use crate::rng::rng;

/// Weighted kNN accuracy: top-1 (the winning label is the query's own) and top-5 (its own is
/// among the five labels of most votes), as lemniscate reports them.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct KnnAccuracy {
    pub top1: f64,
    pub top5: f64,
}

/// Weighted kNN accuracy of `d`-wide embeddings (Wu et al. 2018): each of the k nearest
/// training embeddings votes for its label with weight exp(similarity / sigma).
#[allow(clippy::too_many_arguments)] // the bank, the queries, their labels and the kNN's k, sigma
pub fn weighted_knn(
    train: &[f32],
    train_labels: &[i64],
    test: &[f32],
    test_labels: &[i64],
    d: usize,
    classes: usize,
    k: usize,
    sigma: f64,
) -> Result<KnnAccuracy> {
    let neighbours = nearest(test, train, d, k, false)?;
    weighted_vote(&neighbours, train_labels, test_labels, classes, sigma)
}

/// The weighted kNN vote of each query's neighbours (as [`nearest`] returns them): the share
/// of queries whose own label wins (top-1) or is among the five of most votes (top-5; ties go
/// to the lower class index, as in top-1).
pub fn weighted_vote(
    neighbours: &Neighbours,
    train_labels: &[i64],
    test_labels: &[i64],
    classes: usize,
    sigma: f64,
) -> Result<KnnAccuracy> {
    if neighbours.len() != test_labels.len() {
        return Err(crate::error::Error::invalid(format!(
            "kNN: {} neighbour lists for {} test labels",
            neighbours.len(),
            test_labels.len()
        )));
    }
    check_labels("kNN", train_labels, test_labels, classes)?;
    let ranks: Vec<usize> = neighbours
        .par_iter()
        .zip(test_labels)
        .map(|(nb, &label)| {
            let mut votes = vec![0.0f64; classes];
            for &(s, j) in nb.iter() {
                votes[train_labels[j] as usize] += (f64::from(s) / sigma).exp();
            }
            let own = votes[label as usize];
            // Classes ahead of the query's own: more votes, or as many and a lower index.
            votes
                .iter()
                .enumerate()
                .filter(|&(c, &v)| v > own || (v == own && c < label as usize))
                .count()
        })
        .collect();
    let share = |within: usize| {
        ranks.iter().filter(|&&r| r < within).count() as f64 / test_labels.len().max(1) as f64
    };
    Ok(KnnAccuracy {
        top1: share(1),
        top5: share(5),
    })
}

/// Every label of both splits in 0..classes, or an error naming `what` and the first label
/// outside (a vote or a logit indexed by it would be out of bounds).
pub(crate) fn check_labels(what: &str, train: &[i64], test: &[i64], classes: usize) -> Result<()> {
    let in_range = |l: i64| l >= 0 && (l as usize) < classes;
    match train.iter().chain(test).find(|&&l| !in_range(l)) {
        Some(bad) => Err(crate::error::Error::invalid(format!(
            "{what}: label {bad} outside the {classes} classes"
        ))),
        None => Ok(()),
    }
}

/// Recall@K on one set of `d`-wide embeddings: a query is a hit when one of its K nearest
/// others shares its class.
pub fn recall_at_k(emb: &[f32], labels: &[i64], d: usize, ks: &[usize]) -> Result<Vec<f64>> {
    let kmax = ks.iter().copied().max().unwrap_or(1);
    let neighbours = nearest(emb, emb, d, kmax, true)?;
    Ok(ks
        .iter()
        .map(|&k| {
            let hits = neighbours
                .iter()
                .zip(labels)
                .filter(|(nb, &l)| nb.iter().take(k).any(|&(_, j)| labels[j] == l))
                .count();
            hits as f64 / labels.len().max(1) as f64
        })
        .collect())
}

/// k-means++ starts of the official evaluation (scikit-learn's `KMeans` of 2019, `n_init = 10`).
pub const KMEANS_STARTS: usize = 10;

/// Lloyd iterations at most per start (scikit-learn's `max_iter`).
pub const KMEANS_MAX_ITERATIONS: usize = 300;

/// A k-means result: each row's cluster and the sum of squared distances to the centres.
#[derive(Debug, Clone, PartialEq)]
pub struct Clustering {
    pub assign: Vec<usize>,
    pub inertia: f64,
}

/// k-means of the rows of `x` (`d` wide) into `k` clusters as the official evaluation ran it
/// (scikit-learn's `KMeans` of 2019): `starts` runs, each from a greedy k-means++ seeding
/// (2 + ln k candidates per centre, the one that lowers the potential most kept), then Lloyd
/// iterations until no assignment changes (at most [`KMEANS_MAX_ITERATIONS`]); the run of
/// lowest inertia is returned. Seeded: the same `seed` gives the same clusters on any thread
/// count (the parallel loops only compute per-row values; every sum runs in row order).
pub fn kmeans(x: &[f32], d: usize, k: usize, starts: usize, seed: u64) -> Result<Clustering> {
    if d == 0 || !x.len().is_multiple_of(d) {
        return Err(crate::error::Error::invalid(format!(
            "k-means: {} values are not rows of {d}",
            x.len()
        )));
    }
    let n = x.len() / d;
    if k == 0 || k > n {
        return Err(crate::error::Error::invalid(format!(
            "k-means: {k} clusters of {n} rows: expected 1 <= clusters <= rows"
        )));
    }
    let x: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
    let mut r = rng(seed);
    let mut best: Option<Clustering> = None;
    for _ in 0..starts.max(1) {
        let start_seed = r.random::<u64>();
        let run = kmeans_once(&x, d, k, start_seed);
        if best.as_ref().is_none_or(|b| run.inertia < b.inertia) {
            best = Some(run);
        }
    }
    best.ok_or_else(|| crate::error::Error::invalid("internal: k-means ran no start"))
}

fn squared_distance(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(p, q)| (p - q) * (p - q)).sum()
}

/// The index of the first prefix of `weights` whose sum exceeds `target` (sampling a row with
/// probability proportional to its weight; the last row when rounding runs past the end).
fn sample_by_weight(weights: &[f64], mut target: f64) -> usize {
    for (i, &w) in weights.iter().enumerate() {
        if target < w {
            return i;
        }
        target -= w;
    }
    weights.len() - 1
}

/// Greedy k-means++ seeding (Arthur & Vassilvitskii 2007, with scikit-learn's local trials).
fn kmeans_plus_plus(x: &[f64], d: usize, k: usize, r: &mut impl Rng) -> Vec<Vec<f64>> {
    let n = x.len() / d;
    let row = |i: usize| &x[i * d..(i + 1) * d];
    let trials = 2 + (k as f64).ln() as usize;
    let first = r.random_range(0..n);
    let mut centres = vec![row(first).to_vec()];
    let mut closest: Vec<f64> = (0..n)
        .into_par_iter()
        .map(|i| squared_distance(row(i), row(first)))
        .collect();
    while centres.len() < k {
        let potential: f64 = closest.iter().sum();
        let mut pick: Option<(f64, usize, Vec<f64>)> = None;
        for _ in 0..trials {
            let candidate = sample_by_weight(&closest, r.random::<f64>() * potential);
            let with: Vec<f64> = (0..n)
                .into_par_iter()
                .map(|i| closest[i].min(squared_distance(row(i), row(candidate))))
                .collect();
            let total: f64 = with.iter().sum();
            if pick.as_ref().is_none_or(|p| total < p.0) {
                pick = Some((total, candidate, with));
            }
        }
        if let Some((_, candidate, with)) = pick {
            centres.push(row(candidate).to_vec());
            closest = with;
        }
    }
    centres
}

/// One k-means run from a k-means++ seeding drawn with `seed`.
fn kmeans_once(x: &[f64], d: usize, k: usize, seed: u64) -> Clustering {
    let n = x.len() / d;
    let row = |i: usize| &x[i * d..(i + 1) * d];
    let mut centres = kmeans_plus_plus(x, d, k, &mut rng(seed));
    let nearest = |centres: &[Vec<f64>]| -> Vec<(usize, f64)> {
        (0..n)
            .into_par_iter()
            .map(|i| {
                centres
                    .iter()
                    .enumerate()
                    .map(|(c, centre)| (c, squared_distance(row(i), centre)))
                    .fold((0, f64::INFINITY), |a, b| if b.1 < a.1 { b } else { a })
            })
            .collect()
    };
    let mut assign: Vec<usize> = Vec::new();
    let mut found = nearest(&centres);
    for _ in 0..KMEANS_MAX_ITERATIONS {
        let next: Vec<usize> = found.iter().map(|&(c, _)| c).collect();
        if next == assign {
            break;
        }
        assign = next;
        let mut sums = vec![vec![0.0f64; d]; k];
        let mut counts = vec![0usize; k];
        for (i, &c) in assign.iter().enumerate() {
            counts[c] += 1;
            for (s, &v) in sums[c].iter_mut().zip(row(i)) {
                *s += v;
            }
        }
        // An emptied cluster restarts at the row farthest from its centre (scikit-learn's
        // relocation), so k clusters stay k.
        let mut far: Vec<usize> = (0..n).collect();
        far.sort_by(|&a, &b| found[b].1.total_cmp(&found[a].1));
        let mut far = far.into_iter();
        for c in 0..k {
            if counts[c] == 0 {
                if let Some(i) = far.next() {
                    centres[c] = row(i).to_vec();
                }
            } else {
                for (v, s) in centres[c].iter_mut().zip(&sums[c]) {
                    *v = s / counts[c] as f64;
                }
            }
        }
        found = nearest(&centres);
    }
    let assign: Vec<usize> = found.iter().map(|&(c, _)| c).collect();
    let inertia = found.iter().map(|&(_, dist)| dist).sum();
    Clustering { assign, inertia }
}

/// Normalized mutual information, 2 I(U; V) / (H(U) + H(V)) (scikit-learn's default).
pub fn nmi(a: &[usize], b: &[usize]) -> f64 {
    let n = a.len() as f64;
    let (ka, kb) = (
        a.iter().max().map_or(0, |m| m + 1),
        b.iter().max().map_or(0, |m| m + 1),
    );
    let mut joint = vec![vec![0.0f64; kb]; ka];
    let (mut pa, mut pb) = (vec![0.0f64; ka], vec![0.0f64; kb]);
    for (&x, &y) in a.iter().zip(b) {
        joint[x][y] += 1.0;
        pa[x] += 1.0;
        pb[y] += 1.0;
    }
    let h = |p: &[f64]| {
        -p.iter()
            .filter(|&&c| c > 0.0)
            .map(|&c| (c / n) * (c / n).ln())
            .sum::<f64>()
    };
    let mut mi = 0.0;
    for x in 0..ka {
        for y in 0..kb {
            let c = joint[x][y];
            if c > 0.0 {
                mi += (c / n) * ((c * n) / (pa[x] * pb[y])).ln();
            }
        }
    }
    let denom = h(&pa) + h(&pb);
    if denom == 0.0 {
        1.0
    } else {
        2.0 * mi / denom
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nmi_of_identical_and_independent_labellings() {
        let a = [0, 0, 1, 1, 2, 2];
        assert!((nmi(&a, &[5, 5, 3, 3, 0, 0]) - 1.0).abs() < 1e-12);
        assert!(nmi(&[0, 1, 0, 1], &[0, 0, 1, 1]).abs() < 1e-12);
    }

    #[test]
    fn top5_counts_the_own_label_among_the_five_of_most_votes() {
        // One query, seven classes; its neighbours vote 3 x class 6, 2 x class 5, then one each
        // for 4, 3, 2, 1 at falling similarity: class 1 ranks 6th, class 2 5th.
        let sims = [0.9f32, 0.9, 0.9, 0.8, 0.8, 0.7, 0.6, 0.5, 0.4];
        let bank_labels = [6i64, 6, 6, 5, 5, 4, 3, 2, 1];
        let neighbours: Neighbours = vec![sims.iter().copied().zip(0..9).collect()];
        let vote = |label: i64| weighted_vote(&neighbours, &bank_labels, &[label], 7, 0.1).unwrap();
        assert_eq!(
            vote(6),
            KnnAccuracy {
                top1: 1.0,
                top5: 1.0
            }
        );
        assert_eq!(
            vote(2),
            KnnAccuracy {
                top1: 0.0,
                top5: 1.0
            }
        );
        assert_eq!(
            vote(1),
            KnnAccuracy {
                top1: 0.0,
                top5: 0.0
            }
        );
        assert_eq!(
            vote(0),
            KnnAccuracy {
                top1: 0.0,
                top5: 0.0
            },
            "no votes: ranks last"
        );
        let err = weighted_vote(&neighbours, &bank_labels, &[7], 7, 0.1).unwrap_err();
        assert!(
            err.to_string().contains("label 7 outside the 7 classes"),
            "{err}"
        );
    }

    const EMBED_DIM: usize = 128;

    #[test]
    fn knn_recall_and_kmeans_on_separated_clusters() {
        // Two tight clusters on orthogonal axes: everything must be perfect.
        let mut emb = vec![0.0f32; 20 * EMBED_DIM];
        let mut labels = vec![0i64; 20];
        for i in 0..20 {
            let c = i % 2;
            emb[i * EMBED_DIM + c] = 1.0;
            emb[i * EMBED_DIM + 2 + i] = 0.01;
            labels[i] = c as i64;
        }
        let emb = crate::ops::normalize_rows::cpu::forward(&emb, 20, EMBED_DIM)
            .unwrap()
            .0;
        assert_eq!(
            weighted_knn(&emb, &labels, &emb, &labels, EMBED_DIM, 2, 5, 0.1)
                .unwrap()
                .top1,
            1.0
        );
        assert_eq!(
            recall_at_k(&emb, &labels, EMBED_DIM, &[1, 2]).unwrap(),
            vec![1.0, 1.0]
        );
        let clusters = kmeans(&emb, EMBED_DIM, 2, KMEANS_STARTS, 0).unwrap();
        let as_usize: Vec<usize> = labels.iter().map(|&l| l as usize).collect();
        assert!((nmi(&clusters.assign, &as_usize) - 1.0).abs() < 1e-12);
    }
}
