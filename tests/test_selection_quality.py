"""The selection-quality benchmark end to end on a tiny random model and tiny synthetic pools:
every method on the mixed pool (clean and noisy), PASER's recovery variants and GRAPE;
the tables have the right shape, the numbers are finite and recomputed here from what
the benchmark saved (corrupted rows kept, recovery, GRAPE's two evaluations, the longest
responses, the chosen settings), and a rerun is served from the work dir's caches."""

from __future__ import annotations

import collections
import csv
import gzip
import importlib.util
import json
import math
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
GENERATORS = ["gpt4_1106_preview", "claude-2", "alpaca-7b", "vicuna-7b", "gemma-2b-it"]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("selection_quality", ROOT / "benchmarks" / "selection_quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def write_gz(path: pathlib.Path, rows: list[dict]) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)


def synthetic_data(root: pathlib.Path) -> pathlib.Path:
    """Files named and shaped like ../shared/data, with short texts."""
    root.mkdir()
    qa = lambda n, off: [{"question": f"What is {i + off} plus {i}?", "answer": f"{i + off} + {i} = {2 * i + off}. #### {2 * i + off}"}  # noqa: E731
                         for i in range(n)]
    write_gz(root / "gsm8k_train.jsonl.gz", qa(20, 3))
    write_gz(root / "gsm8k_test.jsonl.gz", qa(6, 100))
    for name, verb in (("codealpaca", "Write code that prints"), ("gpteacher_roleplay", "Pretend to be a pirate saying"),
                       ("gpteacher_toolformer", "Use the calculator on")):
        write_gz(root / f"{name}.jsonl.gz", [
            {"instruction": f"{verb} {i}", "input": "" if i % 2 else f"x = {i}", "output": f"Here it is: {i} " + "ok " * (i % 4)}
            for i in range(20)])
    answer = lambda i, j: f"{GENERATORS[j]} says {i} is a number" + "!" * 10 * (j + 1)  # noqa: E731
    write_gz(root / "alpaca_eval_pool.jsonl.gz", [
        # alpaca-7b repeats claude-2's answer in capitals, as generators do in the real file
        {"instruction": f"Tell me a fact about the number {i}.", "generator": g, "dataset": "synthetic",
         "output": answer(i, 1).upper() if g == "alpaca-7b" else answer(i, j)}
        for i in range(12) for j, g in enumerate(GENERATORS)])
    return root


@pytest.fixture
def one_thread():
    """One torch thread (tiny matmuls on a shared CPU: two threads mostly wait on each other),
    restored afterwards: the setting is process-wide."""
    import torch

    before = torch.get_num_threads()
    yield 1
    torch.set_num_threads(before)


def test_selection_quality_tiny(tmp_path, tiny_lm_dir, one_thread):
    sq = load_benchmark()
    data = synthetic_data(tmp_path / "data")
    out, work, summary_md = tmp_path / "results", tmp_path / "work", tmp_path / "RESULTS.md"
    argv = ["--scale", "tiny", "--model", str(tiny_lm_dir), "--seeds", "0,1", "--dtype", "float32",
            "--threads", str(one_thread), "--device", "cpu", "--data", str(data), "--out", str(out),
            "--work-dir", str(work), "--summary", str(summary_md), "--variants", "clean,noisy,recovery"]
    result = sq.main(argv)
    rows = result["rows"]

    # one row per (variant, method, seed): references first, random's seeds, then the methods
    pool_methods = ["longest", "ppl_low", "ppl_high", "ifd", "diversity", "diversity_iterative", "donod", "s2l",
                    "paser", "longest_strat", "ppl_low_strat", "ppl_high_strat", "ifd_strat", "donod_strat",
                    "paser_strat", "headroom"]
    random_rows = [("random", 0), ("random", 1)]
    expected = ([("clean", m, s) for m, s in [("base", None)] + random_rows + [("full", None)]
                 + [(m, None) for m in pool_methods]]
                + [("noisy", m, s) for m, s in [("base", None)] + random_rows + [(m, None) for m in pool_methods]]
                + [(f"recovery-{p}", m, s) for p in ("wanda50", "layerdrop")
                   for m, s in [("unpruned", None), ("base", None)] + random_rows + [("paser", None)]]
                + [("grape", m, s) for m, s in [("base", None), ("grape", None)] + random_rows + [("longest", None)]])
    assert [(r["variant"], r["method"], r["seed"]) for r in rows] == expected
    # stratified: the pool's mix (12 rows per source, budget 12 -> 3 each)
    longest_strat = next(r for r in rows if r["variant"] == "clean" and r["method"] == "longest_strat")
    assert sorted(longest_strat["source_mix"].values()) == [3, 3, 3, 3]

    pool_sets = ["gsm8k", "codealpaca", "gpteacher_roleplay", "gpteacher_toolformer"]
    budget = 12  # 25% of 4 sources x 12 rows
    meta = json.loads((work / "data" / "data.json").read_text())
    assert meta["n_pool"] == 48 and meta["n_corrupted"] == {"noisy": round(0.2 * 48), "heavy": round(0.6 * 48)}
    assert collections.Counter(meta["corrupted"]["noisy"].values()) == {"wrong_answer": 3, "swapped": 3, "truncated": 4}
    # the heavy pool (built, not run here): a third wrong answers (GSM8K has 12 rows), the rest halved
    assert collections.Counter(meta["corrupted"]["heavy"].values()) == {"wrong_answer": 9, "swapped": 10, "truncated": 10}
    heavy_ids = [sq.record_id(**json.loads(line), source=f.stem) for f in sorted((work / "data" / "heavy").glob("*.jsonl"))
                 for line in f.read_text().splitlines()]
    assert len(heavy_ids) == 48 and sum(i in meta["corrupted"]["heavy"] for i in heavy_ids) == 29
    assert all(len(v) == 4 for v in meta["eval_ids"].values()) and all(len(v) == 2 for v in meta["val_ids"].values())
    for source in pool_sets:  # pool, validation and evaluation are disjoint
        assert not set(meta["pool_ids"][source]) & set(meta["val_ids"][source])
        assert not set(meta["val_ids"][source]) & set(meta["eval_ids"][source])
    for r in rows:
        assert all(math.isfinite(x) for x in r["eval"].values())
        assert r["eval_mean"] == pytest.approx(sum(r["eval"].values()) / len(r["eval"]))
        if r["method"] in ("base", "unpruned"):
            assert r["rows"] == 0 and r["train_s"] is None
            continue
        assert r["steps"] >= 1 and r["train_tokens"] > 0
        if r["variant"] == "grape":
            assert list(r["eval"]) == ["gold", "all_generators"]
            # one response per instruction, from the candidates' generators
            assert r["rows"] == 6 and sum(r["generator_mix"].values()) == 6
            assert set(r["generator_mix"]) <= set(GENERATORS)
            continue
        assert list(r["eval"]) == pool_sets and set(r["source_mix"]) <= set(pool_sets)
        want = 48 if r["method"] == "full" else budget
        # IFD keeps only rows with IFD < 1: fewer than the budget on a random model
        assert r["rows"] == want if r["method"] not in ("ifd", "ifd_strat") else 0 < r["rows"] <= want
        if r["variant"] == "noisy":
            assert r["noisy_kept"] == sum(r["noisy_kept_by_kind"].values()) and 0 <= r["noisy_kept"] <= r["rows"]
        else:
            assert r["noisy_kept"] is None

    # noisy_kept counts the selection's corrupted ids (read back from the selection itself)
    import datasets

    corrupted = set(meta["corrupted"]["noisy"])
    for method in ("random-0", "donod"):
        kept = datasets.load_from_disk(str(work / "noisy" / "select" / method))["id"]
        row = next(r for r in rows if r["variant"] == "noisy" and
                   (r["method"], r["seed"]) == (("random", 0) if method == "random-0" else ("donod", None)))
        assert row["noisy_kept"] == len(corrupted & set(kept))

    # the noisy pool's uncorrupted rows took their scores from the clean pool's saved work
    noisy_ids = set(datasets.load_from_disk(str(work / "noisy" / "pool"))["id"])
    clean_ids = set(datasets.load_from_disk(str(work / "clean" / "pool"))["id"])
    manifest = json.loads((work / "noisy" / "scores-weight_delta" / "manifest.json").read_text())
    assert manifest["counts"]["from_saved"] == {"score:weight_delta": len(noisy_ids & clean_ids)}
    assert len(noisy_ids - clean_ids) == meta["n_corrupted"]["noisy"]

    # scores computed before the store existed go into it once, as they are
    from curate.pipeline import saved_work
    from curate.scorers import make_scorer

    scores = work / "clean" / "scores-ifd"
    specs = json.loads((scores / "manifest.json").read_text())["job"]["scorers"]
    sq.save_scores_of(scores, specs, str(tmp_path / "store"))
    (shard,) = saved_work.saved_shards(saved_work.scorer_dir(str(tmp_path / "store"), make_scorer(dict(specs[0]))))
    saved = dict(saved_work.read_shard(shard))
    columns = list(make_scorer(dict(specs[0])).output_columns())
    assert len(columns) >= 3 and saved == {r["id"]: {c: r[c] for c in columns}
                                           for r in datasets.load_from_disk(str(scores))}

    # longest: no response left out is longer than one kept
    pool = datasets.load_from_disk(str(work / "clean" / "pool"))
    kept = set(datasets.load_from_disk(str(work / "clean" / "select" / "longest"))["id"])
    lengths = {i: len(t) for i, t in zip(pool["id"], pool["response"])}
    assert min(lengths[i] for i in kept) >= max(v for i, v in lengths.items() if i not in kept)

    # recovery, recomputed from the reference rows
    for name in ("wanda50", "layerdrop"):
        vr = {(r["method"], r["seed"]): r for r in rows if r["variant"] == f"recovery-{name}"}
        lp, l0 = vr[("base", None)]["eval_mean"], vr[("unpruned", None)]["eval_mean"]
        assert l0 == rows[0]["eval_mean"]  # the unpruned reference is the clean variant's base model
        for key in [("paser", None), ("random", 0)]:
            assert vr[key]["recovery"] == pytest.approx((lp - vr[key]["eval_mean"]) / (lp - l0))
    # the recovery variants train the pruned copies on the clean variant's random subsets
    by = {(r["variant"], r["method"], r["seed"]): r for r in rows}
    assert by[("recovery-wanda50", "random", 1)]["source_mix"] == by[("clean", "random", 1)]["source_mix"]

    # GRAPE: gold is gpt4's set, all_generators the mean over the generators
    for r in (r for r in rows if r["variant"] == "grape"):
        assert r["eval"]["gold"] == r["eval_by_generator"]["gpt4_1106_preview"]
        assert r["eval"]["all_generators"] == pytest.approx(sum(r["eval_by_generator"].values()) / len(GENERATORS))
    # the pipeline's dedup drops alpaca-7b's repeats of claude-2, counted in the manifest
    grape_counts = json.loads((work / "grape" / "scores-likelihood" / "manifest.json").read_text())["counts"]
    assert grape_counts["read"] == 6 * len(GENERATORS) and grape_counts["filtered"] == {"filter:dedup": 6}
    longest = by[("grape", "longest", None)]
    assert longest["generator_mix"] == {"gemma-2b-it": 6}  # the most "!"s

    # the training settings: the lowest validation loss of the grid, and every run used them
    saved = json.loads((out / "selection_quality.json").read_text())
    best = min(saved["settings_tried"], key=lambda t: t["val_loss"])
    assert saved["chosen"] == {"epochs": best["epochs"], "lr": best["lr"]}
    assert len(saved["settings_tried"]) == 2

    for variant, s in result["summary"].items():
        assert s["random"]["mean"]["n"] == 2
        for method, v in s["verdicts"].items():
            assert {x["verdict"] for x in v.values()} <= {"better", "worse", "tie"}
            assert set(v) == set(s["sets"]) | {"mean"}

    # files: markdown tables, CSV (one line per row), JSON, plot, RESULTS summary
    table = (out / "selection_quality.md").read_text()
    for title in ("### Mixed pool", "corrupted kept", "wrong_answer", "### PASER's setting", "recovery",
                  "### GRAPE", "random, mean ± sd (2 seeds)", "chosen on validation"):
        assert title in table
    with open(out / "selection_quality.csv") as fh:
        lines = list(csv.DictReader(fh))
    assert len(lines) == len(rows) and all(math.isfinite(float(x["loss_mean"])) for x in lines)
    assert (out / "selection_quality.png").stat().st_size > 1000
    assert saved["complete"] is True
    assert "## Verdicts" in summary_md.read_text() and "Command: `python benchmarks/selection_quality.py" in \
        summary_md.read_text()

    # the ETA expected every stage that ran, by kind
    clock = sq.Clock()
    sq.expect_stages(sq.parse_args(argv), clock)
    assert clock.expected == collections.Counter(s["kind"] for s in saved["stages"])

    # a rerun recomputes nothing: every model stage comes from the work dir
    again = sq.main(argv)
    stages = json.loads((out / "selection_quality.json").read_text())["stages"]
    heavy = [s for s in stages if s["kind"] in ("score", "select", "train", "prune", "eval")]
    assert heavy and all(s["cached"] for s in heavy)
    assert [r["eval"] for r in again["rows"]] == [r["eval"] for r in rows]


def test_rows_selected_but_not_trained_report_the_corrupted_share_only(tmp_path):
    """Between the noisy variant's selections and its trainings the tables show each
    method's corrupted rows kept, no losses and no verdicts; trained variants are unaffected."""
    sq = load_benchmark()
    from benchmarks.selection_quality_report import markdown_tables, plot, summarise, write_csv

    def run(loss):
        return {"eval": {"gsm8k": {"loss": loss, "n_tokens": 10}, "codealpaca": {"loss": loss + 1, "n_tokens": 10}},
                "train": {"train_time_s": 1.0, "train_tokens": 100, "tokens_per_s": 100.0, "steps": 2}}

    picked = [{"id": f"r{i}", "source": "gsm8k"} for i in range(4)]
    corrupted = {"r0": "swapped", "r1": "truncated"}
    rows = [sq.result_row("clean", "random", s, picked, run(1.0 + s / 10)) for s in (0, 1)]
    rows.append(sq.result_row("clean", "donod", None, picked, run(2.0)))
    rows += [sq.result_row("noisy", "random", 0, picked, None, corrupted),
             sq.result_row("noisy", "donod", None, picked[1:], None, corrupted)]
    assert rows[-1]["eval"] == {} and rows[-1]["eval_mean"] is None and rows[-1]["noisy_kept"] == 1

    summary = summarise(rows)
    assert summary["noisy"]["random"] == {} and summary["noisy"]["verdicts"] == {}
    assert summary["noisy"]["noisy"]["donod"] == {"kept": 1, "rows": 3, "share": 1 / 3, "by_kind": {"truncated": 1}}
    # the clean variant: random 1.5 and 1.6 (sd 0.0707), donod 2.5 -> worse
    assert summary["clean"]["verdicts"]["donod"]["mean"]["verdict"] == "worse"
    table = markdown_tables(rows, summary)
    assert "| donod | 3 | gsm8k 3 | 1 (33%) | - | - |  |" in table
    assert "not trained yet" in table
    write_csv(rows, tmp_path / "t.csv")
    plot(rows, summary, tmp_path / "t.png")  # a loss panel for clean, a corrupted-kept panel for noisy
    assert (tmp_path / "t.png").stat().st_size > 1000


def test_headroom_takes_the_rows_nearest_each_evaluation_set_in_turn(tmp_path, monkeypatch):
    import datasets
    import numpy as np

    sq = load_benchmark()
    # pool rows on the unit circle at 0, 10, 20, ... 90 degrees; set A sits at 0, set B at 90
    angles = np.radians(np.arange(0, 100, 10))
    pool = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    datasets.Dataset.from_dict({"id": [f"r{d}" for d in range(0, 100, 10)],
                                "embedding": pool.tolist()}).save_to_disk(str(tmp_path / "embed"))
    centre = {"A": [1.0, 0.0], "B": [0.0, 1.0]}
    monkeypatch.setattr("curate.models.load_embedder", lambda name: (None, None))
    monkeypatch.setattr("curate.scorers.embedding.embed_texts",
                        lambda m, t, texts, max_length: np.array([centre[x.split()[0]] for x in texts], np.float32))
    evals = {name: [{"prompt": f"{name} q", "response": "a"}] for name in ("A", "B")}
    opts = sq.parse_args(["--scale", "tiny"])
    # A takes its nearest (0 degrees), B its (90), A the next (10), B (80), A (20)
    assert sq.headroom_ids(opts, tmp_path / "embed", evals, 5) == ["r0", "r90", "r10", "r80", "r20"]
    assert sorted(sq.headroom_ids(opts, tmp_path / "embed", evals, 50)) == sorted(f"r{d}" for d in range(0, 100, 10))
