"""Response log-likelihood under a causal LM: the score behind GRAPE (and IFD/perplexity).

For an example encoded by `curate.formatting.encode` (prompt tokens, then response
tokens), the score is sum_t log p(y_t | x, y_<t) over response tokens only, with its mean
(GRAPE's length-normalised score) and the token count.

How it is computed, and why
- Batches are cut by a token budget after sorting by length (`batches_by_token_budget`),
  so padding is small and memory is bounded by (batch size x longest length).
- The transformer body runs once per batch (right padding, attention mask). The LM head
  is applied only to the hidden states that predict response tokens, gathered across the
  batch: a full `model(ids).logits` costs batch x length x vocab floats (for SmolLM2,
  49k floats per token) and a head matmul per prompt token, for nothing.
- Target logit minus logsumexp is taken in float32 over chunks of positions, so the
  chunk of logits never exceeds `max_logit_elements`, whatever the vocabulary.
- Heads: a plain linear head (with or without bias, tied or not), optionally followed by
  the logit transforms transformers models apply after it: `logit_scale` (Cohere,
  multiplies), `logits_scaling` (Granite, divides) and `final_logit_softcapping`
  (Gemma 2/3). A model whose head does anything else is not supported.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import ClassVar, Literal, Optional, Sequence

import pyarrow as pa

from curate.formatting import TEMPLATES, Encoded, encode
from curate.models.lm_head import (DEFAULT_MAX_LOGIT_ELEMENTS, body_and_head, chunk_rows, head_logits,
                                   post_head)
from curate.transforms.base import Scorer
from curate.transforms.handlers import RecordModelHandler

log = logging.getLogger(__name__)

# Token budget per forward pass (batch size x longest length), by device type. On CPU a
# budget of 1 puts every example in a forward of its own: a padded batch needs an attention
# mask, which takes SDPA off its fused causal kernel, and cost 30-50% more CPU per token
# than unpadded single rows with SmolLM2 in bf16 (benchmarks/RESULTS_scorer.md); on a GPU
# batching is what fills the device.
DEFAULT_TOKENS_PER_BATCH = {"cpu": 1, "cuda": 65536}


def batches_by_token_budget(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Indices into `lengths`, grouped so that len(batch) * max(length in batch) <= max_tokens.

    Longest first (a batch that does not fit in memory fails at once, not at the end);
    within a batch the lengths are adjacent in sorted order, so padding is small. An item
    longer than the budget is a batch of its own.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        if current and (len(current) + 1) * longest > max_tokens:
            batches.append(current)
            current = []
        if not current:
            longest = max(int(lengths[i]), 1)
        current.append(i)
    if current:
        batches.append(current)
    return batches


def response_logprobs(model, encoded: Sequence[Encoded], *, pad_token_id: int = 0,
                      max_logit_elements: int = DEFAULT_MAX_LOGIT_ELEMENTS
                      ) -> list[tuple[float, float, int]]:
    """(sum, mean, count) of response-token log-probs for each encoded example, in order.

    One forward pass over the whole list (the caller cuts batches). The mean of an
    example with no response tokens is NaN.
    """
    import torch

    if not encoded:
        return []
    body, head = body_and_head(model)
    transform = post_head(model.config)
    device = head.weight.device
    lengths = [len(e.input_ids) for e in encoded]
    batch, width = len(encoded), max(lengths)

    ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    rows, cols = [], []
    for i, e in enumerate(encoded):
        ids[i, : lengths[i]] = torch.tensor(e.input_ids, dtype=torch.long)
        mask[i, : lengths[i]] = 1
        # position t - 1 predicts token t, for every token t of the response span(s)
        targets_i = e.targets
        rows.extend([i] * len(targets_i))
        cols.extend(t - 1 for t in targets_i)
    rows_t = torch.tensor(rows, dtype=torch.long)
    cols_t = torch.tensor(cols, dtype=torch.long)
    targets = ids[rows_t, cols_t + 1].to(device)

    with torch.inference_mode():
        # No padding -> no mask: SDPA then takes its plain causal path.
        attention_mask = mask.to(device) if min(lengths) < width else None
        hidden = body(input_ids=ids.to(device), attention_mask=attention_mask,
                      use_cache=False).last_hidden_state
        picked = hidden[rows_t.to(device), cols_t.to(device)]  # (positions, d)
        del hidden
        n_positions = picked.shape[0]
        chunk = chunk_rows(head, max_logit_elements)
        token_logprobs = torch.empty(n_positions, dtype=torch.float32, device=device)
        for start in range(0, n_positions, chunk):
            stop = min(start + chunk, n_positions)
            logits = head_logits(head, transform, picked[start:stop])
            target_logit = logits.gather(1, targets[start:stop, None]).squeeze(1)
            token_logprobs[start:stop] = target_logit - torch.logsumexp(logits, dim=-1)
        sums = torch.zeros(batch, dtype=torch.float64, device=device)
        sums.index_add_(0, rows_t.to(device), token_logprobs.double())
    counts = [e.n_response for e in encoded]
    sums_list = sums.cpu().tolist()
    return [(s, s / c if c else float("nan"), c) for s, c in zip(sums_list, counts)]


def score_encoded(model, encoded: Sequence[Encoded], *, max_tokens_per_batch: int,
                  pad_token_id: int = 0, max_logit_elements: int = DEFAULT_MAX_LOGIT_ELEMENTS
                  ) -> list[tuple[float, float, int]]:
    """`response_logprobs` over any number of examples, cut by token budget; input order."""
    results: list = [None] * len(encoded)
    lengths = [len(e.input_ids) for e in encoded]
    for batch in batches_by_token_budget(lengths, max_tokens_per_batch):
        scored = response_logprobs(model, [encoded[i] for i in batch], pad_token_id=pad_token_id,
                                   max_logit_elements=max_logit_elements)
        for i, value in zip(batch, scored):
            results[i] = value
    return results


class _LikelihoodRunner:
    """The loaded model plus everything needed to score a batch of records (worker side)."""

    def __init__(self, scorer: "LikelihoodScorer"):
        from curate.models import load_causal_lm

        self.scorer = scorer
        self.model, self.tokenizer = load_causal_lm(
            scorer.model, device=scorer.device, dtype=scorer.dtype,
            trust_remote_code=scorer.trust_remote_code)
        device_type = self.model.get_output_embeddings().weight.device.type
        self.max_tokens = scorer.max_tokens_per_batch or DEFAULT_TOKENS_PER_BATCH.get(
            device_type, DEFAULT_TOKENS_PER_BATCH["cpu"])
        self.pad_token_id = self.tokenizer.pad_token_id or 0
        self.columns = scorer.column_names()
        self.progress = scorer.progress()

    def score(self, records: list[dict]) -> list[dict]:
        encoded = []
        for record in records:
            try:
                encoded.append(encode(record, self.tokenizer, self.scorer.template,
                                      self.scorer.max_length, self.scorer.include_eos, self.scorer.turns))
            except Exception as err:
                raise ValueError(f"likelihood: cannot encode record {record.get('id')!r}: "
                                 f"{err}") from err
        scores = score_encoded(self.model, encoded, max_tokens_per_batch=self.max_tokens,
                               pad_token_id=self.pad_token_id,
                               max_logit_elements=self.scorer.max_logit_elements)
        c_sum, c_mean, c_n, c_trunc = self.columns
        out = [{**record, c_sum: total, c_mean: mean, c_n: n, c_trunc: e.truncated}
               for record, e, (total, mean, n) in zip(records, encoded, scores)]
        self.progress.add(len(records), sum(len(e.input_ids) for e in encoded))
        return out


@dataclasses.dataclass
class LikelihoodScorer(Scorer):
    """Log-probability of the response given the prompt under a causal LM.

    Adds `logprob_sum` (float64), `logprob_mean` (float64: GRAPE's score),
    `n_response_tokens` (int64) and `truncated` (bool), each name preceded by `prefix`.
    include_eos (default true): the end of the response (EOS for the plain template, the
    chat template's end-of-turn tokens) counts as response tokens, in the sum, the mean
    and the count: "the probability of this response, and of stopping after it". False
    scores the response's text alone, as implementations that do not append EOS do.
    Resources: one model copy per SDK process (or `model_copies` shared ones), plus
    activations for `max_tokens_per_batch` tokens (default: one example per forward on
    CPU, 65536 tokens on CUDA).
    """

    type: ClassVar[str] = "likelihood"

    model: str = "default"
    template: str = "plain"
    turns: Literal["all", "last"] = "all"  # chat template: loss on every assistant turn, or the last
    max_length: int = 2048
    include_eos: bool = True
    max_tokens_per_batch: Optional[int] = None  # None: by device (DEFAULT_TOKENS_PER_BATCH)
    device: str = "auto"
    dtype: str = "auto"
    prefix: str = ""
    trust_remote_code: bool = False
    max_logit_elements: int = DEFAULT_MAX_LOGIT_ELEMENTS
    min_batch_size: int = 32
    max_batch_size: int = 1024
    model_copies: Optional[int] = None  # set (e.g. 1 per GPU) to share across processes

    def __post_init__(self):
        if self.template not in TEMPLATES:
            raise ValueError(f"likelihood: unknown template {self.template!r}; "
                             f"expected one of {', '.join(TEMPLATES)}")
        if self.max_length < 2:
            raise ValueError("likelihood: max_length must be at least 2")

    def column_names(self) -> tuple[str, str, str, str]:
        p = self.prefix
        return (f"{p}logprob_sum", f"{p}logprob_mean", f"{p}n_response_tokens", f"{p}truncated")

    def output_columns(self) -> dict[str, pa.DataType]:
        return dict(zip(self.column_names(), (pa.float64(), pa.float64(), pa.int64(), pa.bool_())))

    def load_runner(self) -> _LikelihoodRunner:
        return _LikelihoodRunner(self)

    def model_handler(self) -> RecordModelHandler:
        return RecordModelHandler(self.load_runner, self.type, min_batch_size=self.min_batch_size,
                                  max_batch_size=self.max_batch_size,
                                  model_copies=self.model_copies)

    def describe(self) -> dict:
        return {"type": self.type, **dataclasses.asdict(self)}
