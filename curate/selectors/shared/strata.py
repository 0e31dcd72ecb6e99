"""`stratify_by`: any selector run inside each value of a column, keeping the pool's mix.

A score-based method over a pool of several sources takes most of its budget from the one
source its score favours (benchmarks/RESULTS_selection_quality.md: IFD and "longest" took
167-171 role-play rows of 200). With `stratify_by: source` on a selector, the budget B is
shared among the values of the column and the method runs inside each one with its own
rule, as if each were a pool of its own:

    shares     "proportional" (default): B x each stratum's share of the pool, capped at
               the rows the method can keep there, largest-remainder rounding, what a full
               stratum leaves shared again among those with rows left
               (`quotas.water_filling`); "equal": S2L's balanced rule, smallest stratum
               first, each offered what is left / strata left (`quotas.balanced_plan`).
    budget     a fraction is a fraction of the rows the method can keep (all rows, or
               for `top` those with a value in its range: `Selector.can_keep`); a count
               is capped there. A selector without a budget (grape, semdedup) runs in
               each stratum with its own options.

The shares need every stratum's size before the selection starts, so a stratified
selector selects from a written pool: `curate select` on a `curate score` output, or a
job's `scores:` directory (`curate run` writes the pool there first when a selector is
stratified: `curate.pipeline.run.run_job`), and it is the job's first selector. The
sizes are read from the pool's shards (only the stratum column and what `can_keep`
reads) when the graph is built. Every row gets `stratum_quota`, its stratum's share.
"""

from __future__ import annotations

import inspect
import logging

import apache_beam as beam
import pyarrow as pa

from curate import records, steps
from curate.config import ConfigError, resolve_budget
from curate.inputs.formats import arrow_batches
from curate.selectors.base import Selector
from curate.selectors.shared.quotas import balanced_quotas, water_filling

log = logging.getLogger(__name__)

SHARES = ("proportional", "equal")
KEPT, REJECTED = "kept", "rejected"
OPTIONS = ("stratify_by", "stratify_shares")
MAX_STRATA = 200


def stratum_shares(rows: dict, can_keep: dict, budget: int, rule: str = "proportional") -> dict:
    """{stratum: rows the method keeps there} for a budget of `budget` rows, summing to
    min(budget, sum(can_keep)). `rows`: the pool's rows per stratum (the mix kept);
    `can_keep`: the rows the method could keep per stratum (a stratum's cap)."""
    if rule == "proportional":
        return water_filling(can_keep, budget, rows)
    if rule == "equal":
        quotas = balanced_quotas(can_keep, budget)
        return {s: quotas.get(s, 0) for s in rows}
    raise ConfigError(f"stratify_shares must be one of {', '.join(SHARES)}, got {rule!r}")


def stratum_of(record: dict, column: str):
    """A row's stratum: its value of the column as text; a missing value is None."""
    v = record.get(column)
    return None if v is None else str(v)


def _order(value) -> tuple:
    return (value is None, "" if value is None else value)


def build_selector(spec: dict, where: str):
    """The selector a job's spec asks for: stratified (`Stratified`) when it sets
    stratify_by, else the plain one (curate.steps.build)."""
    if not isinstance(spec, dict) or "stratify_by" not in spec:
        return steps.build("selector", spec, where)
    inner = {k: v for k, v in spec.items() if k not in OPTIONS}
    column = spec["stratify_by"]
    if column is None:
        return steps.build("selector", inner, where)
    if not isinstance(column, str) or not column:
        raise ConfigError(f"{where}: stratify_by must be a column name, got {column!r}")
    return Stratified(inner, column, spec.get("stratify_shares", "proportional"), where)


class Stratified(Selector):
    """A selector run inside each stratum with its share of the budget (module docstring).
    It declares what its selector declares (type, requires, columns, model stage), plus
    the stratum column and `stratum_quota`."""

    def __init__(self, spec: dict, column: str, shares: str, where: str):
        super().__init__()
        if shares not in SHARES:
            raise ConfigError(f"{where}: stratify_shares must be one of {', '.join(SHARES)}, got {shares!r}")
        self.spec, self.column, self.shares, self.where = dict(spec), column, shares, where
        self.prototype = steps.build("selector", spec, where)  # checks the options once
        self.type = self.prototype.type
        self.has_budget = "budget" in inspect.signature(type(self.prototype)).parameters
        self.requires = tuple(self.prototype.requires) + (
            (column,) if column not in records.BASE_COLUMNS and column not in self.prototype.requires else ())
        self.pool_tasks = None  # the plan's input files: the pool whose strata are counted
        self.table: list[dict] | None = None  # per stratum: value, rows, can_keep, share
        self._refine = None

    def output_columns(self):
        return {**self.prototype.output_columns(), "stratum_quota": pa.int64()}

    def resources(self):
        return self.prototype.resources()

    def model_stage(self):
        return self.prototype.model_stage()

    def use_model_stage(self, result) -> None:
        self.prototype.use_model_stage(result)
        self._refine = result

    def describe(self):
        return {**self.prototype.describe(), "stratify_by": self.column, "stratify_shares": self.shares,
                **({"strata": self.table} if self.table is not None else {})}

    # ------------------------------------------------------------------ the shares
    def count(self) -> list[dict]:
        """Per stratum (in value order): its value, its rows, the rows the method can
        keep and its share of the budget."""
        if not self.pool_tasks or any(t.adapter != "curate" or t.format != "arrow" for t in self.pool_tasks):
            raise ConfigError(f"{self.where}: stratify_by needs every stratum's size before selecting: select "
                              f"from a written pool (`curate select --scores DIR`, or `scores:` in the job)")
        rows: dict = {}
        keepable: dict = {}
        reads = [self.column, *self.prototype.can_keep_reads()]
        for row in _pool_rows(self.pool_tasks, reads):
            s = stratum_of(row, self.column)
            rows[s] = rows.get(s, 0) + 1
            keepable[s] = keepable.get(s, 0) + bool(self.prototype.can_keep(row))
        if len(rows) > MAX_STRATA:  # one copy of the selector per value: a Beam branch each
            raise ConfigError(f"{self.where}: stratify_by {self.column!r} has {len(rows):,} values in the pool; "
                              f"it is meant for a few (sources, categories): at most {MAX_STRATA}")
        total = sum(keepable.values())
        budget = resolve_budget(self.prototype.budget, total) if self.has_budget else None
        share = stratum_shares(rows, keepable, budget, self.shares) if self.has_budget else {}
        return [{"value": s, "rows": rows[s], "can_keep": keepable[s], "share": share.get(s)}
                for s in sorted(rows, key=_order)]

    def stratum_selector(self, share: int | None):
        spec = dict(self.spec) if share is None else {**self.spec, "budget": share}
        selector = steps.build("selector", spec, self.where)
        if self._refine is not None:
            selector.use_model_stage(self._refine)
        return selector

    def expand(self, pcoll):
        self.table = self.count()
        if not self.table:  # an empty pool: the method itself says so
            out = pcoll | "Empty" >> self.prototype
            return {KEPT: out[KEPT], REJECTED: out[REJECTED]}
        index = {t["value"]: i for i, t in enumerate(self.table)}
        column = self.column
        parts = pcoll | "Strata" >> beam.Partition(lambda r, n: index[stratum_of(r, column)], len(self.table))
        kept, rejected = [], []
        for i, t in enumerate(self.table):
            out = parts[i] | f"Stratum{i}" >> self.stratum_selector(t["share"])
            quota = (lambda r, q=t["share"]: {**r, "stratum_quota": q})
            kept.append(out[KEPT] | f"Quota{i}" >> beam.Map(quota))
            rejected.append(out[REJECTED] | f"RejectedQuota{i}" >> beam.Map(quota))
        log.info("%s: %s", self.where, ", ".join(f"{t['value']} {t['share']} of {t['rows']}" for t in self.table))
        return {KEPT: kept | "Kept" >> beam.Flatten(), REJECTED: rejected | "Rejected" >> beam.Flatten()}


def _pool_rows(tasks, columns: list[str]):
    """The named columns of every row of a written pool (curate outputs), as dicts."""
    for task in tasks:
        for batch in arrow_batches(task.path, columns):
            yield from batch.to_pylist()
