"""Sentence embeddings: attention-masked mean of the encoder's last hidden states,
L2-normalised (the sentence-transformers recipe for all-MiniLM-L6-v2, the model PASER
uses and our default). Diversity clustering and PASER consume the `embedding` column.

Which text is embedded (`field`): "prompt", "response", or "prompt_response" (default;
the prompt, a blank line, the response: what the Diversify-and-Conquer paper embeds; its
released code embeds the user turns only, which is `field: prompt`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Sequence

import numpy as np
import pyarrow as pa

from curate.models.batching import batches_by_token_budget
from curate.scorers.base import ModelScorer

FIELDS = ("prompt", "response", "prompt_response")


def record_text(record: dict, field: str) -> str:
    if field == "prompt":
        return record["prompt"]
    if field == "response":
        return record["response"]
    if field == "prompt_response":
        return f"{record['prompt']}\n\n{record['response']}"
    raise ValueError(f"unknown embedding field {field!r}; expected one of {', '.join(FIELDS)}")


def mean_pool(last_hidden_state, attention_mask):
    """Masked mean over the sequence, L2-normalised, float32: (batch, dim)."""
    import torch

    hidden = last_hidden_state.float()
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
    return torch.nn.functional.normalize(pooled, p=2, dim=-1)


def embed_texts(model, tokenizer, texts: Sequence[str], *, max_length: int = 256,
                max_tokens_per_batch: int = 16384) -> np.ndarray:
    """Unit-norm embeddings of `texts`, (len(texts), dim) float32, in input order."""
    import torch

    if not texts:
        return np.zeros((0, model.config.hidden_size), dtype=np.float32)
    encodings = tokenizer(list(texts), truncation=True, max_length=max_length)
    features = [{k: encodings[k][i] for k in encodings.keys()} for i in range(len(texts))]
    lengths = [len(f["input_ids"]) for f in features]
    device = next(model.parameters()).device
    out = None
    for batch in batches_by_token_budget(lengths, max_tokens_per_batch):
        padded = tokenizer.pad([features[i] for i in batch], return_tensors="pt")
        padded = {k: v.to(device) for k, v in padded.items()}
        with torch.inference_mode():
            hidden = model(**padded).last_hidden_state
            vectors = mean_pool(hidden, padded["attention_mask"]).cpu().numpy()
        if out is None:
            out = np.empty((len(texts), vectors.shape[1]), dtype=np.float32)
        out[batch] = vectors
    return out


@dataclasses.dataclass
class LoadedEncoder:
    model: object
    tokenizer: object
    max_tokens: int


@dataclasses.dataclass
class EmbeddingScorer(ModelScorer):
    """Adds `column` (default `embedding`): list<float32> in the output, unit L2 norm; a
    float32 NumPy array between steps."""

    type: ClassVar[str] = "embedding"
    TOKENS_PER_BATCH: ClassVar[dict[str, int]] = {"cpu": 16384, "cuda": 131072}

    model: str = "minilm"
    field: str = "prompt_response"
    max_length: int = 256
    column: str = "embedding"

    def __post_init__(self):
        if self.field not in FIELDS:
            raise ValueError(f"embedding: unknown field {self.field!r}; "
                             f"expected one of {', '.join(FIELDS)}")

    def output_columns(self) -> dict[str, pa.DataType]:
        return {self.column: pa.list_(pa.float32())}

    def load(self) -> LoadedEncoder:
        model, tokenizer = self.load_encoder(self.model)
        return LoadedEncoder(model, tokenizer, self.token_budget(next(model.parameters()).device.type))

    def score_batch(self, enc: LoadedEncoder, records: list[dict]) -> tuple[list[dict], int]:
        texts = [record_text(r, self.field) for r in records]
        vectors = embed_texts(enc.model, enc.tokenizer, texts, max_length=self.max_length,
                              max_tokens_per_batch=enc.max_tokens)
        # one float32 array per row (a copy: a view would keep the whole batch alive)
        return [{**record, self.column: vector.copy()} for record, vector in zip(records, vectors)], 0
