"""faiss k-means for selectors: the math against numpy, the Beam wrappers in a pipeline."""

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.util import assert_that, equal_to

from curate.pipeline.run import pipeline_options
from curate.selectors.shared import kmeans as km


def blobs(sizes=(60, 120, 30, 90), d=8, spread=10.0, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(len(sizes), d)) * spread
    x = np.concatenate([centers[i] + rng.normal(size=(n, d)) for i, n in enumerate(sizes)])
    labels = np.repeat(np.arange(len(sizes)), sizes)
    return x.astype(np.float32), labels


def brute_force_nearest(x, centroids, metric="l2"):
    x = np.asarray(x, np.float64)
    c = np.asarray(centroids, np.float64)
    if metric == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        c = c / np.linalg.norm(c, axis=1, keepdims=True)
        sim = x @ c.T
        return sim.argmax(1), 1.0 - sim.max(1)
    d2 = ((x[:, None, :] - c[None, :, :]) ** 2).sum(-1)
    return d2.argmin(1), np.sqrt(d2.min(1))


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_assign_equals_brute_force_nearest_centroid(metric):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2000, 24)).astype(np.float32)
    centroids = rng.normal(size=(37, 24)).astype(np.float32)
    labels, dist = km.assign(x, centroids, metric)
    want_labels, want_dist = brute_force_nearest(x, centroids, metric)
    # random Gaussian data has no near-ties at float32 precision worth worrying about
    assert labels.dtype == np.int64 and np.array_equal(labels, want_labels)
    np.testing.assert_allclose(dist, want_dist, rtol=1e-4, atol=1e-4)


def test_train_centroids_recovers_blobs_and_is_seeded():
    x, truth = blobs()
    c1 = km.train_centroids(x, 4, seed=3)
    c2 = km.train_centroids(x, 4, seed=3)
    assert c1.shape == (4, 8) and c1.dtype == np.float32
    np.testing.assert_array_equal(c1, c2)
    labels, _ = km.assign(x, c1)
    # each true blob maps to exactly one cluster and vice versa
    pairs = {(int(t), int(l)) for t, l in zip(truth, labels)}
    assert len(pairs) == 4 and len({l for _, l in pairs}) == 4
    with pytest.raises(ValueError, match="needs at least k"):
        km.train_centroids(x[:3], 4)


def test_choose_k_by_silhouette_finds_the_blobs():
    x, _ = blobs(sizes=(80, 80, 80, 80, 80), spread=8.0, seed=2)
    best, scores = km.choose_k_by_silhouette(x, [2, 3, 5, 8, 12, 1000], seed=0)
    assert best == 5
    assert set(scores) == {2, 3, 5, 8, 12}  # 1000 > n is skipped
    assert scores[5] == max(scores.values())
    model = km.fit_model(x, None, grid=[2, 5, 8], seed=0)
    assert model.k == 5 and set(model.silhouette) == {2, 5, 8}


def records_from(x, missing=()):
    rows = []
    for i, v in enumerate(x):
        rows.append({"id": f"r{i}", "origin": f"pool:{i + 1}",
                     "embedding": None if i in missing else v.tolist()})
    return rows


def test_sample_assign_pipeline_matches_numpy():
    x, _ = blobs(seed=4)
    missing = {5, 17}
    rows = records_from(x, missing)
    rows.append({"id": "bad", "origin": "pool:999", "embedding": [1.0, 2.0]})  # wrong dimension
    n_sample, seed = 150, 7

    # the sample the pipeline takes: the 150 smallest hash keys among rows with a vector
    have = [r for r in rows if r["embedding"] is not None and len(r["embedding"]) == 8]
    chosen = sorted(have, key=lambda r: (km.hash_unit(seed, r), r["origin"], r["id"]))[:n_sample]
    sample = np.array([r["embedding"] for r in chosen], np.float32)
    model = km.fit_model(sample, 4, seed=seed)
    want_labels, _ = brute_force_nearest(x, model.centroids)
    expected = [(f"r{i}", int(want_labels[i])) for i in range(len(x)) if i not in missing]

    with beam.Pipeline(options=pipeline_options([])) as p:
        recs = p | beam.Create(rows)
        trained = recs | km.TrainKMeans("embedding", k=4, sample_size=n_sample, seed=seed)
        assert_that(trained | beam.Map(lambda m: (m.k, m.sample_rows, m.fingerprint)),
                    equal_to([(4, n_sample, model.fingerprint)]), label="model")
        out = recs | km.AssignClusters(trained, "embedding", batch_size=64)
        assert_that(out["assigned"] | "ids" >> beam.Map(lambda r: (r["id"], r["cluster"])),
                    equal_to(expected), label="assigned")
        assert_that(out["assigned"] | "dist" >> beam.Map(lambda r: r["cluster_distance"] >= 0),
                    equal_to([True] * len(expected)), label="distances")
        assert_that(out[km.UNASSIGNED] | "why" >> beam.MapTuple(lambda r, why: (r["id"], why.split(" ")[0])),
                    equal_to([("r5", "no"), ("r17", "no"), ("bad", "'embedding'")]), label="unassigned")


def test_empty_input_assigns_nothing():
    with beam.Pipeline(options=pipeline_options([])) as p:
        recs = p | beam.Create([{"id": "a", "origin": "x:1", "embedding": None}])
        trained = recs | km.TrainKMeans("embedding", k=2)
        out = recs | km.AssignClusters(trained, "embedding")
        assert_that(out["assigned"], equal_to([]), label="assigned")
        assert_that(out[km.UNASSIGNED] | beam.MapTuple(lambda r, why: r["id"]), equal_to(["a"]), label="un")
