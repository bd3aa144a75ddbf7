//! Metrics of embeddings, on the host: weighted kNN top-1 (Wu et al. 2018), Recall@K, and NMI
//! of k-means clusters. Embeddings are rows of `d` floats, L2-normalized; the neighbour search
//! is `ops::topk` (`nn::embed::knn_top1` runs it on a training backend).

use rand::Rng;
use rayon::prelude::*;

use crate::error::Result;
use crate::ops::topk::{cpu::nearest, Neighbours};
use crate::rng::rng;

/// Weighted kNN top-1 accuracy of `d`-wide embeddings: each of the k nearest training
/// embeddings votes for its label with weight exp(similarity / sigma).
#[allow(clippy::too_many_arguments)] // the bank, the queries, their labels and the kNN's k, sigma
pub fn knn_top1(
    train: &[f32],
    train_labels: &[i64],
    test: &[f32],
    test_labels: &[i64],
    d: usize,
    classes: usize,
    k: usize,
    sigma: f64,
) -> Result<f64> {
    let neighbours = nearest(test, train, d, k, false)?;
    weighted_vote_accuracy(&neighbours, train_labels, test_labels, classes, sigma)
}

/// The weighted kNN vote of each query's neighbours (as [`nearest`] returns them): the share
/// of queries whose winning label is their own.
pub fn weighted_vote_accuracy(
    neighbours: &Neighbours,
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

/// k-means (k-means++ initialisation, seeded; Lloyd iterations until no assignment changes,
/// at most 100) on the rows of `x`; returns each row's cluster.
pub fn kmeans(x: &[f32], d: usize, k: usize, seed: u64) -> Vec<usize> {
    let n = x.len() / d.max(1);
    if n == 0 || k == 0 {
        return vec![0; n];
    }
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
            knn_top1(&emb, &labels, &emb, &labels, EMBED_DIM, 2, 5, 0.1).unwrap(),
            1.0
        );
        assert_eq!(
            recall_at_k(&emb, &labels, EMBED_DIM, &[1, 2]).unwrap(),
            vec![1.0, 1.0]
        );
        let clusters = kmeans(&emb, EMBED_DIM, 2, 0);
        let as_usize: Vec<usize> = labels.iter().map(|&l| l as usize).collect();
        assert!((nmi(&clusters, &as_usize) - 1.0).abs() < 1e-12);
    }
}
