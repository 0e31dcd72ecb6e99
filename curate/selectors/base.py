"""Contract for selection methods.

A selector is a Beam PTransform over scored records. `expand` returns a dict with
`kept` and `rejected` PCollections; every rejected record carries `reject_reason`
(why it was not kept) and every kept record the columns that explain why it was
(score, rank, cluster, quota...). The pipeline adds `reject_stage`.
Selectors never load a model: they read score columns, which is what makes
"score once, select many" possible. A method that needs model work between its steps
(iterative diversity's train / generate / score rounds) says so with `model_stage()`;
the pipeline's plan builds that stage (`curate.train.refine`) and hands it to the
selector, which calls it as a function of the rows drawn so far.
"""

from __future__ import annotations

import apache_beam as beam
import pyarrow as pa

from curate.steps import Step


class Selector(Step, beam.PTransform):
    kind = "selector"
    # score columns this selector reads; the pipeline checks they exist before running
    requires: tuple[str, ...] = ()
    # Streamed selectors (curate.pipeline.graph) select from a small projection of each
    # row, so the pipeline streams the rows instead of holding them: `project(record)`
    # -> the few fields read (id and origin included), `decide(rows_again)` -> a
    # PTransform from the projections to one state element (a cut-off, quotas; a call to
    # `rows_again()` reads the rows once more), `route(row, state)` ->
    # (reject reason or None, the selector's columns), reading only the fields both the
    # record and its projection carry. None: whole rows needed.
    project = None

    def output_columns(self) -> dict[str, pa.DataType]:
        """Columns this selector adds to kept and rejected records."""
        return {}

    def describe(self) -> dict:
        return {"type": self.type}

    def model_stage(self) -> dict | None:
        """The config of the model work this selector needs (None: none)."""
        return None

    def use_model_stage(self, stage) -> None:
        """Receive the built model stage (a callable) from the pipeline's plan."""
        raise NotImplementedError(f"selector {self.type!r} takes no model stage")


def reject(record: dict, reason: str) -> dict:
    return {**record, "reject_reason": reason}

