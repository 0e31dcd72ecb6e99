"""Global cut-offs shared by selectors: keep the top `budget` records by a key.

Only keys travel to one place, never records: a count budget uses Beam's top-n
combiner (a combiner tree holding `budget` keys per worker); a fractional budget needs
the total, so the keys are gathered and sorted in one worker (a few tens of bytes per
row) to find the exact cut-off. Either combine outputs the cut-off itself: its result
passes through a side input (Beam's default for an empty input), which Beam's cache
weighs object by object, 3 us per key for a list of keys and nothing for one small
dict. Keys must be unique (end them with the record's origin) so the kept count is
exact.
"""

from __future__ import annotations

from typing import Callable

import apache_beam as beam
from apache_beam.transforms.combiners import TopCombineFn

from curate.config import resolve_budget

KEPT, REJECTED = "kept", "rejected"


def _cutoff_from_top(top: list, budget: int) -> dict:
    if budget == 0:
        return {"keep": "none", "key": None}
    if len(top) < budget:
        return {"keep": "all", "key": None}
    return {"keep": "from", "key": top[-1]}


def _cutoff_from_all(keys: list, n: int, budget: float) -> dict:
    k = resolve_budget(budget, n)
    keys = sorted(keys, reverse=True)
    return _cutoff_from_top(keys[:k], k) if k < n else {"keep": "all", "key": None}


def passes(key, cutoff: dict) -> bool:
    if cutoff["keep"] == "all":
        return True
    if cutoff["keep"] == "none":
        return False
    return key >= cutoff["key"]


class Cutoff(beam.PTransform):
    """Keys -> the cut-off (one dict) that keeps the `budget` largest of them."""

    def __init__(self, budget: int | float):
        super().__init__()
        self.budget = budget

    def expand(self, keys):
        fn = _CutoffOfTop(self.budget) if isinstance(self.budget, int) else _CutoffOfAll(self.budget)
        return keys | "Cutoff" >> beam.CombineGlobally(fn)


@beam.typehints.with_output_types(dict)  # not its parent's list: Beam picks the coder by it
class _CutoffOfTop(TopCombineFn):
    """Keys -> the cut-off keeping the `budget` (a count) largest: Beam's top-n combine."""

    def __init__(self, budget: int):
        super().__init__(budget)
        self.budget = budget

    def extract_output(self, accumulator, *args, **kwargs):
        return _cutoff_from_top(super().extract_output(accumulator, *args, **kwargs), self.budget)


class _CutoffOfAll(beam.CombineFn):
    """Keys -> the cut-off keeping the largest `budget` (a fraction) of them: all keys
    gathered, counted and sorted."""

    def __init__(self, budget: float):
        self.budget = budget

    def create_accumulator(self):
        return []

    def add_input(self, keys, key):
        keys.append(key)
        return keys

    def merge_accumulators(self, accumulators):
        merged = []
        for keys in accumulators:
            merged.extend(keys)
        return merged

    def extract_output(self, keys):
        return _cutoff_from_all(keys, len(keys), self.budget)


class KeepTop(beam.PTransform):
    """Split records into the `budget` with the largest `key_fn(record)` and the rest.

    `explain(record, key, cutoff, kept) -> (record, reason)` annotates each record;
    it runs in a Map with the cut-off as a side input.
    """

    def __init__(self, key_fn: Callable[[dict], tuple], budget: int | float,
                 explain: Callable[[dict, tuple, dict, bool], tuple[dict, str | None]]):
        super().__init__()
        self.key_fn, self.budget, self.explain = key_fn, budget, explain

    def expand(self, pcoll):
        key_fn, explain = self.key_fn, self.explain
        cutoff = pcoll | "Keys" >> beam.Map(key_fn) | Cutoff(self.budget)

        def split(record, cutoff):
            key = key_fn(record)
            kept = passes(key, cutoff)
            record, reason = explain(record, key, cutoff, kept)
            if kept:
                yield record
            else:
                yield beam.pvalue.TaggedOutput(REJECTED, {**record, "reject_reason": reason})

        out = pcoll | "Split" >> beam.FlatMap(split, cutoff=beam.pvalue.AsSingleton(cutoff)).with_outputs(
            REJECTED, main=KEPT)
        return {KEPT: out[KEPT], REJECTED: out[REJECTED]}
