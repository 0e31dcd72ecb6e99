"""Capability degradation: how far pruning moved a model's predictions on an example.

PASER (He et al., 2025, "PASER: Post-training Data Selection for Efficient Pruned
Large Language Model Recovery", code BokwaiHo/PASER; docs/methods.md "PASER"): the degradation of an example is the
Jensen-Shannon divergence between the original model's and the pruned model's
next-token distributions,

    JSD(P || Q) = 1/2 KL(P || M) + 1/2 KL(Q || M),   M = (P + Q) / 2,

taken at every position that predicts a response token and *averaged* over those
positions (`jsd`). Units: nats (natural log), so 0 <= jsd <= ln 2 ~ 0.693.
Departures from the authors' code, both following docs/methods.md:
- the code sums over positions, which makes long examples look more degraded; we
  average (the sum is jsd * jsd_tokens if wanted);
- the code feeds the instruction only; we score the response tokens given the prompt,
  formatted by `curate.formatting.encode` like every other score (template "plain").

Columns: `jsd` (float64, nats; NaN when truncation left no response token),
`jsd_tokens` (int64: the response tokens averaged over; not `n_response_tokens`, which
the likelihood scorer writes), `jsd_total_tokens` (int64: prompt + response tokens as
scored, the training cost PASER's IES divides by).

How it is computed (`degradation_batch`)
- Both models live in one worker and see the same right-padded batch (batches formed
  by a token budget after sorting by length). Each runs its decoder once; only the last
  hidden states are kept, never batch x length x vocab logits.
- The response positions of the whole batch are gathered into one [N, d] array per
  model and pushed through each LM head in chunks of max_logit_elements / vocab rows
  (default 2^22 logits: 85 rows for SmolLM2's 49k vocabulary), in float32 whatever the
  model dtype; log-softmax, then the JSD from log-probabilities with log M =
  logaddexp(log P, log Q) - ln 2, reduced in float64. Peak extra memory is about six
  chunk-sized float32 arrays (~100 MB at the default), never batch x length x vocab.
- The head is the model's output embedding, applied as the likelihood scorer does
  (bias, then the logit transforms transformers applies after it: Cohere's scale,
  Granite's scaling, Gemma's soft-capping).
Resources: two model copies on one device (CUDA when present, else CPU), activations of
one batch (max_tokens_per_batch tokens) per model.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Sequence

import pyarrow as pa

from curate.config import ConfigError
from curate.formatting import Encoded
from curate.models.batching import map_token_batches, pad_batch, pad_id, predicting_positions
from curate.models.lm_head import body_and_head, post_head
from curate.scorers.base import CausalLMScorer

LN2 = math.log(2.0)
MAX_LOGITS_PER_CHUNK = 1 << 22


# ------------------------------------------------------------------ pure math
def jsd_from_logits(logits_p, logits_q):
    """Per-row Jensen-Shannon divergence (nats, float64) between softmax(p) and softmax(q).

    logits_p, logits_q: [N, V]. Computed in float32 from log-probabilities, reduced in
    float64; a zero-probability entry contributes 0.
    """
    import torch

    lp = torch.log_softmax(logits_p.float(), dim=-1)
    lq = torch.log_softmax(logits_q.float(), dim=-1)
    lm = torch.logaddexp(lp, lq) - LN2
    p, q = lp.exp(), lq.exp()
    kl_p = torch.where(p > 0, p * (lp - lm), torch.zeros_like(p)).sum(-1, dtype=torch.float64)
    kl_q = torch.where(q > 0, q * (lq - lm), torch.zeros_like(q)).sum(-1, dtype=torch.float64)
    return (0.5 * (kl_p + kl_q)).clamp_min(0.0)


class LogitHead:
    """hidden [N, d] -> float32 logits [N, V] for one model, as its forward computes them
    (the head's matmul in float32 from a float32 copy of the weight, then the model's
    logit transforms: Cohere scale, Granite scaling, Gemma soft-capping)."""

    def __init__(self, model):
        import torch

        self.body, head = body_and_head(model)
        w = head.weight.detach()
        # one float32 copy of the head per model (none when it already is float32)
        self.weight = w if w.dtype == torch.float32 else w.float()
        bias = getattr(head, "bias", None)
        self.bias = None if bias is None else bias.detach().float()
        self.transform = post_head(model.config)

    def __call__(self, hidden):
        z = hidden.float() @ self.weight.T
        if self.bias is not None:
            z = z + self.bias
        return z if self.transform is None else self.transform(z)


def degradation_batch(original, pruned, encoded: Sequence[Encoded], pad_token_id: int = 0,
                      heads: tuple[LogitHead, LogitHead] | None = None,
                      max_logit_elements: int = MAX_LOGITS_PER_CHUNK) -> list[tuple[float, int, int]]:
    """(mean JSD over response positions, response tokens, total tokens) per example."""
    import torch

    if not encoded:
        return []
    head_o, head_p = heads or (LogitHead(original), LogitHead(pruned))
    vocab = head_o.weight.shape[0]
    if head_p.weight.shape[0] != vocab:
        raise ValueError(f"the original and pruned models have different vocabularies "
                         f"({vocab} vs {head_p.weight.shape[0]})")
    chunk = max(1, max_logit_elements // vocab)
    device = next(original.parameters()).device
    ids, mask = pad_batch(encoded, pad_token_id)
    rows, cols = predicting_positions(encoded)
    rows_t = torch.tensor(rows, dtype=torch.long, device=device)
    cols_t = torch.tensor(cols, dtype=torch.long, device=device)
    owner_t = torch.tensor(rows, dtype=torch.long)
    totals = torch.zeros(len(encoded), dtype=torch.float64)
    with torch.inference_mode():
        ids_d = ids.to(device)
        # no padding -> no mask: SDPA then takes its plain causal path
        mask_d = mask.to(device) if int(mask.sum()) < mask.numel() else None
        h_o = head_o.body(input_ids=ids_d, attention_mask=mask_d, use_cache=False).last_hidden_state
        h_o = h_o[rows_t, cols_t]
        h_p = head_p.body(input_ids=ids_d, attention_mask=mask_d, use_cache=False).last_hidden_state
        h_p = h_p[rows_t, cols_t]
        for a in range(0, len(rows), chunk):
            b = min(a + chunk, len(rows))
            per_pos = jsd_from_logits(head_o(h_o[a:b]), head_p(h_p[a:b])).cpu()
            totals.index_add_(0, owner_t[a:b], per_pos)
    out = []
    for i, e in enumerate(encoded):
        n = e.n_response
        out.append((float(totals[i]) / n if n > 0 else math.nan, n, len(e.input_ids)))
    return out


# ------------------------------------------------------------------ Beam wrapper
def score_pairs(original, pruned, encoded: Sequence[Encoded], *, max_tokens_per_batch: int,
                pad_token_id: int = 0, heads: tuple[LogitHead, LogitHead] | None = None,
                max_logit_elements: int = MAX_LOGITS_PER_CHUNK) -> list[tuple[float, int, int]]:
    """`degradation_batch` over any number of examples, cut by token budget; input order."""
    heads = heads or (LogitHead(original), LogitHead(pruned))
    return map_token_batches(encoded, [len(e.input_ids) for e in encoded], max_tokens_per_batch,
                             lambda batch: degradation_batch(original, pruned, batch, pad_token_id, heads,
                                                             max_logit_elements=max_logit_elements))


@dataclasses.dataclass
class LoadedPair:
    """Both models, the tokenizer and both heads, loaded once per worker."""

    original: object
    pruned: object
    tokenizer: object
    heads: tuple
    max_tokens: int
    pad_token_id: int


@dataclasses.dataclass
class DegradationScorer(CausalLMScorer):
    """Per-example JSD between the original and a pruned model (docs/methods.md "PASER").

    Options: pruned_model (required: a path or id, e.g. made by `curate prune`), model
    ("default" = the embedded SmolLM2-135M-Instruct, or an HF id/path), template
    ("plain" | "chat"), max_length, max_tokens_per_batch (padded tokens per forward of
    each model; None: one example per forward on CPU, 65536 tokens on CUDA), device and
    dtype ("auto"), max_logit_elements (float32 logits per JSD chunk per model, default 2^22).
    Resources: both models on one device per worker (or `model_copies` shared ones).
    """

    type: ClassVar[str] = "degradation"

    pruned_model: str = ""
    max_logit_elements: int = MAX_LOGITS_PER_CHUNK

    def __post_init__(self):
        if not self.pruned_model:
            raise ConfigError("degradation: 'pruned_model' is required (a path or id; make one with "
                              "`curate prune --method wanda --calibration POOL --output DIR`)")
        super().__post_init__()

    def output_columns(self) -> dict[str, pa.DataType]:
        return {"jsd": pa.float64(), "jsd_tokens": pa.int64(), "jsd_total_tokens": pa.int64()}

    def load(self) -> LoadedPair:
        original, tokenizer = self.load_lm(self.model)
        pruned, pruned_tok = self.load_lm(self.pruned_model)
        if len(pruned_tok) != len(tokenizer):
            raise ValueError(f"degradation: the pruned model's tokenizer ({len(pruned_tok)} tokens) differs "
                             f"from the original's ({len(tokenizer)}); prune the same model")
        heads = (LogitHead(original), LogitHead(pruned))
        return LoadedPair(original, pruned, tokenizer, heads, self.token_budget(heads[0].weight.device.type),
                          pad_id(tokenizer))

    def score_batch(self, m: LoadedPair, records: list[dict]) -> tuple[list[dict], int]:
        encoded = self.encode_all(records, m.tokenizer)
        scores = score_pairs(m.original, m.pruned, encoded, max_tokens_per_batch=m.max_tokens,
                             pad_token_id=m.pad_token_id, heads=m.heads, max_logit_elements=self.max_logit_elements)
        return ([{**r, "jsd": float(j), "jsd_tokens": int(n), "jsd_total_tokens": int(t)}
                 for r, (j, n, t) in zip(records, scores)], sum(len(e.input_ids) for e in encoded))

    def describe(self) -> dict:
        return {**super().describe(), "units": "nats, mean over response tokens"}
