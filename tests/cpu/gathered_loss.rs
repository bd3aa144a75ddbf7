//! The gathered loss of data-parallel ranks (`loss::gathered`) against one device's float64
//! reference of the same global batch: equal and unequal shards, one to four ranks, both
//! gradient semantics, with and without a hard/easy selection; and the trap the field fell into
//! (a gather whose backward keeps only the local rank's key terms) shown to give another
//! gradient, so these comparisons can fail.

use invaspread::loss::gathered::{data_parallel_reference, rank_step, RankLayout};
use invaspread::loss::reference::{self, normalize, normalize_backward};
use invaspread::loss::{GradSemantics, LossConfig, Negatives};
use invaspread::testing::{random_matrix, rng};

/// Each rank's raw rows (2 m_r x d), and the same rows as one device's batch.
fn split_batch(layout: &RankLayout, d: usize, seed: u64) -> (Vec<Vec<f64>>, Vec<f64>) {
    let n = layout.n();
    let gathered: Vec<f64> = random_matrix(&mut rng(seed), n, d)
        .into_iter()
        .map(f64::from)
        .collect();
    let per_rank = (0..layout.ranks())
        .map(|r| gathered[layout.rows(r).start * d..layout.rows(r).end * d].to_vec())
        .collect();
    let mut single = vec![0.0; n * d];
    for g in 0..n {
        let s = layout.single_device_row(g);
        single[s * d..(s + 1) * d].copy_from_slice(&gathered[g * d..(g + 1) * d]);
    }
    (per_rank, single)
}

/// take_rank_rows and put_rank_rows move a rank's rows as single_device_row places them, for
/// equal and unequal shards.
#[test]
fn rank_rows_move_between_the_rank_and_one_device_layout() {
    let d = 3;
    for images in [&[2usize, 2][..], &[1, 3, 2], &[4]] {
        let layout = RankLayout::new(images).unwrap();
        let (per_rank, single) = split_batch(&layout, d, 77);
        let mut rebuilt = vec![0.0; single.len()];
        for (r, rows) in per_rank.iter().enumerate() {
            assert_eq!(
                &layout.take_rank_rows(&single, d, r),
                rows,
                "{images:?} rank {r}"
            );
            layout.put_rank_rows(rows, d, r, &mut rebuilt);
        }
        assert_eq!(rebuilt, single, "{images:?}: put_rank_rows of every rank");
    }
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn ranks_together_equal_one_device_on_the_same_global_batch() {
    let d = 7;
    let layouts: [&[usize]; 5] = [&[6], &[3, 3], &[2, 3, 4], &[1, 1, 1, 1], &[5, 2]];
    for (case, images) in layouts.iter().enumerate() {
        let layout = RankLayout::new(images).unwrap();
        let (z, single) = split_batch(&layout, d, 900 + case as u64);
        for semantics in [GradSemantics::QueryOnly, GradSemantics::BothSides] {
            for negatives in [Negatives::All, Negatives::hard(0.5)] {
                let cfg = LossConfig {
                    semantics,
                    negatives,
                    ..LossConfig::default()
                };
                let what = format!("ranks {images:?} {semantics:?} {negatives:?}");
                let want = reference::instance_loss(&single, layout.n(), d, &cfg, true).unwrap();
                let want_grad = want.grad_z.unwrap();
                let got = data_parallel_reference(&z, &layout, d, &cfg).unwrap();
                for (rank, result) in got.iter().enumerate() {
                    let rel = (result.loss - want.loss).abs() / want.loss;
                    assert!(
                        rel < 1e-12,
                        "{what}: rank {rank} loss {} vs {}",
                        result.loss,
                        want.loss
                    );
                    for (local, g) in layout.rows(rank).enumerate() {
                        let s = layout.single_device_row(g);
                        let err = max_abs_diff(
                            &result.grad_z[local * d..(local + 1) * d],
                            &want_grad[s * d..(s + 1) * d],
                        );
                        assert!(
                            err < 1e-12,
                            "{what}: rank {rank} row {g}: gradient off by {err:e}"
                        );
                    }
                }
            }
        }
    }
}

/// lightly issue 1528: the key side summed only over the local rank's queries. On one rank that
/// is the whole sum; on several it is not, and the gradient moves by a visible amount.
#[test]
fn key_side_without_the_sum_over_ranks_is_another_gradient() {
    let d = 5;
    let cfg = LossConfig {
        semantics: GradSemantics::BothSides,
        ..LossConfig::default()
    };
    for (images, wrong) in [
        (&[8usize][..], false),
        (&[4, 4][..], true),
        (&[3, 2, 3][..], true),
    ] {
        let layout = RankLayout::new(images).unwrap();
        let (z, _) = split_batch(&layout, d, 950);
        let right = data_parallel_reference(&z, &layout, d, &cfg).unwrap();
        let (f, norms) = normalize(&z.concat(), d);
        let mut largest: f64 = 0.0;
        for (rank, result) in right.iter().enumerate() {
            let step = rank_step(&f, &layout, rank, d, &cfg, true).unwrap();
            let rows = layout.rows(rank);
            let keys = step.grad_f_keys.unwrap();
            let local_only: Vec<f64> = step
                .grad_f_query
                .iter()
                .zip(&keys[rows.start * d..rows.end * d])
                .map(|(q, k)| q + k)
                .collect();
            let grad_z = normalize_backward(
                &f[rows.start * d..rows.end * d],
                &norms[rows.clone()],
                &local_only,
                d,
            );
            largest = largest.max(max_abs_diff(&grad_z, &result.grad_z));
        }
        if wrong {
            assert!(
                largest > 1e-3,
                "ranks {images:?}: the local-only gradient differs by {largest:e}"
            );
        } else {
            assert!(
                largest < 1e-15,
                "one rank: local is everything ({largest:e})"
            );
        }
    }
}

#[test]
fn rank_inputs_are_checked() {
    let layout = RankLayout::new(&[2, 2]).unwrap();
    let cfg = LossConfig::default();
    let err = data_parallel_reference(&[vec![0.5; 12]], &layout, 3, &cfg)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("1 ranks' rows for a layout of 2 ranks"),
        "{err}"
    );
    let err = data_parallel_reference(&[vec![0.5; 12], vec![0.5; 11]], &layout, 3, &cfg)
        .unwrap_err()
        .to_string();
    assert!(err.contains("rank 1: 11 values, expected 12"), "{err}");
    let err = rank_step(&[0.0; 24], &layout, 2, 3, &cfg, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("rank 2 of 2"), "{err}");
}
