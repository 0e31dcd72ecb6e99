"""The diversity method's refinement step on a tiny random LM: the log-prob it scores with
matches the trainer's loss, the step is seeded and leaves the base model alone, and the
iterative selector runs it inside a Beam pipeline."""

import json
import math
from collections import Counter

import apache_beam as beam
import pytest
from apache_beam.testing.util import assert_that

from curate.pipeline.run import pipeline_options
from curate.pipeline.plan import attach_model_stage
from curate import steps
from test_diversity import blob_rows


def test_refinement_step_on_a_tiny_lm(tiny_lm_dir, tmp_path):
    from curate.train.refine import (RefineConfig, TrainGenerateScore,
                                                   mean_response_logprobs)
    from curate.train import evaluate_loss, load_model

    rows = [{"id": f"t{i}", "origin": f"t:{i}", "prompt": f"What is {i} plus {i}?",
             "response": f"{i} plus {i} is {2 * i}.",
             "messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(6)]
    model, tok = load_model(str(tiny_lm_dir), device="cpu", dtype="float32")
    lps = mean_response_logprobs(model, tok, rows, "plain", 128, batch_size=4)
    for r, lp in zip(rows, lps):  # the trainer's loss on one example is -mean log-prob
        assert lp == pytest.approx(-evaluate_loss(model, tok, [r], "plain", 128)["loss"], abs=1e-4)
    cfg = RefineConfig(model=str(tiny_lm_dir), max_length=128, max_new_tokens=6, batch_size=4,
                       device="cpu", dtype="fp32", train={"max_steps": 2, "batch_size": 4, "lr": 1e-2})
    step = TrainGenerateScore(cfg)
    gaps, info = step(rows, round_index=1, seed=0, work_dir=str(tmp_path))
    assert len(gaps) == 6 and all(math.isfinite(g) for g in gaps)
    assert info["train"]["steps"] == 2 and (tmp_path / "round-1" / "adapter").is_dir()
    again, _ = TrainGenerateScore(cfg)(rows, round_index=1, seed=0, work_dir=str(tmp_path / "b"))
    assert again == pytest.approx(gaps, abs=1e-5)  # seeded, deterministic
    # the base model was not touched by training (each round starts from it)
    assert mean_response_logprobs(step._base[0], tok, rows, "plain", 128, 4) == pytest.approx(lps, abs=1e-5)


def test_iterative_selector_with_the_tiny_lm(tiny_lm_dir, tmp_path):
    rows = blob_rows(sizes=(20, 20, 20), d=8, seed=4)
    for r in rows:
        n = int(r["id"].split("_")[1])
        r.update(prompt=f"Add {n} and {n}.", response=f"The sum is {2 * n}.",
                 messages=[{"role": "user", "content": f"Add {n} and {n}."},
                           {"role": "assistant", "content": f"The sum is {2 * n}."}])
    sel = steps.build("selector", {"type": "diversity", "budget": 12, "k": 3, "rounds": 2, "model": str(tiny_lm_dir),
                                   "max_length": 64, "max_new_tokens": 4, "device": "cpu", "dtype": "fp32",
                                   "train": {"max_steps": 1, "batch_size": 8}, "work_dir": str(tmp_path)}, "selector")
    assert sel.model_stage() is not None and sel.gap_fn is None  # the selector holds no model code
    attach_model_stage(sel)  # what the pipeline's plan does: the train/generate/score stage
    with beam.Pipeline(options=pipeline_options([])) as p:
        out = p | beam.Create(rows) | sel
        assert_that(out["kept"] | beam.Map(lambda r: (r["diversity_round"], r["diversity_gap"] is not None)),
                    lambda got: _check_tiny(got), label="kept")
    doc = json.loads((tmp_path / "diversity_rounds.json").read_text())
    assert doc["history"][0]["train"]["steps"] == 1 and len(doc["history"]) == 2


def _check_tiny(got):
    c = Counter(got)
    # round 1's six rows were scored by the refinement step; round 2's were not
    assert c == Counter({(1, True): 6, (2, False): 6}), c


def test_a_bad_refinement_config_fails_before_any_scoring(tmp_path, monkeypatch):
    from curate.config import ConfigError, parse_job
    from curate.pipeline.run import run_job

    def no_work(*a, **k):
        raise AssertionError("a pipeline ran before the configuration was checked")

    monkeypatch.setattr("curate.pipeline.run.run_pipeline", no_work)
    path = tmp_path / "in.jsonl"
    path.write_text('{"question": "q", "answer": "a"}\n')
    job = parse_job({"inputs": [str(path)], "output": str(tmp_path / "out"), "scores": str(tmp_path / "s"),
                     "scorers": [{"type": "embedding"}],
                     "selectors": [{"type": "diversity", "budget": 1, "rounds": 2, "train": {"bogus": 1}}]})
    with pytest.raises(ConfigError, match="selector 'diversity'.*bogus"):
        run_job(job)
