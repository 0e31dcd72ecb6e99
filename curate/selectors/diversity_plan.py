"""The diversity method's plan (Yu et al., 2024; see curate.selectors.diversity): budgets
per round and per cluster, the cluster-weight update of iterative refinement (Eq. 6),
and the seeded sampling keys. Pure functions of counts, weights and rows; no Beam.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Mapping, Sequence

import numpy as np

from curate.config import resolve_budget
from curate.selectors.shared.keys import hash_bits
from curate.selectors.shared.quotas import water_filling

ALLOCATIONS = ("proportional", "equal")


# ---------------------------------------------------------------- budgets


def split_budget(total: int, rounds: int) -> list[int]:
    """`total` in `rounds` parts differing by at most one, earlier rounds first."""
    base, extra = divmod(int(total), int(rounds))
    return [base + (1 if r < extra else 0) for r in range(rounds)]


def initial_weights(sizes: Mapping[int, int], allocation: str) -> dict[int, float]:
    """Round-one cluster weights, normalised: proportional to size, or equal."""
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation {allocation!r}: expected one of {ALLOCATIONS}")
    raw = {c: float(n) if allocation == "proportional" else 1.0 for c, n in sizes.items() if n > 0}
    total = sum(raw.values())
    return {c: v / total for c, v in raw.items()} if total else {}


# ---------------------------------------------------------------- the weight update


def cluster_scores(clusters: Sequence[int], gaps: Sequence[float]) -> dict[int, float]:
    """Mean S per cluster over the scored rows (NaN scores are skipped)."""
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    for c, s in zip(clusters, gaps):
        if s is None or not math.isfinite(s):
            continue
        sums[c] = sums.get(c, 0.0) + float(s)
        counts[c] = counts.get(c, 0) + 1
    return {c: sums[c] / counts[c] for c in sums}


def floored_scores(weights: Mapping[int, float], scores: Mapping[int, float],
                   score_floor: float = 0.05) -> dict[int, float] | None:
    """The s_j that enter Eq. 6, all positive: unscored clusters get the mean score,
    scores below `score_floor` x max get that floor. None when no score is positive
    (there is nothing to reweight by)."""
    if not scores:
        return None
    best = max(scores.values())
    if not best > 0:
        return None
    mean = sum(scores.values()) / len(scores)
    floor = score_floor * best
    return {c: max(scores.get(c, mean), floor) for c in weights}


def update_weights(weights: Mapping[int, float], scores: Mapping[int, float],
                   score_floor: float = 0.05) -> dict[int, float]:
    """The paper's Eq. 6, w_j <- w_j * s_j / sum_c s_c, with the floor above; the
    weights stay positive (and unchanged when no cluster scored above 0)."""
    s = floored_scores(weights, scores, score_floor)
    if s is None:
        return dict(weights)
    total = sum(s.values())
    return {c: w * s[c] / total for c, w in weights.items()}


def normalised(weights: Mapping[int, float]) -> dict[int, float]:
    total = sum(weights.values())
    return {c: w / total for c, w in weights.items()} if total > 0 else dict(weights)


# ---------------------------------------------------------------- sampling keys


def uniform01(seed: int, record: dict, salt: str = "kmq") -> float:
    """u in (0, 1), a hash of (salt, seed, id, origin)."""
    return (hash_bits(seed, record, salt) + 0.5) / 2**64


def gumbel(u: float) -> float:
    return -math.log(-math.log(u))


def sampling_key(record: dict, seed: int, quality_column: str | None = None,
                 temperature: float = 1.0) -> tuple:
    """(scored, quality / temperature + Gumbel(u), origin, id): sorting descending and
    taking the first n is sampling n without replacement with probability proportional
    to softmax(quality / temperature) (Gumbel-top-k = Efraimidis-Spirakis with weights
    exp(quality / T)). Unscored rows (missing / NaN quality) sort after scored ones."""
    g = gumbel(uniform01(seed, record))
    if quality_column is None:
        return (1, g, record["origin"], record["id"])
    q = record.get(quality_column)
    if q is None or not math.isfinite(float(q)):
        return (0, g, record["origin"], record["id"])
    return (1, float(q) / temperature + g, record["origin"], record["id"])


# ---------------------------------------------------------------- the selection plan


def first_plan(sizes: Mapping[int, int], n_input: int, budget: int | float, rounds: int,
               allocation: str, k_info: dict | None = None) -> dict:
    """Round one: the exact total, the per-round budgets and round one's quotas."""
    sizes = {int(c): int(n) for c, n in sizes.items()}
    total = min(resolve_budget(budget, n_input), sum(sizes.values()))
    round_budgets = split_budget(total, rounds)
    weights = initial_weights(sizes, allocation)
    quotas = water_filling(sizes, round_budgets[0], weights)
    return {"budget": total, "n_input": n_input, "rounds": rounds, "allocation": allocation,
            "sizes": sizes, "round_budgets": round_budgets, "kmeans": k_info or {},
            "history": [{"round": 1, "weights": weights, "quotas": quotas,
                         "taken_before": {c: 0 for c in sizes}}],
            "gaps": {}}


def taken_after(plan: dict, round_index: int | None = None) -> dict[int, int]:
    """Rows drawn per cluster after round `round_index` (1-based; default the last)."""
    h = plan["history"][(round_index or len(plan["history"])) - 1]
    return {c: h["taken_before"].get(c, 0) + h["quotas"].get(c, 0) for c in plan["sizes"]}


def next_plan(plan: dict, clusters: Sequence[int], row_keys: Sequence[str], gaps: Sequence[float],
              score_floor: float, info: dict | None = None) -> dict:
    """After a refinement step: record the scores, update the weights (Eq. 6) and
    allocate the next round's budget from what is left in each cluster."""
    plan = copy.deepcopy(plan)  # never mutate a Beam element
    r = len(plan["history"])
    last = plan["history"][-1]
    scores = cluster_scores(clusters, gaps)
    floored = floored_scores(last["weights"], scores, score_floor)
    weights = update_weights(last["weights"], scores, score_floor)
    last.update({"cluster_scores": scores, "scores_used": floored, "n_scored": len(gaps),
                 "mean_gap": float(np.nanmean(gaps)) if len(gaps) else None, **(info or {})})
    plan["gaps"].update({k: float(g) for k, g in zip(row_keys, gaps)})
    before = taken_after(plan, r)
    capacity = {c: plan["sizes"][c] - before[c] for c in plan["sizes"]}
    # weights are carried raw (Eq. 6 as written); allocation only needs their ratios
    quotas = water_filling(capacity, plan["round_budgets"][r], weights)
    plan["history"].append({"round": r + 1, "weights": weights, "quotas": quotas, "taken_before": before})
    return plan


def jsonable(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def cut_offs(cluster: int, keys_desc: list, plan: dict) -> tuple[int, Any]:
    """(cluster, the smallest key drawn in rounds 1..r), r the plan's last round; None
    when the cluster gave no rows."""
    end = taken_after(plan).get(cluster, 0)
    return cluster, (keys_desc[end - 1] if end > 0 else None)


def round_of(key: tuple, cluster: int, cuts_by_round: Mapping[int, Mapping[int, Any]]) -> int | None:
    """The first round whose cumulative cut-off this key clears; None if never drawn."""
    for r in sorted(cuts_by_round):
        cut = cuts_by_round[r].get(cluster)
        if cut is not None and tuple(key) >= tuple(cut):
            return r
    return None


def row_key(record: dict) -> str:
    return f"{record['origin']}\x00{record['id']}"
