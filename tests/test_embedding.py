"""Sentence embeddings: equal to a hand-written masked mean pool, unit norm, batch-invariant."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from curate.records import make_record
from curate.scorers import make_scorer
from curate.scorers.embedding import EmbeddingScorer
from curate.scorers.embedding import embed_texts, record_text

TEXTS = [
    "What is two plus two?",
    "Write a function that adds two numbers in Python. def add(a, b): return a + b",
    "Arr, she be the fastest ship on the seven seas.",
    "Hi",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many in May.",
]


def hand_mean_pool(model, tokenizer, text, max_length=256):
    batch = tokenizer([text], truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state[0]
    mask = batch["attention_mask"][0].float()[:, None]
    pooled = (hidden * mask).sum(0) / mask.sum()
    return (pooled / pooled.norm()).numpy()


def test_embedding_equals_hand_mean_pool(tiny_bert_dir):
    from curate.models import load_embedder

    model, tokenizer = load_embedder(str(tiny_bert_dir), dtype="float32")
    want = np.stack([hand_mean_pool(model, tokenizer, t) for t in TEXTS])
    one_batch = embed_texts(model, tokenizer, TEXTS)
    many_batches = embed_texts(model, tokenizer, TEXTS, max_tokens_per_batch=8)
    assert one_batch.dtype == np.float32 and one_batch.shape == (len(TEXTS), 32)
    np.testing.assert_allclose(one_batch, want, atol=2e-5)
    np.testing.assert_allclose(many_batches, want, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(one_batch, axis=1), 1.0, atol=1e-5)
    assert embed_texts(model, tokenizer, []).shape == (0, 32)


def test_truncation_to_max_length(tiny_bert_dir):
    from curate.models import load_embedder

    model, tokenizer = load_embedder(str(tiny_bert_dir), dtype="float32")
    long_text = " ".join(TEXTS * 20)
    got = embed_texts(model, tokenizer, [long_text], max_length=16)
    np.testing.assert_allclose(got[0], hand_mean_pool(model, tokenizer, long_text, 16), atol=2e-5)


def test_record_text_fields():
    record = make_record([{"role": "user", "content": "P"},
                          {"role": "assistant", "content": "R"}], "t")
    assert record_text(record, "prompt") == "P"
    assert record_text(record, "response") == "R"
    assert record_text(record, "prompt_response") == "P\n\nR"
    with pytest.raises(ValueError, match="field"):
        make_scorer({"type": "embedding", "field": "instruction"})


def test_runner_adds_the_column(tiny_bert_dir):
    records = [make_record([{"role": "user", "content": t},
                            {"role": "assistant", "content": t[::-1]}], "t") for t in TEXTS]
    scorer = make_scorer({"type": "embedding", "model": str(tiny_bert_dir), "field": "prompt",
                          "column": "emb_prompt"})
    assert isinstance(scorer, EmbeddingScorer)
    assert list(scorer.output_columns()) == ["emb_prompt"]
    runner = scorer.load_runner()
    out = runner.score(records)
    assert [r["id"] for r in out] == [r["id"] for r in records]
    # vectors travel between steps as float32 arrays, not lists of Python floats
    assert all(isinstance(r["emb_prompt"], np.ndarray) and r["emb_prompt"].dtype == np.float32 for r in out)
    vectors = np.array([r["emb_prompt"] for r in out], dtype=np.float32)
    assert vectors.shape == (len(TEXTS), 32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # the embedding of the prompt field alone, whatever the response
    model_vectors = embed_texts(runner.loaded.model, runner.loaded.tokenizer, TEXTS)
    np.testing.assert_allclose(vectors, model_vectors, atol=2e-5)


@pytest.mark.integration
def test_minilm_embedding_shape_and_norm():
    records = [make_record([{"role": "user", "content": t},
                            {"role": "assistant", "content": "ok"}], "t") for t in TEXTS]
    runner = EmbeddingScorer(model="minilm").load_runner()
    out = runner.score(records)
    vectors = np.array([r["embedding"] for r in out], dtype=np.float32)
    assert vectors.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    # a trained model: a paraphrase is nearer than an unrelated sentence
    a, b, c = embed_texts(runner.loaded.model, runner.loaded.tokenizer, ["What is two plus two?", "What is 2 + 2?",
                                                           "Arr, she be the fastest ship at sea."])
    assert a @ b > a @ c + 0.2
