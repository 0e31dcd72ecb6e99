"""report.html: what a run read, dropped and kept, with plots, in one self-contained file.

Sections: the counts funnel, per-source mix before and after, one section per selector
that says what the method did, with its own plots (`curate.report.sections`), score
histograms (kept vs. not selected), cluster sizes when a `cluster` column exists and no
selector section drew them, and a few kept and dropped examples per stage. Plots are
matplotlib PNGs embedded as base64, so the file can be mailed or opened from a bucket.
Only the needed columns are read from the memory-mapped shards, so the report stays
cheap on large outputs.
"""

from __future__ import annotations

import html
import json
import os
from collections import Counter

import pyarrow as pa

from curate.records import BASE_COLUMNS
from curate.report.plots import DROPPED_COLOR, KEPT_COLOR, POOL_COLOR, READ_COLOR, figure, png
from curate.report.sections import selector_sections

SKIP_PLOT = {"random_key", "reject_stage", "reject_reason", "cluster", "n_response_tokens",
             # selectors' bookkeeping, shown in their own sections (curate.report.sections)
             "score_grape", "grape_rank", "grape_candidates", "topsis_rank", "cluster_rank", "cluster_size",
             "cluster_budget", "cluster_quota", "stratum_quota", "diversity_round", "cluster_weight"}


def _load_table(path: str) -> pa.Table | None:
    if not os.path.exists(os.path.join(path, "state.json")):
        return None
    import datasets

    return datasets.load_from_disk(path).data.table


def _funnel(counts: dict) -> str:
    failed = counts.get("score_failed", {})  # absent in manifests older than it
    labels = (["read", "invalid"] + list(counts["filtered"]) + [f"{s} failed" for s in failed]
              + list(counts["not_selected"]) + ["kept"])
    values = ([counts["read"], counts["invalid"]] + list(counts["filtered"].values())
              + list(failed.values()) + list(counts["not_selected"].values()) + [counts["kept"]])
    fig, ax = figure(7, 0.45 * len(labels) + 0.8)
    colors = [READ_COLOR] + [DROPPED_COLOR] * (len(labels) - 2) + [KEPT_COLOR]
    ax.barh(labels[::-1], values[::-1], color=colors[::-1])
    for i, v in enumerate(values[::-1]):
        ax.text(v, i, f" {v:,}", va="center")
    ax.set_xlabel("examples")
    ax.set_title("counts funnel")
    return png(fig, "counts funnel")


def mix_shift(before: Counter, after: Counter, least: float = 0.05) -> list[tuple[str, float, float]]:
    """The sources (with at least `least` of the pool) whose share of the kept rows is
    more than twice, or less than half, their share of the pool: (source, pool share,
    kept share), largest shift first."""
    total_b, total_a = sum(before.values()), sum(after.values())
    if not total_b or not total_a:
        return []
    shifted = [(n, before[n] / total_b, after[n] / total_a) for n in before if before[n] / total_b >= least]
    shifted = [t for t in shifted if t[2] > 2 * t[1] or t[2] < t[1] / 2]
    return sorted(shifted, key=lambda t: -abs(t[2] - t[1]))


def _sources(kept: pa.Table, rejected: pa.Table | None, selectors: list[dict]) -> str:
    after = Counter(kept.column("source").to_pylist())
    before = Counter(after)
    if rejected is not None and len(rejected):
        before.update(rejected.column("source").to_pylist())
    names = [n for n, _ in before.most_common()]
    rows = "".join(f"<tr><td>{html.escape(n)}</td><td>{before[n]:,}</td><td>{after[n]:,}</td></tr>" for n in names)
    table = f"<table><tr><th>source</th><th>before</th><th>kept</th></tr>{rows}</table>"
    if len(names) < 2:  # one source: its share is 100% before and after
        return table
    shift = mix_shift(before, after)
    if shift and selectors and not any(s.get("stratify_by") for s in selectors):
        table += ("<p class='why'>The kept mix is not the pool's: "
                  + "; ".join(f"{html.escape(n)} {a:.0%} of the kept rows, {b:.0%} of the pool" for n, b, a in shift)
                  + ". A score-based selector over several sources often spends its budget on the source its "
                  "score favours; <code>stratify_by: source</code> on the selector keeps the pool's mix.</p>")
    fig, ax = figure(7, 3)
    total_b, total_a = sum(before.values()) or 1, sum(after.values()) or 1
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [before[n] / total_b for n in names], width=0.4, color=POOL_COLOR,
           label="before (all examples)")
    ax.bar([i + 0.2 for i in x], [after[n] / total_a for n in names], width=0.4, color=KEPT_COLOR, label="kept")
    ax.set_xticks(list(x), names, rotation=20, ha="right")
    ax.set_ylabel("share")
    ax.set_title("source mix before and after")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return png(fig, "source mix") + table


def _numeric_columns(table: pa.Table) -> list[str]:
    return [f.name for f in table.schema
            if f.name not in BASE_COLUMNS and f.name not in SKIP_PLOT
            and (pa.types.is_floating(f.type) or pa.types.is_integer(f.type))]


def _histograms(kept: pa.Table, rejected: pa.Table | None) -> str:
    import numpy as np

    parts = []
    for name in _numeric_columns(kept):
        k = np.array([v for v in kept.column(name).to_pylist() if v is not None], dtype=float)
        r = np.array([], dtype=float)
        if rejected is not None and name in rejected.column_names:
            r = np.array([v for v in rejected.column(name).to_pylist() if v is not None], dtype=float)
        k, r = k[np.isfinite(k)], r[np.isfinite(r)]
        if not len(k) and not len(r):
            continue
        fig, ax = figure(5, 2.6)
        both = np.concatenate([k, r])
        bins = np.histogram_bin_edges(both, bins=40)
        if len(r):
            ax.hist(r, bins=bins, alpha=0.6, label=f"dropped ({len(r):,})", color=DROPPED_COLOR)
        ax.hist(k, bins=bins, alpha=0.7, label=f"kept ({len(k):,})", color=KEPT_COLOR)
        ax.set_title(name)
        ax.legend(fontsize=8)
        parts.append(png(fig, f"histogram of {name}"))
    return "".join(parts) or "<p>no score columns</p>"


def _clusters(kept: pa.Table, rejected: pa.Table | None) -> str:
    if "cluster" not in kept.column_names:
        return ""
    k = Counter(kept.column("cluster").to_pylist())
    allc = Counter(k)
    if rejected is not None and "cluster" in rejected.column_names:
        allc.update(c for c in rejected.column("cluster").to_pylist() if c is not None)
    ids = sorted(allc, key=lambda c: -allc[c])
    fig, ax = figure(7, 2.8)
    ax.bar(range(len(ids)), [allc[c] for c in ids], label="cluster size", color=POOL_COLOR)
    ax.bar(range(len(ids)), [k.get(c, 0) for c in ids], label="kept", color=KEPT_COLOR)
    ax.set_xlabel("clusters, largest first")
    ax.set_title(f"cluster sizes and budgets ({len(k)} of {len(allc)} clusters covered)")
    ax.legend()
    return "<h2>Clusters</h2>" + png(fig, "cluster sizes")


def _examples(kept: pa.Table, rejected: pa.Table | None, n: int = 3) -> str:
    def card(row: dict, extra: str = "") -> str:
        scores = {k: v for k, v in row.items() if k not in BASE_COLUMNS and k not in ("reject_stage", "reject_reason")
                  and isinstance(v, (int, float)) and not isinstance(v, bool)}
        return (f"<div class='ex'><div class='meta'>{html.escape(row['id'])} · {html.escape(row['origin'])} · "
                f"{html.escape(json.dumps(scores)[:300])}{extra}</div>"
                f"<b>prompt</b><pre>{html.escape(row['prompt'][:600])}</pre>"
                f"<b>response</b><pre>{html.escape(row['response'][:600])}</pre></div>")

    out = ["<h3>kept</h3>"] + [card(r) for r in kept.slice(0, n).to_pylist()]
    if rejected is not None and len(rejected):
        stages = rejected.column("reject_stage").to_pylist()
        for stage in dict.fromkeys(stages):
            idx = [i for i, s in enumerate(stages) if s == stage][:n]
            out.append(f"<h3>dropped by {html.escape(stage)}</h3>")
            for i in idx:
                row = rejected.slice(i, 1).to_pylist()[0]
                out.append(card(row, f"<br><span class='why'>{html.escape(row['reject_reason'] or '')}</span>"))
    return "".join(out)


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
pre{white-space:pre-wrap;background:#f6f6f6;padding:.5em;margin:.2em 0 .8em}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}
.ex{border-left:3px solid #ccc;padding-left:.8em;margin-bottom:1em}.meta{color:#666;font-size:.85em}
.why{color:#c44e52}img{margin:4px;max-width:100%}section{margin-bottom:1.5em}
ul.plain{list-style:none;padding-left:0}ul.plain li{border-left:3px solid #c44e52;padding-left:.8em;margin-bottom:.8em}
code{background:#f0f0f0;padding:0 .2em}"""


def render_report(out_dir: str, manifest: dict | None = None) -> str:
    """Write out_dir/report.html from the shards and the manifest; returns its path."""
    if manifest is None:
        with open(os.path.join(out_dir, "manifest.json")) as fh:
            manifest = json.load(fh)
    counts = manifest["counts"]
    kept = _load_table(out_dir)
    rejected = _load_table(os.path.join(out_dir, "rejected"))
    title = html.escape(manifest.get("name", os.path.basename(out_dir.rstrip("/"))))
    steps = manifest.get("plan", {})
    scoring = manifest.get("scoring_plan") or {}  # the steps that made re-used scores
    step_text = ", ".join(s["type"] for k in ("filters", "scorers", "selectors")
                          for s in steps.get(k) or scoring.get(k) or [])
    selection, clusters_drawn = selector_sections(kept, rejected, manifest)
    failed = counts.get("score_failed")  # one entry per scorer; none without scorers
    failed_text = f"{sum(failed.values()):,} failed in a scorer (dead letter), " if failed else ""
    resumed = sum((counts.get("from_saved") or {}).values())  # absent in manifests older than resume
    failed_text += f"{resumed:,} scored by an earlier, interrupted run (saved work), " if resumed else ""
    body = [f"<h1>curate report: {title}</h1>",
            f"<p>{counts['read']:,} read, {counts['invalid']:,} invalid, {failed_text}{counts['kept']:,} kept. "
            f"Steps: {html.escape(step_text or 'none')}.</p>",
            "<h2>Counts</h2>", _funnel(counts),
            "<h2>Sources</h2>", _sources(kept, rejected, steps.get("selectors") or []),
            selection,
            "<h2>Scores</h2>", _histograms(kept, rejected),
            "" if clusters_drawn else _clusters(kept, rejected),
            "<h2>Examples</h2>", _examples(kept, rejected)]
    if manifest.get("scoring_counts"):
        body.insert(2, f"<p>Scores re-used from <code>{html.escape(manifest['scores_from'])}</code>: "
                       f"{html.escape(json.dumps(manifest['scoring_counts']))}</p>")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>")
    path = os.path.join(out_dir, "report.html")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(page)
    return path
