"""Tables, CSV, JSON and plot of benchmarks/selection_quality.py's rows.

A row is one trained (or reference) model: variant, method, seed, the rows it trained on,
its held-out losses per evaluation set and their mean. Reference rows (`base`: the model
before fine-tuning; `unpruned`: the model before pruning, in the recovery variants) get
no verdict. A method is better or worse than random only outside random's seed spread.
A row selected but not trained yet (a corrupted variant, between its selections and its
trainings) has no losses: it shows the corrupted rows kept and no verdict.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import os
import pathlib
import statistics
import time

REFERENCE = ("base", "unpruned")
SHORT = {"gpteacher_roleplay": "roleplay", "gpteacher_toolformer": "toolformer"}
TITLES = {"clean": "Mixed pool",
          "noisy": "Mixed pool, 20% of rows corrupted (noisy)",
          "heavy": "Mixed pool, 60% of rows corrupted (heavy)",
          "recovery-wanda50": "PASER's setting: recovering the Wanda 50% copy",
          "recovery-layerdrop": "PASER's setting: recovering the layer-dropped copy",
          "grape": "GRAPE: one response per alpaca_eval instruction"}


def label(r: dict) -> str:
    return r["method"] if r["seed"] is None else f"{r['method']}:{r['seed']}"


def summarise(rows: list[dict]) -> dict:
    """Per variant: random's mean and spread per set, each method's verdict, and the
    corrupted rows kept (the corrupted variants)."""
    out = {}
    for variant in dict.fromkeys(r["variant"] for r in rows):
        vr = [r for r in rows if r["variant"] == variant]
        trained = [r for r in vr if r["eval_mean"] is not None]
        rand = [r for r in trained if r["method"] == "random"]
        sets = list(trained[0]["eval"]) if trained else []
        stats = {}
        for s in sets + ["mean"]:
            vals = [r["eval_mean"] if s == "mean" else r["eval"][s] for r in rand]
            if vals:
                stats[s] = {"mean": statistics.fmean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                            "min": min(vals), "max": max(vals), "n": len(vals)}
        verdicts = {}
        for r in trained:
            if r["method"] in ("random",) + REFERENCE or not stats:
                continue
            v = {}
            for s in sets + ["mean"]:
                d = (r["eval_mean"] if s == "mean" else r["eval"][s]) - stats[s]["mean"]
                v[s] = {"delta": d, "verdict": "tie" if abs(d) <= stats[s]["sd"] else ("better" if d < 0 else "worse")}
            verdicts[r["method"]] = v
        noisy = {label(r): {"kept": r["noisy_kept"], "rows": r["rows"], "share": r["noisy_kept"] / r["rows"],
                            "by_kind": r["noisy_kept_by_kind"]}
                 for r in vr if r.get("noisy_kept") is not None}
        recovery = {label(r): r["recovery"] for r in vr if r.get("recovery") is not None}
        rec_rand = [recovery[label(r)] for r in rand if label(r) in recovery]
        out[variant] = {"sets": sets, "random": stats, "verdicts": verdicts, "noisy": noisy,
                        "recovery": recovery,
                        "random_recovery": ({"mean": statistics.fmean(rec_rand),
                                             "sd": statistics.stdev(rec_rand) if len(rec_rand) > 1 else 0.0}
                                            if rec_rand else None)}
    return out


def _fmt(x, nd=4):
    return "" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def markdown_tables(rows: list[dict], summary: dict) -> str:
    lines = []
    for variant, s in summary.items():
        vr = [r for r in rows if r["variant"] == variant]
        sets = s["sets"]
        noisy, recovery, grape = bool(s["noisy"]), variant.startswith("recovery"), variant == "grape"
        lines += [f"### {TITLES.get(variant, variant)}", ""]
        head = (["method", "rows", "generator mix (top 3)" if grape else "source mix"]
                + (["corrupted kept"] if noisy else []) + ["train s"] + [SHORT.get(x, x) for x in sets]
                + ["mean", "vs random (mean)"] + (["recovery"] if recovery else []))
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in vr:
            name = ("random generator" if grape and r["method"] == "random" else r["method"]) + \
                ("" if r["seed"] is None else f" (seed {r['seed']})")
            mix = (", ".join(f"{k} {v}" for k, v in list(r["generator_mix"].items())[:3]) if grape
                   else ", ".join(f"{SHORT.get(k, k)} {v}" for k, v in r["source_mix"].items()))
            cells = [name, str(r["rows"]) if r["rows"] else "-", mix or "-"]
            if noisy:
                cells.append("-" if r["noisy_kept"] is None else
                             f"{r['noisy_kept']} ({100 * r['noisy_kept'] / r['rows']:.0f}%)")
            cells.append(_fmt(r["train_s"], 0) or "-")
            v = s["verdicts"].get(r["method"]) if r["seed"] is None else None
            for x in sets + ["mean"]:
                val = r["eval_mean"] if x == "mean" else r["eval"].get(x)
                cells.append("-" if val is None else f"{val:.4f}" + (f" ({v[x]['verdict']})" if v else ""))
            cells.append(f"{v['mean']['delta']:+.4f}" if v else "")
            if recovery:
                cells.append("" if r.get("recovery") is None else f"{100 * r['recovery']:.1f}%")
            lines.append("| " + " | ".join(cells) + " |")
        if s["random"]:
            st = s["random"]
            cells = [f"**random, mean ± sd ({st['mean']['n']} seeds)**", "", ""] + ([""] if noisy else []) + [""]
            cells += [f"{st[x]['mean']:.4f} ± {st[x]['sd']:.4f}" for x in sets + ["mean"]] + [""]
            if recovery:
                rr = s["random_recovery"]
                cells.append(f"{100 * rr['mean']:.1f}% ± {100 * rr['sd']:.1f}" if rr else "")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        if any(r["eval_mean"] is None for r in vr):
            lines += ["Rows without losses are selected but not trained yet (a later invocation adds them).", ""]
        if noisy and s["noisy"]:
            kinds = sorted({k for v in s["noisy"].values() for k in (v["by_kind"] or {})})
            lines += ["Corrupted rows kept, by kind (random keeps the pool's corrupted share in expectation):", "", "| method | all | " + " | ".join(kinds) + " |",
                      "|---|---|" + "---|" * len(kinds)]
            for k, v in s["noisy"].items():
                lines.append(f"| {k} | {v['kept']}/{v['rows']} ({100 * v['share']:.1f}%) | "
                             + " | ".join(str((v["by_kind"] or {}).get(x, 0)) for x in kinds) + " |")
            rand = [v["share"] for k, v in s["noisy"].items() if k.startswith("random")]
            if rand:
                sd = statistics.stdev(rand) if len(rand) > 1 else 0.0
                lines += ["", f"Random's share: {100 * statistics.fmean(rand):.1f}% ± {100 * sd:.1f} over "
                              f"{len(rand)} seeds."]
            lines.append("")
        if recovery:
            lines += ["Recovery = (pruned loss − trained loss) / (pruned loss − unpruned loss), on the mean "
                      "over sets: 0% is the pruned copy, 100% the model before pruning.", ""]
        if grape:
            lines += ["`gold`: loss on gpt4_1106_preview's answers (one of the generators); "
                      "`all_generators`: mean loss over every generator's answers to the same held-out "
                      "instructions; `mean`: the mean of the two.", ""]
    return "\n".join(lines)


def write_csv(rows: list[dict], path: pathlib.Path) -> None:
    sets = list(dict.fromkeys(k for r in rows for k in r["eval"]))
    fields = ["variant", "method", "seed", "rows", "source_mix", "generator_mix", "noisy_kept",
              "noisy_kept_by_kind", "recovery", "train_s", "train_tokens", "train_tokens_per_s", "steps"] + \
             [f"loss_{s}" for s in sets] + ["loss_mean"]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({**{k: r.get(k) for k in fields if not k.startswith("loss_")},
                        "source_mix": ";".join(f"{k}:{v}" for k, v in r["source_mix"].items()),
                        "generator_mix": ";".join(f"{k}:{v}" for k, v in r["generator_mix"].items()),
                        "noisy_kept_by_kind": ";".join(f"{k}:{v}" for k, v in (r.get("noisy_kept_by_kind") or {}).items()),
                        **{f"loss_{s}": r["eval"].get(s) for s in sets}, "loss_mean": r["eval_mean"]})


def plot(rows: list[dict], summary: dict, path: pathlib.Path) -> None:
    """One panel per variant: each method's mean held-out loss (in the recovery variants:
    the share of the pruning loss recovered), random's mean ± one seed sd as a grey band
    (inside it: a tie); and, for the corrupted variants, the share of corrupted rows each
    method kept, with random's band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(v, "recovery" if summary[v]["random_recovery"] else "loss") for v in summary if summary[v]["random"]]
    panels += [(v, "noise") for v in summary if summary[v]["noisy"]]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.8), squeeze=False)
    for ax, (variant, what) in zip(axes[0], panels):
        s = summary[variant]
        methods = [r for r in rows if r["variant"] == variant and r["method"] not in ("random",) + REFERENCE
                   and (what == "noise" or r["eval_mean"] is not None)]
        names = [r["method"] for r in methods]
        if what == "loss":
            values = [r["eval_mean"] for r in methods]
            band = (s["random"]["mean"]["mean"], s["random"]["mean"]["sd"])
            ax.set_xlabel("mean held-out loss (lower is better)")
        elif what == "recovery":
            values = [100 * r["recovery"] for r in methods]
            band = (100 * s["random_recovery"]["mean"], 100 * s["random_recovery"]["sd"])
            ax.set_xlabel("pruning loss recovered, % (higher is better)")
        else:
            values = [s["noisy"][r["method"]]["share"] * 100 for r in methods if r["method"] in s["noisy"]]
            names = [r["method"] for r in methods if r["method"] in s["noisy"]]
            rand = [v["share"] * 100 for k, v in s["noisy"].items() if k.startswith("random")]
            band = (statistics.fmean(rand), statistics.stdev(rand) if len(rand) > 1 else 0.0)
            ax.set_xlabel("corrupted rows kept, % (lower is better)")
        ax.axvspan(band[0] - band[1], band[0] + band[1], color="0.85", lw=0, label="random ± sd")
        ax.axvline(band[0], color="0.4", lw=0.8)
        ax.barh(range(len(values)), values, color="tab:blue", height=0.6)
        ax.set_yticks(range(len(values)))
        ax.set_yticklabels(names, fontsize=8)
        ax.set_ylim(max(len(values), 4) - 0.5, -0.5)  # first method on top; one bar stays a bar
        lo, hi = min(values + [band[0] - band[1]]), max(values + [band[0] + band[1]])
        pad = ((hi - lo) if what == "loss" else hi) * 0.15 or 0.01
        ax.set_xlim(lo - pad if what == "loss" else 0.0, hi + pad)  # shares from 0: bar length means something
        ax.set_title(("corrupted kept: " if what == "noise" else "") + TITLES.get(variant, variant), fontsize=8)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def settings_lines(opts, tried: list[dict]) -> list[str]:
    sc = opts.scale
    chosen = opts.chosen
    lines = [
        f"- scale `{opts.scale_name}`; model `{opts.model}`, embedder `{opts.embedder}`, "
        f"device {opts.device}, dtype {opts.dtype}",
        f"- pool: {sc.rows_per_source} rows per source x 4 sources (seeded draw, pool seed {opts.pool_seed}); "
        f"budget {sc.budget:.0%} of the pool (the same row count for every method); random seeds "
        f"{list(opts.seeds)}; tie = |method - random's mean| <= random's sample sd over the seeds",
        f"- evaluation: {sc.eval_rows} rows per source (gsm8k_test's first rows; held-out rows of the other "
        f"three files), loss = mean NLL over response tokens at max_length {sc.max_length}; validation: "
        f"{sc.val_rows} other held-out rows per source, used only to choose the training settings",
        f"- training: LoRA r=16 alpha=32 (all linear), plain template, max_length {sc.max_length}, batch "
        f"{sc.batch_size} x {sc.grad_accum}, cosine, seed 0; chosen on validation: "
        f"**{chosen.get('epochs')} epoch(s), lr {chosen.get('lr')}** (from "
        + ", ".join(f"{t['epochs']} ep / {t['lr']:g}: {t['val_loss']:.4f}" for t in tried) + ")",
        f"- scorers at {sc.score_max_length} tokens (ifd, weight_delta, degradation, trajectory); MiniLM at "
        f"{sc.embed_max_length}; diversity k by silhouette over {list(sc.diversity_k_grid)}, iterative: "
        f"{sc.diversity_rounds} rounds, {sc.refine_max_new_tokens} generated tokens; PASER: Wanda 50% "
        f"(calibration {sc.prune_calibration_rows} pool rows) and {sc.layer_drop_fraction:.0%} of the blocks "
        f"dropped before the last, n_clusters {sc.paser_clusters}",
        f"- S2L: proxy = the model with {1 - sc.s2l_proxy_keep:.0%} of its blocks dropped (the first ones and "
        f"the last kept), LoRA lr {sc.s2l_proxy_lr}, {sc.s2l_proxy_epochs} epoch(s) over the pool, batch "
        f"{sc.s2l_proxy_batch}, T={sc.s2l_checkpoints} checkpoints, k={sc.s2l_k} (paper: Pythia-70M proxy "
        f"fully fine-tuned for 3 epochs, T=12, k=100, for Pythia-410M/1B targets)",
        f"- variants: {', '.join(sc.variants)}; corrupted: noisy {sc.noise:.0%} and heavy {sc.heavy_noise:.0%} "
        f"of the rows (swapped, truncated, wrong final answer, a third each); full pool: "
        f"{'on' if 'full' in opts.methods else 'off'} (clean only)",
        f"- GRAPE: {sc.grape_instructions} alpaca_eval instructions x all candidates (an answer equal to "
        f"another's up to case and spacing is dropped by the pipeline's dedup), likelihood at "
        f"{sc.grape_max_length} tokens; evaluated on {sc.grape_eval} other instructions against every "
        f"generator's answer",
        f"- data: {opts.data}",
    ]
    return lines


def write_reports(opts, rows: list[dict], tried: list[dict], clock, machine: dict, final: bool) -> dict:
    summary = summarise(rows)
    out = pathlib.Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    tables = markdown_tables(rows, summary)
    stem = out / "selection_quality"
    meta = {"command": opts.command, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": {**machine, "load_average_end": round(os.getloadavg()[0], 2)},
            "scale": opts.scale_name, "settings": dataclasses.asdict(opts.scale), "chosen": opts.chosen,
            "settings_tried": tried, "methods": list(opts.methods), "seeds": list(opts.seeds),
            "complete": final, "stages": clock.stages, "wall_s": round(time.perf_counter() - clock.start, 1),
            "computed_s": round(sum(v["seconds"] for v in clock.computed.values()), 1)}
    stem.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows, "summary": summary}, indent=2, default=str))
    write_csv(rows, stem.with_suffix(".csv"))
    plot(rows, summary, stem.with_suffix(".png"))
    header = [f"# Selection quality ({opts.scale_name} scale){'' if final else ' (partial)'}", "",
              f"Command: `{opts.command}`", "",
              f"Date: {meta['date']}; wall time of this invocation {meta['wall_s'] / 60:.1f} min; every stage "
              f"computed once: {meta['computed_s'] / 60:.1f} min", "",
              "Machine: " + ", ".join(f"{k} {v}" for k, v in meta["machine"].items()), "", "## Settings", ""]
    body = header + settings_lines(opts, tried) + ["", "## Results (held-out loss, lower is better)", "", tables]
    stage_lines = ["## Stage times", "",
                   "Seconds in this invocation, and when the stage was computed (a rerun finds finished "
                   "stages in the work dir).", "",
                   "| stage | s (this run) | s (computed) | note |", "|---|---|---|---|"]
    stage_lines += [f"| {s['stage']} | {s['seconds']} | {_fmt(s['computed_seconds'], 1)} | {s['note']} |"
                    for s in clock.stages]
    stem.with_suffix(".md").write_text("\n".join(body + [""] + stage_lines) + "\n")
    if opts.summary:  # rewritten at every report, titled partial until the run completes
        verdict_lines = ["## Verdicts (mean over evaluation sets, against random's seed spread)", ""]
        for variant, s in summary.items():
            for m, v in s["verdicts"].items():
                per_set = ", ".join(f"{SHORT.get(k, k)} {x['verdict']}" for k, x in v.items() if k != "mean")
                verdict_lines.append(f"- {variant} / {m}: **{v['mean']['verdict']}** "
                                     f"({v['mean']['delta']:+.4f} vs random {s['random']['mean']['mean']:.4f} "
                                     f"± {s['random']['mean']['sd']:.4f}); per set: {per_set}")
        pathlib.Path(opts.summary).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(opts.summary).write_text(
            "\n".join(body + verdict_lines + ["", f"Files: `{stem}.md`, `.csv`, `.json`, `.png`", ""]
                      + stage_lines) + "\n")
    return summary
