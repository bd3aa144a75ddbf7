//! Evaluation of embeddings: weighted kNN top-1 (Wu et al. 2018), Recall@K, and NMI of
//! k-means clusters. All run in parallel on the CPU over blocks of queries.

use rand::Rng;
use rayon::prelude::*;

use crate::data::{augment, Split};
use crate::error::Result;
use crate::linalg::{matmul, MatRef};
use crate::nn::backend::Backend;
use crate::nn::cpu_ops::Shape4;
use crate::nn::graph::Graph;
use crate::nn::models::{Model, EMBED_DIM};
use crate::testing::rng;

/// L2-normalised embeddings (N x 128) of a split under the test transform, batchnorm in eval
/// mode, in batches of `batch` images.
pub fn embed<B: Backend>(
    graph: &mut Graph<B>,
    model: &Model,
    split: &Split,
    size: usize,
    batch: usize,
) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(split.len() * EMBED_DIM);
    let mut start = 0;
    while start < split.len() {
        let end = (start + batch).min(split.len());
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
        out.extend(graph.value(z)?);
        start = end;
    }
    normalise_rows(&mut out, EMBED_DIM);
    Ok(out)
}

/// Scales every row to unit length (zero rows stay zero).
pub fn normalise_rows(x: &mut [f32], d: usize) {
    x.par_chunks_mut(d).for_each(|row| {
        let norm = row
            .iter()
            .map(|&v| f64::from(v) * f64::from(v))
            .sum::<f64>()
            .sqrt();
        if norm > 0.0 {
            row.iter_mut()
                .for_each(|v| *v = (f64::from(*v) / norm) as f32);
        }
    });
}

const QUERY_BLOCK: usize = 64;

/// For each query, its neighbours as (similarity, index), best first.
type Neighbours = Vec<Vec<(f32, usize)>>;

/// For each query row, the `k` most similar rows of `keys` as (similarity, index), best first;
/// `exclude_self` drops key i for query i (queries and keys the same set).
pub fn nearest(
    queries: &[f32],
    keys: &[f32],
    d: usize,
    k: usize,
    exclude_self: bool,
) -> Result<Vec<Vec<(f32, usize)>>> {
    let nk = keys.len() / d;
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
                .map(|(i, row)| {
                    let q = b * QUERY_BLOCK + i;
                    let mut cand: Vec<(f32, usize)> = row
                        .iter()
                        .copied()
                        .enumerate()
                        .filter(|&(j, _)| !(exclude_self && j == q))
                        .map(|(j, s)| (s, j))
                        .collect();
                    let by_sim = |a: &(f32, usize), b: &(f32, usize)| {
                        b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
                    };
                    let kk = k.min(cand.len());
                    if kk > 0 && kk < cand.len() {
                        cand.select_nth_unstable_by(kk - 1, by_sim);
                        cand.truncate(kk);
                        cand.shrink_to_fit(); // else every query keeps a row-sized allocation
                    }
                    cand.sort_by(by_sim);
                    cand
                })
                .collect())
        })
        .collect();
    let mut out = Vec::with_capacity(queries.len() / d);
    for b in blocks {
        out.extend(b?);
    }
    Ok(out)
}

/// Weighted kNN top-1 accuracy: each of the k nearest training embeddings votes for its label
/// with weight exp(similarity / sigma).
pub fn knn_top1(
    train: &[f32],
    train_labels: &[i64],
    test: &[f32],
    test_labels: &[i64],
    classes: usize,
    k: usize,
    sigma: f64,
) -> Result<f64> {
    let neighbours = nearest(test, train, EMBED_DIM, k, false)?;
    weighted_vote_accuracy(&neighbours, train_labels, test_labels, classes, sigma)
}

/// [`knn_top1`] with the neighbour search on `backend` (a GPU's similarity GEMM and top-k, or
/// the CPU's).
#[allow(clippy::too_many_arguments)] // knn_top1's arguments and the backend
pub fn knn_top1_on<B: Backend>(
    backend: &B,
    train: &[f32],
    train_labels: &[i64],
    test: &[f32],
    test_labels: &[i64],
    classes: usize,
    k: usize,
    sigma: f64,
) -> Result<f64> {
    let neighbours = backend.nearest(test, train, EMBED_DIM, k)?;
    weighted_vote_accuracy(&neighbours, train_labels, test_labels, classes, sigma)
}

/// The weighted kNN vote of each query's neighbours (as [`nearest`] returns them): the share
/// of queries whose winning label is their own.
pub fn weighted_vote_accuracy(
    neighbours: &[Vec<(f32, usize)>],
    train_labels: &[i64],
    test_labels: &[i64],
    classes: usize,
    sigma: f64,
) -> Result<f64> {
    if neighbours.len() != test_labels.len() {
        return Err(crate::error::Error::invalid(format!(
            "kNN: {} neighbour lists for {} test labels",
            neighbours.len(),
            test_labels.len()
        )));
    }
    let correct = neighbours
        .par_iter()
        .zip(test_labels)
        .filter(|(nb, &label)| {
            let mut votes = vec![0.0f64; classes];
            for &(s, j) in nb.iter() {
                votes[train_labels[j] as usize] += (f64::from(s) / sigma).exp();
            }
            let best = votes
                .iter()
                .enumerate()
                .fold(
                    (0, f64::NEG_INFINITY),
                    |b, (c, &v)| if v > b.1 { (c, v) } else { b },
                )
                .0;
            best as i64 == label
        })
        .count();
    Ok(correct as f64 / test_labels.len().max(1) as f64)
}

/// Recall@K on one set: a query is a hit when one of its K nearest others shares its class.
pub fn recall_at_k(emb: &[f32], labels: &[i64], ks: &[usize]) -> Result<Vec<f64>> {
    let kmax = ks.iter().copied().max().unwrap_or(1);
    let neighbours = nearest(emb, emb, EMBED_DIM, kmax, true)?;
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

/// k-means (k-means++ initialisation, seeded; Lloyd iterations until no assignment changes,
/// at most 100) on the rows of `x`; returns each row's cluster.
pub fn kmeans(x: &[f32], d: usize, k: usize, seed: u64) -> Vec<usize> {
    let n = x.len() / d;
    let row = |i: usize| &x[i * d..(i + 1) * d];
    let dist = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(p, q)| f64::from(p - q).powi(2))
            .sum::<f64>()
    };
    let mut r = rng(seed);
    let mut centres: Vec<Vec<f32>> = vec![row(r.random_range(0..n)).to_vec()];
    let mut best: Vec<f64> = (0..n).map(|i| dist(row(i), &centres[0])).collect();
    while centres.len() < k.min(n) {
        let total: f64 = best.iter().sum();
        let mut target = r.random::<f64>() * total;
        let mut pick = n - 1;
        for (i, &b) in best.iter().enumerate() {
            if target < b {
                pick = i;
                break;
            }
            target -= b;
        }
        centres.push(row(pick).to_vec());
        let c = centres.last().map(|c| c.as_slice()).unwrap_or(&[]);
        best.par_iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = b.min(dist(row(i), c)));
    }
    let mut assign = vec![usize::MAX; n];
    for _ in 0..100 {
        let next: Vec<usize> = (0..n)
            .into_par_iter()
            .map(|i| {
                (0..centres.len())
                    .map(|c| (dist(row(i), &centres[c]), c))
                    .fold((f64::INFINITY, 0), |a, b| if b.0 < a.0 { b } else { a })
                    .1
            })
            .collect();
        if next == assign {
            break;
        }
        assign = next;
        let mut sums = vec![vec![0.0f64; d]; centres.len()];
        let mut counts = vec![0usize; centres.len()];
        for (i, &c) in assign.iter().enumerate() {
            counts[c] += 1;
            for (s, &v) in sums[c].iter_mut().zip(row(i)) {
                *s += f64::from(v);
            }
        }
        for (c, centre) in centres.iter_mut().enumerate() {
            if counts[c] > 0 {
                for (v, s) in centre.iter_mut().zip(&sums[c]) {
                    *v = (s / counts[c] as f64) as f32;
                }
            }
        }
    }
    assign
}

/// Normalised mutual information, 2 I(U; V) / (H(U) + H(V)) (scikit-learn's default).
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
        normalise_rows(&mut emb, EMBED_DIM);
        assert_eq!(
            knn_top1(&emb, &labels, &emb, &labels, 2, 5, 0.1).unwrap(),
            1.0
        );
        assert_eq!(recall_at_k(&emb, &labels, &[1, 2]).unwrap(), vec![1.0, 1.0]);
        let clusters = kmeans(&emb, EMBED_DIM, 2, 0);
        let as_usize: Vec<usize> = labels.iter().map(|&l| l as usize).collect();
        assert!((nmi(&clusters, &as_usize) - 1.0).abs() < 1e-12);
    }
}
