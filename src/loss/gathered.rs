//! The loss of a global batch split over R data-parallel ranks, as multi-GPU training computes
//! it: every rank all-gathers the normalized rows of both views (solo-learn's and VISSL's
//! gather), computes the loss terms of its own rows against all N gathered keys, and the
//! gradient is recombined so that it is exactly one device's gradient of the same global batch.
//!
//! Layout. Rank r holds m_r images and 2 m_r rows: view A of its images, then view B (one
//! device's layout, locally). The all-gather concatenates the ranks' rows in rank order, so
//! gathered row g = o_r + v m_r + i (o_r = 2 sum_{q<r} m_q, view v, image i) has its partner on
//! the same rank: o_r + (1 - v) m_r + i. Getting this right on every rank is the point (solo-learn
//! issue 206: a wrong positive mask on ranks above 0). N = 2 sum_r m_r.
//!
//! Loss. Rank r forms l_a for its own rows a (loss.md's row term with the keys of all ranks);
//! L = (1/N) sum over every rank's rows: each rank's partial sum, all-reduced.
//!
//! Gradient. dL/df_a = (1/(N tau)) (sum_b g_ab f_b + [both-sides] sum_c g_ca f_c). The first sum
//! (a as a query) uses a's own row of G: local to a's rank. The second (a as a key of every
//! query c) is spread over the ranks that own the queries c: each rank forms it for every
//! gathered row from its own queries (N x d), and a reduce-scatter sums those over ranks and
//! hands each rank its own rows. A gather whose backward kept only the local rank's terms
//! (lightly issue 1528) loses the other ranks' share; `key_side_without_the_sum` in the tests
//! shows the difference.
//!
//! The global batch is one device's batch of the same images with its rows permuted
//! ([`RankLayout::single_device_row`]: view A of every image in rank order, then view B), and the
//! loss is invariant to that permutation, which is how the tests check this module.

// Index loops on purpose, as in the reference.
#![allow(clippy::needless_range_loop)]

use std::ops::Range;

use rayon::prelude::*;

use super::reference::{normalize, normalize_backward, row_terms};
use super::{GradSemantics, LossConfig};
use crate::error::{Error, Result};

/// How a global batch is split over ranks: each rank's image count, in rank order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankLayout {
    images: Vec<usize>,
    /// First gathered row of each rank, and N at the end.
    row_offsets: Vec<usize>,
    /// First image of each rank in the global order.
    image_offsets: Vec<usize>,
}

impl RankLayout {
    /// `images_per_rank[r]` images (2 x as many rows) on rank r; every rank has at least one
    /// image and the global batch at least two (N >= 4, as the loss needs).
    pub fn new(images_per_rank: &[usize]) -> Result<Self> {
        if images_per_rank.is_empty() || images_per_rank.contains(&0) {
            return Err(Error::invalid(format!(
                "images per rank {images_per_rank:?}: expected at least one rank, each with at \
                 least one image"
            )));
        }
        let mut row_offsets = vec![0];
        let mut image_offsets = vec![0];
        for &m in images_per_rank {
            let rows = m
                .checked_mul(2)
                .and_then(|r| r.checked_add(*row_offsets.last().unwrap_or(&0)))
                .ok_or_else(|| Error::invalid("images per rank: the global batch overflows"))?;
            row_offsets.push(rows);
            image_offsets.push(image_offsets.last().unwrap_or(&0) + m);
        }
        let layout = RankLayout {
            images: images_per_rank.to_vec(),
            row_offsets,
            image_offsets,
        };
        if layout.n() < 4 {
            return Err(Error::invalid(format!(
                "images per rank {images_per_rank:?}: the global batch has N = {} rows, the loss \
                 needs N >= 4 (two images)",
                layout.n()
            )));
        }
        Ok(layout)
    }

    pub fn ranks(&self) -> usize {
        self.images.len()
    }

    /// N: rows of the global batch.
    pub fn n(&self) -> usize {
        self.row_offsets[self.images.len()]
    }

    /// The gathered rows of `rank` (its 2 m_r rows, view A then view B).
    pub fn rows(&self, rank: usize) -> Range<usize> {
        self.row_offsets[rank]..self.row_offsets[rank + 1]
    }

    /// (rank, view, image on the rank) of gathered row `g`.
    fn locate(&self, g: usize) -> (usize, usize, usize) {
        let rank = self.row_offsets.partition_point(|&o| o <= g) - 1;
        let (local, m) = (g - self.row_offsets[rank], self.images[rank]);
        (rank, local / m, local % m)
    }

    /// The partner of gathered row `g`: the other view of the same image, on the same rank.
    pub fn partner(&self, g: usize) -> usize {
        let (rank, view, i) = self.locate(g);
        self.row_offsets[rank] + (1 - view) * self.images[rank] + i
    }

    /// Where `rank`'s rows sit in one device's batch of the same images (see
    /// [`RankLayout::single_device_row`]): its view A rows, then its view B rows, m_r each.
    pub fn single_device_rows(&self, rank: usize) -> [Range<usize>; 2] {
        let m_total = self.image_offsets[self.images.len()];
        let (first, m) = (self.image_offsets[rank], self.images[rank]);
        [first..first + m, m_total + first..m_total + first + m]
    }

    /// `rank`'s rows (`width` values each) out of one device's batch `batch`, in the rank's own
    /// layout: view A of its images, then view B.
    pub fn take_rank_rows<T: Copy>(&self, batch: &[T], width: usize, rank: usize) -> Vec<T> {
        self.single_device_rows(rank)
            .into_iter()
            .flat_map(|rows| batch[rows.start * width..rows.end * width].iter().copied())
            .collect()
    }

    /// The inverse of [`RankLayout::take_rank_rows`]: writes `rank`'s rows into their places in
    /// one device's batch `batch`.
    pub fn put_rank_rows<T: Copy>(&self, rows: &[T], width: usize, rank: usize, batch: &mut [T]) {
        let mut at = 0;
        for place in self.single_device_rows(rank) {
            let len = place.len() * width;
            batch[place.start * width..place.end * width].copy_from_slice(&rows[at..at + len]);
            at += len;
        }
    }

    /// Where gathered row `g` sits in one device's batch of the same images (view A of every
    /// image in rank order, then view B), whose partner rule is `loss::partner`.
    pub fn single_device_row(&self, g: usize) -> usize {
        let (rank, view, i) = self.locate(g);
        let m_total = self.image_offsets[self.images.len()];
        view * m_total + self.image_offsets[rank] + i
    }
}

/// What one rank computes from the gathered rows, before any collective of the backward.
#[derive(Debug, Clone)]
pub struct RankStep {
    /// (1/N) sum of the rank's rows' l_a: the all-reduce (sum) of these over ranks is L.
    pub partial_loss: f64,
    /// dL/df of the rank's own rows as queries (2 m_r x d), scaled by 1/(N tau).
    pub grad_f_query: Vec<f64>,
    /// Both-sides: the key-side terms of the rank's queries for every gathered row (N x d),
    /// scaled by 1/(N tau); the reduce-scatter's input.
    pub grad_f_keys: Option<Vec<f64>>,
}

/// Rank `rank`'s share of the loss of the gathered normalized rows `f` (N x d), in float64.
pub fn rank_step(
    f: &[f64],
    layout: &RankLayout,
    rank: usize,
    d: usize,
    cfg: &LossConfig,
    with_grad: bool,
) -> Result<RankStep> {
    cfg.validate()?;
    let n = layout.n();
    if rank >= layout.ranks() || f.len() != n * d {
        return Err(Error::invalid(format!(
            "rank {rank} of {}, {} gathered values: expected a rank below the count and N x d = \
             {n} x {d} values",
            layout.ranks(),
            f.len()
        )));
    }
    let own = layout.rows(rank);
    let terms: Vec<_> = own
        .clone()
        .into_par_iter()
        .map(|a| {
            let fa = &f[a * d..(a + 1) * d];
            row_terms(fa, f, (n, d), (a, layout.partner(a)), cfg, with_grad)
        })
        .collect();
    let partial_loss = terms.iter().map(|t| t.loss).sum::<f64>() / n as f64;
    if !with_grad {
        return Ok(RankStep {
            partial_loss,
            grad_f_query: Vec::new(),
            grad_f_keys: None,
        });
    }
    let scale = 1.0 / (n as f64 * cfg.tau);
    // Query side: row a's own G row against every gathered key.
    let mut grad_f_query = vec![0.0; own.len() * d];
    for (local, t) in terms.iter().enumerate() {
        let out = &mut grad_f_query[local * d..(local + 1) * d];
        for b in 0..n {
            for k in 0..d {
                out[k] += scale * t.g[b] * f[b * d + k];
            }
        }
    }
    // Key side: for every gathered row b, the terms g_ab f_a of this rank's queries a.
    let grad_f_keys = (cfg.semantics == GradSemantics::BothSides).then(|| {
        let mut keys = vec![0.0; n * d];
        for (local, t) in terms.iter().enumerate() {
            let a = own.start + local;
            for b in 0..n {
                for k in 0..d {
                    keys[b * d + k] += scale * t.g[b] * f[a * d + k];
                }
            }
        }
        keys
    });
    Ok(RankStep {
        partial_loss,
        grad_f_query,
        grad_f_keys,
    })
}

/// One rank's result of a data-parallel step.
#[derive(Debug, Clone)]
pub struct RankResult {
    /// L of the global batch (the all-reduced sum: the same on every rank).
    pub loss: f64,
    /// dL/dz of the rank's own raw rows (2 m_r x d).
    pub grad_z: Vec<f64>,
}

/// A whole data-parallel step in float64 with the collectives done in memory: rank r's raw rows
/// `z[r]` (2 m_r x d, view A then view B) in; each rank's loss and gradient out. The truth that
/// multi-rank training is tested against.
pub fn data_parallel_reference(
    z: &[Vec<f64>],
    layout: &RankLayout,
    d: usize,
    cfg: &LossConfig,
) -> Result<Vec<RankResult>> {
    if z.len() != layout.ranks() {
        return Err(Error::invalid(format!(
            "{} ranks' rows for a layout of {} ranks",
            z.len(),
            layout.ranks()
        )));
    }
    for (rank, rows) in z.iter().enumerate() {
        if rows.len() != layout.rows(rank).len() * d || rows.iter().any(|x| !x.is_finite()) {
            return Err(Error::invalid(format!(
                "rank {rank}: {} values, expected {} finite ones",
                rows.len(),
                layout.rows(rank).len() * d
            )));
        }
    }
    // Each rank normalizes its own rows (row by row, so at once here); the all-gather
    // concatenates them in rank order.
    let (f, norms) = normalize(&z.concat(), d);
    let steps = (0..layout.ranks())
        .map(|rank| rank_step(&f, layout, rank, d, cfg, true))
        .collect::<Result<Vec<_>>>()?;
    let loss: f64 = steps.iter().map(|s| s.partial_loss).sum();
    let keys_sum = reduce_key_sides(&steps);
    Ok(steps
        .iter()
        .enumerate()
        .map(|(rank, step)| {
            let rows = layout.rows(rank);
            let mut grad_f = step.grad_f_query.clone();
            if let Some(keys) = &keys_sum {
                // The reduce-scatter: this rank's rows of the sum over every rank.
                for (x, k) in grad_f.iter_mut().zip(&keys[rows.start * d..rows.end * d]) {
                    *x += k;
                }
            }
            let f_own = &f[rows.start * d..rows.end * d];
            RankResult {
                loss,
                grad_z: normalize_backward(f_own, &norms[rows.clone()], &grad_f, d),
            }
        })
        .collect())
}

/// The sum over ranks of their key sides (N x d), in rank order; None query-only.
fn reduce_key_sides(steps: &[RankStep]) -> Option<Vec<f64>> {
    let mut sum: Option<Vec<f64>> = None;
    for keys in steps.iter().filter_map(|s| s.grad_f_keys.as_ref()) {
        match &mut sum {
            None => sum = Some(keys.clone()),
            Some(acc) => acc.iter_mut().zip(keys).for_each(|(a, k)| *a += k),
        }
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::partner;

    #[test]
    fn partners_stay_on_their_rank_and_map_to_one_devices_partners() {
        let layout = RankLayout::new(&[2, 3, 1]).unwrap();
        let n = layout.n();
        assert_eq!(n, 12);
        let mut seen = vec![false; n];
        for g in 0..n {
            let p = layout.partner(g);
            assert_ne!(p, g);
            assert_eq!(layout.partner(p), g);
            let rank = (0..layout.ranks())
                .find(|&r| layout.rows(r).contains(&g))
                .unwrap();
            assert!(
                layout.rows(rank).contains(&p),
                "row {g}: partner {p} off its rank"
            );
            let s = layout.single_device_row(g);
            assert!(!seen[s], "row {g}: {s} twice");
            seen[s] = true;
            assert_eq!(layout.single_device_row(p), partner(s, n), "row {g}");
        }
        // Rank 1's rows 4..10: view A of its images 4, 5, 6, then view B.
        assert_eq!(layout.partner(4), 7);
        assert_eq!(layout.partner(9), 6);
    }

    #[test]
    fn bad_layouts_are_refused_clearly() {
        for bad in [&[][..], &[2, 0], &[1]] {
            let err = RankLayout::new(bad).unwrap_err().to_string();
            assert!(err.contains("images per rank"), "{err}");
        }
    }
}
