"""report.html sections of the curation steps that run as selectors (they remove
duplicates rather than choose a budget): SemDeDup. Named by its selector's
`report_section` like every method's (curate.steps)."""

from __future__ import annotations

import html

import numpy as np

from curate.report.plots import DROPPED_COLOR, KEPT_COLOR, figure, png
from curate.report.selector_run import SelectorRun, _floats, _n


def semdedup_section(run: SelectorRun) -> str | None:
    if not run.has("semdedup_similarity", "semdedup_cluster"):
        return None
    pool = run.pool(["id", "prompt", "semdedup_similarity", "semdedup_cluster"])
    sims, kept = _floats(pool, "semdedup_similarity"), pool.column("kept").to_numpy()
    threshold, keep = run.spec.get("threshold", 0.95), run.spec.get("keep", "farthest")
    n_clusters = len(set(pool.column("semdedup_cluster").drop_null().to_pylist()))
    text = (f"<p>Rejected {_n(run.n_dropped, 'row')} of {run.n:,} as semantic duplicates: cosine similarity "
            f"&ge; {threshold} to a row kept before it in its k-means cluster ({n_clusters:,} clusters; "
            f"each cluster read {keep} from its centroid first). The histogram shows each row's highest "
            f"similarity to an earlier kept row.</p>")
    drawn = np.isfinite(sims)
    if not drawn.any():
        return text
    fig, ax = figure(7, 3)
    bins = np.histogram_bin_edges(sims[drawn], bins=40)
    ax.hist(sims[drawn & kept], bins=bins, color=KEPT_COLOR, alpha=0.8, label="kept")
    ax.hist(sims[drawn & ~kept], bins=bins, color=DROPPED_COLOR, alpha=0.7, label="duplicate")
    ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label="threshold")
    ax.set_xlabel("cosine similarity to the most similar earlier kept row")
    ax.set_ylabel("rows")
    ax.legend(fontsize=8)
    text += png(fig, "SemDeDup similarity histogram")
    dropped = run.dropped(["prompt", "semdedup_duplicate_of", "semdedup_similarity"]).to_pylist()
    prompts = dict(zip(pool.column("id").to_pylist(), pool.column("prompt").to_pylist()))
    pairs = sorted((r for r in dropped if r["semdedup_duplicate_of"]), key=lambda r: -r["semdedup_similarity"])
    if pairs:  # the least similar duplicates show what the threshold lets through
        rows = "".join(f"<tr><td>{r['semdedup_similarity']:.3f}</td><td>{html.escape(r['prompt'][:160])}</td>"
                       f"<td>{html.escape((prompts.get(r['semdedup_duplicate_of']) or '?')[:160])}</td></tr>"
                       for r in pairs[-5:])
        text += ("<p>The five least similar duplicates removed:</p><table><tr><th>cosine</th>"
                 f"<th>rejected prompt</th><th>kept prompt</th></tr>{rows}</table>")
    return text
