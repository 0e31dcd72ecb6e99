"""Response-token log-probabilities under a causal LM: the one implementation behind the
likelihood, IFD and trajectory scorers.

- The transformer body runs once per batch (right padding, a mask only when padded). On
  CPU a batch of one row is padded to a multiple of CPU_WIDTH_MULTIPLE tokens, without a
  mask (causal attention: no real position sees the padding after it): oneDNN builds a
  matmul kernel per shape, and a few widths cost less than one per row length (as in the
  trainer, `curate.train.data.collate`). The
  LM head is applied only to the hidden states that predict response tokens, gathered
  across the batch: a full `model(ids).logits` costs batch x length x vocab floats (for
  SmolLM2, 49k floats per token) and a head matmul per prompt token, for nothing.
- Target logit minus logsumexp is taken in float32 over chunks of positions, so the
  chunk of logits never exceeds `max_logit_elements`, whatever the vocabulary.
- Heads: see `curate.models.lm_head` (plain linear heads and the transforms applied after).
"""

from __future__ import annotations

from typing import Sequence

from curate.models.batching import map_token_batches, mask_if_padded, pad_batch, predicting_positions
from curate.models.lm_head import DEFAULT_MAX_LOGIT_ELEMENTS, body_and_head, chunk_rows, head_logits, post_head

CPU_WIDTH_MULTIPLE = 32


def response_logprobs(model, encoded: Sequence, *, pad_token_id: int = 0,
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
    one_row_on_cpu = device.type == "cpu" and len(encoded) == 1
    ids, mask = pad_batch(encoded, pad_token_id, CPU_WIDTH_MULTIPLE if one_row_on_cpu else 1)
    rows, cols = predicting_positions(encoded)
    rows_t = torch.tensor(rows, dtype=torch.long)
    cols_t = torch.tensor(cols, dtype=torch.long)
    targets = ids[rows_t, cols_t + 1].to(device)

    with torch.inference_mode():
        attention_mask = None if one_row_on_cpu else mask_if_padded(mask)
        hidden = body(input_ids=ids.to(device),
                      attention_mask=None if attention_mask is None else attention_mask.to(device),
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
        sums = torch.zeros(len(encoded), dtype=torch.float64, device=device)
        sums.index_add_(0, rows_t.to(device), token_logprobs.double())
    counts = [e.n_response for e in encoded]
    return [(s, s / c if c else float("nan"), c) for s, c in zip(sums.cpu().tolist(), counts)]


def score_encoded(model, encoded: Sequence, *, max_tokens_per_batch: int, pad_token_id: int = 0,
                  max_logit_elements: int = DEFAULT_MAX_LOGIT_ELEMENTS) -> list[tuple[float, float, int]]:
    """`response_logprobs` over any number of examples, cut by token budget; input order."""
    return map_token_batches(encoded, [len(e.input_ids) for e in encoded], max_tokens_per_batch,
                             lambda batch: response_logprobs(model, batch, pad_token_id=pad_token_id,
                                                             max_logit_elements=max_logit_elements))
