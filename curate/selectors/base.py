"""Contract for selection methods.

A selector is a Beam PTransform over scored records. `expand` returns a dict with
`kept` and `rejected` PCollections; every rejected record carries `reject_reason`
(why it was not kept) and every kept record the columns that explain why it was
(score, rank, cluster, quota...). The pipeline adds `reject_stage`.
Selectors never load a model: they read score columns, which is what makes
"score once, select many" possible. A method that needs model work between its steps
(iterative diversity's train / generate / score rounds) declares a "refine" model stage
(`curate.steps.ModelStage`); the plan builds it (`curate.train.refine`) and hands it to
the selector, which calls it as a function of the rows drawn so far.
"""

from __future__ import annotations

import apache_beam as beam

from curate.steps import Step


class Selector(Step, beam.PTransform):
    """A selector's `requires`, `output_columns` and streaming (`project`, `decide`,
    `route`) are the step contract's (curate.steps.Step)."""

    kind = "selector"

    # `stratify_by` (curate.selectors.shared.strata) caps a stratum's share at the rows the
    # method can keep there: a selector that rejects some rows whatever the budget (no
    # value, outside a range) says which, from the columns `can_keep_reads` names
    def can_keep(self, row: dict) -> bool:
        return True

    def can_keep_reads(self) -> tuple[str, ...]:
        return ()


def reject(record: dict, reason: str) -> dict:
    return {**record, "reject_reason": reason}

