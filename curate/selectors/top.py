"""Top: keep the `budget` rows with the highest (or lowest) value of one column.

The baselines a user compares a selection method with, and two published one-score
methods, are this selector over one column:
    longest responses        column: response_chars (computed here), order: highest
    perplexity, low / high   column: logprob_mean (likelihood scorer), order: highest / lowest
    IFD (Cherry LLM)         column: ifd (ifd scorer), order: highest, below: 1.0
                             (the paper keeps the highest IFD among rows whose IFD < 1)
Rows outside [`at_least`, `below`) and rows without a value (missing or NaN) are
rejected with their reason before the ranking (a fractional budget is a fraction of the
rows left); ties go by (origin, id), so the kept count is exact and reruns agree. Adds
`top_value`, the value ranked by.
"""

from __future__ import annotations

import math

import apache_beam as beam
import pyarrow as pa

from curate.config import ConfigError, parse_budget
from curate.selectors.base import Selector, reject
from curate.selectors.shared.cutoff import KeepTop

COMPUTED = {"response_chars": lambda r: float(len(r["response"]))}


def value_of(record: dict, column: str) -> float | None:
    """The value ranked by; None when missing or NaN."""
    v = COMPUTED[column](record) if column in COMPUTED else record.get(column)
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def out_of_range(v: float | None, column: str, at_least: float | None, below: float | None) -> str | None:
    """Why a row with this value is rejected before the ranking, or None."""
    if v is None:
        return f"no value of {column}"
    if at_least is not None and v < at_least:
        return f"{column} {v:.6g} < at_least {at_least}"
    if below is not None and v >= below:
        return f"{column} {v:.6g} >= below {below}"
    return None


class TopSelector(Selector):
    type = "top"
    title = "top by one column"
    report_section = "curate.report.sections:top_section"

    def __init__(self, column: str, budget: int | float, order: str = "highest",
                 at_least: float | None = None, below: float | None = None):
        super().__init__()
        if order not in ("highest", "lowest"):
            raise ConfigError(f"top: order must be highest or lowest, got {order!r}")
        self.column, self.order, self.at_least, self.below = column, order, at_least, below
        self.budget = parse_budget(budget, "top selector")
        self.requires = () if column in COMPUTED else (column,)

    def output_columns(self):
        return {"top_value": pa.float64()}

    def describe(self):
        return {"type": self.type, "column": self.column, "budget": self.budget, "order": self.order,
                "at_least": self.at_least, "below": self.below}

    def can_keep(self, row: dict) -> bool:
        if not self.can_keep_reads():  # a computed value with no range: every row
            return True
        return out_of_range(value_of(row, self.column), self.column, self.at_least, self.below) is None

    def can_keep_reads(self) -> tuple[str, ...]:
        if self.column not in COMPUTED:
            return (self.column,)
        return ("response",) if self.at_least is not None or self.below is not None else ()

    def expand(self, pcoll):
        column, sign = self.column, (1.0 if self.order == "highest" else -1.0)
        at_least, below, order, budget = self.at_least, self.below, self.order, self.budget

        def screen(record):
            v = value_of(record, column)
            record = {**record, "top_value": v}
            why = out_of_range(v, column, at_least, below)
            if why is None:
                yield record
            else:
                yield beam.pvalue.TaggedOutput("rejected", reject(record, why))

        def explain(record, key, cutoff, kept):
            if kept:
                return record, None
            if cutoff["keep"] == "none":
                return record, "budget is 0"
            return record, (f"{column} {record['top_value']:.6g} outside the {order} {budget} "
                            f"(cut-off {sign * cutoff['key'][0]:.6g})")

        screened = pcoll | "Screen" >> beam.FlatMap(screen).with_outputs("rejected", main="ranked")
        top = screened.ranked | KeepTop(lambda r: (sign * r["top_value"], r["origin"], r["id"]),
                                        self.budget, explain)
        rejected = (screened.rejected, top["rejected"]) | "AllRejected" >> beam.Flatten()
        return {"kept": top["kept"], "rejected": rejected}
