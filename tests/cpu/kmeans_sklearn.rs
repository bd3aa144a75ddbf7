//! NMI as the official evaluation computed it, against scikit-learn on fixed embeddings
//! (`tests/fixtures/kmeans/`, written by `scripts/kmeans-fixture.py`): `eval::nmi` must equal
//! `normalized_mutual_info_score` on scikit-learn's own clusters, and `eval::kmeans` with 10
//! starts must land where scikit-learn's 10 starts land. The two draw other random numbers, and
//! on embeddings whose classes overlap several local optima lie within a hair of inertia of each
//! other with NMIs 0.1 apart, so each of our seeds is held to the range scikit-learn's own seeds
//! span, not to one of its runs.

use std::path::{Path, PathBuf};

use invaspread::eval::{kmeans, nmi, KMEANS_STARTS};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/kmeans")
        .join(name)
}

fn labels(name: &str) -> Vec<usize> {
    let a = invaspread::npy::read(&fixture(name)).unwrap();
    a.to_f64().iter().map(|&v| v as usize).collect()
}

#[test]
fn nmi_and_kmeans_agree_with_scikit_learn() {
    let text = std::fs::read_to_string(fixture("expected.json")).unwrap();
    let expected: serde_json::Value = serde_json::from_str(&text).unwrap();
    let sets = expected["sets"].as_array().unwrap();
    assert_eq!(sets.len(), 2);
    for set in sets {
        let name = set["name"].as_str().unwrap();
        let k = set["clusters"].as_u64().unwrap() as usize;
        let (rows, d, x) = invaspread::npy::read_matrix(&fixture(&format!("{name}.npy"))).unwrap();
        let x = x.to_f32();
        let truth = labels(&format!("{name}_labels.npy"));
        let theirs = labels(&format!("{name}_sklearn_clusters.npy"));
        assert_eq!((truth.len(), theirs.len()), (rows, rows));

        let their_nmi = set["nmi"].as_f64().unwrap();
        let nmi_of_theirs = nmi(&truth, &theirs);
        assert!(
            (nmi_of_theirs - their_nmi).abs() < 1e-12,
            "{name}: NMI of scikit-learn's clusters {nmi_of_theirs} vs its own {their_nmi}"
        );

        // Our seeds must land where scikit-learn's seeds land: each inertia no higher than its
        // worst 10-start run's (0.1% of slack; lower is a better optimum), and over as many seeds the mean
        // inertia and the mean NMI as its own (one seed's NMI alone wanders by 0.1).
        let range = |key: &str| {
            let v = |m: &str| set[format!("ten_start_{key}_{m}")].as_f64().unwrap();
            (v("min"), v("max"))
        };
        let (inertia_lo, inertia_hi) = range("inertia");
        let (nmi_lo, nmi_hi) = range("nmi");
        let single_worst = set["single_start_inertia_max"].as_f64().unwrap();
        let seeds = set["seeds"].as_u64().unwrap();
        let (mut ours, mut nmis, mut inertias) = (None, Vec::new(), Vec::new());
        for seed in 0..seeds {
            let run = kmeans(&x, d, k, KMEANS_STARTS, seed).unwrap();
            let our_nmi = nmi(&truth, &run.assign);
            eprintln!(
                "{name} seed {seed}: inertia {:.4} (scikit-learn {inertia_lo:.4}..{inertia_hi:.4}), \
                 NMI {our_nmi:.4} (scikit-learn {nmi_lo:.4}..{nmi_hi:.4})",
                run.inertia
            );
            assert!(
                run.inertia <= inertia_hi * (1.0 + 1e-3),
                "{name} seed {seed}: inertia {} above scikit-learn's worst 10-start {inertia_hi}",
                run.inertia
            );
            assert!(
                run.inertia < single_worst,
                "{name}: no better than a bad single start"
            );
            nmis.push(our_nmi);
            inertias.push(run.inertia);
            ours = Some(run);
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let (their_inertia, their_nmi) = (
            set["ten_start_inertia_mean"].as_f64().unwrap(),
            set["ten_start_nmi_mean"].as_f64().unwrap(),
        );
        let (our_inertia, our_nmi) = (mean(&inertias), mean(&nmis));
        eprintln!(
            "{name} over {seeds} seeds: mean inertia {our_inertia:.4} (scikit-learn \
             {their_inertia:.4}), mean NMI {our_nmi:.4} (scikit-learn {their_nmi:.4})"
        );
        assert!(
            our_inertia <= their_inertia * (1.0 + 1e-3),
            "{name}: mean inertia {our_inertia} vs scikit-learn's {their_inertia}"
        );
        assert!(
            (our_nmi - their_nmi).abs() < 0.015,
            "{name}: mean NMI {our_nmi} vs scikit-learn's {their_nmi}"
        );
        let ours = ours.unwrap();
        let direct: f64 = (0..rows)
            .map(|i| {
                let members: Vec<usize> = (0..rows)
                    .filter(|&j| ours.assign[j] == ours.assign[i])
                    .collect();
                (0..d)
                    .map(|c| {
                        let mean = members
                            .iter()
                            .map(|&j| f64::from(x[j * d + c]))
                            .sum::<f64>()
                            / members.len() as f64;
                        (f64::from(x[i * d + c]) - mean).powi(2)
                    })
                    .sum::<f64>()
            })
            .sum();
        assert!(
            (direct - ours.inertia).abs() < 1e-9 * direct,
            "{name}: reported inertia {} but the clusters' own is {direct}",
            ours.inertia
        );
        let distinct: std::collections::BTreeSet<_> = ours.assign.iter().collect();
        assert_eq!(distinct.len(), k, "{name}: every cluster kept");
    }
}

#[test]
fn kmeans_is_seeded_and_checks_its_arguments() {
    let (_, d, x) = invaspread::npy::read_matrix(&fixture("five.npy")).unwrap();
    let x = x.to_f32();
    let a = kmeans(&x, d, 5, 3, 7).unwrap();
    assert_eq!(a, kmeans(&x, d, 5, 3, 7).unwrap());
    let err = kmeans(&x, d, 0, 3, 7).unwrap_err().to_string();
    assert!(err.contains("0 clusters"), "{err}");
    let err = kmeans(&x[..5], d, 2, 3, 7).unwrap_err().to_string();
    assert!(err.contains("not rows of"), "{err}");
}
