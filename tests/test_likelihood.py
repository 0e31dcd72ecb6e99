"""Response log-likelihood: the scorer against an independent computation from the
model's full logits, invariance to batching/padding/chunking, and the Beam handler."""

from __future__ import annotations

import gzip
import json
import math
import os
import random

import pytest
import torch

from conftest import make_tiny_lm
from curate.formatting import encode
from curate.records import adapt_qa, make_record
from curate.scorers import make_scorer
from curate.scorers.likelihood import LikelihoodScorer
from curate.models.batching import batches_by_token_budget
from curate.models.logprobs import response_logprobs, score_encoded

TEXTS = [
    ("What is two plus two?", "Two plus two is four."),
    ("Write a function that adds two numbers in Python.", "def add(a, b): return a + b"),
    ("Describe your ship!", "Arr, she be the fastest ship on the seven seas, captain."),
    ("Natalia sold clips to 48 of her friends in April. How many in May?",
     "She sold half as many clips in May: 24. The quick brown fox jumps over the lazy dog. "
     "0123456789 +-*/=()"),
    ("Hi", "Hello."),
    ("The quick brown fox jumps over the lazy dog, says who?", "The fox."),
]


def _records():
    out = []
    for i, (prompt, response) in enumerate(TEXTS):
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        if i % 2:
            messages = [{"role": "system", "content": "Be brief."}] + messages
        out.append(make_record(messages, "test"))
    return out


def reference_logprobs(model, enc):
    """Independent: full logits -> log_softmax -> gather the response tokens."""
    ids = torch.tensor([enc.input_ids])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    targets = ids[0, enc.prompt_len:]
    token = logprobs[enc.prompt_len - 1: -1].gather(1, targets[:, None]).squeeze(1)
    return token.sum().item(), token.mean().item(), len(targets)


def _check_close(got, want, tol=2e-5):
    assert got[2] == want[2]
    assert got[0] == pytest.approx(want[0], rel=tol, abs=tol * 10)
    assert got[1] == pytest.approx(want[1], rel=tol, abs=tol)


@pytest.mark.parametrize("template", ["plain", "chat"])
@pytest.mark.parametrize("tied", [False, True])
def test_matches_full_logits(template, tied):
    model, tokenizer = make_tiny_lm(tie_word_embeddings=tied)
    encoded = [encode(r, tokenizer, template, 512) for r in _records()]
    got = response_logprobs(model, encoded, pad_token_id=tokenizer.pad_token_id)
    for enc, value in zip(encoded, got):
        _check_close(value, reference_logprobs(model, enc))


def test_plain_template_scores_response_and_eos_only(tiny_lm):
    model, tokenizer = tiny_lm
    record = _records()[0]
    enc = encode(record, tokenizer, "plain", 512)
    response_ids = tokenizer(" " + record["response"], add_special_tokens=False)["input_ids"]
    (_, _, n), = response_logprobs(model, [enc])
    assert n == len(response_ids) + 1  # + EOS
    assert enc.input_ids[-1] == tokenizer.eos_token_id


@pytest.mark.parametrize("template", ["plain", "chat"])
def test_include_eos_false_scores_the_text_alone(tiny_lm, tiny_lm_dir, template):
    """The scorer with include_eos false against per-token log-probs from full logits of
    the default encoding: the same tokens less the end (EOS / the end-of-turn token)."""
    model, tokenizer = tiny_lm
    records = _records()
    with_eos = make_scorer({"type": "likelihood", "model": str(tiny_lm_dir), "template": template,
                            "dtype": "float32"}).load_runner().score(records)
    without = make_scorer({"type": "likelihood", "model": str(tiny_lm_dir), "template": template,
                           "dtype": "float32", "include_eos": False}).load_runner().score(records)
    for r, a, b in zip(records, with_eos, without):
        enc = encode(r, tokenizer, template, 2048)
        assert enc.input_ids[-1] == tokenizer.eos_token_id
        ids = torch.tensor([enc.input_ids])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
        token = logprobs[enc.prompt_len - 1:-1].gather(1, ids[0, enc.prompt_len:, None]).squeeze(1)
        assert a["n_response_tokens"] == len(token) and b["n_response_tokens"] == len(token) - 1
        assert a["logprob_sum"] == pytest.approx(token.sum().item(), rel=2e-5, abs=2e-4)
        assert b["logprob_sum"] == pytest.approx(token[:-1].sum().item(), rel=2e-5, abs=2e-4)
        assert b["logprob_mean"] == pytest.approx(token[:-1].mean().item(), rel=2e-5, abs=2e-5)


def test_batching_padding_and_order_do_not_change_scores(tiny_lm):
    model, tokenizer = tiny_lm
    encoded = [encode(r, tokenizer, "plain", 512) for r in _records()] * 2
    random.Random(0).shuffle(encoded)
    singly = [response_logprobs(model, [e])[0] for e in encoded]
    one_batch = response_logprobs(model, encoded)
    longest = max(len(e.input_ids) for e in encoded)
    many_batches = score_encoded(model, encoded, max_tokens_per_batch=longest + 1)
    for single, a, b in zip(singly, one_batch, many_batches):
        _check_close(a, single, tol=1e-4)
        _check_close(b, single, tol=1e-4)


def test_a_single_row_on_cpu_runs_at_a_rounded_width_and_scores_the_same(tiny_lm):
    """One row on CPU: the body sees a width rounded up to CPU_WIDTH_MULTIPLE and no mask
    (right padding after a causal row changes nothing before it); scores equal the
    full-logits reference of the unpadded row."""
    from curate.models.logprobs import CPU_WIDTH_MULTIPLE

    model, tokenizer = tiny_lm
    seen = []
    hook = model.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((kwargs["input_ids"].shape[1], kwargs.get("attention_mask"))),
        with_kwargs=True)
    try:
        for enc in [encode(r, tokenizer, "plain", 512) for r in _records()]:
            got = response_logprobs(model, [enc], pad_token_id=tokenizer.pad_token_id)[0]
            width, mask = seen[-1]
            assert width % CPU_WIDTH_MULTIPLE == 0 and 0 <= width - len(enc.input_ids) < CPU_WIDTH_MULTIPLE
            assert mask is None
            _check_close(got, reference_logprobs(model, enc))
    finally:
        hook.remove()
    assert any(width > 0 for width, _ in seen)


def test_chunked_logits_equal_unchunked(tiny_lm):
    model, tokenizer = tiny_lm
    encoded = [encode(r, tokenizer, "plain", 512) for r in _records()]
    whole = response_logprobs(model, encoded, max_logit_elements=1 << 30)
    # 7 positions' worth of logits at a time (chunk boundaries cross examples)
    chunked = response_logprobs(model, encoded, max_logit_elements=7 * len(tokenizer))
    one_at_a_time = response_logprobs(model, encoded, max_logit_elements=1)
    for a, b, c in zip(whole, chunked, one_at_a_time):
        _check_close(b, a, tol=1e-6)
        _check_close(c, a, tol=1e-6)


def test_final_logit_softcapping_is_applied():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from conftest import make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=8, max_position_embeddings=512, final_logit_softcapping=0.5,
                          pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                          bos_token_id=None, attn_implementation="eager")
    model = Gemma2ForCausalLM(config).eval()
    with torch.no_grad():  # make the cap bite: large logits
        model.lm_head.weight.mul_(50)
    encoded = [encode(r, tokenizer, "plain", 512) for r in _records()[:3]]
    got = response_logprobs(model, encoded, pad_token_id=tokenizer.pad_token_id)
    for enc, value in zip(encoded, got):
        _check_close(value, reference_logprobs(model, enc), tol=1e-4)


@pytest.mark.parametrize("max_tokens", [1, 5, 17, 100, 10_000])
def test_batches_by_token_budget(max_tokens):
    rng = random.Random(max_tokens)
    lengths = [rng.randint(1, 60) for _ in range(200)]
    batches = batches_by_token_budget(lengths, max_tokens)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(lengths)))
    for b in batches:
        assert b
        longest = max(lengths[i] for i in b)
        assert len(b) == 1 or len(b) * longest <= max_tokens
    # longest first, adjacent in sorted order
    firsts = [lengths[b[0]] for b in batches]
    assert firsts == sorted(firsts, reverse=True)


def test_batches_by_token_budget_edges():
    assert batches_by_token_budget([], 10) == []
    assert batches_by_token_budget([50], 10) == [[0]]
    assert batches_by_token_budget([3, 3, 3, 3], 12) == [[0, 1, 2, 3]]
    with pytest.raises(ValueError):
        batches_by_token_budget([1], 0)


def test_truncated_examples_are_flagged(tiny_lm_dir):
    scorer = LikelihoodScorer(model=str(tiny_lm_dir), max_length=12, prefix="base_")
    runner = scorer.load_runner()
    records = _records()
    out = runner.score(records)
    assert [r["id"] for r in out] == [r["id"] for r in records]
    for r in out:
        assert set(scorer.output_columns()) <= set(r)
        assert isinstance(r["base_n_response_tokens"], int)
        assert isinstance(r["base_truncated"], bool)
    assert any(r["base_truncated"] for r in out)
    assert all(r["base_n_response_tokens"] <= 12 for r in out)
    assert "logprob_mean" not in out[0]


def test_make_scorer_options():
    scorer = make_scorer({"type": "likelihood", "model": "x", "template": "chat", "prefix": "p_"})
    assert isinstance(scorer, LikelihoodScorer)
    assert list(scorer.output_columns()) == ["p_logprob_sum", "p_logprob_mean",
                                             "p_n_response_tokens", "p_truncated"]
    with pytest.raises(ValueError, match="unknown option.*batch_sise.*colour"):
        make_scorer({"type": "likelihood", "batch_sise": 3, "colour": "red"})
    with pytest.raises(ValueError, match="unknown scorer 'perplexity'; known: .*likelihood"):
        make_scorer({"type": "perplexity"})
    with pytest.raises(ValueError, match="template"):
        make_scorer({"type": "likelihood", "template": "alpaca"})


def test_handler_in_a_beam_pipeline(tiny_lm, tiny_lm_dir):
    """RunInference end to end on the in-process runner (FnApiRunner: the DirectRunner
    would first try Prism, which downloads a job-server binary)."""
    import apache_beam as beam
    from apache_beam.ml.inference.base import RunInference
    from apache_beam.testing.util import assert_that

    model, tokenizer = tiny_lm
    records = _records()
    expected = {r["id"]: reference_logprobs(model, encode(r, tokenizer, "chat", 2048))
                for r in records}
    scorer = make_scorer({"type": "likelihood", "model": str(tiny_lm_dir), "template": "chat",
                          "max_tokens_per_batch": 64, "min_batch_size": 2, "max_batch_size": 4})

    def check(rows):
        assert sorted(r["id"] for r in rows) == sorted(expected)
        for r in rows:
            want = expected[r["id"]]
            got = (r["logprob_sum"], r["logprob_mean"], r["n_response_tokens"])
            _check_close(got, want, tol=1e-4)
            assert r["truncated"] is False
            assert r["prompt"] and r["messages"]  # the record travels through

    with beam.Pipeline(runner="FnApiRunner") as p:
        scored = p | beam.Create(records) | RunInference(scorer.model_handler())
        assert_that(scored, check)


@pytest.mark.integration
def test_smollm2_matches_direct_computation(shared_data):
    from curate.models import load_causal_lm

    with gzip.open(shared_data / "gsm8k_train.jsonl.gz", "rt") as handle:
        rows = [json.loads(next(handle)) for _ in range(3)]
    records = [rec for row in rows for rec in adapt_qa(row, {}, "gsm8k")]
    model, tokenizer = load_causal_lm("default", dtype="float32")
    runner = LikelihoodScorer(model="default", dtype="float32").load_runner()
    out = runner.score(records)
    for record, scored in zip(records, out):
        enc = encode(record, tokenizer, "plain", 2048)
        want = reference_logprobs(model, enc)
        _check_close((scored["logprob_sum"], scored["logprob_mean"],
                      scored["n_response_tokens"]), want, tol=1e-4)
        assert -5 < scored["logprob_mean"] < 0 and math.isfinite(scored["logprob_sum"])


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("CURATE_SLOW") != "1", reason="slow: set CURATE_SLOW=1")
def test_handler_pickles_across_processes(tiny_lm, tiny_lm_dir, tmp_path):
    """--direct_running_mode=multi_processing: the handler travels to worker processes and
    each loads its own model, as on Dataflow."""
    import apache_beam as beam
    from apache_beam.ml.inference.base import RunInference
    from apache_beam.options.pipeline_options import PipelineOptions

    model, tokenizer = tiny_lm
    records = _records()
    scorer = LikelihoodScorer(model=str(tiny_lm_dir), min_batch_size=2, max_batch_size=3)
    options = PipelineOptions(["--runner=FnApiRunner", "--direct_running_mode=multi_processing",
                               "--direct_num_workers=2"])
    with beam.Pipeline(options=options) as p:
        (p | beam.Create(records) | RunInference(scorer.model_handler())
         | beam.Map(lambda r: json.dumps([r["id"], r["logprob_sum"], r["logprob_mean"],
                                          r["n_response_tokens"]]))
         | beam.io.WriteToText(str(tmp_path / "scores")))
    rows = [json.loads(line) for f in tmp_path.glob("scores*") for line in f.read_text().splitlines()]
    got = {row[0]: tuple(row[1:]) for row in rows}
    assert sorted(got) == sorted(r["id"] for r in records)
    for r in records:
        _check_close(got[r["id"]], reference_logprobs(model, encode(r, tokenizer, "plain", 2048)),
                     tol=1e-4)
