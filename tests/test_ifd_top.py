"""IFD against a direct computation, and the `top` selector (the baselines' selector)."""

import math

import datasets
import pytest
import torch

from curate.config import parse_job
from curate.pipeline.run import run_job
from curate.records import adapt_qa
from curate.scorers import make_scorer

PAIRS = [("What is 2 + 2?", "4, because two and two make four."),
         ("Name a colour of the sky.", "Blue, on a clear day."),
         ("Write a function that adds two numbers in Python.", "def add(a, b): return a + b")]


def _records():
    return [next(adapt_qa({"question": q, "answer": a}, {}, "t")) for q, a in PAIRS]


def _mean_loss(model, ids, first):
    """Mean cross-entropy of ids[first:], each token from the ones before it: one plain
    forward over the whole sequence and log_softmax."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    return -sum(float(logp[t - 1, ids[t]]) for t in range(first, len(ids))) / (len(ids) - first)


def test_ifd_is_the_ratio_of_the_two_losses_computed_directly(tiny_lm, tiny_lm_dir):
    model, tok = tiny_lm
    scorer = make_scorer({"type": "ifd", "model": str(tiny_lm_dir), "dtype": "float32"})
    out = scorer.load_runner().score(_records())
    for (q, a), r in zip(PAIRS, out):
        prompt = tok(f"Question: {q}\nAnswer:", add_special_tokens=False)["input_ids"]
        answer = tok(f" {a}", add_special_tokens=False)["input_ids"]  # the plain template's response
        conditioned = _mean_loss(model, prompt + answer, len(prompt))
        alone_ids = tok(a, add_special_tokens=False)["input_ids"]
        alone = _mean_loss(model, alone_ids, 1)  # the first answer token has no context
        assert r["ifd_loss_conditioned"] == pytest.approx(conditioned, rel=1e-4)
        assert r["ifd_loss_alone"] == pytest.approx(alone, rel=1e-4)
        assert r["ifd"] == pytest.approx(conditioned / alone, rel=1e-4)


def test_ifd_of_a_one_token_answer_is_nan(tiny_lm_dir):
    rec = next(adapt_qa({"question": "Q?", "answer": "4"}, {}, "t"))
    scorer = make_scorer({"type": "ifd", "model": str(tiny_lm_dir), "dtype": "float32"})
    (r,) = scorer.load_runner().score([rec])
    assert math.isnan(r["ifd"]) and math.isnan(r["ifd_loss_alone"])


def _pool(tmp_path, n=12):
    import json

    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"question": f"Question {i}?", "answer": "x" * (i + 1)}) + "\n"
                            for i in range(n)))
    return str(path)


@pytest.mark.parametrize("order,expected", [("highest", [12, 11, 10]), ("lowest", [1, 2, 3])])
def test_top_keeps_the_budget_by_a_column(tmp_path, order, expected):
    job = parse_job({"inputs": [{"path": _pool(tmp_path)}], "output": str(tmp_path / "out"),
                     "selectors": [{"type": "top", "column": "response_chars", "budget": 3, "order": order}]})
    m = run_job(job)
    kept = datasets.load_from_disk(str(tmp_path / "out"))
    assert sorted(len(r) for r in kept["response"]) == sorted(expected)
    assert m["counts"]["not_selected"] == {"select:top": 9}


def test_top_bounds_and_missing_values_are_rejected_with_reasons(tmp_path):
    job = parse_job({"inputs": [{"path": _pool(tmp_path)}], "output": str(tmp_path / "out"),
                     "selectors": [{"type": "top", "column": "response_chars", "budget": 0.5,
                                    "at_least": 3, "below": 9}]})
    run_job(job)
    kept = sorted(len(r) for r in datasets.load_from_disk(str(tmp_path / "out"))["response"])
    assert kept == [6, 7, 8]  # 3..8 pass the bounds (6 rows); half of them, the longest
    reasons = datasets.load_from_disk(str(tmp_path / "out" / "rejected"))["reject_reason"]
    assert sum("< at_least 3" in r for r in reasons) == 2 and sum(">= below 9" in r for r in reasons) == 4
    assert sum("outside the highest 0.5" in r for r in reasons) == 3
