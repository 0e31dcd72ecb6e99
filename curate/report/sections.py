"""report.html: one section per selector, explaining what the method did with the numbers.

`selector_sections` finds the selectors in manifest["plan"]["selectors"] (each one's
`describe()`), gives each the rows it saw (`SelectorRun`, in curate.report.selector_run:
what it kept and what it rejected, with the columns it wrote) and calls the section function of its type
(the step's `report_section`, see curate.steps). A section function returns None when the output lacks the columns it reads
(an older output, or an unknown selector): the section is then a generic line with the
counts, and the page's generic histograms show the score columns.
"""

from __future__ import annotations

import html
import importlib
import math
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate import steps
from curate.report.plots import DROPPED_COLOR, KEPT_COLOR, POOL_COLOR, figure, png
from curate.report.selector_run import (SelectorRun, _budget_text, _cluster_bars, _cluster_table, _code, _counts,
                                       _floats, _n, _padded, _pct)
from curate.selectors.donod import closeness_from_stats, column_stats

MAX_SCATTER_POINTS = 20_000  # a bigger pool is drawn from a seeded sample of its rows


# ------------------------------------------------------------------ GRAPE
def grape_section(run: SelectorRun) -> str | None:
    need = ["prompt_id", "generator", "score_grape", "grape_rank"]
    if not run.has(*need):
        return None
    k, reverse = int(run.spec.get("k", 1)), bool(run.spec.get("reverse", False))
    column = run.spec.get("score_column", "logprob_mean")
    pool = run.pool(need)
    gens = pc.fill_null(pool.column("generator"), "(not given)").to_pylist()
    kept = pool.column("kept").to_pylist()
    in_pool = Counter(gens)
    picked = Counter(g for g, k_ in zip(gens, kept) if k_)
    n_picks = sum(picked.values())
    n_prompts = len(set(pool.column("prompt_id").to_pylist()))
    order = sorted(in_pool, key=lambda g: (-picked[g] / (n_picks or 1), -in_pool[g], g))

    fig, ax = figure(8, 3.2)
    x = np.arange(len(order))
    ax.bar(x - 0.2, [in_pool[g] / len(pool) for g in order], width=0.4, color=POOL_COLOR,
           label=f"share of the candidates ({len(pool):,})")
    ax.bar(x + 0.2, [picked[g] / (n_picks or 1) for g in order], width=0.4, color=KEPT_COLOR,
           label=f"share of the picks ({n_picks:,})")
    ax.set_xticks(x, order, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("share")
    ax.set_title("generator mix: the candidates against the picks")
    ax.legend(fontsize=8)
    plots = [png(fig, "GRAPE generator mix")]

    # each pick against the best candidate of its prompt that was not picked (rank k + 1)
    ranks = pool.column("grape_rank")
    picks = pool.filter(pool.column("kept")).select(["prompt_id", "score_grape"])
    runner = (pool.filter(pc.fill_null(pc.equal(ranks, k + 1), False)).select(["prompt_id", "score_grape"])
              .rename_columns(["prompt_id", "runner_up"]))
    joined = picks.join(runner, "prompt_id", join_type="left outer")
    margin = _floats(joined, "score_grape") - _floats(joined, "runner_up")
    margin = (-margin if reverse else margin)
    margin = margin[np.isfinite(margin)]
    sign = "lowest" if reverse else "highest"
    text = [f"GRAPE read {len(pool):,} candidate responses to {n_prompts:,} prompts "
            f"({len(pool) / max(n_prompts, 1):.1f} a prompt, from {len(in_pool)} generators) and kept, "
            f"for each prompt, {'the response' if k == 1 else f'the {k} responses'} the target model finds "
            f"{'least' if reverse else 'most'} likely: "
            f"the {sign} {_code(column)} (mean log-probability of the response tokens given the prompt, "
            f"so long and short answers compare). {run.n_kept:,} kept."]
    if order:
        top, low = order[0], order[-1]
        text.append(f"The picks come most from {html.escape(top)}: {_pct(picked[top], n_picks)} of the "
                    f"picks against {_pct(in_pool[top], len(pool))} of the candidates; "
                    f"{html.escape(low)} has {_pct(picked[low], n_picks)} of the picks against "
                    f"{_pct(in_pool[low], len(pool))} of the candidates.")
    if len(margin):
        q1, med = np.percentile(margin, [25, 50])
        text.append(f"A pick beats its prompt's runner-up by a median {med:.3g} (a quarter of the picks "
                    f"by less than {q1:.3g}); the smallest margins are near-ties, where a slightly "
                    f"different model could pick another response.")
        fig, ax = figure(6, 2.8)
        ax.hist(margin, bins=min(40, max(5, len(margin) // 5)), color=KEPT_COLOR)
        ax.axvline(med, color="#333", linestyle="--", label=f"median {med:.3g}")
        ax.set_xlabel(f"{column}: pick minus runner-up" + (" (reversed)" if reverse else ""))
        ax.set_ylabel("picks")
        ax.set_title(f"margin of each pick over the runner-up ({len(margin):,} picks)")
        ax.legend(fontsize=8)
        plots.append(png(fig, "GRAPE margin to the runner-up"))
    no_rival = len(joined) - len(margin)
    if no_rival:
        text.append(f"{no_rival:,} picks had no scored runner-up (a prompt with {k} candidate(s) or fewer, "
                    f"or a missing score).")
    return f"<p>{' '.join(text)}</p>" + "".join(plots)


# ------------------------------------------------------------------ DONOD
def donod_section(run: SelectorRun) -> str | None:
    criteria = run.spec.get("criteria") or [["don", "benefit"], ["nod", "cost"]]
    columns = [c for c, _ in criteria]
    directions = [1 if d == "benefit" else -1 for _, d in criteria]
    weights = run.spec.get("weights")
    if not run.has(*columns, "topsis"):
        return None
    pool = run.pool(columns + ["topsis"])
    close = _floats(pool, "topsis")
    kept = pool.column("kept").to_numpy()
    ranked = np.isfinite(close)
    cutoff = float(close[kept & ranked].min()) if (kept & ranked).any() else None
    n_ranked, n_kept = int(ranked.sum()), int(kept.sum())
    values = np.stack([_floats(pool, c) for c in columns], axis=1)
    budget = run.spec.get("budget")
    crit = ", ".join(f"{_code(c)} ({d})" for c, d in criteria)
    text = [f"DONOD measured, for each example, what one SGD step on it would do to the model's output "
            f"layer: DON, the change of the layer's norm (new minus old; high when the model can absorb "
            f"the answer), and NOD, how far the step moves the layer (a cost). TOPSIS ranked the "
            f"{n_ranked:,} examples with finite scores on {crit} by their closeness to the ideal point "
            f"(the best value of every criterion seen, weights "
            f"{', '.join(f'{w:.2g}' for w in (weights or [1 / len(columns)] * len(columns)))}) and kept the "
            f"top {n_kept:,} ({_pct(n_kept, n_ranked)}; budget {_budget_text(budget)})"
            + (f": every kept row has closeness &ge; {cutoff:.4g}." if cutoff is not None else ".")]
    if n_ranked < len(pool):
        text.append(f"{len(pool) - n_ranked:,} rows lacked a finite score and were rejected unranked.")
    for j, c in enumerate(columns):
        k_med, d_med = (np.nanmedian(values[m & ranked, j]) if (m & ranked).any() else math.nan
                        for m in (kept, ~kept))
        text.append(f"Median {_code(c)}: kept {k_med:.4g}, dropped {d_med:.4g}.")

    rng = np.random.default_rng(0)
    idx = np.flatnonzero(ranked)
    if len(idx) > MAX_SCATTER_POINTS:
        idx = np.sort(rng.choice(idx, MAX_SCATTER_POINTS, replace=False))
    xs = values[idx, 0]
    ys = values[idx, 1] if len(columns) > 1 else close[idx]
    fig, ax = figure(6.5, 4.2)
    ax.scatter(xs[~kept[idx]], ys[~kept[idx]], s=6, color="#bbbbbb", label="dropped", rasterized=True)
    ax.scatter(xs[kept[idx]], ys[kept[idx]], s=8, color=KEPT_COLOR, label="kept", rasterized=True)
    if len(columns) == 2 and cutoff is not None and n_ranked > 1:
        # the cut-off as a line: where TOPSIS closeness equals the kept rows' lowest
        stats = column_stats(values[ranked])
        (x0, x1), (y0, y1) = _padded(xs), _padded(ys)
        mx, my = np.meshgrid(np.linspace(x0, x1, 200), np.linspace(y0, y1, 200))
        grid = closeness_from_stats(np.stack([mx.ravel(), my.ravel()], axis=1), stats, directions,
                                    weights).reshape(mx.shape)
        ax.contour(mx, my, grid, levels=[cutoff], colors="#333", linestyles="--")
        ax.plot([], [], color="#333", linestyle="--", label=f"cut-off: closeness {cutoff:.3g}")
        best = [stats["max"][j] if directions[j] > 0 else stats["min"][j] for j in range(2)]
        ax.scatter([best[0]], [best[1]], marker="*", s=180, color="#dd8452", zorder=5, clip_on=False,
                   label="ideal point")
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
    ax.set_xlabel(f"{columns[0]} ({criteria[0][1]})")
    ax.set_ylabel(f"{columns[1]} ({criteria[1][1]})" if len(columns) > 1 else "TOPSIS closeness")
    shown = f", {len(idx):,} of {n_ranked:,} shown" if len(idx) < n_ranked else ""
    ax.set_title(f"{' / '.join(c.upper() for c in columns[:2])}: kept {n_kept:,} of {n_ranked:,}{shown}")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    plots = [png(fig, "DONOD DON/NOD scatter")]

    fig, ax = figure(6, 2.6)
    bins = np.histogram_bin_edges(close[ranked], bins=40) if n_ranked else 10
    ax.hist(close[ranked & ~kept], bins=bins, color=DROPPED_COLOR, alpha=0.6, label="dropped")
    ax.hist(close[ranked & kept], bins=bins, color=KEPT_COLOR, alpha=0.8, label="kept")
    if cutoff is not None:
        ax.axvline(cutoff, color="#333", linestyle="--", label=f"cut-off {cutoff:.3g}")
    ax.set_xlabel("TOPSIS closeness to the ideal (1 = ideal)")
    ax.set_ylabel("examples")
    ax.set_title(f"closeness: the top {_pct(n_kept, n_ranked)} kept")
    ax.legend(fontsize=8)
    plots.append(png(fig, "DONOD closeness"))
    return f"<p>{' '.join(text)}</p>" + "".join(plots)


# ------------------------------------------------------------------ kMQ (diversity)
def kmq_section(run: SelectorRun) -> str | None:
    if not run.has("cluster"):
        return None
    rounds = int(run.spec.get("rounds", 1))
    cols = ["cluster"] + [c for c in ("diversity_round", "diversity_gap") if run.has(c)]
    pool = run.pool(cols)
    clusters = pool.column("cluster").to_pylist()
    kept = pool.column("kept").to_pylist()
    size = _counts(clusters)
    n_clustered = sum(size.values())
    ids = sorted(size, key=lambda c: (-size[c], c))
    kept_by = _counts(c for c, k in zip(clusters, kept) if k)
    rnd = pool.column("diversity_round").to_pylist() if "diversity_round" in cols else [None] * len(pool)
    if rounds > 1 and "diversity_round" in cols:
        colors = ["#55a868", "#2d7f45", "#9fd4a8", "#1b5e20", "#c7e9c0"]
        parts = [(f"kept in round {r}", _counts(c for c, k, rr in zip(clusters, kept, rnd) if k and rr == r),
                  colors[(r - 1) % len(colors)]) for r in range(1, rounds + 1)]
    else:
        parts = [("kept", kept_by, KEPT_COLOR)]
    fig, ax = figure(8, 3.2)
    _cluster_bars(ax, ids, size, parts, "clusters, largest first")
    ax.set_title(f"kMQ: cluster sizes and rows kept ({len(kept_by)} of {len(size)} clusters gave rows)")
    plots = [png(fig, "kMQ clusters")]

    k_text = (f"K = {len(size)} chosen by silhouette among {run.spec.get('k_grid')}"
              if run.spec.get("k") == "auto" else f"K = {run.spec.get('k', len(size))}")
    allocation = run.spec.get("allocation", "proportional")
    share = ("proportional to its size" if allocation == "proportional"
             else "in equal shares (a cluster smaller than its share gives all its rows)")
    quality = run.spec.get("quality_column")
    draw = (f"by softmax of {_code(quality)} (temperature {run.spec.get('temperature', 1.0)})" if quality
            else "uniformly at random (seeded)")
    text = [f"kMQ split the {n_clustered:,} embedded examples ({_code(run.spec.get('embedding_column', 'embedding'))}) "
            f"into clusters of similar content with k-means ({k_text}), gave each cluster a share of the "
            f"budget ({_budget_text(run.spec.get('budget'))}) {share}, and drew that many rows inside each "
            f"cluster {draw}. It kept {run.n_kept:,} rows from {len(kept_by)} of {len(size)} clusters."]
    if ids:
        big, small = ids[0], ids[-1]
        text.append(f"The largest cluster ({big}) holds {size[big]:,} rows ({_pct(size[big], n_clustered)} of "
                    f"the pool) and gave {kept_by.get(big, 0):,} ({_pct(kept_by.get(big, 0), run.n_kept)} of "
                    f"the kept); the smallest ({small}) holds {size[small]:,} and gave {kept_by.get(small, 0):,}.")
    if len(pool) > n_clustered:
        text.append(f"{len(pool) - n_clustered:,} rows had no usable embedding and were rejected.")
    if rounds > 1 and "diversity_round" in cols:
        per_round = []
        gaps = _floats(pool, "diversity_gap") if "diversity_gap" in cols else None
        for r in range(1, rounds + 1):
            sel = [i for i, (k, rr) in enumerate(zip(kept, rnd)) if k and rr == r]
            covered = len({clusters[i] for i in sel})
            g = gaps[sel] if gaps is not None and sel else np.array([])
            g = g[np.isfinite(g)]
            per_round.append(f"Round {r}: {len(sel):,} rows from {covered} clusters"
                             + (f", mean gap S {g.mean():.3g}" if len(g) else ""))
        text.append(f"Iterative refinement, {rounds} rounds: after each round but the last a model was "
                    f"fine-tuned on the rows drawn so far, answered their prompts, and each cluster's weight "
                    f"was multiplied by how far those answers were from the gold ones (mean gap S), so the "
                    f"next round drew more from clusters with more left to learn. "
                    + ". ".join(per_round) + ".")
    return f"<p>{' '.join(text)}</p>" + "".join(plots)


# ------------------------------------------------------------------ S2L
def s2l_section(run: SelectorRun) -> str | None:
    if not run.has("cluster", "cluster_quota"):
        return None
    column = run.spec.get("column", "trajectory")
    pool = run.pool(["cluster", "cluster_quota"])
    clusters = pool.column("cluster").to_pylist()
    kept = pool.column("kept").to_pylist()
    size = _counts(clusters)
    n_clustered = sum(size.values())
    kept_by = _counts(c for c, k in zip(clusters, kept) if k)
    ids = sorted(size, key=lambda c: (size[c], c))  # S2L visits the smallest cluster first
    whole = [c for c in ids if kept_by.get(c, 0) == size[c]]
    sampled = [c for c in ids if 0 < kept_by.get(c, 0) < size[c]]
    fig, ax = figure(8, 3.2)
    _cluster_bars(ax, ids, size, [("kept", kept_by, KEPT_COLOR)], "clusters, smallest first (S2L's visiting order)")
    ax.set_title(f"S2L: cluster sizes and rows kept ({len(size)} clusters)")
    plots = [png(fig, "S2L clusters")]

    half = ids[:len(ids) // 2]
    small_pool = sum(size[c] for c in half)
    small_kept = sum(kept_by.get(c, 0) for c in half)
    text = [f"S2L trained a small proxy model on the pool and recorded each example's loss at every saved "
            f"checkpoint (its loss trajectory, {_code(column)}); examples with similar trajectories affect "
            f"training alike. It grouped the {n_clustered:,} trajectories into {len(size)} clusters with "
            f"k-means and sampled the clusters evenly, smallest first: each cluster is offered what is left "
            f"of the budget ({_budget_text(run.spec.get('budget'))}) divided by the clusters still to visit"
            + ("" if not run.spec.get("strata") else ", inside each stratum (above)")
            + f". Kept {run.n_kept:,} of {run.n:,} ({_pct(run.n_kept, run.n)})."]
    if whole:
        text.append(f"{_n(len(whole), 'cluster')} smaller than {'its' if len(whole) == 1 else 'their'} offer "
                    f"gave all {sum(size[c] for c in whole):,} of {'its' if len(whole) == 1 else 'their'} rows.")
    if sampled:
        lo, hi = min(kept_by[c] for c in sampled), max(kept_by[c] for c in sampled)
        text.append(f"{_n(len(sampled), 'cluster')} gave a random sample of "
                    f"{lo if lo == hi else f'{lo}-{hi}'} rows each.")
    if half:
        text.append(f"Rare behaviour is favoured: the smaller half of the clusters holds "
                    f"{_pct(small_pool, n_clustered)} of the pool and {_pct(small_kept, run.n_kept)} of the kept rows.")
    if len(pool) > n_clustered:
        text.append(f"{len(pool) - n_clustered:,} rows had no usable trajectory and were rejected.")
    traj = _trajectory_plot(run, column, ids, size, kept_by)
    return f"<p>{' '.join(text)}</p>" + "".join(plots) + traj


def _trajectory_plot(run: SelectorRun, column: str, ids: list, size: Counter, kept_by: Counter) -> str:
    """Mean loss trajectory of the smallest and largest clusters (what S2L clusters on)."""
    if not run.has(column):
        return ""
    dtype = run.column_type(column)
    if not (pa.types.is_list(dtype) or pa.types.is_fixed_size_list(dtype) or pa.types.is_large_list(dtype)):
        return ""
    pool = run.pool(["cluster", column])
    pool = pool.filter(pc.and_(pc.is_valid(pool.column("cluster")), pc.is_valid(pool.column(column))))
    lengths = pc.list_value_length(pool.column(column))
    if not len(pool) or pc.min(lengths).as_py() != pc.max(lengths).as_py() or not pc.max(lengths).as_py():
        return ""
    steps = pc.max(lengths).as_py()
    values = pc.list_flatten(pool.column(column)).to_numpy(zero_copy_only=False).reshape(len(pool), steps)
    clusters = pool.column("cluster").to_numpy(zero_copy_only=False)
    show = ids[:5] + [c for c in ids[-5:] if c not in ids[:5]]
    fig, ax = figure(7, 3)
    x = np.arange(1, steps + 1)
    for c in show:
        ax.plot(x, values[clusters == c].mean(axis=0), marker=".",
                label=f"cluster {c}: {size[c]:,} rows, {kept_by.get(c, 0):,} kept")
    ax.set_xlabel("checkpoint")
    ax.set_ylabel("mean loss")
    ax.set_title("mean loss trajectory per cluster" if len(show) == len(ids)
                 else "mean loss trajectory of the 5 smallest and the 5 largest clusters")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    return png(fig, "S2L trajectories")


# ------------------------------------------------------------------ PASER
def paser_section(run: SelectorRun) -> str | None:
    if not run.has("cluster", "cds", "cluster_budget"):
        return None
    pool = run.pool(["cluster", "cds", "cluster_budget"])
    clusters = pool.column("cluster").to_pylist()
    kept = pool.column("kept").to_pylist()
    size = _counts(clusters)
    kept_by = _counts(c for c, k in zip(clusters, kept) if k)
    cds, budget = {}, {}
    for c, d, b in zip(clusters, pool.column("cds").to_pylist(), pool.column("cluster_budget").to_pylist()):
        if c is not None:
            cds.setdefault(c, d)
            budget.setdefault(c, b)
    dropped = run.dropped(["cluster", "prompt", "reject_reason"] + (["concepts"] if run.has("concepts") else []))
    reasons = dropped.column("reject_reason").to_pylist()
    ccg = [i for i, r in enumerate(reasons) if r and r.startswith("CCG conflict")]
    over = [i for i, r in enumerate(reasons) if r and r.startswith("over cluster budget")]
    ccg_by = _counts(dropped.column("cluster")[i].as_py() for i in ccg)
    over_by = _counts(dropped.column("cluster")[i].as_py() for i in over)
    ids = sorted(size, key=lambda c: (-(cds.get(c) or 0), c))  # most degraded first

    fig, ax = figure(8, 3.4)
    x = np.arange(len(ids))
    ax.bar(x - 0.2, [size[c] for c in ids], width=0.4, color=POOL_COLOR, label="cluster size")
    ax.bar(x + 0.2, [budget.get(c) or 0 for c in ids], width=0.4, color=KEPT_COLOR, label="budget")
    ax.set_xticks(x, [str(c) for c in ids], fontsize=8)
    ax.set_xlabel("capability clusters, most degraded first")
    ax.set_ylabel("rows")
    ax2 = ax.twinx()
    ax2.plot(x, [cds.get(c) or 0 for c in ids], color="#333", marker="o", label="CDS (mean JSD)")
    ax2.set_ylabel("CDS: mean JSD (nats)")
    ax2.set_ylim(bottom=0)
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [h.get_label() for h in lines], fontsize=8, loc="upper left", bbox_to_anchor=(1.1, 1))
    ax.set_title("PASER: budget against degradation (CDS) per cluster")
    plots = [png(fig, "PASER budget and CDS per cluster")]

    total_budget = sum(v or 0 for v in budget.values())
    text = [f"PASER grouped the {sum(size.values()):,} instructions into {len(size)} capability clusters "
            f"(spectral clustering of {_code(run.spec.get('embedding_column', 'embedding'))}), measured how "
            f"much pruning hurt each cluster (CDS: the mean JSD between the original and the pruned model's "
            f"next-token distributions over the responses) and shared the budget "
            f"({_budget_text(run.spec.get('budget'))}"
            + (f", {total_budget:,} rows" if total_budget != run.spec.get("budget") else "")
            + ") in proportion to CDS."]
    if ids:
        hi, lo = ids[0], ids[-1]
        text.append(f"The most degraded cluster ({hi}, CDS {cds[hi]:.3g}, {size[hi]:,} rows) got a budget of "
                    f"{budget[hi]:,}; the least degraded ({lo}, CDS {cds[lo]:.3g}, {size[lo]:,} rows) got "
                    f"{budget[lo]:,}.")
    text.append(f"Inside each cluster it took the examples with the highest IES (JSD per log token cost) "
                f"first; its concept-consistency graph turned away {_n(len(ccg), 'example')} whose key-phrase "
                f"concepts contradicted ones already selected (two concepts known but never accepted "
                f"together), and {len(over):,} more were beyond their cluster's budget. Kept {run.n_kept:,}.")
    table = _cluster_table([[c, size[c], cds.get(c), budget.get(c), kept_by.get(c, 0), ccg_by.get(c, 0),
                             over_by.get(c, 0)] for c in ids],
                           ["cluster", "rows", "CDS", "budget", "kept", "CCG conflict", "over budget"])
    examples = ""
    if ccg:
        items = []
        for i in ccg[:3]:
            concepts = dropped.column("concepts")[i].as_py() if "concepts" in dropped.column_names else None
            items.append(f"<li><span class='meta'>cluster {dropped.column('cluster')[i].as_py()}"
                         + (f" · concepts: {html.escape(', '.join(concepts or []))}" if concepts is not None else "")
                         + f"</span><pre>{html.escape((dropped.column('prompt')[i].as_py() or '')[:240])}</pre>"
                         f"<span class='why'>{html.escape(reasons[i])}</span></li>")
        examples = "<h3>turned away by the concept filter</h3><ul class='plain'>" + "".join(items) + "</ul>"
    return f"<p>{' '.join(text)}</p>" + "".join(plots) + table + examples


# ------------------------------------------------------------------ random
def random_section(run: SelectorRun) -> str | None:
    return (f"<p>Random selection is the seeded baseline the other methods are measured against: it kept "
            f"{run.n_kept:,} of {run.n:,} rows ({_pct(run.n_kept, run.n)}; budget "
            f"{_budget_text(run.spec.get('budget'))}) uniformly at random, seed {run.spec.get('seed', 0)}. "
            f"A row's key is a hash of (seed, id, origin), so a rerun keeps the same rows and a smaller "
            f"budget keeps a subset of a larger one.</p>")


def top_section(run: SelectorRun) -> str | None:
    if not run.has("top_value"):
        return None
    column, order = run.spec.get("column", "?"), run.spec.get("order", "highest")
    pool = run.pool(["top_value"])
    values, kept = _floats(pool, "top_value"), pool.column("kept").to_numpy()
    ranked = np.isfinite(values)
    bounds = [f"{_code(column)} &ge; {run.spec['at_least']}" if run.spec.get("at_least") is not None else None,
              f"{_code(column)} &lt; {run.spec['below']}" if run.spec.get("below") is not None else None]
    bounds = " and ".join(b for b in bounds if b)
    text = (f"<p>Kept the {_n(int(kept.sum()), 'row')} with the {order} {_code(column)} of {len(pool):,} "
            f"(budget {_budget_text(run.spec.get('budget'))})"
            + (f", among the rows with {bounds}" if bounds else "") + ".")
    if (kept & ranked).any():
        edge = values[kept & ranked].min() if order == "highest" else values[kept & ranked].max()
        text += f" The cut-off is {edge:.4g}."
    if not ranked.all():
        text += f" {int((~ranked).sum()):,} rows had no value and were rejected unranked."
    if not (kept & ranked).any():
        return text + "</p>"
    fig, ax = figure(7, 3)
    bins = np.histogram_bin_edges(values[ranked], bins=30)
    ax.hist(values[ranked & ~kept], bins=bins, color=DROPPED_COLOR, alpha=0.7, label="not kept")
    ax.hist(values[ranked & kept], bins=bins, color=KEPT_COLOR, alpha=0.8, label="kept")
    for key in ("at_least", "below"):
        if run.spec.get(key) is not None:
            ax.axvline(run.spec[key], color="black", linestyle="--", linewidth=1, label=key)
    ax.set_xlabel(column)
    ax.set_ylabel("rows")
    ax.legend(fontsize=8)
    return text + "</p>" + png(fig, f"Top {column} histogram")


def generic_section(run: SelectorRun) -> str:
    options = {k: v for k, v in run.spec.items() if k != "type" and isinstance(v, (int, float, str))}
    opts = ", ".join(f"{k}={v}" for k, v in options.items())
    return (f"<p>{html.escape(run.type)}{f' ({html.escape(opts)})' if opts else ''}: kept {run.n_kept:,} of "
            f"the {run.n:,} rows that reached it. This output lacks the columns a detailed view of this "
            f"method reads; the score histograms below show the columns it has.</p>")


def strata_section(run: SelectorRun) -> str:
    """A stratified selector (`stratify_by`): each stratum's rows, share and kept rows."""
    strata, column = run.spec.get("strata"), run.spec.get("stratify_by")
    if not strata or not run.has(column):
        return ""
    pool = run.pool([column])
    kept_by = _counts(v if v is None else str(v) for v, k in
                      zip(pool.column(column).to_pylist(), pool.column("kept").to_pylist()) if k)
    has_share = strata[0].get("share") is not None
    rows = [[t["value"], t["rows"], t["can_keep"], *([t["share"]] if has_share else []), kept_by.get(t["value"], 0)]
            for t in strata]
    header = [column, "pool rows", "the method can keep", *(["share"] if has_share else []), "kept"]
    rule = ("in the pool's proportions" if run.spec.get("stratify_shares") == "proportional"
            else "smallest first, equal offers")
    text = (f"Stratified by {_code(column)}: the budget was shared among its {len(strata)} values {rule}, "
            f"and the method ran inside each value as if it were the whole pool."
            if has_share else f"Stratified by {_code(column)}: the method ran inside each of its "
            f"{len(strata)} values as if it were the whole pool.")
    return f"<p>{text}</p>" + _cluster_table(rows, header)


def selector_stages(manifest: dict) -> list[str]:
    """The reject_stage of each selector, in order (as curate.pipeline.plan.Plan names them)."""
    specs = manifest.get("plan", {}).get("selectors", [])
    named = list(manifest.get("counts", {}).get("not_selected", {}))
    if len(named) == len(specs):
        return named
    if len(specs) == 1:
        return [f"select:{specs[0]['type']}"]
    return [f"select{i}:{s['type']}" for i, s in enumerate(specs)]


def _section_function(step):
    module, name = step.report_section.split(":")
    return getattr(importlib.import_module(module), name)


def selector_sections(kept: pa.Table, rejected: pa.Table | None, manifest: dict) -> tuple[str, bool]:
    """The selectors' sections, and whether they drew the clusters."""
    specs = manifest.get("plan", {}).get("selectors", [])
    stages = selector_stages(manifest)
    out, clusters_drawn = [], False
    for i, (spec, stage) in enumerate(zip(specs, stages)):
        run = SelectorRun(spec, stage, kept, rejected, stages[i + 1:])
        step = steps.find("selector", run.type)  # None: a selector this install lacks
        body = _section_function(step)(run) if step is not None and step.report_section else None
        clusters_drawn |= body is not None and step.draws_clusters
        anchor = f"selector-{run.type}" if len(specs) == 1 else f"selector{i}-{run.type}"
        out.append(f"<section id='{html.escape(anchor)}'><h2>Selection: "
                   f"{html.escape(step.title if step is not None and step.title else run.type)}</h2>"
                   f"{strata_section(run)}{body or generic_section(run)}</section>")
    return "".join(out), clusters_drawn
