"""Budgets per cluster: the three rules the methods' papers give, side by side.

They differ on purpose, each as its method specifies (docs/methods.md); one place so a reader
compares them, and each exists once:

    water_filling    diversity (kMQ, Yu et al. 2024): shares proportional to cluster
                     weights, capped at capacity (a full cluster taken whole, the rest
                     shared again), largest-remainder rounding; also `stratify_by`'s
                     proportional shares among strata
    cds_shares       PASER (He et al. 2025): floor(B * CDS_k / sum CDS) per cluster, capped,
                     the leftover shared again by the same rule, single units by largest
                     fraction when every floor is 0
    balanced_plan    S2L (Yang et al. 2024): smallest cluster first, each offered
                     remaining // clusters left, a smaller cluster taken whole and its
                     leftover rolled forward (`balanced_quotas`; also `stratify_by`'s
                     "equal" shares among strata: curate.selectors.shared.strata)
Each sums to exactly min(budget, total capacity).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Hashable, Mapping


def water_filling(capacity: Mapping[int, int], budget: int, weights: Mapping[int, float]) -> dict[int, int]:
    """Integer quotas per cluster: shares of `budget` proportional to `weights`, capped at
    each cluster's `capacity`, summing to exactly min(budget, total capacity).

    Water-filling: a cluster whose share reaches its capacity is taken whole and the
    budget left is shared again among the others; then largest-remainder rounding
    (ties: larger weight, then smaller cluster id). Clusters with weight 0 get rows only
    when the positive-weight ones cannot absorb the budget (then equal shares)."""
    caps = {c: int(n) for c, n in capacity.items()}
    quota = {c: 0 for c in caps}
    remaining = min(int(budget), sum(max(n, 0) for n in caps.values()))
    open_ = {c for c, n in caps.items() if n > 0}
    w = {c: Fraction(max(float(weights.get(c, 0.0)), 0.0)) for c in caps}
    while remaining > 0 and open_:
        live = {c for c in open_ if w[c] > 0} or set(open_)
        wl = {c: (w[c] if w[c] > 0 else Fraction(1)) for c in live}
        total_w = sum(wl.values())
        shares = {c: remaining * wl[c] / total_w for c in live}
        full = [c for c in live if shares[c] >= caps[c]]
        if full:
            for c in full:
                quota[c] = caps[c]
                remaining -= caps[c]
                open_.discard(c)
            continue
        floors = {c: math.floor(s) for c, s in shares.items()}
        for c, f in floors.items():
            quota[c] += f
        left = remaining - sum(floors.values())
        order = sorted(live, key=lambda c: (-(shares[c] - floors[c]), -wl[c], c))
        for c in order[:left]:
            quota[c] += 1
        remaining = 0
    return quota


def cds_shares(budget: int, cds: Mapping[int, float], capacity: Mapping[int, int]) -> dict[int, int]:
    """Per-cluster budgets summing to exactly min(budget, total capacity).

    n_k = floor(B * CDS_k / sum_j CDS_j) capped at capacity_k; the leftover is shared
    again by the same rule among the clusters with room, until nothing is left. When a
    round's floors are all zero, one unit goes to each of the clusters with room in
    order of largest fractional share, then higher CDS, then lower id. A cluster whose
    CDS is 0 or NaN gets a share only when every cluster with room has CDS 0 (then
    shares are equal).
    """
    clusters = sorted(capacity)
    alloc = {c: 0 for c in clusters}
    remaining = min(int(budget), sum(max(int(capacity[c]), 0) for c in clusters))
    weight = {c: (float(cds.get(c, 0.0)) if cds.get(c) is not None and not math.isnan(cds[c])
                  and cds[c] > 0 else 0.0) for c in clusters}
    while remaining > 0:
        open_ = [c for c in clusters if alloc[c] < capacity[c]]
        total = sum(weight[c] for c in open_)
        w = {c: (weight[c] / total if total > 0 else 1.0 / len(open_)) for c in open_}
        shares = {c: remaining * w[c] for c in open_}
        grant = {c: min(int(math.floor(shares[c])), capacity[c] - alloc[c]) for c in open_}
        if sum(grant.values()) == 0:
            order = sorted(open_, key=lambda c: (-(shares[c] - math.floor(shares[c])), -weight[c], c))
            for c in order[:remaining]:
                grant[c] = 1
        for c, g in grant.items():
            alloc[c] += g
            remaining -= g
    return alloc


def balanced_plan(sizes: Mapping[Hashable, int], budget: int) -> list[tuple[Hashable, int, int, int]]:
    """S2L's balanced sampling schedule: [(cluster, size, quota offered, rows taken)],
    in visiting order (smallest cluster first, ties by cluster id)."""
    if budget < 0:
        raise ValueError("budget must be >= 0")
    order = sorted((c for c in sizes if sizes[c] > 0), key=lambda c: (sizes[c], c))
    remaining = int(budget)
    plan = []
    for i, c in enumerate(order):
        quota = remaining // (len(order) - i)
        take = min(int(sizes[c]), quota)
        plan.append((c, int(sizes[c]), quota, take))
        remaining -= take
    return plan


def balanced_quotas(cluster_sizes: Mapping[Hashable, int], budget: int) -> dict:
    """Rows to take from each cluster: smallest clusters first, each offered
    remaining // clusters left, a smaller cluster taken whole and its leftover rolled
    forward. Sums to min(budget, total rows)."""
    return {c: take for c, _, _, take in balanced_plan(cluster_sizes, budget)}
