"""Score once, select many: scores are computed once, re-used by content hash, and
re-selected without loading a model."""

import json

import datasets

from curate.config import parse_job
from curate.pipeline.run import run_job, select_from_scores
from curate.config import JobConfig


def pool_file(tmp_path):
    rows = [{"instruction": f"Say something about topic {i}", "output": f"Answer {j} about {i}" + "!" * j,
             "generator": f"m{j}"} for i in range(6) for j in range(3)]
    path = tmp_path / "pool.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_score_once_then_select_many(tmp_path, tiny_lm_dir, monkeypatch):
    spec = {"inputs": [pool_file(tmp_path)], "output": str(tmp_path / "grape"),
            "scores": str(tmp_path / "scores"),
            "scorers": [{"type": "likelihood", "model": str(tiny_lm_dir), "dtype": "float32"}],
            "selectors": [{"type": "grape", "k": 1}]}
    first = run_job(parse_job(spec))
    assert first["counts"]["kept"] == 6 and first["scoring_counts"]["kept"] == 18
    scores = datasets.load_from_disk(str(tmp_path / "scores"))
    assert len(scores) == 18 and "logprob_mean" in scores.column_names

    # a second run with the same inputs and scorers re-uses the scores: no model is loaded
    def no_model(*a, **k):
        raise AssertionError("a model was loaded although scores exist")

    monkeypatch.setattr("curate.scorers.base.load_causal_lm", no_model)  # what every scorer loads with
    second = run_job(parse_job({**spec, "output": str(tmp_path / "grape2"), "selectors": [{"type": "grape", "k": 2}]}))
    assert second["scores_key"] == first["scores_key"]
    assert second["counts"]["kept"] == 12

    # selections from the same scores: random budgets nest, GRAPE's pick matches the scores
    small = select_from_scores(JobConfig(inputs=[], output=str(tmp_path / "r5"),
                                         selectors=[{"type": "random", "budget": 5}]), str(tmp_path / "scores"))
    large = select_from_scores(JobConfig(inputs=[], output=str(tmp_path / "r10"),
                                         selectors=[{"type": "random", "budget": 10}]), str(tmp_path / "scores"))
    assert small["counts"]["kept"] == 5 and large["counts"]["kept"] == 10
    ids5 = set(datasets.load_from_disk(str(tmp_path / "r5"))["id"])
    assert ids5 <= set(datasets.load_from_disk(str(tmp_path / "r10"))["id"])
    best = {}
    for r in scores:
        if r["prompt_id"] not in best or r["logprob_mean"] > best[r["prompt_id"]]["logprob_mean"]:
            best[r["prompt_id"]] = r
    assert set(datasets.load_from_disk(str(tmp_path / "grape"))["id"]) == {r["id"] for r in best.values()}


def test_changed_input_rescoring(tmp_path, tiny_lm_dir):
    path = pool_file(tmp_path)
    spec = {"inputs": [path], "output": str(tmp_path / "o"), "scores": str(tmp_path / "scores"),
            "scorers": [{"type": "likelihood", "model": str(tiny_lm_dir), "dtype": "float32"}],
            "selectors": [{"type": "grape"}]}
    key1 = run_job(parse_job(spec))["scores_key"]
    with open(path, "a") as fh:
        fh.write(json.dumps({"instruction": "new", "output": "row", "generator": "m0"}) + "\n")
    m = run_job(parse_job(spec))
    assert m["scores_key"] != key1 and m["scoring_counts"]["kept"] == 19
