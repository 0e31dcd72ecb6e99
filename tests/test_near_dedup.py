"""near_dedup: the MinHash family against exact arithmetic and exact Jaccard, and the Beam
step against brute-force Jaccard over every pair of a real sample with planted edits."""

from __future__ import annotations

import json
import random

import apache_beam as beam
import datasets
import numpy as np
import pytest
from apache_beam.testing.util import assert_that

from curate.config import ConfigError, InputConfig, parse_job
from curate.inputs.files import read_records
from curate.pipeline.run import pipeline_options, run_job
from curate.filters.near_dedup import (PRIME, NearDedup, band_hashes, bucket_pairs, estimated_jaccard, permutations,
                                          record_text, row_ref, shingle_values, shingles, signature, signature_similarity,
                                          verified_pairs)


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 0.0


def test_hash_family_is_exact_modular_arithmetic():
    a, b = permutations(64, seed=3)
    assert a.min() >= 1 and a.max() < PRIME and b.max() < PRIME
    x = np.array([0, 1, PRIME - 1, 123456789], dtype=np.uint64)
    got = signature(x, a, b)
    want = [min((int(ai) * int(xi) + int(bi)) % PRIME for xi in x) for ai, bi in zip(a, b)]
    assert got.tolist() == want
    assert (permutations(64, seed=3)[0] == a).all() and not (permutations(64, seed=4)[0] == a).all()


@pytest.mark.parametrize("overlap", [0.5, 0.8, 0.95])
def test_signature_agreement_estimates_jaccard(overlap):
    base = [f"w{i}" for i in range(400)]
    k = int(400 * (1 - overlap) / (1 + overlap))  # |A & B| / |A | B| = (400 - k) / (400 + k)
    s1, s2 = set(base), set(base[k:] + [f"x{i}" for i in range(k)])
    a, b = permutations(1024, seed=0)
    est = estimated_jaccard(signature(shingle_values(s1), a, b), signature(shingle_values(s2), a, b))
    exact = jaccard(s1, s2)
    assert abs(est - exact) < 4 * np.sqrt(exact * (1 - exact) / 1024) + 1e-9


def test_shingles():
    assert shingles("The cat, the HAT.", 2) == {"the cat", "cat the", "the hat"}
    assert shingles("one two", 5) == {"one two"}  # shorter than a shingle: the whole text
    assert shingles("ab c", 3, unit="char") == {"ab ", "b c"}
    assert shingles("...", 5) == set()


def edited(text: str, rng: random.Random) -> str:
    """One word dropped and one replaced: a near-duplicate of a long text."""
    ws = text.split()
    del ws[rng.randrange(len(ws))]
    ws[rng.randrange(len(ws))] = "EDITED"
    return " ".join(ws)


def real_rows_with_edits(shared_data) -> list[dict]:
    rng = random.Random(0)
    recs = []
    for name in ("gsm8k_train", "codealpaca"):
        got, _ = read_records([InputConfig(path=str(shared_data / f"{name}.jsonl.gz"), limit=150)])
        recs += got
    long_rows = [r for r in recs if len(r["response"].split()) >= 60]
    for k, r in enumerate(long_rows[:40]):
        response = edited(r["response"], rng)
        recs.append({**r, "id": f"edit-{k}", "origin": f"edit:{k}", "response": response,
                     "messages": [r["messages"][0], {"role": "assistant", "content": response}]})
    return recs


def test_pairs_match_brute_force_jaccard_on_real_rows(shared_data):
    recs = real_rows_with_edits(shared_data)
    sets = {(r["id"], r["origin"]): shingles(record_text(r), 5) for r in recs}
    keys = sorted(sets)
    exact = {(x, y): jaccard(sets[x], sets[y]) for i, x in enumerate(keys) for y in keys[i + 1:]}
    truth = {p for p, j in exact.items() if j >= 0.8}
    assert len(truth) >= 30  # the planted edits (and any real near-duplicates)

    # the decide's own stages, in memory: band arrays, buckets, verification
    step = NearDedup(threshold=0.8, seed=0)
    perms = permutations(step.num_perm, step.seed)
    row_keys = [(r["id"], r["origin"]) for r in recs]
    refs = np.array([row_ref(*k) for k in row_keys], dtype=np.uint64)
    sigs = np.stack([signature(shingle_values(shingles(record_text(r), 5)), *perms) for r in recs])
    hashes = band_hashes(sigs, step.bands)
    # the projection carries these band hashes
    assert all(np.frombuffer(step.project(r)["bands"], dtype=np.uint64).tolist() == h.tolist()
               for r, h in zip(recs, hashes))
    candidates = np.unique(np.concatenate([bucket_pairs(hashes[:, j], refs) for j in range(step.bands)]), axis=0)
    order = np.argsort(refs)
    edges, _ = verified_pairs(candidates, refs[order], signature_similarity(sigs[order]), 0.8)
    found = {tuple(sorted((row_keys[order[a]], row_keys[order[b]]))) for a, b in edges}
    tp = len(found & truth)
    precision, recall = tp / max(len(found), 1), tp / len(truth)
    assert precision >= 0.9 and recall >= 0.9, (precision, recall, len(found), len(truth))
    # every pair the step reports is close to the threshold or above it, exactly
    assert all(exact[p] >= 0.7 for p in found)


@pytest.mark.parametrize("verify", ["estimate", "exact"])
def test_the_beam_step_rejects_what_banding_by_hand_rejects(shared_data, verify):
    """Candidates found by comparing every pair's bands directly (no hashing, no refs),
    verified (the signatures' agreement, or the Jaccard of the shingle strings), joined
    and resolved by hand: the same rows rejected, with the same reasons."""
    recs = real_rows_with_edits(shared_data)
    step = NearDedup(threshold=0.8, seed=0, keep="longest", verify=verify)
    sets = {(r["id"], r["origin"]): shingles(record_text(r), 5) for r in recs}

    def similarity(x, y):
        return estimated_jaccard(proj[x][0], proj[y][0]) if verify == "estimate" else jaccard(sets[x], sets[y])

    perms = permutations(step.num_perm, step.seed)
    proj = {(r["id"], r["origin"]): (signature(shingle_values(shingles(record_text(r), 5)), *perms), len(r["response"]))
            for r in recs}
    keys, width = sorted(proj), step.num_perm // step.bands
    edges = [(x, y) for i, x in enumerate(keys) for y in keys[i + 1:]
             if (proj[x][0] != PRIME).any()
             and any((proj[x][0][j:j + width] == proj[y][0][j:j + width]).all() for j in range(0, step.num_perm, width))
             and similarity(x, y) >= 0.8]
    group = {k: {k} for k in keys}
    for x, y in edges:
        if group[x] is not group[y]:
            merged = group[x] | group[y]
            for k in merged:
                group[k] = merged
    want = {}
    for members in {id(g): g for g in group.values() if len(g) > 1}.values():
        winner = min(members, key=lambda k: (-proj[k][1], k))
        for k in members - {winner}:
            measure = "estimated Jaccard" if verify == "estimate" else "Jaccard"
            want[k] = f"near-duplicate of {winner[0]} ({winner[1]}), {measure} {similarity(k, winner):.3f}"
    assert len(want) >= 30

    def check(rejected):
        assert {(r["id"], r["origin"]): r["reject_reason"] for r in rejected} == want

    with beam.Pipeline(options=pipeline_options([])) as p:
        out = p | beam.Create(recs) | step
        assert_that(out["rejected"], check)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_job_keeps_one_row_per_component_with_the_reason(tmp_path):
    text = ("the quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat "
            "and the bird sings in the old oak tree near the river bank")
    rows = [{"question": "Describe the scene.", "answer": text},
            {"question": "Describe the scene.", "answer": text + " today"},      # longest: kept
            {"question": "Describe the scene.", "answer": text.replace("old", "tall")},
            {"question": "Name a prime number.", "answer": "Seven is a prime number."}]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    m = run_job(parse_job({"inputs": [path], "output": str(tmp_path / "out"),
                           "filters": [{"type": "near_dedup", "threshold": 0.7}]}))
    assert m["counts"]["filtered"] == {"filter:near_dedup": 2} and m["counts"]["kept"] == 2
    kept = datasets.load_from_disk(str(tmp_path / "out")).to_list()
    assert sorted(r["origin"] for r in kept) == ["in.jsonl:2", "in.jsonl:4"]
    winner = next(r for r in kept if r["origin"] == "in.jsonl:2")
    for r in datasets.load_from_disk(str(tmp_path / "out" / "rejected")).to_list():
        # the default verification: the Jaccard of the two rows' shingle sets, by hand here
        by_hand = jaccard(shingles(record_text(r), 5), shingles(record_text(winner), 5))
        assert r["reject_reason"] == f"near-duplicate of {winner['id']} (in.jsonl:2), Jaccard {by_hand:.3f}"


@pytest.mark.parametrize("options, match", [({"threshold": 0}, "threshold"), ({"num_perm": 100}, "multiple"),
                                            ({"keep": "best"}, "keep"), ({"unit": "byte"}, "unit"),
                                            ({"verify": "sometimes"}, "verify")])
def test_config_errors(tmp_path, options, match):
    path = write_jsonl(tmp_path / "a.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(ConfigError, match=match):
        run_job(parse_job({"inputs": [path], "output": str(tmp_path / "o"),
                           "filters": [{"type": "near_dedup", **options}]}))
