"""The selection-quality benchmark end to end on a tiny random model and tiny synthetic pools:
random + DONOD on the mixed pool (clean and noisy) and the GRAPE variant; the tables have
the right shape, the numbers are finite, the counts add up, and a rerun is served from
the work dir's caches."""

from __future__ import annotations

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
    write_gz(root / "alpaca_eval_pool.jsonl.gz", [
        {"instruction": f"Tell me a fact about the number {i}.", "output": f"{g} says {i} is a number" + "!" * 10 * (j + 1),
         "generator": g, "dataset": "synthetic"}
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
    argv = ["--scale", "tiny", "--model", str(tiny_lm_dir), "--methods", "random,donod,grape",
            "--seeds", "0,1", "--dtype", "float32", "--threads", str(one_thread), "--device", "cpu", "--data", str(data),
            "--out", str(out), "--work-dir", str(work), "--summary", str(summary_md), "--noisy"]
    result = sq.main(argv)
    rows = result["rows"]

    # one row per (variant, method, seed), the base model first in each variant
    got = [(r["variant"], r["method"], r["seed"]) for r in rows]
    assert got == [(v, "base", None) for v in ["clean"]] + [("clean", "random", 0), ("clean", "random", 1),
                                                          ("clean", "donod", None)] + \
        [("noisy", "base", None), ("noisy", "random", 0), ("noisy", "random", 1), ("noisy", "donod", None)] + \
        [("grape", "base", None), ("grape", "grape", None), ("grape", "random", 0), ("grape", "random", 1),
         ("grape", "longest", None)]

    pool_sets = ["gsm8k", "codealpaca", "gpteacher_roleplay", "gpteacher_toolformer"]
    budget = 12  # 25% of 4 sources x 12 rows
    meta = json.loads((work / "data" / "data.json").read_text())
    assert meta["n_pool"] == 48 and meta["n_corrupted"] == round(0.2 * 48)
    assert all(len(v) == 4 for v in meta["eval_ids"].values())
    for r in rows:
        assert all(math.isfinite(x) for x in r["eval"].values()) and math.isfinite(r["eval_mean"])
        assert r["eval_mean"] == pytest.approx(sum(r["eval"].values()) / len(r["eval"]))
        if r["method"] == "base":
            assert r["rows"] == 0 and r["train_s"] is None
            continue
        assert r["steps"] >= 1 and r["train_tokens"] > 0
        if r["variant"] in ("clean", "noisy"):
            assert list(r["eval"]) == pool_sets
            assert r["rows"] == budget and sum(r["source_mix"].values()) == budget
            assert set(r["source_mix"]) <= set(pool_sets)
            if r["variant"] == "noisy":
                assert 0 <= r["noisy_kept"] <= budget
            else:
                assert r["noisy_kept"] is None
        else:
            assert list(r["eval"]) == ["alpaca_eval"]
            # one response per instruction, from the candidates' generators
            assert r["rows"] == 6 and sum(r["generator_mix"].values()) == 6
            assert set(r["generator_mix"]) <= set(GENERATORS)
    longest = next(r for r in rows if r["method"] == "longest")
    assert longest["generator_mix"] == {"gemma-2b-it": 6}  # the most "!"s

    # the same base model is the reference row of both pool variants
    assert rows[0]["eval"] == rows[4]["eval"]
    for variant, s in result["summary"].items():
        assert s["random"]["mean"]["n"] == 2
        for method, v in s["verdicts"].items():
            assert {x["verdict"] for x in v.values()} <= {"better", "worse", "tie"}
            assert set(v) == set(s["sets"]) | {"mean"}

    # files: markdown tables, CSV (one line per row), JSON, plot, RESULTS summary
    table = (out / "selection_quality.md").read_text()
    for title in ("### Mixed pool", "noisy kept", "### GRAPE", "random, mean ± sd (2 seeds)"):
        assert title in table
    with open(out / "selection_quality.csv") as fh:
        lines = list(csv.DictReader(fh))
    assert len(lines) == len(rows) and all(math.isfinite(float(x["loss_mean"])) for x in lines)
    assert (out / "selection_quality.png").stat().st_size > 1000
    assert json.loads((out / "selection_quality.json").read_text())["complete"] is True
    assert "## Verdicts" in summary_md.read_text() and "Command: `python benchmarks/selection_quality.py" in \
        summary_md.read_text()

    # a rerun recomputes nothing: every model stage comes from the work dir
    again = sq.main(argv)
    stages = json.loads((out / "selection_quality.json").read_text())["stages"]
    heavy = [s for s in stages if s["stage"].split(": ", 1)[1].startswith(("score", "select", "train", "prune"))]
    assert heavy and all(s["cached"] for s in heavy)
    assert [r["eval"] for r in again["rows"]] == [r["eval"] for r in rows]
