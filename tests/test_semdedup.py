"""SemDeDup (Abbas et al. 2023): the within-cluster rule against a brute-force reference
(every pair's cosine similarity, float64, one row at a time), a hand-checked chain, the
Beam selector against the reference applied to its own clusters, and a job on real rows
with the embedded MiniLM where planted rewordings must be caught."""

import gzip
import json

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.util import assert_that

from curate.config import ConfigError, parse_job
from curate.pipeline.run import pipeline_options, run_job
from curate import steps
from curate.selectors.semdedup import SemDedupSelector, dedup_cluster, dedup_order


def reference(vectors: np.ndarray, threshold: float):
    """Row by row in order: the most similar kept row (first on ties), rejected at >= threshold."""
    x = vectors.astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    kept, duplicate_of, best = [], [], []
    for j in range(len(x)):
        top, top_i = -np.inf, -1
        for i in kept:
            s = float(x[i] @ x[j])
            if s > top:
                top, top_i = s, i
        best.append(top)
        if top >= threshold:
            duplicate_of.append(top_i)
        else:
            duplicate_of.append(-1)
            kept.append(j)
    return np.array(duplicate_of), np.array(best)


def planted(seed=0, n_base=60, n_copies=40, n_near=10, d=16):
    """Random directions, near-copies (cosine ~0.99) and rows at cosine ~0.85 (not duplicates)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n_base, d))
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    src = rng.integers(0, n_base, n_copies)
    copies = base[src] + rng.normal(scale=0.02, size=(n_copies, d))
    src2 = rng.integers(0, n_base, n_near)
    near = base[src2] + rng.normal(scale=0.6, size=(n_near, d)) / np.sqrt(d)
    x = np.concatenate([base, copies, near]).astype(np.float32)
    return x[rng.permutation(len(x))]


@pytest.mark.parametrize("block_rows", [1, 7, 1024])
def test_the_rule_matches_the_brute_force_reference(block_rows):
    x = planted()
    dup, best = dedup_cluster(x, 0.95, block_rows=block_rows)
    want_dup, want_best = reference(x, 0.95)
    assert (dup == want_dup).all()
    finite = np.isfinite(want_best)
    assert np.isinf(best[~finite]).all() and np.allclose(best[finite], want_best[finite], atol=1e-5)
    assert (dup >= 0).sum() == 40  # one row of each copy group stays
    assert all(dup[j] < j and dup[dup[j]] == -1 for j in np.flatnonzero(dup >= 0))  # each names a kept row


def test_a_chain_keeps_both_ends():
    """A at 0 degrees, B at 15, C at 30: cos(A,B) = cos(B,C) = 0.966, cos(A,C) = 0.866.
    B duplicates A; C duplicates only B, which is gone, so C stays (the released code,
    comparing with every earlier row, would drop C too)."""
    angles = np.radians([0.0, 15.0, 30.0])
    x = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    dup, best = dedup_cluster(x, 0.95)
    assert dup.tolist() == [-1, 0, -1]
    assert best[1] == pytest.approx(np.cos(np.radians(15))) and best[2] == pytest.approx(np.cos(np.radians(30)))


def test_order_is_farthest_first_ties_by_id():
    items = [(0.1, "b", "o", None), (0.3, "c", "o", None), (0.3, "a", "o", None), (0.2, "d", "o", None)]
    assert [t[1] for t in dedup_order(items)] == ["a", "c", "d", "b"]
    assert [t[1] for t in dedup_order(items, "nearest")] == ["b", "d", "a", "c"]


def test_bad_options_are_config_errors():
    for spec in ({"threshold": 1.5}, {"k": 0}, {"keep": "random"}, {"block_rows": 0}):
        with pytest.raises(ConfigError, match="semdedup"):
            steps.build("selector", {"type": "semdedup", **spec}, "selector")


def test_the_selector_applies_the_rule_inside_each_cluster():
    x = planted(seed=1, n_base=80, n_copies=50, n_near=10)
    rows = [{"id": f"r{i:03d}", "origin": f"pool.jsonl:{i + 1}", "embedding": v} for i, v in enumerate(x)]
    rows.append({"id": "novec", "origin": "pool.jsonl:999", "embedding": None})
    with beam.Pipeline(options=pipeline_options([])) as p:
        out = p | beam.Create(rows) | SemDedupSelector(k=3, threshold=0.95, block_rows=16)
        tagged = ((out["kept"] | "k" >> beam.Map(lambda r: ("kept", r)),
                   out["rejected"] | "r" >> beam.Map(lambda r: ("rejected", r))) | beam.Flatten())
        assert_that(tagged, lambda got: check_selection(rows, got))


def check_selection(rows, got):
    kept = [r for tag, r in got if tag == "kept"]
    rejected = [r for tag, r in got if tag == "rejected"]
    assert len(kept) + len(rejected) == len(rows)
    assert [r["id"] for r in rejected if r.get("semdedup_duplicate_of") is None] == ["novec"]

    # the reference, applied to the selector's own clusters and order
    by_cluster = {}
    for r in kept + rejected:
        if r["id"] != "novec":
            by_cluster.setdefault(r["semdedup_cluster"], []).append(
                (r["semdedup_distance"], r["id"], r["origin"], np.asarray(r["embedding"])))
    assert len(by_cluster) == 3
    want = {}
    for items in by_cluster.values():
        ordered = dedup_order(items)
        dup, _ = reference(np.stack([t[3] for t in ordered]), 0.95)
        for t, d in zip(ordered, dup):
            want[t[1]] = ordered[d][1] if d >= 0 else None
    assert {r["id"]: r.get("semdedup_duplicate_of") for r in kept + rejected if r["id"] != "novec"} == want
    kept_ids = {r["id"] for r in kept}
    for r in rejected:
        if r["id"] != "novec":
            assert r["semdedup_duplicate_of"] in kept_ids
            assert r["reject_reason"].startswith(f"semantic duplicate (cosine {r['semdedup_similarity']:.4f} >= 0.95) "
                                                 f"of {r['semdedup_duplicate_of']} (pool.jsonl:")
    assert 40 <= sum(v is not None for v in want.values()) <= 50  # copies split across clusters stay


@pytest.mark.integration
def test_a_job_on_real_rows_catches_planted_rewordings(shared_data, tmp_path):
    """150 gsm8k and 150 codealpaca rows, and 30 of them again with " Thanks!" after the
    prompt (MiniLM cosine 0.976 to 0.995 to the original): of each pair one is rejected,
    naming the other. (MiniLM is uncased: a re-cased copy has cosine 1.0. A reworded
    prompt, "Question: ... Please answer.", stays above 0.95 for 27 of the 30.)"""
    rows = []
    for name in ("gsm8k_train", "codealpaca"):
        with gzip.open(shared_data / f"{name}.jsonl.gz", "rt") as fh:
            for line_no, line in enumerate(fh):
                if line_no == 150:
                    break
                raw = json.loads(line)
                prompt = raw.get("question") or (raw["instruction"] + ("\n" + raw["input"] if raw.get("input") else ""))
                rows.append({"prompt": prompt, "response": raw.get("answer") or raw["output"]})
    copies = [{"prompt": f"{r['prompt']} Thanks!", "response": r["response"]}
              for r in rows[::10]]
    path = tmp_path / "pool.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows + copies))
    job = parse_job({"inputs": [str(path)], "output": str(tmp_path / "out"),
                     "scorers": [{"type": "embedding", "model": "minilm", "field": "prompt_response"}],
                     "selectors": [{"type": "semdedup", "threshold": 0.95}]})
    manifest = run_job(job, progress=False)
    import datasets

    rejected = datasets.load_from_disk(str(tmp_path / "out" / "rejected")).to_list()
    kept = datasets.load_from_disk(str(tmp_path / "out")).to_list()
    by_origin = {r["origin"]: r for r in kept + rejected}
    by_id = {r["id"]: r for r in kept + rejected}
    pairs = [(f"pool.jsonl:{10 * i + 1}", f"pool.jsonl:{len(rows) + i + 1}") for i in range(len(copies))]
    for a, b in pairs:  # one of the two is rejected, naming the other, which is kept
        ra, rb = by_origin[a], by_origin[b]
        gone, stays = (ra, rb) if ra.get("semdedup_duplicate_of") else (rb, ra)
        assert gone.get("semdedup_duplicate_of"), (a, b, ra["semdedup_cluster"], rb["semdedup_cluster"])
        assert by_id[gone["semdedup_duplicate_of"]]["origin"] == stays["origin"] and stays in kept
        assert gone["semdedup_similarity"] >= 0.95
    assert manifest["counts"]["not_selected"]["select:semdedup"] == len(rejected) < 60


def test_without_the_embedding_scorer_the_job_is_refused_naming_the_column(tmp_path):
    from curate.pipeline.plan import Plan

    path = tmp_path / "pool.jsonl"
    path.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    job = parse_job({"inputs": [str(path)], "output": str(tmp_path / "out"), "selectors": [{"type": "semdedup"}]})
    with pytest.raises(ConfigError, match=r"needs the column 'embedding'.*known so far: none\)"):
        Plan(job)
