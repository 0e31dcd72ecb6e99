"""The filters' contract and mechanics.

A per-example filter (`Filter`) only answers "keep?" with None, or the reason it drops
the example; as in DataTrove, the loop, the rejected output with its reason and the
counters live once in `ApplyFilters`, and consecutive filters share one Beam step. A
whole-pool filter (exact and near dedup, decontamination) is a `PTransform` returning
`kept` and `REJECTED`; one that decides from a small projection of each row (`project`,
`decide`, `route`: curate.pipeline.streamed) streams, and `ApplyDecisions` is its
PTransform on rows held in a PCollection.
"""

from __future__ import annotations

from typing import Any, Iterator

import apache_beam as beam
from apache_beam.metrics import Metrics

from curate.steps import Step

# the tag of a filter step's rejected output (per-example filters and whole-pool steps)
REJECTED = "rejected"


PROJECTION_BATCH = 1000  # projections a batch given to `decide` holds


class ApplyDecisions(beam.PTransform):
    """A streamed step (`project` a row to a few fields, `decide` one state from the
    projections, `route` a row by it: curate.pipeline.streamed) applied to rows held
    in a PCollection: {"kept", REJECTED}, each rejected row with the step's reason
    (the pipeline adds its reject_stage), each row with the columns the step gave it."""

    def __init__(self, step):
        super().__init__()
        self.step = step

    def expand(self, rows):
        step = self.step
        state = (rows
                 | "Project" >> beam.Map(step.project)
                 | "Batch" >> beam.BatchElements(min_batch_size=PROJECTION_BATCH, max_batch_size=PROJECTION_BATCH)
                 | "Columns" >> beam.Map(lambda batch: {name: [p[name] for p in batch] for name in batch[0]})
                 | "Decide" >> step.decide(lambda: rows))

        def split(record, state) -> Iterator[Any]:  # rows or TaggedOutputs: not a type Beam can check
            reason, columns = step.route(record, state)
            record = {**record, **columns}
            if reason is None:
                yield record
            else:
                yield beam.pvalue.TaggedOutput(REJECTED, {**record, "reject_reason": reason})

        out = rows | "Apply" >> beam.FlatMap(split, beam.pvalue.AsSingleton(state)).with_outputs(
            REJECTED, main="kept")
        return {"kept": out.kept, REJECTED: out[REJECTED]}


class Filter(Step):
    """A per-example filter: `reason_to_drop(record)`. Consecutive ones share one Beam step."""

    kind = "filter"
    per_example = True

    def setup(self) -> None:
        """Load what the filter needs once per worker (tokenizers...)."""

    def reason_to_drop(self, record: dict) -> str | None:
        raise NotImplementedError


class ApplyFilters(beam.DoFn):
    """Runs filters in order; the first that objects rejects the example, with its reason."""

    def __init__(self, filters: list[Filter]):
        self.filters = filters

    def setup(self):
        for f in self.filters:
            f.setup()
        self.dropped = {f.type: Metrics.counter("filters", f"dropped_{f.type}") for f in self.filters}

    def process(self, record: dict):
        for f in self.filters:
            reason = f.reason_to_drop(record)
            if reason is not None:
                self.dropped[f.type].inc()
                yield beam.pvalue.TaggedOutput(REJECTED, {**record, "reject_stage": f"filter:{f.type}",
                                                          "reject_reason": reason})
                return
        yield record
