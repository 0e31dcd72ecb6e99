"""Training data: read records, tokenise them with `curate.formatting.encode`, and plan
the batches of a run.

The batch plan is a pure function of (token lengths, seed, epoch, batch settings), so a
resumed run recomputes exactly the plan of the interrupted one and continues at its step
index: the "data-order state" of a checkpoint is just the step and a fingerprint of the
plan's inputs.

Batches are length-grouped to cut padding, the way Hugging Face's LengthGroupedSampler
does it: shuffle, cut the permutation into mega-batches of `MEGABATCH` micro-batches,
sort each mega-batch by length, split it into micro-batches (a fixed number of examples,
or a padded-token budget), then shuffle the micro-batches inside the mega-batch so the
run sees no long-to-short trend.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from curate.config import ConfigError, InputConfig
from curate.formatting import encode
from curate.inputs.files import read_records
from curate.published import reading
from curate.records import prompt_text

log = logging.getLogger("curate.train")

MEGABATCH = 32  # micro-batches per length-sorted group


# ---------------------------------------------------------------- reading


def load_records(data: Any, limit: int | None = None, source: str | None = None) -> Sequence[dict]:
    """Records from a `datasets.Dataset`, a `save_to_disk` directory (what `curate run`
    writes), a JSONL(.gz) file of records / alpaca / question-answer / messages rows, or a
    list of record dicts. `limit` takes the first N."""
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if path.is_dir():
            import datasets

            with reading(str(path)):  # one run's shards, not a mix with a run publishing meanwhile
                ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                split = "train" if "train" in ds else next(iter(ds))
                ds = ds[split]
            data = ds
        elif path.is_file():
            return read_jsonl_records(path, limit=limit, source=source)
        else:
            raise FileNotFoundError(f"training data not found: {path}")
    if hasattr(data, "select") and hasattr(data, "column_names"):  # datasets.Dataset
        if limit is not None:
            data = data.select(range(min(limit, len(data))))
        return data
    records = list(data)
    return records[:limit] if limit is not None else records


def read_jsonl_records(path: str | os.PathLike, limit: int | None = None,
                       source: str | None = None) -> list[dict]:
    """Canonical records of a data file (JSONL or any format the pipeline reads) through
    the pipeline's readers, adapters and validation (`curate.inputs`), so a training
    example is the record a scorer sees. A row that cannot become a record is skipped
    with a warning naming file, line and reason (the pipeline's dead-letter output keeps
    such rows; the trainer only reads)."""

    records, dead = read_records([InputConfig(path=str(path), source=source, limit=limit)])
    for row in dead[:5]:
        log.warning("%s: skipped: %s", row["origin"], row["reason"])
    if dead:
        log.warning("%s: %d rows skipped", path, len(dead))
    return records[:limit] if limit is not None else records


def _as_record(row: dict) -> dict:
    if row.get("prompt") is None and row.get("messages"):
        row = dict(row, prompt=prompt_text(row["messages"]), response=row["messages"][-1]["content"])
    return row


# ---------------------------------------------------------------- tokenising


@dataclass
class Tokenized:
    """Token ids of a set of examples, with the loss span(s) of each."""

    input_ids: list[list[int]]
    prompt_lens: list[int]  # where the last response starts (generation prompts end there)
    ids: list[str]
    truncated: list[bool]  # cut to max_length
    spans: list[tuple[tuple[int, int], ...]]  # the token ranges that carry the loss

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_truncated(self) -> int:
        return sum(self.truncated)

    def select(self, indices: Sequence[int]) -> "Tokenized":
        """These examples only, in this order."""
        def pick(values):
            return [values[i] for i in indices]

        return Tokenized(pick(self.input_ids), pick(self.prompt_lens), pick(self.ids),
                         pick(self.truncated), pick(self.spans))

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.input_ids), dtype=np.int64, count=len(self))

    @property
    def response_lens(self) -> np.ndarray:
        return np.fromiter((sum(b - a for a, b in sp) for sp in self.spans), dtype=np.int64, count=len(self))

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for ids, sp in zip(self.input_ids, self.spans):
            h.update(np.asarray(ids + [-1] + [x for ab in sp for x in ab], dtype=np.int64).tobytes())
        return h.hexdigest()[:16]


def tokenize(records: Iterable[dict], tokenizer, template: str, max_length: int,
             turns: str = "all") -> Tokenized:
    input_ids, prompt_lens, ids, truncated, spans = [], [], [], [], []
    for i, row in enumerate(records):
        row = _as_record(row)
        enc = encode(row, tokenizer, template, max_length, turns=turns)
        input_ids.append(enc.input_ids)
        prompt_lens.append(enc.prompt_len)
        spans.append(enc.loss_spans)
        ids.append(str(row.get("id") or i))
        truncated.append(bool(enc.truncated))
    return Tokenized(input_ids, prompt_lens, ids, truncated, spans)


# ---------------------------------------------------------------- batch planning


def _split(order: np.ndarray, lengths: np.ndarray, batch_size: int,
           batch_tokens: int | None) -> list[list[int]]:
    if batch_tokens is None:
        return [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    batches, cur, cur_max = [], [], 0
    for idx in order.tolist():
        new_max = max(cur_max, int(lengths[idx]))
        if cur and new_max * (len(cur) + 1) > batch_tokens:
            batches.append(cur)
            cur, new_max = [], int(lengths[idx])
        cur.append(idx)
        cur_max = new_max
    if cur:
        batches.append(cur)
    return batches


def micro_batches(lengths: np.ndarray, *, seed: int, epoch: int, batch_size: int,
                  batch_tokens: int | None = None, group_by_length: bool = True,
                  shuffle: bool = True) -> list[list[int]]:
    """One epoch's micro-batches (lists of example indices), deterministic in its inputs.

    `batch_tokens`, when set, caps padded tokens (examples x longest) per micro-batch
    instead of a fixed `batch_size`."""
    n = len(lengths)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n) if shuffle else np.arange(n)
    if not group_by_length:
        return _split(order, lengths, batch_size, batch_tokens)
    if not shuffle:  # evaluation: one global sort, longest first (memory errors show at once)
        order = order[np.argsort(-lengths[order], kind="stable")]
        return _split(order, lengths, batch_size, batch_tokens)
    per_batch = batch_size if batch_tokens is None else max(1, batch_tokens // max(1, int(np.median(lengths))))
    mega = MEGABATCH * per_batch
    out: list[list[int]] = []
    for start in range(0, n, mega):
        chunk = order[start:start + mega]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches = _split(chunk, lengths, batch_size, batch_tokens)
        out.extend(batches[i] for i in rng.permutation(len(batches)))
    return out


def split_by_tokens(indices: Sequence[int], lengths: np.ndarray, max_tokens: int) -> list[list[int]]:
    """`indices` cut into pieces of at most `max_tokens` padded tokens (rows x longest),
    longest first, so each piece pads only to its own longest row; 0 keeps them whole.
    A row longer than the budget is a piece of its own."""
    if not max_tokens:
        return [list(indices)]
    order = sorted(indices, key=lambda i: -int(lengths[i]))
    pieces: list[list[int]] = []
    for i in order:
        if pieces and (len(pieces[-1]) + 1) * int(lengths[pieces[-1][0]]) <= max_tokens:
            pieces[-1].append(i)
        else:
            pieces.append([i])
    return pieces


@dataclass(frozen=True)
class Step:
    """One optimizer step: its epoch and its micro-batches (gradient accumulation)."""

    epoch: int
    micro_batches: tuple[tuple[int, ...], ...]


def plan_steps(lengths: np.ndarray, *, seed: int, epochs: int, max_steps: int | None,
               batch_size: int, batch_tokens: int | None, grad_accum: int,
               group_by_length: bool = True) -> list[Step]:
    """The whole run's optimizer steps. `max_steps`, when set, decides the length of the
    run (more epochs are planned if needed, as in HF Trainer); otherwise `epochs` do."""
    if len(lengths) == 0:
        return []
    steps: list[Step] = []
    epoch = 0
    while True:
        if max_steps is None and epoch >= epochs:
            break
        mbs = micro_batches(lengths, seed=seed, epoch=epoch, batch_size=batch_size,
                            batch_tokens=batch_tokens, group_by_length=group_by_length)
        for i in range(0, len(mbs), grad_accum):
            steps.append(Step(epoch, tuple(tuple(b) for b in mbs[i:i + grad_accum])))
            if max_steps is not None and len(steps) >= max_steps:
                return steps
        epoch += 1
    return steps


def collate(tok: Tokenized, indices: Sequence[int], pad_id: int, multiple: int = 1):
    """Right-padded tensors: input_ids, attention_mask, labels (-100 on prompt and
    padding, so the loss is taken over response tokens only). The width is rounded up to
    a `multiple`: on CPU, oneDNN builds a matmul kernel per shape, and a few widths let it
    reuse them instead of building one for every length in the data."""
    import torch

    width = max(len(tok.input_ids[i]) for i in indices)
    width = -(-width // multiple) * multiple
    input_ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(indices), width), dtype=torch.long)
    labels = torch.full((len(indices), width), -100, dtype=torch.long)
    for row, i in enumerate(indices):
        ids = tok.input_ids[i]
        t = torch.tensor(ids, dtype=torch.long)
        input_ids[row, :len(ids)] = t
        attention[row, :len(ids)] = 1
        for a, b in tok.spans[i]:
            labels[row, a:b] = t[a:b]
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels,
            "prompt_lens": torch.tensor([tok.prompt_lens[i] for i in indices])}


def read_examples(data: Any, what: str, limit: int | None = None) -> Sequence[dict]:
    """`load_records(data, limit)`, refusing a set with no example: nothing to learn from
    (or to evaluate on)."""
    records = load_records(data, limit=limit)
    if len(records) == 0:
        where = f" {data}" if isinstance(data, (str, os.PathLike)) else ""
        if where and (Path(data) / "manifest.json").is_file():
            where += " (a curate output that kept 0 rows)"
        raise ConfigError(f"{what}{where} holds no examples")
    return records


def with_response_tokens(tok: Tokenized, what: str, max_length: int) -> Tokenized:
    """The examples with at least one response token left, with a warning when some have
    none (they would add nothing to the loss; a step of only such examples would divide
    by zero). None at all is an error: training on it would report a loss of 0 and
    publish an untrained adapter."""
    lens = tok.response_lens
    keep = [i for i in range(len(tok)) if lens[i] > 0]
    dropped = len(tok) - len(keep)
    if not dropped:
        return tok
    cut = sum(tok.truncated[i] for i in range(len(tok)) if lens[i] == 0)
    why = (f"cut off by max_length={max_length}" if cut == dropped
           else f"{cut} cut off by max_length={max_length}, {dropped - cut} empty")
    if not keep:
        if cut == dropped:
            raise ConfigError(f"{what}: every response token is {why}: none of the {len(tok)} examples "
                              f"has one left to learn from; raise max_length (--max-length)")
        raise ConfigError(f"{what}: none of the {len(tok)} examples has a response token to learn "
                          f"from ({why})")
    log.warning("%s: %d of %d examples have no response token left (%s); they are left out",
                what, dropped, len(tok), why)
    return tok.select(keep)
