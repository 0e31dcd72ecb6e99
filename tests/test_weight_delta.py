"""DON/NOD closed form against a real backward pass on tiny models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny_lm
from curate.formatting import encode, truncate
from curate.scorers.weight_delta import (
    WeightDeltaScorer, don_nod, don_nod_batch, weight_norm,
)

RECORDS = [
    {"prompt": "What is two plus two?", "response": "Two plus two is four."},
    {"prompt": "Write a function that adds two numbers in Python.",
     "response": "def add(a, b): return a + b"},
    {"prompt": "Describe your ship!", "response": "Arr, she be the fastest ship on the seven seas."},
    {"prompt": "Natalia sold clips to 48 of her friends in April.",
     "response": "Then she sold half as many clips in May, so 24 in May and 72 altogether."},
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: OpenMP's thread hand-offs cost more than the math on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


ETAS = [1e-6, 1e-4, 1e-2, 3.0, 300.0]  # 300: eta^2 ||G||^2 dominates, the norm grows: DON > 0


def _records():
    return [{**r, "id": f"r{i}", "messages": [{"role": "user", "content": r["prompt"]},
                                             {"role": "assistant", "content": r["response"]}]}
            for i, r in enumerate(RECORDS)]


@pytest.fixture(scope="module")
def untied():
    return make_tiny_lm(tie_word_embeddings=False, seed=1)


@pytest.fixture(scope="module")
def tied():
    return make_tiny_lm(tie_word_embeddings=True, seed=2)


def _hidden(model, enc):
    ids = torch.tensor([enc.input_ids])
    with torch.no_grad():
        hs = model.get_decoder()(input_ids=ids).last_hidden_state[0]
    P = enc.prompt_len
    return hs[P - 1:-1], ids[0, P:]


def _reference(W, G, eta):
    """DON = ||W - eta G|| - ||W|| (new minus old) and NOD = ||eta G||, in float64 from the
    autograd gradient."""
    W64, G64 = W.detach().double(), G.double()
    return float((W64 - eta * G64).norm() - W64.norm()), float((eta * G64).norm())


def _head_grad_full_backward(model, enc):
    """G from a real loss.backward() through the whole (untied) model."""
    model.zero_grad(set_to_none=True)
    ids = torch.tensor([enc.input_ids])
    P = enc.prompt_len
    logits = model(input_ids=ids).logits[0]
    loss = F.cross_entropy(logits[P - 1:-1], ids[0, P:])  # mean over response tokens
    loss.backward()
    G = model.get_output_embeddings().weight.grad.detach().clone()
    model.zero_grad(set_to_none=True)
    return G


def _head_grad_detached(model, enc):
    """G through the head path only: hidden states detached, head weight a leaf copy."""
    h, y = _hidden(model, enc)
    W = model.get_output_embeddings().weight.detach().clone().requires_grad_(True)
    F.cross_entropy(h @ W.T, y).backward()
    return W.grad


def _close(got, want, rtol=2e-5, atol=1e-12):
    assert got == pytest.approx(want, rel=rtol, abs=atol), (got, want)


def test_matches_autograd_untied(untied):
    model, tok = untied
    W = model.get_output_embeddings().weight
    Wn = weight_norm(W)
    assert Wn == pytest.approx(float(W.detach().double().norm()), rel=1e-12)
    for rec in _records():
        enc = encode(rec, tok)
        G = _head_grad_full_backward(model, enc)
        h, y = _hidden(model, enc)
        for eta in ETAS:
            don, nod = don_nod(h, y, W, eta, Wn)
            ref_don, ref_nod = _reference(W, G, eta)
            _close(nod, ref_nod)
            # the float64 reference itself is only as good as the float32 gradient
            _close(don, ref_don, rtol=1e-4, atol=1e-13 * Wn)
    assert don > 0  # eta = 300 overshoots: the step grows the norm


def test_matches_autograd_tied_head_path_only(tied):
    model, tok = tied
    W = model.get_output_embeddings().weight
    assert W is model.get_input_embeddings().weight
    Wn = weight_norm(W)
    enc = encode(_records()[3], tok)
    G = _head_grad_detached(model, enc)
    # the full backward also collects the embedding path: a different matrix
    model.zero_grad(set_to_none=True)
    ids = torch.tensor([enc.input_ids])
    F.cross_entropy(model(input_ids=ids).logits[0, enc.prompt_len - 1:-1],
                    ids[0, enc.prompt_len:]).backward()
    assert not torch.allclose(W.grad, G, atol=1e-6)
    model.zero_grad(set_to_none=True)
    h, y = _hidden(model, enc)
    for eta in ETAS:
        don, nod = don_nod(h, y, W, eta, Wn)
        ref_don, ref_nod = _reference(W, G, eta)
        _close(nod, ref_nod)
        _close(don, ref_don, rtol=1e-4, atol=1e-13 * Wn)


def test_stable_don_keeps_digits_at_small_eta(untied):
    """||W'|| - ||W|| subtracted in float32 loses everything at eta = 1e-7; ours does not."""
    model, tok = untied
    W = model.get_output_embeddings().weight
    enc = encode(_records()[0], tok)
    G = _head_grad_full_backward(model, enc)
    h, y = _hidden(model, enc)
    eta = 1e-7
    ref_don, _ = _reference(W, G, eta)
    don, _ = don_nod(h, y, W, eta)
    naive = float((W.detach() - eta * G).norm() - W.detach().norm())  # float32
    assert abs(don - ref_don) < 1e-4 * abs(ref_don)
    assert abs(naive - ref_don) > 0.1 * abs(ref_don)


def test_confident_predictions_keep_precision():
    """p[y] ~ 1 - 1e-6: the (p - e) Gram must not cancel to noise. Float64 autograd reference."""
    g = torch.Generator().manual_seed(0)
    T, d, V = 12, 16, 50
    W = torch.randn(V, d, generator=g)
    H = torch.randn(T, d, generator=g) * 30.0
    y = (H @ W.T).argmax(dim=1)
    y[:2] = torch.tensor([3, 7])  # a couple of surprising tokens too
    W64 = W.double().requires_grad_(True)
    F.cross_entropy(H.double() @ W64.T, y).backward()
    G = W64.grad
    for eta in [1e-4, 1e-1]:
        don, nod = don_nod(H, y, W, eta)
        ref_don = float((W.double() - eta * G).norm() - W.double().norm())
        _close(nod, float(eta * G.norm()), rtol=1e-5)
        _close(don, ref_don, rtol=1e-4)
    # every token confident (top-2 logit margin > 15): ||G|| ~ 1e-6 and still right
    Z = H @ W.T
    top2 = Z.topk(2, dim=1).values
    sure = (top2[:, 0] - top2[:, 1]) > 15
    assert sure.sum() >= 6
    Hc, yc = H[sure], Z[sure].argmax(dim=1)
    W64 = W.double().requires_grad_(True)
    F.cross_entropy(Hc.double() @ W64.T, yc).backward()
    ref = float(W64.grad.norm())
    assert ref < 1e-4
    _, nod = don_nod(Hc, yc, W, 1.0)
    _close(nod, ref, rtol=1e-3)


def test_chunked_equals_unchunked(untied):
    model, tok = untied
    W = model.get_output_embeddings().weight
    enc = encode(_records()[3], tok)
    h, y = _hidden(model, enc)
    assert h.shape[0] > 10
    whole = don_nod(h, y, W, 1e-2, vocab_chunk=W.shape[0], time_chunk=h.shape[0])
    for vc, tc in [(37, 10_000), (W.shape[0], 4), (37, 5)]:
        part = don_nod(h, y, W, 1e-2, vocab_chunk=vc, time_chunk=tc)
        _close(part[0], whole[0], rtol=1e-6)
        _close(part[1], whole[1], rtol=1e-6)


def test_batch_equals_one_by_one(untied):
    model, tok = untied
    encs = [encode(r, tok) for r in _records()]
    encs.append(truncate([5, 6, 7], [8], 16))  # a one-token response
    assert len({len(e.input_ids) for e in encs}) > 2
    batched = don_nod_batch(model, encs, 1e-3, pad_token_id=tok.pad_token_id)
    for e, (don, nod, n) in zip(encs, batched):
        single = don_nod_batch(model, [e], 1e-3)[0]
        assert n == e.n_response == single[2]
        _close(don, single[0], rtol=1e-4)
        _close(nod, single[1], rtol=1e-4)


def test_empty_response_is_no_step(untied):
    model, _ = untied
    W = model.get_output_embeddings().weight
    assert don_nod(torch.zeros(0, W.shape[1]), torch.zeros(0, dtype=torch.long), W, 1e-4) == (0.0, 0.0)


def test_runner_adds_columns_in_order(untied):
    model, tok = untied
    scorer = WeightDeltaScorer(eta=1e-3, max_length=64, max_tokens_per_batch=60)
    assert set(scorer.output_columns()) == {"don", "nod", "n_response_tokens"}
    loaded = scorer.loaded_from(model, tok)
    assert loaded.W_norm == pytest.approx(weight_norm(model.get_output_embeddings().weight))
    recs = _records()
    out, tokens = scorer.score_batch(loaded, recs)
    assert tokens == sum(len(encode(r, tok, max_length=64).input_ids) for r in recs)
    assert [r["id"] for r in out] == [r["id"] for r in recs]
    expect = don_nod_batch(model, [encode(r, tok, max_length=64) for r in recs], 1e-3)
    for r, (don, nod, n) in zip(out, expect):
        assert r["n_response_tokens"] == n and isinstance(r["n_response_tokens"], int)
        _close(r["don"], don, rtol=1e-4)
        _close(r["nod"], nod, rtol=1e-4)
    with pytest.raises(ValueError):
        WeightDeltaScorer(eta=0)


def test_run_inference_in_a_pipeline(tiny_lm, tiny_lm_dir):
    """The scorer's handler in RunInference, loading the saved tiny model by path."""
    import apache_beam as beam
    from apache_beam.ml.inference.base import RunInference
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner
    from apache_beam.testing.util import assert_that

    model, tok = tiny_lm
    scorer = WeightDeltaScorer(model=str(tiny_lm_dir), eta=1e-4, max_length=64,
                               device="cpu", dtype="float32")
    recs = _records()
    want = {r["id"]: s for r, s in zip(
        recs, don_nod_batch(model, [encode(r, tok, max_length=64) for r in recs], 1e-4))}

    def check(rows):
        assert sorted(r["id"] for r in rows) == sorted(want)
        for r in rows:
            don, nod, n = want[r["id"]]
            assert r["n_response_tokens"] == n
            assert math.isclose(r["don"], don, rel_tol=1e-4)
            assert math.isclose(r["nod"], nod, rel_tol=1e-4)

    with beam.Pipeline(runner=FnApiRunner()) as p:
        out = p | beam.Create(recs) | RunInference(scorer.model_handler())
        assert_that(out, check)
