"""Degradation scorer: JSD against a direct numpy computation from both models' full logits."""

import copy
import math

import apache_beam as beam
import numpy as np
import pytest
import torch
from apache_beam.testing.util import assert_that

from curate.formatting import encode
from curate.prune import prune_model
from curate.records import make_record
from curate.scorers.degradation import (DegradationScorer, degradation_batch, jsd_from_logits,
                                           score_pairs)
from tests.conftest import make_tiny_lm

QA = [("What is two plus two?", "Two plus two is four."),
      ("Write a function that adds two numbers in Python.", "def add(a, b): return a + b"),
      ("You are a pirate captain. Describe your ship!", "Arr, she be the fastest ship on the seven seas, "
       "with black sails and forty cannons."),
      ("Natalia sold clips to 48 of her friends in April.", "Half as many in May: 24. Total 72."),
      ("Hi", "Ok.")]


def recs():
    out = []
    for i, (q, a) in enumerate(QA):
        r = make_record([{"role": "user", "content": q}, {"role": "assistant", "content": a}], "t")
        r["origin"] = f"t:{i + 1}"
        out.append(r)
    return out


@pytest.fixture(scope="module")
def pair():
    original, tok = make_tiny_lm(seed=0, hidden_size=64)
    pruned = copy.deepcopy(original)
    prune_model(pruned, "magnitude", 0.5)
    return original, pruned, tok


def numpy_jsd(original, pruned, enc):
    """Mean JSD over response positions from the full logits of one unpadded example, float64."""
    ids = torch.tensor([enc.input_ids])
    with torch.no_grad():
        zo = original(ids).logits[0].double().numpy()
        zp = pruned(ids).logits[0].double().numpy()

    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    vals = []
    for t in range(enc.prompt_len - 1, len(enc.input_ids) - 1):
        p, q = softmax(zo[t]), softmax(zp[t])
        m = (p + q) / 2
        vals.append(0.5 * np.sum(p * np.log(p / m)) + 0.5 * np.sum(q * np.log(q / m)))
    return float(np.mean(vals)), len(vals)


def test_jsd_matches_numpy_from_full_logits(pair):
    original, pruned, tok = pair
    encoded = [encode(r, tok, "plain", 1024) for r in recs()]
    # one padded batch, and logits chunks of 3 positions that straddle examples
    got = degradation_batch(original, pruned, encoded, tok.pad_token_id,
                            max_logit_elements=3 * len(tok))
    for e, (jsd, n, total) in zip(encoded, got):
        want, n_want = numpy_jsd(original, pruned, e)
        assert n == n_want == e.n_response and total == len(e.input_ids)
        assert jsd == pytest.approx(want, rel=1e-4, abs=1e-7)
        assert 0 < jsd <= math.log(2)


def test_identical_models_have_zero_jsd_and_formula_is_symmetric(pair):
    original, _, tok = pair
    encoded = [encode(r, tok, "plain", 1024) for r in recs()[:2]]
    assert all(j == pytest.approx(0.0, abs=1e-6) for j, _, _ in degradation_batch(original, original, encoded))
    a, b = torch.randn(4, 50), torch.randn(4, 50) * 3
    assert torch.allclose(jsd_from_logits(a, b), jsd_from_logits(b, a))
    # disjoint supports reach the bound ln 2
    far = torch.tensor([[0.0, -1e4]]), torch.tensor([[-1e4, 0.0]])
    assert float(jsd_from_logits(*far)[0]) == pytest.approx(math.log(2), rel=1e-6)


def test_token_budget_batches_keep_order_and_values(pair):
    original, pruned, tok = pair
    rows = recs()
    encoded = [encode(r, tok, "plain", 1024) for r in rows]
    got = score_pairs(original, pruned, encoded, max_tokens_per_batch=40, pad_token_id=tok.pad_token_id)
    for e, (jsd, n, total) in zip(encoded, got):
        want, n_want = numpy_jsd(original, pruned, e)
        assert jsd == pytest.approx(want, rel=1e-4) and n == n_want and total == len(e.input_ids)
    # truncation that leaves no response token gives NaN, not a crash
    long_prompt = make_record([{"role": "user", "content": "word " * 20},
                               {"role": "assistant", "content": "x"}], "t")
    [(jsd, n, _)] = score_pairs(original, pruned, [encode(long_prompt, tok, "plain", 2)],
                                max_tokens_per_batch=64)
    assert (n == 0 and math.isnan(jsd)) or (n > 0 and jsd >= 0)


def test_scorer_in_a_pipeline(pair, tmp_path):
    from apache_beam.ml.inference.base import RunInference

    from curate.pipeline.run import pipeline_options
    from curate.scorers import make_scorer  # noqa: F401  (the registry imports cleanly)

    original, pruned, tok = pair
    for name, m in (("orig", original), ("pruned", pruned)):
        m.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    scorer = DegradationScorer(model=str(tmp_path / "orig"), pruned_model=str(tmp_path / "pruned"),
                               dtype="float32", device="cpu")
    assert set(scorer.output_columns()) == {"jsd", "jsd_tokens", "jsd_total_tokens"}
    rows = recs()
    expected = {r["id"]: numpy_jsd(original, pruned, encode(r, tok, "plain", 1024))[0] for r in rows}

    def check(got):
        assert sorted(i for i, _ in got) == sorted(expected)
        for i, jsd in got:
            assert jsd == pytest.approx(expected[i], rel=1e-4)

    with beam.Pipeline(options=pipeline_options([])) as p:
        out = (p | beam.Create(rows) | RunInference(scorer.model_handler())
               | beam.Map(lambda r: (r["id"], r["jsd"])))
        assert_that(out, check)


def test_pruned_model_is_required():
    from curate.config import ConfigError

    with pytest.raises(ConfigError, match="pruned_model"):
        DegradationScorer()
