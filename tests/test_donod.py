"""TOPSIS closeness by hand, and the DONOD selector as a Beam pipeline."""

from __future__ import annotations

import math
import random

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

from curate.selectors.donod import DonodSelector, topsis_closeness


def test_hand_computed_4x2():
    # columns: DON (benefit), NOD (cost); equal weights 0.5 each
    m = np.array([[1.0, 2.0],   # A
                  [2.0, 1.0],   # B
                  [2.0, 4.0],   # C
                  [4.0, 2.0]])  # D
    # norms: sqrt(1+4+4+16) = 5 and sqrt(4+1+16+4) = 5
    # weighted normalised v: A (.1, .2)  B (.2, .1)  C (.2, .4)  D (.4, .2)
    # ideal best (max DON, min NOD) = (.4, .1); worst = (.1, .4)
    # A: d+ = sqrt(.3^2 + .1^2) = sqrt(.10) = .316228, d- = sqrt(0 + .2^2) = .2 -> .2/.516228
    # B: d+ = .2, d- = sqrt(.1^2 + .3^2) = .316228                             -> .316228/.516228
    # C: d+ = sqrt(.2^2 + .3^2) = sqrt(.13) = .360555, d- = sqrt(.1^2 + 0) = .1 -> .1/.460555
    # D: d+ = sqrt(0 + .1^2) = .1, d- = sqrt(.3^2 + .2^2) = .360555            -> .360555/.460555
    want = [0.387426, 0.612574, 0.217129, 0.782871]
    got = topsis_closeness(m, [+1, -1], [1, 1])
    np.testing.assert_allclose(got, want, atol=1e-6)
    # weights are relative; names work as directions
    np.testing.assert_allclose(topsis_closeness(m, ["benefit", "cost"], [3, 3]), want, atol=1e-6)
    # flipping both directions mirrors the ideal: closeness becomes 1 - closeness
    np.testing.assert_allclose(topsis_closeness(m, [-1, +1]), 1 - np.array(want), atol=1e-6)


def test_weighting_and_degenerate_cases():
    m = np.array([[1.0, 2.0], [2.0, 1.0], [2.0, 4.0], [4.0, 2.0]])
    # all weight on DON: closeness is (x - min) / (max - min) of the normalised column
    np.testing.assert_allclose(topsis_closeness(m, [1, -1], [1, 0]), [0, 1 / 3, 1 / 3, 1], atol=1e-12)
    # identical rows: both ideal and anti-ideal, 0/0 -> 0.5
    np.testing.assert_allclose(topsis_closeness(np.ones((3, 2)), [1, -1]), [0.5] * 3)
    # a column of zeros contributes nothing
    z = np.array([[0.0, 1.0], [0.0, 3.0]])
    np.testing.assert_allclose(topsis_closeness(z, [1, -1]), [1.0, 0.0])
    # negative DON (the step grows the norm) is fine under vector normalisation
    neg = np.array([[-1.0, 1.0], [1.0, 1.0]])
    np.testing.assert_allclose(topsis_closeness(neg, [1, -1]), [0.0, 1.0])
    assert topsis_closeness(np.zeros((0, 2)), [1, -1]).shape == (0,)
    with pytest.raises(ValueError):
        topsis_closeness(m, [1, 0])
    with pytest.raises(ValueError):
        topsis_closeness(m, [1, -1], [0, 0])
    with pytest.raises(ValueError):
        topsis_closeness(np.array([[math.nan, 1.0]]), [1, -1])


def _records(n, seed=0, ties=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        don, nod = rng.uniform(-1e-6, 4e-6), rng.uniform(1e-5, 5e-5)
        if i < ties:  # identical scores: order must come from the id
            don, nod = 1e-6, 2e-5
        out.append({"id": f"id{(i * 7919) % 1000:04d}", "origin": f"f:{i}", "don": don, "nod": nod})
    return out


_COLLECTED: dict[str, list] = {}


def _collect(row, key):
    _COLLECTED.setdefault(key, []).append(row)


# every scenario is one branch of a single pipeline: one pipeline start for the file
MAIN = _records(53, ties=6) + [{"id": "nan", "origin": "f:nan", "don": math.nan, "nod": 1e-5},
                               {"id": "none", "origin": "f:none", "nod": 1e-5}]
SCENARIOS = {
    # 3 closeness ranges: the distributed sort really merges several groups
    "main": (MAIN, lambda: DonodSelector(fraction=0.3, rank_buckets=3)),
    "ties": (list(reversed([{"id": f"x{i}", "don": 1.0, "nod": 1.0} for i in range(10)]
                           + [{"id": "best", "don": 2.0, "nod": 0.5}])),
             lambda: DonodSelector(budget=4)),
    "zero": (_records(7), lambda: DonodSelector(budget=0)),
    "empty": ([], lambda: DonodSelector()),
}


@pytest.fixture(scope="module")
def selected():
    _COLLECTED.clear()
    with beam.Pipeline(runner=FnApiRunner()) as p:
        for name, (records, selector) in SCENARIOS.items():
            out = p | f"Create {name}" >> beam.Create(records) | f"Select {name}" >> selector()
            for part in ("kept", "rejected"):
                out[part] | f"Collect {name} {part}" >> beam.Map(_collect, f"{name}/{part}")
    return lambda name: (_COLLECTED.get(f"{name}/kept", []), _COLLECTED.get(f"{name}/rejected", []))


def test_selector_matches_pure_function_and_keeps_exact_count(selected):
    recs = MAIN[:53]
    kept, rejected = selected("main")
    k = 16  # round-half-up(0.3 * 53 = 15.9); the two rows without scores are not ranked
    assert len(kept) == k and len(rejected) == 53 - k + 2
    want = topsis_closeness(np.array([[r["don"], r["nod"]] for r in recs]), [1, -1])
    by_origin = {r["origin"]: c for r, c in zip(recs, want)}
    ranked = [r for r in kept + rejected if r["topsis"] is not None]
    for r in ranked:
        assert r["topsis"] == pytest.approx(by_origin[r["origin"]], abs=1e-12)
    # ranks are a permutation in (closeness desc, id asc) order
    order = sorted(ranked, key=lambda r: (-by_origin[r["origin"]], r["id"]))
    assert [r["topsis_rank"] for r in order] == list(range(1, 54))
    assert {r["topsis_rank"] for r in kept} == set(range(1, k + 1))
    cut = min(r["topsis"] for r in kept)
    for r in rejected:
        if r["topsis"] is None:
            continue
        assert r["topsis"] <= cut
        assert f"of 53, keeping {k}" in r["reject_reason"]
        assert "below cut-off" in r["reject_reason"] or "ties the cut-off" in r["reject_reason"]
    bad = {r["id"]: r for r in rejected if r["topsis"] is None}
    assert set(bad) == {"nan", "none"} and bad["none"]["topsis_rank"] is None
    assert "no 'don' score" in bad["none"]["reject_reason"]
    assert "not a finite number" in bad["nan"]["reject_reason"]


def test_ties_are_broken_by_id_deterministically(selected):
    kept, rejected = selected("ties")
    assert sorted(r["id"] for r in kept) == ["best", "x0", "x1", "x2"]
    assert {r["id"]: r["topsis_rank"] for r in kept} == {"best": 1, "x0": 2, "x1": 3, "x2": 4}
    assert all("ties the cut-off" in r["reject_reason"] for r in rejected)


def test_budget_edges(selected):
    kept, rejected = selected("zero")
    assert kept == [] and len(rejected) == 7
    assert all("keeps none" in r["reject_reason"] for r in rejected)
    assert selected("empty") == ([], [])


def test_options_are_checked():
    sel = DonodSelector()
    assert sel.requires == ("don", "nod") and sel.budget == 0.3
    assert set(sel.output_columns()) == {"topsis", "topsis_rank"}
    with pytest.raises(ValueError):
        DonodSelector(criteria=[["don", "sideways"]])
    with pytest.raises(ValueError):
        DonodSelector(weights=[1.0])
    custom = DonodSelector(criteria=[["nod", "cost"]], budget=5)
    assert custom.requires == ("nod",) and custom.budget == 5
