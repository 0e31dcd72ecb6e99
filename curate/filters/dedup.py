"""Exact dedup: one example per normalised text (lower case, whitespace runs as one
space), the smallest (id, origin) kept. A global decision, so a whole-pool step; it
streams (only a 128-bit hash of each row's text travels to the grouping)."""

from __future__ import annotations

import hashlib

import apache_beam as beam
from apache_beam.transforms.window import GlobalWindows

from curate.config import ConfigError
from curate.filters.base import ApplyDecisions
from curate.steps import Step


def normalise(text: str) -> str:
    r"""Lower case, whitespace runs as one space, none at the ends (str.split's whitespace
    is the regex \s: the same text as re.sub(r"\s+", " ", ...) at a third of its CPU)."""
    return " ".join(text.lower().split())


def dedup_key(record: dict, key: str) -> str:
    if key == "prompt":
        return normalise(record["prompt"])
    return "\x00".join(normalise(m["content"]) for m in record["messages"])


BUCKETS = 256  # the groups keys travel to the grouping in (by their first byte)
HOLD = 50_000  # projections a worker gathers before it sends them on


class _Buckets(beam.DoFn):
    """Batches of projections -> (bucket, {key: [(id, origin), ...]}): a bundle's rows
    (HOLD at a time) grouped by key, in BUCKETS buckets. The grouping then moves a few
    hundred elements per bundle, not one per row (each element crossing a stage costs
    Beam microseconds)."""

    def start_bundle(self):
        self._held: dict[bytes, list] = {}
        self._rows = 0

    def process(self, batch):
        held = self._held
        for key, id_, origin in zip(batch["key"], batch["id"], batch["origin"]):
            held.setdefault(key, []).append((id_, origin))
        self._rows += len(batch["id"])
        if self._rows >= HOLD:
            yield from self._buckets()

    def finish_bundle(self):
        for bucket in self._buckets():
            yield GlobalWindows.windowed_value(bucket)

    def _buckets(self) -> list[tuple[int, dict]]:
        buckets: dict[int, dict] = {}
        for key, refs in self._held.items():
            buckets.setdefault(key[0] % BUCKETS, {})[key] = refs
        self._held, self._rows = {}, 0
        return list(buckets.items())


def _copies(bucket):
    """A bucket's parts -> (id, origin) of every row but the first (smallest) of its key,
    with the reason naming the first."""
    _, parts = bucket
    by_key: dict[bytes, list] = {}
    for part in parts:
        for key, refs in part.items():
            by_key.setdefault(key, []).extend(refs)
    for refs in by_key.values():
        if len(refs) > 1:
            refs.sort()
            first = refs[0]
            for ref in refs[1:]:
                yield ref, f"duplicate of {first[0]} ({first[1]})"


class ExactDedup(Step, beam.PTransform):
    """Keep one example per normalised text (the smallest id, then origin: deterministic).

    key: "prompt_response" (default: the whole conversation) or "prompt". Never use
    "prompt" on a multi-response pool: it would keep one candidate per instruction.
    Streamed (curate.pipeline.streamed): only (id, origin) and a 128-bit hash of the
    normalised text travel to the grouping, never the rows.
    """

    kind = "filter"
    type = "dedup"

    def __init__(self, key: str = "prompt_response"):
        super().__init__()
        if key not in ("prompt_response", "prompt"):
            raise ConfigError(f"dedup: key must be prompt_response or prompt, not {key!r}")
        self.key = key

    def project(self, record: dict) -> dict:
        text = dedup_key(record, self.key).encode("utf-8", "surrogatepass")
        return {"id": record["id"], "origin": record["origin"],
                "key": hashlib.blake2b(text, digest_size=16).digest()}

    def decide(self, rows_again) -> beam.PTransform:
        """Batches of projections -> {(id, origin): reason} of every row but the first of
        its text."""

        return ("Buckets" >> beam.ParDo(_Buckets())
                | "Group" >> beam.GroupByKey()
                | "Copies" >> beam.FlatMap(_copies)
                | "Rejected" >> beam.combiners.ToDict())

    def route(self, row: dict, rejected: dict) -> tuple[str | None, dict]:
        return rejected.get((row["id"], row["origin"])), {}

    def expand(self, pcoll):
        return pcoll | ApplyDecisions(self)
