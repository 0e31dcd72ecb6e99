"""What report.html's selector sections read: one selector's rows (`SelectorRun`) and the
small formatting and plotting helpers the sections share."""

from __future__ import annotations

import html
import math
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.report.plots import POOL_COLOR


class SelectorRun:
    """One selector's rows: those it kept (a later selector may have dropped some of
    them since) and those it rejected. Columns are read only when a section asks."""

    def __init__(self, spec: dict, stage: str, kept: pa.Table, rejected: pa.Table | None,
                 later_stages: list[str]):
        self.spec, self.stage, self.type = spec, stage, spec.get("type", "?")
        self._kept, self._rejected = kept, rejected
        self._own = self._later = None
        if rejected is not None and "reject_stage" in rejected.column_names:
            stages = rejected.column("reject_stage")
            self._own = pc.fill_null(pc.equal(stages, stage), False)
            self._later = pc.fill_null(pc.is_in(stages, value_set=pa.array(later_stages, pa.string())), False)
        self.n_kept = len(kept) + (pc.sum(self._later).as_py() or 0 if self._later is not None else 0)
        self.n_dropped = pc.sum(self._own).as_py() or 0 if self._own is not None else 0
        self.n = self.n_kept + self.n_dropped

    def has(self, *names: str) -> bool:
        return all(n in self._kept.column_names for n in names)

    def _rejected_part(self, names: list[str], mask) -> pa.Table:
        part = self._rejected.filter(mask)
        cols = [part.column(n) if n in part.column_names else pa.nulls(len(part), self.column_type(n))
                for n in names]
        return pa.table(cols, names=names)

    def column_type(self, name: str) -> pa.DataType:
        if name in self._kept.column_names:
            return self._kept.schema.field(name).type
        return self._rejected.schema.field(name).type

    def pool(self, names: list[str]) -> pa.Table:
        """Every row this selector saw, the named columns and `kept` (bool)."""
        parts = [self._kept.select(names).append_column("kept", pa.array(np.ones(len(self._kept), bool)))]
        if self._own is not None:
            for mask, kept in ((self._later, True), (self._own, False)):
                part = self._rejected_part(names, mask)
                parts.append(part.append_column("kept", pa.array(np.full(len(part), kept))))
        parts = [p.cast(parts[0].schema) for p in parts]
        return pa.concat_tables(parts)

    def dropped(self, names: list[str]) -> pa.Table:
        """The rows this selector rejected (`reject_reason` among the columns one may ask)."""
        if self._own is None:
            return pa.table({n: pa.array([], self.column_type(n)) for n in names})
        return self._rejected_part(names, self._own)


# ------------------------------------------------------------------ small helpers
def _pct(a: float, b: float) -> str:
    return f"{a / b:.0%}" if b else "n/a"


def _code(name: str) -> str:
    return f"<code>{html.escape(str(name))}</code>"


def _floats(table: pa.Table, name: str) -> np.ndarray:
    """A numeric column as float64, null as NaN."""
    return pc.fill_null(table.column(name).cast(pa.float64()), math.nan).to_numpy()


def _counts(values) -> Counter:
    return Counter(v for v in values if v is not None)


def _cluster_table(rows: list[list], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return "" if v is None else str(v)


def _padded(values: np.ndarray, pad: float = 0.05) -> tuple[float, float]:
    lo, hi = float(np.min(values)), float(np.max(values))
    span = (hi - lo) or abs(hi) or 1.0
    return lo - pad * span, hi + pad * span


def _n(count: int, noun: str) -> str:
    """'1 example', '3 examples'."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def _budget_text(budget) -> str:
    if isinstance(budget, float):
        return f"{budget:.0%} of the pool"
    return f"{budget:,} rows" if isinstance(budget, int) else "the budget"


def _cluster_bars(ax, ids: list, size: Counter, kept_parts: list[tuple[str, Counter, str]], xlabel: str):
    """Bars per cluster: the cluster's rows behind, its kept rows (stacked parts) in front."""
    x = np.arange(len(ids))
    ax.bar(x, [size[c] for c in ids], color=POOL_COLOR, label="cluster size")
    bottom = np.zeros(len(ids))
    for label, part, color in kept_parts:
        h = np.array([part.get(c, 0) for c in ids], dtype=float)
        ax.bar(x, h, bottom=bottom, color=color, label=label, width=0.6)
        bottom += h
    if len(ids) <= 40:
        ax.set_xticks(x, [str(c) for c in ids], fontsize=7, rotation=90 if len(ids) > 20 else 0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("rows")
    ax.legend(fontsize=8)
