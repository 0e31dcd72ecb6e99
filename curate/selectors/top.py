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

    def expand(self, pcoll):
        column, sign = self.column, (1.0 if self.order == "highest" else -1.0)
        at_least, below, order, budget = self.at_least, self.below, self.order, self.budget
        value_of = COMPUTED.get(column, lambda r: r.get(column))

        def screen(record):
            v = value_of(record)
            v = None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)
            record = {**record, "top_value": v}
            if v is None:
                yield beam.pvalue.TaggedOutput("rejected", reject(record, f"no value of {column}"))
            elif at_least is not None and v < at_least:
                yield beam.pvalue.TaggedOutput("rejected", reject(record, f"{column} {v:.6g} < at_least {at_least}"))
            elif below is not None and v >= below:
                yield beam.pvalue.TaggedOutput("rejected", reject(record, f"{column} {v:.6g} >= below {below}"))
            else:
                yield record

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
