"""benchmarks/scale.py's cheap pieces: the pool builder at 500 rows (planted fractions,
ground truth against a brute-force recomputation through curate's own reader, exact
copies normalising to their source, distinct variants distinct), the quality scorer on
a hand-made removal list, curate's rejection reasons parsed, and the process-tree
measurement counting a grandchild and an orphan. No DataTrove needed."""

from __future__ import annotations

import gzip
import importlib.util
import itertools
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("scale_bench", ROOT / "benchmarks" / "scale.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


scale = load_benchmark()


@pytest.fixture(scope="module")
def pool(shared_data, tmp_path_factory):
    base = scale.load_base(shared_data, limit=120)  # 120 rows of each file
    return scale.build_pool(tmp_path_factory.mktemp("scale"), 500, seed=0, base=base), base


def curate_records(pool_path: pathlib.Path) -> dict[int, dict]:
    """The pool as curate reads it, by row position (its origins: shard file:line)."""
    from curate.config import InputConfig
    from curate.inputs.files import read_records

    meta = scale.read_meta(pool_path)
    recs, dead = read_records([InputConfig(path=str(pool_path / "part-*.jsonl.gz"))], max_chars=10**9)
    assert not dead
    out = {}
    for rec in recs:
        file, line = rec["origin"].rsplit(":", 1)
        out[scale.row_index(meta, file, int(line) - 1)] = rec
    return out


def test_pool_fractions_truth_and_copies(pool, tmp_path):
    from curate.filters.dedup import dedup_key
    from curate.filters.near_dedup import record_text, shingles

    path, base = pool
    meta = scale.read_meta(path)
    truth = [json.loads(line) for line in gzip.open(path / "truth.jsonl.gz", "rt")]
    kinds = {k: sum(t["kind"] == k for t in truth) for k in ("exact", "case-space", "near")}
    assert meta["rows"] == 500 and meta["variants"] == 350 and meta["kinds"] == kinds
    assert kinds["exact"] + kinds["case-space"] == 50 and kinds["near"] == 100
    assert kinds["exact"] > 10 and kinds["case-space"] > 10

    recs = curate_records(path)
    assert sorted(recs) == list(range(500))
    raw = scale.read_rows(path, set(range(500)))
    for r, rec in recs.items():  # the benchmark's own text and key are curate's
        assert scale.alpaca_text(raw[r]) == record_text(rec)
        assert scale.exact_key(raw[r]) == dedup_key(rec, "prompt_response")
        assert scale.datatrove_adapter(None, raw[r], "part-00000.jsonl.gz", 0)["text"] == record_text(rec)

    sh = {r: shingles(record_text(rec), 5) for r, rec in recs.items()}
    copies = {t["row"] for t in truth}
    for t in truth:  # brute force: the recorded Jaccard is curate's, between the right rows
        src, row = t["source"], t["row"]
        assert src not in copies
        assert abs(len(sh[src] & sh[row]) / len(sh[src] | sh[row]) - t["jaccard"]) < 1e-6
        same = dedup_key(recs[row], "prompt_response") == dedup_key(recs[src], "prompt_response")
        if t["kind"] == "exact":
            assert raw[row] == raw[src] and same and t["jaccard"] == 1.0
        elif t["kind"] == "case-space":
            assert raw[row] != raw[src] and same and t["jaccard"] == 1.0
        else:
            assert not same and t["edits"] >= 1 and t["jaccard"] < 1.0
    near = [t["jaccard"] for t in truth if t["kind"] == "near"]
    assert 0.6 <= sum(j >= 0.8 for j in near) / len(near) <= 0.95  # mostly >= 0.8, some below

    variants = sorted(set(range(500)) - copies)
    assert len(variants) == 350
    worst = max(len(sh[a] & sh[b]) / len(sh[a] | sh[b]) for a, b in itertools.combinations(variants, 2))
    assert worst < 0.6, worst  # distinct variants are not near-duplicates of one another

    again = scale.build_pool(tmp_path, 500, seed=0, base=base)  # deterministic
    for name in meta["files"] + ["truth.jsonl.gz"]:
        assert gzip.open(again / name).read() == gzip.open(path / name).read()


def test_pair_variants_unique_pairs():
    first, second = scale.pair_variants(50, 120, np.random.Generator(np.random.PCG64(0)))
    pairs = {tuple(sorted(p)) for p in zip(first.tolist(), second.tolist())}
    assert len(pairs) == 120 and all(a != b and abs(a - b) <= 3 for a, b in pairs)
    with pytest.raises(ValueError):
        scale.pair_variants(5, 11, np.random.Generator(np.random.PCG64(0)))  # only 10 pairs exist


def alpaca(words: str) -> dict:
    w = words.split()
    return {"instruction": " ".join(w[:3]), "input": "", "output": " ".join(w[3:])}


def test_score_hand_made_removals():
    # families: A {0, 1 exact, 2 near .9}, B {3, 4 near .85, 5 near .7}, C {6, 7 case-space},
    # D {8, 10 exact, 12 near .9 (length-filtered)}, E {9, 11 near .95}
    source = np.array([0, 0, 0, 3, 3, 3, 6, 6, 8, 9, 8, 9, 8])
    kind = {1: "exact", 2: "near", 4: "near", 5: "near", 7: "case-space", 10: "exact", 11: "near", 12: "near"}
    jac = {1: 1.0, 2: 0.9, 4: 0.85, 5: 0.7, 7: 1.0, 10: 1.0, 11: 0.95, 12: 0.9}
    # 5 -> 3 -> 8: a chain; 6 -> 9 empties C (7 went with it); 10 and 11 are missed
    removed = {1: 0, 2: 0, 5: 3, 3: 8, 7: 6, 6: 9}
    texts = {3: alpaca("p q r s t u v"), 8: alpaca("p q r s t u w"),  # Jaccard 2/4
             6: alpaca("a b c d e f"), 9: alpaca("a b c d e g")}  # Jaccard 1/3
    q = scale.score({"source": source, "kind": kind, "jaccard": jac}, {"removed": removed, "other": {12}},
                    rows_text=texts)
    assert q["removed_as_duplicates"] == 6
    assert q["exact_copies"] == 3 and q["exact_caught"] == round(2 / 3, 4)  # 1 and 7 caught, 10 kept beside 8
    # >= 0.8: 2 (removed), 4 (kept, its source 3 removed: one of the two kept), 11 (kept beside 9: missed)
    assert q["near_copies_ge_0.8"] == 3 and q["near_recall"] == round(2 / 3, 4)
    assert q["near_copies_below_0.8"] == 1 and q["near_removed_below_0.8"] == 1.0
    assert q["near_found_by_jaccard"]["0.85-0.90"] == "1/1" and q["near_found_by_jaccard"]["0.95-1.00"] == "0/1"
    assert q["wrong_removals"] == 1 and q["rows_lost_with_them"] == 2  # family C
    assert q["wrong_removals_median_jaccard"] == 0.333
    assert q["cross_merges"] == 2 and q["cross_merges_median_jaccard"] == round((1 / 3 + 0.5) / 2, 3)  # 3->8, 6->9
    assert scale.final_target(removed, 5) == 8


def test_reject_target_reads_curate_reasons():
    assert scale.reject_target("duplicate of 9f2c (part-00001.jsonl.gz:17)") == "part-00001.jsonl.gz:17"
    assert scale.reject_target("near-duplicate of 9f2c (part-00000.jsonl.gz:3), estimated Jaccard 0.812") \
        == "part-00000.jsonl.gz:3"
    assert scale.reject_target("near-duplicate of 9f2c (part-00000.jsonl.gz:3), Jaccard 0.812") \
        == "part-00000.jsonl.gz:3"  # verify: exact
    with pytest.raises(ValueError):
        scale.reject_target("too short: 3 chars < min 10")


def test_measure_counts_grandchildren_and_orphans(tmp_path):
    """A job whose child burns ~0.4 s of CPU after the job itself has exited (an orphan):
    the subreaper sees it and rusage counts it. Run in a process of its own, since measure
    reaps every child of the process it runs in."""
    burn = "import time; t = time.process_time(); [0 for _ in iter(lambda: time.process_time() - t > 0.4, True)]"
    job = f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {burn!r}])"
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import importlib.util, pathlib; "
            "spec = importlib.util.spec_from_file_location('s', sys.argv[1] + '/benchmarks/scale.py'); "
            "s = importlib.util.module_from_spec(spec); spec.loader.exec_module(s); s.become_subreaper(); "
            "print(json.dumps(s.measure([sys.executable, '-c', sys.argv[2]], pathlib.Path(sys.argv[3]), {})))")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT), job, str(tmp_path / "log")],
                         capture_output=True, text=True, check=True, timeout=60)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert m["rc"] == 0 and m["processes"] >= 2
    assert m["cpu_rusage_s"] >= 0.4 and m["cpu_s"] >= 0.4
    assert m["largest_process_mb"] > 0 and m["peak_rss_tree_mb"] >= m["largest_process_mb"] * 0.5
