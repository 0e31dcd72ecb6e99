"""What `curate compare` writes (curate.compare): compare.md (the verdict table, printed),
compare.json, compare.csv, compare.png and report.html."""

from __future__ import annotations

import csv
import html
import pathlib
import statistics

from curate.report.html import CSS
from curate.report.plots import DROPPED_COLOR, KEPT_COLOR, POOL_COLOR, figure, png

RANDOM = "random"  # the baseline's method name in the results


def _table(results: dict) -> tuple[list[str], list[list[str]]]:
    sets = results["eval_sets"]
    header = ["budget", "method", "rows", "source mix", *sets, "mean", "vs random (mean)"]
    lines = [["-", "base (no fine-tuning)", "-", "-", *(f"{results['base_eval'][s]['loss']:.4f}" for s in sets),
              f"{statistics.fmean(results['base_eval'][s]['loss'] for s in sets):.4f}", ""]]
    mix = {(r["budget"], r["method"], r["seed"]): r for r in results["rows"]}
    for b in sorted({r["budget"] for r in results["rows"]}):
        rand = [r for r in results["rows"] if r["budget"] == b and r["method"] == RANDOM]
        for r in rand:
            lines.append([str(b), f"random (seed {r['seed']})", str(r["rows"]), _mix(r["source_mix"]),
                          *(f"{r['eval'][s]:.4f}" for s in sets), f"{r['mean']:.4f}", ""])
        cells = []
        for s in sets + ["mean"]:
            ref = [x["mean"] if s == "mean" else x["eval"][s] for x in rand]
            cells.append(f"{statistics.fmean(ref):.4f} ± {statistics.stdev(ref):.4f}")
        lines.append([str(b), f"**random, mean ± sd ({len(rand)} seeds)**", "", "", *cells, ""])
        for v in results["verdicts"]:
            if v["budget"] != b:
                continue
            r = mix[(b, v["method"], None)]
            lines.append([str(b), v["method"], str(v["rows"]), _mix(r["source_mix"]),
                          *(f"{v[s]['loss']:.4f} ({v[s]['verdict']})" for s in sets + ["mean"]),
                          f"{v['mean']['vs_random']:+.4f}"])
    return header, lines


def _mix(mix: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in mix.items())


def write_outputs(work: pathlib.Path, results: dict) -> None:
    header, lines = _table(results)
    md = [f"# {results['name']}: selection against random", "",
          f"Pool: {results['pool_rows']} rows after filters; settings: {results['settings']['epochs']} epoch(s), "
          f"lr {results['settings']['lr']:g}; held-out loss (mean response-token NLL), lower is better. A "
          f"method is better or worse than random only outside random's seed spread (|method - random's "
          f"mean| > sd over the seeds); inside it, a tie.", "",
          "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(line) + " |" for line in lines]
    if results["eval_overlap"]:
        md += ["", "Warning: evaluation rows whose prompt is also in the pool: "
               + ", ".join(f"{k} {v}" for k, v in results["eval_overlap"].items())]
    (work / "compare.md").write_text("\n".join(md) + "\n")
    with open(work / "compare.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["budget", "method", "seed", "rows", *results["eval_sets"], "mean"])
        for r in results["rows"]:
            w.writerow([r["budget"], r["method"], r["seed"], r["rows"],
                        *(r["eval"][s] for s in results["eval_sets"]), r["mean"]])
    plot = _plot(results, work / "compare.png")
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c).replace('**', '')}</td>" for c in line) + "</tr>"
                   for line in lines)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(results['name'])}</title>"
            f"<style>{CSS}</style></head><body><h1>{html.escape(results['name'])}: selection against random</h1>"
            f"<section id='compare'><p>{html.escape(md[2])}</p><table><tr>"
            + "".join(f"<th>{html.escape(h)}</th>" for h in header) + f"</tr>{body}</table>{plot}</section>"
            "</body></html>")
    (work / "report.html").write_text(page)


def _plot(results: dict, path: pathlib.Path) -> str:
    """Each method's mean loss (green better, red worse, grey a tie) beside random's seed
    band, one panel per budget."""
    budgets = sorted({r["budget"] for r in results["rows"]})
    fig, axes = figure(6.5 * len(budgets), 3.5, ncols=len(budgets))
    axes = list(axes) if len(budgets) > 1 else [axes]
    for ax, b in zip(axes, budgets):
        vs = [v for v in results["verdicts"] if v["budget"] == b]
        rand = [r["mean"] for r in results["rows"] if r["budget"] == b and r["method"] == RANDOM]
        mean, sd = statistics.fmean(rand), statistics.stdev(rand)
        ax.axhspan(mean - sd, mean + sd, color=POOL_COLOR, alpha=0.4, label="random, mean ± sd")
        ax.axhline(mean, color=POOL_COLOR)
        # points, not bars: the axis does not start at 0
        colors = {"better": KEPT_COLOR, "worse": DROPPED_COLOR, "tie": "#888888"}
        ax.scatter(range(len(vs)), [v["mean"]["loss"] for v in vs], s=60, zorder=3,
                   c=[colors[v["mean"]["verdict"]] for v in vs])
        ax.set_xticks(range(len(vs)), [v["method"] for v in vs], rotation=30, ha="right")
        ax.set_xlim(-0.5, len(vs) - 0.5)
        lo = min([v["mean"]["loss"] for v in vs] + [mean - sd])
        hi = max([v["mean"]["loss"] for v in vs] + [mean + sd])
        pad = max((hi - lo) * 0.2, 1e-3)
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_title(f"budget {b}: mean held-out loss (lower is better)")
        ax.legend(loc="best", fontsize=8)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    return png(fig, "methods against random")
