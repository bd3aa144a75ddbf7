#!/usr/bin/env python3
"""Writes tests/fixtures/kmeans/: fixed embeddings and what scikit-learn's KMeans (10
k-means++ starts, the lowest inertia kept: the official evaluation's protocol) and
normalized_mutual_info_score make of them, for tests/cpu/kmeans_sklearn.rs.

    pip install scikit-learn numpy && python3 scripts/kmeans-fixture.py

The embeddings are L2-normalised rows around 10 random unit centres, with noise wide enough
that the classes overlap and single k-means++ starts disagree (what a real embedding looks like
to k-means); a second set has 5 classes, as an unseen-class evaluation clusters.
"""
import json
import pathlib

import numpy as np
import sklearn
from sklearn.cluster import KMeans
from sklearn.metrics import normalized_mutual_info_score

SEEDS = 20
OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "kmeans"


def blobs(rng, classes, per_class, dim, noise):
    centres = rng.standard_normal((classes, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(classes), per_class)
    x = centres[labels] + noise * rng.standard_normal((labels.size, dim)) / np.sqrt(dim)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), labels.astype(np.float64)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2019)
    expected = {"sklearn": sklearn.__version__, "sets": []}
    for name, classes, per_class, dim, noise in [
        ("ten", 10, 60, 32, 2.2),
        ("five", 5, 80, 24, 2.0),
    ]:
        x, labels = blobs(rng, classes, per_class, dim, noise)
        np.save(OUT / f"{name}.npy", x)
        np.save(OUT / f"{name}_labels.npy", labels)
        km = KMeans(n_clusters=classes, n_init=10, init="k-means++", max_iter=300,
                    algorithm="lloyd", random_state=0).fit(x.astype(np.float64))
        # The spread of scikit-learn's own 10-start results over seeds: where local optima lie
        # within a hair of each other, the clusters (and NMI) depend on the seed.
        runs = [KMeans(n_clusters=classes, n_init=10, random_state=s).fit(x.astype(np.float64))
                for s in range(SEEDS)]
        inertias = [r.inertia_ for r in runs]
        nmis = [normalized_mutual_info_score(labels, r.labels_) for r in runs]
        single = [KMeans(n_clusters=classes, n_init=1, random_state=s).fit(x.astype(np.float64)).inertia_
                  for s in range(SEEDS)]
        np.save(OUT / f"{name}_sklearn_clusters.npy", km.labels_.astype(np.float64))
        expected["sets"].append({
            "name": name,
            "clusters": classes,
            "inertia": float(km.inertia_),
            "nmi": float(normalized_mutual_info_score(labels, km.labels_)),
            "seeds": SEEDS,
            "ten_start_inertia_min": float(min(inertias)),
            "ten_start_inertia_max": float(max(inertias)),
            "ten_start_nmi_min": float(min(nmis)),
            "ten_start_nmi_max": float(max(nmis)),
            "ten_start_inertia_mean": float(np.mean(inertias)),
            "ten_start_nmi_mean": float(np.mean(nmis)),
            "single_start_inertia_min": float(min(single)),
            "single_start_inertia_max": float(max(single)),
        })
    (OUT / "expected.json").write_text(json.dumps(expected, indent=2) + "\n")
    print(json.dumps(expected, indent=2))


if __name__ == "__main__":
    main()
