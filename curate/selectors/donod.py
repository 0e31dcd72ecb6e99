"""DONOD selection: rank examples by TOPSIS over (DON: benefit, NOD: cost), keep the top.

Paper: Hu, Yang, Zhou, Wu (2025), "DONOD: Robust and Generalizable Instruction
Fine-Tuning for LLMs via Model-Intrinsic Dataset Pruning" (arXiv 2504.14810). No
official code. Defaults from the paper (docs/methods.md "DONOD"): criteria DON (benefit; DON =
||W'|| - ||W||, new minus old, as the `weight_delta` scorer computes it) and NOD (cost),
equal weights, vector-normalised columns, keep the top 30% (the paper keeps 20-30%;
"filtering out 70%" is its headline setting). The scores come from the
`weight_delta` scorer (curate/scorers/weight_delta.py); this module never loads a model.

TOPSIS (Hwang & Yoon, 1981) for an N x C matrix x:
    r_ij = x_ij / sqrt(sum_i x_ij^2)        (a column of zeros stays zero)
    v_ij = w_j r_ij                         (weights normalised to sum 1)
    best_j = max_i v_ij for a benefit column, min_i v_ij for a cost column; worst_j the other
    closeness_i = d(v_i, worst) / (d(v_i, best) + d(v_i, worst))   (Euclidean distances)
When d_best + d_worst = 0 the row is both ideal and anti-ideal (every weighted column is
constant): it is neither better nor worse than any row, closeness 0.5.

In Beam, the only global state is per column the sum of squares, the maximum and the
minimum (a CombineFn): with w_j >= 0 the ideal points are w_j * extreme_j / norm_j, so each
row's closeness is a Map with that state as a side input.

Cut-off and rank
- The kept count is exact: k = budget for a count, round-half-up(fraction x N) for a
  fraction (`curate.config.resolve_budget`), N = rows with every criterion finite. Rows
  missing a criterion or carrying NaN/inf are rejected with that reason, not ranked.
- Every ranked row gets `topsis_rank` (1 = best, ties broken by `id`, then `origin`,
  so reruns agree). The global order is a distributed sort, never a collect into one
  worker: `ApproximateQuantiles` of the closeness gives `rank_buckets` ranges, a
  CombineFn counts rows per range (prefix sums -> rank offsets, a small side input),
  and each range is grouped and sorted on its own (about N / rank_buckets rows per
  group). Rows with rank <= k are kept.
- A rejected row's reason names its closeness, the cut-off (the closeness of rank k)
  and its rank: "topsis 0.41 below cut-off 0.55 (rank 812 of 1000, keeping 300)".
"""

from __future__ import annotations

import bisect
import math
from typing import Sequence

import apache_beam as beam
import numpy as np
from apache_beam.transforms.stats import ApproximateQuantiles
import pyarrow as pa

from curate.config import ConfigError, parse_budget, resolve_budget
from curate.selectors.base import Selector, reject

BENEFIT, COST = 1, -1
_DIRECTIONS = {"benefit": BENEFIT, "max": BENEFIT, "cost": COST, "min": COST}
DEFAULT_CRITERIA = (("don", "benefit"), ("nod", "cost"))
DEFAULT_FRACTION = 0.3


# ------------------------------------------------------------------ pure math
def _weights(weights, n_cols: int) -> np.ndarray:
    w = np.ones(n_cols) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (n_cols,):
        raise ValueError(f"TOPSIS: {w.size} weights for {n_cols} criteria")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"TOPSIS: weights must be >= 0 and not all 0, got {list(w)}")
    return w / w.sum()


def _directions(directions, n_cols: int) -> np.ndarray:
    d = np.asarray([_DIRECTIONS[x] if isinstance(x, str) else x for x in directions], dtype=np.float64)
    if d.shape != (n_cols,) or not np.all(np.isin(d, (BENEFIT, COST))):
        raise ValueError(f"TOPSIS: directions must be +1 (benefit) or -1 (cost) per criterion, "
                         f"got {list(directions)}")
    return d


def column_stats(matrix: np.ndarray) -> dict:
    """What TOPSIS needs from the whole collection: per column sum of squares, max, min."""
    m = np.asarray(matrix, dtype=np.float64)
    return {"count": int(m.shape[0]), "sumsq": (m * m).sum(axis=0).tolist(),
            "max": m.max(axis=0).tolist() if len(m) else [],
            "min": m.min(axis=0).tolist() if len(m) else []}


def closeness_from_stats(matrix: np.ndarray, stats: dict, directions, weights=None) -> np.ndarray:
    """TOPSIS closeness of each row of `matrix` given the collection's `column_stats`."""
    m = np.atleast_2d(np.asarray(matrix, dtype=np.float64))
    n_cols = m.shape[1]
    d, w = _directions(directions, n_cols), _weights(weights, n_cols)
    if len(m) == 0 or stats["count"] == 0:
        return np.zeros(len(m))
    norm = np.sqrt(np.asarray(stats["sumsq"], dtype=np.float64))
    # a column of zeros has no direction to prefer; it contributes nothing
    scale = np.divide(w, norm, out=np.zeros(n_cols), where=norm > 0)
    v = m * scale
    hi, lo = np.asarray(stats["max"]) * scale, np.asarray(stats["min"]) * scale
    best, worst = np.where(d > 0, hi, lo), np.where(d > 0, lo, hi)
    d_best = np.sqrt(((v - best) ** 2).sum(axis=1))
    d_worst = np.sqrt(((v - worst) ** 2).sum(axis=1))
    total = d_best + d_worst
    return np.divide(d_worst, total, out=np.full(len(m), 0.5), where=total > 0)


def topsis_closeness(matrix: np.ndarray, directions: Sequence, weights=None) -> np.ndarray:
    """TOPSIS closeness in [0, 1] of each row (1 = the ideal row) of an N x C matrix.

    directions: per column +1 / "benefit" (larger is better) or -1 / "cost";
    weights: per column, >= 0, normalised to sum 1 (None: equal).
    """
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError("TOPSIS: expected an N x C matrix")
    if not np.all(np.isfinite(m)):
        raise ValueError("TOPSIS: the matrix has NaN or infinite entries")
    return closeness_from_stats(m, column_stats(m), directions, weights)


# ------------------------------------------------------------------ Beam pieces
class TopsisStatsFn(beam.CombineFn):
    """Per-column count, sum of squares, max and min over rows given as lists of floats."""

    def __init__(self, n_cols: int):
        self.n_cols = n_cols

    def create_accumulator(self):
        c = self.n_cols
        return [0, [0.0] * c, [-math.inf] * c, [math.inf] * c]

    def add_input(self, acc, row):
        acc[0] += 1
        for j, x in enumerate(row):
            acc[1][j] += x * x
            if x > acc[2][j]:
                acc[2][j] = x
            if x < acc[3][j]:
                acc[3][j] = x
        return acc

    def merge_accumulators(self, accs):
        out = self.create_accumulator()
        for a in accs:
            out[0] += a[0]
            out[1] = [s + t for s, t in zip(out[1], a[1])]
            out[2] = [max(s, t) for s, t in zip(out[2], a[2])]
            out[3] = [min(s, t) for s, t in zip(out[3], a[3])]
        return out

    def extract_output(self, acc):
        return {"count": acc[0], "sumsq": acc[1], "max": acc[2], "min": acc[3]}


class _BucketCountFn(beam.CombineFn):
    """How many rows fall in each closeness range: a dict bucket -> count."""

    def create_accumulator(self):
        return {}

    def add_input(self, acc, bucket):
        acc[bucket] = acc.get(bucket, 0) + 1
        return acc

    def merge_accumulators(self, accs):
        out = {}
        for a in accs:
            for b, n in a.items():
                out[b] = out.get(b, 0) + n
        return out

    def extract_output(self, acc):
        return acc


def _bucket(closeness: float, bounds: list) -> int:
    """Range index, 0 = highest closeness; equal values always share a range."""
    return len(bounds) - bisect.bisect_right(bounds, closeness)


def _interior_bounds(quantiles: list) -> list:
    return sorted(set(quantiles[1:-1])) if quantiles else []


def _offsets(counts: dict) -> dict:
    out, total = {}, 0
    for b in sorted(counts):
        out[b] = total
        total += counts[b]
    return out


def _order_key(record: dict):
    return (-record["topsis"], str(record.get("id", "")), str(record.get("origin", "")))


def _min_or_none(values):
    values = [v for v in values if v is not None]
    return min(values) if values else None


class DonodSelector(Selector):
    """Keep the examples closest to the ideal (high DON, low NOD) by TOPSIS.

    criteria: [[column, "benefit" | "cost"], ...] (default DON benefit, NOD cost);
    weights: one per criterion (default equal); fraction (default 0.3) or budget (a
    count, or a fraction; overrides `fraction`); rank_buckets: ranges of the
    distributed sort (about N / rank_buckets rows are sorted together).
    Adds `topsis` (float64) and `topsis_rank` (int64, 1 = best) to every ranked row.
    """

    type = "donod"
    title = "DONOD"
    report_section = "curate.report.sections:donod_section"
    requires = ("don", "nod")

    def __init__(self, criteria: Sequence[Sequence[str]] | None = None,
                 weights: Sequence[float] | None = None, fraction: float | None = DEFAULT_FRACTION,
                 budget: int | float | None = None, rank_buckets: int = 256):
        super().__init__()
        criteria = [tuple(c) for c in (criteria or DEFAULT_CRITERIA)]
        if not criteria or any(len(c) != 2 or c[1] not in _DIRECTIONS for c in criteria):
            raise ConfigError(f"donod selector: criteria must be [column, benefit|cost] pairs, got {criteria}")
        self.columns = [c for c, _ in criteria]
        self.directions = [_DIRECTIONS[d] for _, d in criteria]
        self.criteria = [[c, "benefit" if d > 0 else "cost"] for c, d in zip(self.columns, self.directions)]
        try:
            self.weights = _weights(weights, len(criteria)).tolist()
        except ValueError as err:
            raise ConfigError(f"donod selector: {err}") from None
        self.requires = tuple(self.columns)
        chosen = budget if budget is not None else fraction
        if chosen is None:
            raise ConfigError("donod selector: give a fraction or a budget")
        self.budget = parse_budget(chosen, "donod selector")
        if int(rank_buckets) < 1:
            raise ConfigError("donod selector: rank_buckets must be >= 1")
        self.rank_buckets = int(rank_buckets)

    def output_columns(self) -> dict[str, pa.DataType]:
        return {"topsis": pa.float64(), "topsis_rank": pa.int64()}

    def describe(self) -> dict:
        return {"type": self.type, "criteria": self.criteria, "weights": self.weights,
                "budget": self.budget, "rank_buckets": self.rank_buckets}

    def expand(self, pcoll):
        columns, directions, weights = self.columns, self.directions, self.weights
        budget = self.budget

        def unranked(record, reason):
            return reject({**record, "topsis": None, "topsis_rank": None}, reason)

        def check(record):
            for c in columns:
                x = record.get(c)
                if x is None:
                    yield beam.pvalue.TaggedOutput("invalid", unranked(record, f"no '{c}' score"))
                    return
                try:
                    x = float(x)
                except (TypeError, ValueError):
                    x = math.nan
                if not math.isfinite(x):
                    yield beam.pvalue.TaggedOutput(
                        "invalid", unranked(record, f"'{c}' score is {record.get(c)!r}, not a finite number"))
                    return
            yield record

        split = pcoll | "CheckScores" >> beam.FlatMap(check).with_outputs("invalid", main="valid")
        valid, invalid = split.valid, split.invalid

        stats = (valid
                 | "ScoreRows" >> beam.Map(lambda r: [float(r[c]) for c in columns])
                 | "ColumnStats" >> beam.CombineGlobally(TopsisStatsFn(len(columns))))

        def add_closeness(record, stats):
            row = np.array([[float(record[c]) for c in columns]])
            c = float(closeness_from_stats(row, stats, directions, weights)[0])
            return {**record, "topsis": c}

        scored = valid | "Closeness" >> beam.Map(add_closeness, stats=beam.pvalue.AsSingleton(stats))

        # distributed sort: closeness ranges, their sizes, each range sorted on its own
        bounds = (scored
                  | "ClosenessValues" >> beam.Map(lambda r: r["topsis"])
                  | "Quantiles" >> ApproximateQuantiles.Globally(self.rank_buckets + 1)
                  | "Bounds" >> beam.Map(_interior_bounds))
        bounds_si = beam.pvalue.AsSingleton(bounds)
        keyed = scored | "KeyByRange" >> beam.Map(lambda r, bounds: (_bucket(r["topsis"], bounds), r),
                                                 bounds=bounds_si)
        offsets = (keyed
                   | "RangeOf" >> beam.Map(lambda kv: kv[0])
                   | "RangeSizes" >> beam.CombineGlobally(_BucketCountFn())
                   | "Offsets" >> beam.Map(_offsets))

        def rank_range(kv, offsets):
            bucket, records = kv
            for i, record in enumerate(sorted(records, key=_order_key)):
                yield {**record, "topsis_rank": offsets[bucket] + i + 1}

        ranked = (keyed
                  | "GroupRanges" >> beam.GroupByKey()
                  | "RankInRange" >> beam.FlatMap(rank_range, offsets=beam.pvalue.AsSingleton(offsets)))
        stats_si = beam.pvalue.AsSingleton(stats)
        parts = ranked | "SplitAtCutoff" >> beam.Partition(
            lambda r, n_parts, stats: 0 if r["topsis_rank"] <= resolve_budget(budget, stats["count"]) else 1,
            2, stats=stats_si)
        kept, below = parts[0], parts[1]
        cutoff = (kept
                  | "KeptCloseness" >> beam.Map(lambda r: r["topsis"])
                  | "Cutoff" >> beam.CombineGlobally(_min_or_none))

        def explain(record, cutoff, stats):
            n = stats["count"]
            k = resolve_budget(budget, n)
            c, rank = record["topsis"], record["topsis_rank"]
            where = f"rank {rank} of {n}, keeping {k}"
            if cutoff is None:
                return reject(record, f"topsis {c:.4g}: the budget keeps none ({where})")
            if c < cutoff:
                return reject(record, f"topsis {c:.4g} below cut-off {cutoff:.4g} ({where})")
            return reject(record, f"topsis {c:.4g} ties the cut-off {cutoff:.4g} and sorts after "
                                  f"by id ({where})")

        rejected_ranked = below | "Explain" >> beam.Map(
            explain, cutoff=beam.pvalue.AsSingleton(cutoff), stats=stats_si)
        rejected = (rejected_ranked, invalid) | "Rejected" >> beam.Flatten()
        return {"kept": kept, "rejected": rejected}
