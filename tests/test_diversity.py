"""Diversity selection (kMQ + iterative refinement): budgets, sampling, the weight update
and the selector in a Beam pipeline on synthetic vectors. The model step on a tiny LM is in
test_diversity_refine.py, purity on the real pool in test_diversity_real.py."""

import json
import math
import random
from collections import Counter

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.util import assert_that, equal_to
from scipy.stats import chisquare

from curate.config import ConfigError
from curate.pipeline.run import pipeline_options
from curate.selectors import diversity as dv
from curate.selectors import diversity_plan as dp
from curate.selectors.shared import kmeans as km
from curate.selectors.shared.quotas import water_filling
from curate import steps

# ---------------------------------------------------------------- budgets


def test_split_budget():
    assert dp.split_budget(100, 3) == [34, 33, 33]
    assert dp.split_budget(2, 3) == [1, 1, 0]
    assert sum(dp.split_budget(12345, 7)) == 12345


def test_allocation_is_exact_and_proportional_within_rounding():
    rng = random.Random(0)
    for _ in range(300):
        sizes = {c: rng.randint(0, 200) for c in range(rng.randint(1, 30))}
        n = sum(sizes.values())
        budget = rng.randint(0, n + 20)
        quotas = water_filling(sizes, budget, dp.initial_weights(sizes, "proportional") or {})
        assert sum(quotas.values()) == min(budget, n)
        b = min(budget, n)
        for c, q in quotas.items():
            assert 0 <= q <= sizes[c]
            # proportional shares never exceed a cluster's size, so only rounding moves them
            assert abs(q - b * sizes[c] / n) < 1 if n else q == 0


def test_equal_allocation_rolls_small_clusters_over():
    sizes = {0: 2, 1: 3, 2: 50, 3: 50}
    quotas = water_filling(sizes, 40, dp.initial_weights(sizes, "equal"))
    # 10 each asked; clusters 0 and 1 give all they have (2 + 3), the other 35 split 18/17
    assert quotas == {0: 2, 1: 3, 2: 18, 3: 17}
    # a cluster with weight 0 gets rows only once the others are exhausted
    assert water_filling({0: 5, 1: 5}, 4, {0: 1.0, 1: 0.0}) == {0: 4, 1: 0}
    assert water_filling({0: 5, 1: 5}, 8, {0: 1.0, 1: 0.0}) == {0: 5, 1: 3}
    assert water_filling({0: 5, 1: 5}, 99, {0: 1.0, 1: 1.0}) == {0: 5, 1: 5}
    # largest remainder: 7 * (1/6, 2/6, 3/6) = 1.17, 2.33, 3.5 -> 1, 2, 4 (ties by weight)
    assert water_filling({0: 10, 1: 10, 2: 10}, 7, {0: 1, 1: 2, 2: 3}) == {0: 1, 1: 2, 2: 4}


# ---------------------------------------------------------------- sampling


def softmax(x, t=1.0):
    e = np.exp((np.asarray(x) - np.max(x)) / t)
    return e / e.sum()


def rows_with(scores):
    return [{"id": f"r{i}", "origin": f"o:{i}", "q": s} for i, s in enumerate(scores)]


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_first_pick_frequencies_follow_softmax(temperature):
    scores = [0.0, -0.5, 1.0, 0.3, -2.0, 0.8]
    rows = rows_with(scores)
    trials = 20_000
    firsts = Counter(max(range(len(rows)), key=lambda i: dp.sampling_key(rows[i], seed, "q", temperature))
                     for seed in range(trials))
    observed = [firsts[i] for i in range(len(rows))]
    expected = softmax(scores, temperature) * trials
    assert chisquare(observed, expected).pvalue > 1e-3  # fixed seeds: deterministic


def test_two_of_four_inclusion_matches_sequential_sampling():
    scores = [1.0, 0.0, -1.0, 0.5]
    p = softmax(scores)
    # sampling two without replacement, one at a time with probability p renormalised
    exact = [p[i] + sum(p[j] * p[i] / (1 - p[j]) for j in range(4) if j != i) for i in range(4)]
    rows = rows_with(scores)
    trials = 20_000
    counts = Counter()
    for seed in range(trials):
        top2 = sorted(range(4), key=lambda i: dp.sampling_key(rows[i], seed, "q"), reverse=True)[:2]
        counts.update(top2)
    for i in range(4):
        f = counts[i] / trials
        sd = math.sqrt(exact[i] * (1 - exact[i]) / trials)
        assert abs(f - exact[i]) < 4 * sd, (i, f, exact[i])


def test_uniform_without_quality_and_unscored_rank_last():
    rows = rows_with([0.0] * 5)
    trials = 10_000
    firsts = Counter(max(range(5), key=lambda i: dp.sampling_key(rows[i], seed)) for seed in range(trials))
    assert chisquare([firsts[i] for i in range(5)]).pvalue > 1e-3
    rows = rows_with([-50.0, None, float("nan"), -60.0])
    for seed in range(50):
        order = sorted(range(4), key=lambda i: dp.sampling_key(rows[i], seed, "q"), reverse=True)
        assert set(order[:2]) == {0, 3}


# ---------------------------------------------------------------- the weight update


def test_multiplicative_weight_update_hand_computed():
    w = {0: 0.5, 1: 0.3, 2: 0.2}
    s = {0: 2.0, 1: 1.0, 2: -1.0}
    # floor = 0.05 * 2.0 = 0.1 replaces -1.0; sum s+ = 3.1
    new = dp.update_weights(w, s, score_floor=0.05)
    assert new == pytest.approx({0: 0.5 * 2.0 / 3.1, 1: 0.3 * 1.0 / 3.1, 2: 0.2 * 0.1 / 3.1})
    assert all(v > 0 for v in new.values())
    # an unscored cluster is multiplied by the mean score: its weight keeps its ratio to
    # a cluster that scored exactly the mean
    w = {0: 0.4, 1: 0.4, 2: 0.2}
    new = dp.update_weights(w, {0: 3.0, 1: 1.0}, score_floor=0.05)
    assert new == pytest.approx({0: 0.4 * 3 / 6, 1: 0.4 * 1 / 6, 2: 0.2 * 2 / 6})
    # not the released code's softmax(s): previous weights matter
    assert new[0] / new[2] == pytest.approx((0.4 / 0.2) * (3 / 2))
    # nothing positive: nothing to reweight by
    assert dp.update_weights(w, {0: -1.0, 1: 0.0}) == w
    assert dp.cluster_scores([0, 0, 1, 1, 1], [1.0, 3.0, float("nan"), 2.0, 4.0]) == {0: 2.0, 1: 3.0}


def test_config_errors():
    with pytest.raises(ConfigError, match="allocation"):
        steps.build("selector", {"type": "diversity", "budget": 10, "allocation": "fair"}, "selector")
    with pytest.raises(ConfigError, match="k must be"):
        steps.build("selector", {"type": "diversity", "budget": 10, "k": 0}, "selector")
    with pytest.raises(ConfigError, match="reward_model"):
        steps.build("selector", {"type": "diversity", "budget": 10, "rounds": 3, "gap": "reward"}, "selector")
    # a bad `train:` of the refinement fails when the plan builds its model stage
    # (test_diversity_refine.py), before any scoring
    sel = steps.build("selector", {"type": "diversity", "budget": 0.25, "k": 5, "quality_column": "logprob_mean"}, "selector")
    assert sel.requires == ("embedding", "logprob_mean")


# ---------------------------------------------------------------- the selector in Beam


def blob_rows(sizes=(40, 80, 160, 12), d=16, seed=0, quality=True):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(len(sizes), d)) * 10
    rows = []
    for c, n in enumerate(sizes):
        for i in range(n):
            v = (centers[c] + rng.normal(size=d)).astype(np.float32)
            rows.append({"id": f"id{c}_{i}", "origin": f"pool:{len(rows) + 1}", "source": f"s{c}",
                         "embedding": v.tolist(), "quality": float(rng.normal()) if quality else None})
    return rows


def brute_force_kmq(rows, budget, k, seed, sample_size=100_000, quality="quality", allocation="proportional"):
    """An independent loop over the same definitions: sample, centroids, nearest centroid
    (numpy), exact allocation, the n_c largest sampling keys per cluster."""
    have = [r for r in rows if r["embedding"] is not None]
    sample = sorted(have, key=lambda r: (km.hash_unit(seed, r), r["origin"], r["id"]))[:sample_size]
    model = km.fit_model(np.array([r["embedding"] for r in sample], np.float32), k, seed=seed)
    x = np.array([r["embedding"] for r in have], np.float64)
    c = model.centroids.astype(np.float64)
    labels = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
    by_cluster = {}
    for r, l in zip(have, labels):
        by_cluster.setdefault(int(l), []).append(r)
    sizes = {cl: len(rs) for cl, rs in by_cluster.items()}
    total = budget if isinstance(budget, int) else int(budget * len(rows) + 0.5)
    quotas = water_filling(sizes, total, dp.initial_weights(sizes, allocation))
    kept = set()
    for cl, rs in by_cluster.items():
        rs = sorted(rs, key=lambda r: dp.sampling_key(r, seed, quality), reverse=True)
        kept |= {r["id"] for r in rs[:quotas[cl]]}
    return kept, sizes, quotas


def test_kmq_selector_matches_brute_force():
    rows = blob_rows()
    rows.append({"id": "novec", "origin": "pool:999", "source": "s9", "embedding": None, "quality": 0.0})
    want, sizes, quotas = brute_force_kmq(rows, 60, 4, seed=3)
    assert sum(quotas.values()) == 60 and len(want) == 60
    with beam.Pipeline(options=pipeline_options([])) as p:
        out = p | beam.Create(rows) | dv.DiversitySelector(budget=60, k=4, seed=3, quality_column="quality")
        assert_that(out["kept"] | "ids" >> beam.Map(lambda r: r["id"]), equal_to(sorted(want)), label="kept")
        assert_that(out["kept"] | "cols" >> beam.Map(
            lambda r: (r["cluster_budget"] == quotas[r["cluster"]], r["cluster_size"] == sizes[r["cluster"]],
                       r["diversity_round"], r["diversity_key"] is not None, r["cluster_distance"] >= 0)),
            equal_to([(True, True, 1, True, True)] * 60), label="columns")
        assert_that(out["rejected"] | "why" >> beam.Map(
            lambda r: r["id"] == "novec" and r["reject_reason"].startswith("no 'embedding' value")
            or ("proportional allocation of 60" in r["reject_reason"] and "below its last drawn" in r["reject_reason"])),
            equal_to([True] * (len(rows) - 60)), label="reasons")


def test_fractional_budget_equal_allocation_and_uniform_sampling():
    rows = blob_rows(sizes=(10, 100, 100, 5), seed=1, quality=False)
    want, sizes, quotas = brute_force_kmq(rows, 0.2, 4, seed=0, quality=None, allocation="equal")
    # 43 = 0.2 * 215: 10.75 each asked; 5 and 10 given whole, the other 28 split 14/14
    assert sorted(quotas.values()) == [5, 10, 14, 14]
    with beam.Pipeline(options=pipeline_options([])) as p:
        out = p | beam.Create(rows) | dv.DiversitySelector(budget=0.2, k=4, allocation="equal", sample_size=150)
        assert_that(out["kept"] | beam.Map(lambda r: r["id"]), equal_to(sorted(
            brute_force_kmq(rows, 0.2, 4, seed=0, sample_size=150, quality=None, allocation="equal")[0])))


def gap_by_source(rows, round_index, seed, work_dir=None):
    """A stand-in for train/generate/score: source s1 has the most left to learn, s3
    scores below zero (the model beats the gold answers there)."""
    s = {"s0": 1.0, "s1": 4.0, "s2": 1.0, "s3": -2.0}
    return [s[r["source"]] for r in rows], {"stand_in": True, "round": round_index}


def test_iterative_rounds_follow_the_multiplicative_update(tmp_path):
    rows = blob_rows(sizes=(60, 60, 60, 60), seed=2)
    work = tmp_path / "work"
    sel = dv.DiversitySelector(budget=90, k=4, rounds=3, allocation="equal", seed=5,
                               gap_fn=gap_by_source, work_dir=str(work))
    with beam.Pipeline(options=pipeline_options([])) as p:
        out = p | beam.Create(rows) | sel
        kept = out["kept"] | "k" >> beam.Map(lambda r: (r["source"], r["diversity_round"]))
        counts = kept | beam.combiners.Count.PerElement() | beam.combiners.ToDict()
        assert_that(out["kept"] | "n" >> beam.combiners.Count.Globally(), equal_to([90]), label="n")
        assert_that(out["rejected"] | "rn" >> beam.combiners.Count.Globally(), equal_to([150]), label="rn")
        assert_that(out["rejected"] | "rr" >> beam.Map(lambda r: "3 rounds of [30, 30, 30]" in r["reject_reason"]),
                    equal_to([True] * 150), label="reason")
        assert_that(counts, lambda got: _check_rounds(got[0]), label="rounds")
    doc = json.loads((work / "diversity_rounds.json").read_text())
    hist = doc["history"]
    assert [h["round"] for h in hist] == [1, 2, 3] and doc["round_budgets"] == [30, 30, 30]
    assert [sum(h["quotas"].values()) for h in hist] == [30, 30, 30]
    assert {len(v) for v in doc["selected_ids"].values()} == {30}
    # the weights follow Eq. 6 from round to round, with the stand-in's cluster scores
    for prev, nxt in zip(hist, hist[1:]):
        scores = {int(c): v for c, v in prev["cluster_scores"].items()}
        want = dp.update_weights({int(c): v for c, v in prev["weights"].items()}, scores, 0.05)
        assert {int(c): v for c, v in nxt["weights"].items()} == pytest.approx(want)
        assert prev["stand_in"] is True


def _check_rounds(got):
    by_source = Counter()
    for (source, rnd), n in got.items():
        by_source[(source, rnd)] += n
    # equal shares in round one (30 over 4 clusters)
    assert sorted(by_source[(s, 1)] for s in ("s0", "s1", "s2", "s3")) == [7, 7, 8, 8]
    # after one update s1 (score 4) dominates, s3 (below zero) is floored to a trickle
    assert by_source[("s1", 2)] > 15 and by_source[("s3", 2)] <= 1
    assert by_source[("s1", 3)] > by_source[("s1", 2)]
