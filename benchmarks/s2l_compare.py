"""How S2L's selection spreads over its trajectory clusters, against random selection.

    python benchmarks/s2l_compare.py runs/s2l [--random runs/s2l-random] [--seeds 200]

Reads an S2L output (kept + rejected/ carry every row's `cluster`), counts the kept rows
per cluster and does the same for random selections of the same size from the same rows:
`--random DIR` (a `curate select --method random` output) and `--seeds` more drawn here
with the random selector's own rule (the B rows with the smallest random_key(seed, row)).
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import math
from collections import Counter

import datasets
import numpy as np

from curate.selectors.shared.keys import hash_unit as random_key


def spread(counts: dict, clusters: list) -> dict:
    v = np.array([counts.get(c, 0) for c in clusters], dtype=float)
    p = v / v.sum() if v.sum() else v
    entropy = -sum(x * math.log(x) for x in p if x > 0)
    return {"covered": int((v > 0).sum()), "min": int(v.min()), "max": int(v.max()),
            "std": float(v.std()), "entropy": entropy / math.log(len(clusters)) if len(clusters) > 1 else 1.0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("s2l")
    ap.add_argument("--random", help="a `curate select --method random` output of the same rows")
    ap.add_argument("--seeds", type=int, default=200)
    args = ap.parse_args()

    kept = datasets.load_from_disk(args.s2l).to_list()
    rejected = datasets.load_from_disk(f"{args.s2l}/rejected").to_list()
    rows = [r for r in kept + rejected if r.get("cluster") is not None]
    cluster_of = {(r["id"], r["origin"]): r["cluster"] for r in rows}
    sizes = Counter(r["cluster"] for r in rows)
    clusters = sorted(sizes, key=lambda c: (sizes[c], c))
    budget = len(kept)
    s2l = Counter(r["cluster"] for r in kept)

    print(f"{len(rows)} rows in {len(clusters)} clusters, budget {budget}\n")
    print("| cluster | size | S2L kept | random kept (seed 0) | random mean over seeds |")
    print("|---|---|---|---|---|")
    draws = []
    for seed in range(args.seeds):
        chosen = sorted(rows, key=lambda r: (random_key(seed, r), r["origin"], r["id"]))[:budget]
        draws.append(Counter(r["cluster"] for r in chosen))
    rand0 = draws[0]
    if args.random:
        picked = datasets.load_from_disk(args.random).to_list()
        from_cli = Counter(cluster_of[(r["id"], r["origin"])] for r in picked)
        assert from_cli == rand0, "the CLI's random selection differs from random_key's rule"
    for c in clusters:
        mean = np.mean([d.get(c, 0) for d in draws])
        print(f"| {c} | {sizes[c]} | {s2l.get(c, 0)} | {rand0.get(c, 0)} | {mean:.2f} |")

    print("\n| selection | clusters covered | min per cluster | max per cluster | std | normalised entropy |")
    print("|---|---|---|---|---|---|")
    for name, counts in [("S2L", s2l), ("random, seed 0", rand0)]:
        s = spread(counts, clusters)
        print(f"| {name} | {s['covered']}/{len(clusters)} | {s['min']} | {s['max']} | {s['std']:.2f} | {s['entropy']:.3f} |")
    stats = [spread(d, clusters) for d in draws]
    print(f"| random, mean of {args.seeds} seeds | {np.mean([s['covered'] for s in stats]):.2f}/{len(clusters)} | "
          f"{np.mean([s['min'] for s in stats]):.2f} | {np.mean([s['max'] for s in stats]):.2f} | "
          f"{np.mean([s['std'] for s in stats]):.2f} | {np.mean([s['entropy'] for s in stats]):.3f} |")
    by_source = Counter(r["source"] for r in kept)
    print(f"\nS2L kept by source: {dict(by_source)}")


if __name__ == "__main__":
    main()
