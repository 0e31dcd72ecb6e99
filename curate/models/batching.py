"""Batching helpers every model stage shares (scorers, proxy trajectories, evaluation):
token-budget batches, right padding, the positions that predict response tokens.

Each exists once here; a scorer composes them instead of writing its own loop.
"""

from __future__ import annotations

from typing import Callable, Sequence, TypeVar

T = TypeVar("T")


def pad_id(tokenizer) -> int:
    """The id used for padding: the tokenizer's pad token, else EOS, else 0. Padded
    positions are masked or never read, so the value only has to be a valid id."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


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


def map_token_batches(items: Sequence, lengths: Sequence[int], max_tokens: int,
                      fn: Callable[[list], list[T]]) -> list[T]:
    """fn over `items` cut into token-budget batches; one result per item, in input order."""
    results: list = [None] * len(items)
    for batch in batches_by_token_budget(lengths, max_tokens):
        for i, value in zip(batch, fn([items[i] for i in batch])):
            results[i] = value
    return results


def pad_batch(encoded: Sequence, pad_token_id: int, multiple: int = 1):
    """Right-padded (ids, attention mask), both long tensors of (batch, longest rounded up
    to a `multiple`)."""
    import torch

    width = -(-max(len(e.input_ids) for e in encoded) // multiple) * multiple
    ids = torch.full((len(encoded), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, e in enumerate(encoded):
        ids[i, :len(e.input_ids)] = torch.tensor(e.input_ids, dtype=torch.long)
        mask[i, :len(e.input_ids)] = 1
    return ids, mask


def mask_if_padded(mask):
    """The mask, or None when no position is padding: SDPA then takes its fused causal path."""
    return mask if int(mask.sum()) < mask.numel() else None


def predicting_positions(encoded: Sequence) -> tuple[list[int], list[int]]:
    """(row, position) of every hidden state that predicts a response token: position
    t - 1 predicts token t, for every target t of each example's loss spans."""
    rows, cols = [], []
    for i, e in enumerate(encoded):
        targets = e.targets
        rows.extend([i] * len(targets))
        cols.extend(t - 1 for t in targets)
    return rows, cols
