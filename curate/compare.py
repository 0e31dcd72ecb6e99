"""`curate compare SPEC.yaml`: does a selection beat random on my pool, for my model?

The pool is read, filtered and scored once (`curate score`); every method and random
with several seeds select from it at the same row count (`curate select`); one model is
fine-tuned per subset with the same settings (curate's trainer) and evaluated on held-out
sets (mean response-token loss). A method is better or worse than random on a set only
when its loss is outside random's seed spread (|method - random's mean| > random's
sample sd over the seeds); inside it, a tie. The settings (epochs, learning rate) are
given, or chosen on validation sets from a grid, training a random subset of the budget's
size: never on the evaluation sets.

Every stage is cached under `output:` (scores by content, selections by the selector and
the scores they came from, training runs by their config and rows, evaluations by the
model and the evaluation rows), so a rerun after a crash or an added method computes only
what is missing; each stage prints the elapsed time and an ETA. The scoring and the
selections take the pool's `beam_args` (the selections `select_beam_args` when given, as
in a job with `scores:`) and Beam options after `--`. With `store:` (a gs:// path) they
write there, so they can run on Dataflow with the same spec (jobs/compare/dataflow.yaml):
each selection is copied into `output:` (its kept rows only) and the training and
evaluation run on this machine.

Writes OUTPUT/compare.{md,json,csv}, OUTPUT/compare.png and OUTPUT/report.html.

    name: compare-mixed
    output: runs/compare-mixed
    store: gs://bucket/compare    # optional: the scores and selections (default: output)
    pool:                         # a job's inputs, validate, filters, scorers and beam options
      inputs: [{path: a.jsonl, source: a}, {path: b.jsonl, source: b}]
      filters: [{type: dedup}]
      scorers: [{type: ifd, model: default, max_length: 256}]
    budgets: [0.1]                # counts, or fractions of the pool (the same count for all)
    methods:                      # name -> selector (its budget is set per budget)
      ifd: {type: top, column: ifd, below: 1.0}
      ifd_by_source: {type: top, column: ifd, below: 1.0, stratify_by: source}
    random_seeds: [0, 1, 2]       # at least 3
    eval:                         # name -> an input; `skip` drops its first rows
      a: {path: a_test.jsonl, limit: 100}
      b: {path: b.jsonl, skip: 1000, limit: 100}
    validation:                   # optional: choose epochs and lr on these sets
      sets: {a: {path: a.jsonl, skip: 1100, limit: 25}}
      grid: [[1, 1.0e-3], [2, 1.0e-3]]
    train: {model: default, template: plain, max_length: 256, epochs: 1, lr: 1.0e-3}
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import logging
import pathlib
import shutil
import statistics
from dataclasses import dataclass, field

from curate import dataflow, steps
from curate.config import (ConfigError, InputConfig, JobConfig, expand_vars, parse_budget, parse_job,
                           read_yaml, resolve_budget)
from curate.export import copy_kept
from curate.inputs.files import read_records
from curate.inputs.formats import arrow_batches
from curate.paths import canonical_path, is_remote
from curate.pipeline.output import read_manifest
from curate.pipeline.plan import Plan
from curate.pipeline.run import pipeline_options, score_once, select_from_scores
from curate.report.compare_page import RANDOM, write_outputs
from curate.stage_clock import Clock, digest, read_json, write_json
from curate.train import TrainConfig, evaluate_loss, load_model, train
from curate.train.loading import resolve_device_dtype

log = logging.getLogger(__name__)

MIN_SEEDS = 3


@dataclass
class CompareSpec:
    name: str
    output: str
    pool: JobConfig
    methods: dict[str, dict]
    budgets: list
    eval_sets: dict[str, dict]
    train: dict
    random_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    validation_sets: dict[str, dict] = field(default_factory=dict)
    grid: list[tuple[int, float]] = field(default_factory=list)
    source_file: str | None = None
    store: str | None = None  # where the scores and selections are written, when not `output`


# ---------------------------------------------------------------------------- the spec
def _input(raw, where: str) -> dict:
    """An evaluation input: a path, or {path, source, format, fields, limit, skip}."""
    item = {"path": raw} if isinstance(raw, str) else raw
    if not isinstance(item, dict) or not isinstance(item.get("path"), str):
        raise ConfigError(f"{where}: an input needs a path (text), got {raw!r}")
    known = {f.name for f in dataclasses.fields(InputConfig)} | {"skip"}
    unknown = sorted(set(item) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    for key in ("limit", "skip"):
        if item.get(key) is not None and (not isinstance(item[key], int) or item[key] < 0):
            raise ConfigError(f"{where}.{key}: a number of rows >= 0, got {item[key]!r}")
    return {**item, "path": expand_vars(item["path"])}


def _sets(raw, where: str) -> dict[str, dict]:
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{where}: a mapping of set name -> input (path or {{path, limit, skip, ...}})")
    return {str(name): _input(item, f"{where}.{name}") for name, item in raw.items()}


def parse_compare(data, source_file: str | None = None) -> CompareSpec:
    where = source_file or "compare spec"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the spec must be a mapping")
    known = {"name", "output", "store", "pool", "budgets", "methods", "random_seeds", "eval", "validation",
             "train"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    for key in ("pool", "budgets", "methods", "eval", "train"):
        if not data.get(key):
            raise ConfigError(f"{where}: '{key}' is required")
    name = str(data.get("name") or pathlib.Path(source_file or "compare").stem)
    output = expand_vars(str(data.get("output") or f"runs/compare-{name}"))
    store = expand_vars(str(data["store"])).rstrip("/") if data.get("store") else None
    if store and canonical_path(store) == canonical_path(output):
        store = None
    if not isinstance(data["pool"], dict):
        raise ConfigError(f"{where}: pool: a job's inputs, filters and scorers")
    extra = sorted(set(data["pool"]) - {"inputs", "validate", "filters", "scorers", "beam_args", "select_beam_args"})
    if extra:
        raise ConfigError(f"{where}: pool: {', '.join(extra)} not allowed (the pool is inputs, validate, "
                          f"filters, scorers, beam_args and select_beam_args; the methods go under 'methods')")
    pool = parse_job({**data["pool"], "output": under(store or output, "scores"), "name": f"{name}-pool"},
                     f"{where}: pool")
    budgets = data["budgets"] if isinstance(data["budgets"], list) else [data["budgets"]]
    for b in budgets:
        parse_budget(b, f"{where}: budgets")
    methods = data["methods"]
    if not isinstance(methods, dict):
        raise ConfigError(f"{where}: methods: a mapping of name -> selector ({{type: ..., options}})")
    if RANDOM in methods:
        raise ConfigError(f"{where}: methods: 'random' is the baseline every compare runs (random_seeds); "
                          f"name your method otherwise")
    for mname, spec in methods.items():
        if not isinstance(spec, dict) or "type" not in spec:
            raise ConfigError(f"{where}: methods.{mname}: a selector ({{type: ..., options}}), got {spec!r}")
        if "budget" in spec:
            raise ConfigError(f"{where}: methods.{mname}: the budget comes from 'budgets' (the same for every "
                              f"method); remove it here")
    seeds = data.get("random_seeds", [0, 1, 2])
    if (not isinstance(seeds, list) or len(seeds) < MIN_SEEDS or len(set(seeds)) != len(seeds)
            or not all(isinstance(s, int) for s in seeds)):
        raise ConfigError(f"{where}: random_seeds: at least {MIN_SEEDS} different integers (random's spread "
                          f"is what a method must leave to win), got {seeds!r}")
    validation = data.get("validation") or {}
    if validation and (not isinstance(validation, dict) or set(validation) - {"sets", "grid"}):
        raise ConfigError(f"{where}: validation: {{sets: {{name: input}}, grid: [[epochs, lr], ...]}}")
    grid = []
    if validation:
        for g in validation.get("grid") or []:
            if not (isinstance(g, list) and len(g) == 2 and isinstance(g[0], int) and g[0] >= 1
                    and isinstance(g[1], (int, float)) and g[1] > 0):
                raise ConfigError(f"{where}: validation.grid: [epochs, lr] pairs, got {g!r}")
            grid.append((g[0], float(g[1])))
        if not grid:
            raise ConfigError(f"{where}: validation.grid: at least one [epochs, lr] to try")
    if not isinstance(data["train"], dict):
        raise ConfigError(f"{where}: train: the trainer's options (model, max_length, epochs, lr, ...)")
    TrainConfig.from_dict(data["train"])
    return CompareSpec(name=name, output=output, pool=pool, methods=dict(methods), budgets=budgets,
                       eval_sets=_sets(data["eval"], f"{where}: eval"), train=dict(data["train"]),
                       random_seeds=list(seeds),
                       validation_sets=_sets(validation["sets"], f"{where}: validation.sets") if validation else {},
                       grid=grid, source_file=source_file, store=store)


def load_compare(path: str) -> CompareSpec:
    return parse_compare(read_yaml(path, "compare spec"), path)


# ---------------------------------------------------------------------------- the work
def read_set(item: dict) -> list[dict]:
    """An evaluation or validation set's records, through the pipeline's readers (a row
    that cannot become a record is left out with a warning naming it)."""
    skip, limit = item.get("skip") or 0, item.get("limit")
    spec = InputConfig(**{k: v for k, v in item.items() if k not in ("skip", "limit")},
                       limit=None if limit is None else skip + limit)
    records, dead = read_records([spec])
    for row in dead[:5]:
        log.warning("%s: skipped: %s", row["origin"], row["reason"])
    records = records[skip:]
    if not records:
        raise ConfigError(f"{item['path']}: no rows left for evaluation (skip {skip}, limit {limit})")
    return records


def under(root: str, *parts: str) -> str:
    """A path under a local or a remote (gs://) directory."""
    return "/".join([root.rstrip("/"), *parts])


def check_store(spec: CompareSpec, beam_args: list[str] | None) -> None:
    """Dataflow's workers write the scores and selections: not to this machine's disk."""
    for args in (spec.pool.beam_args, spec.pool.select_beam_args or []):
        if dataflow.is_dataflow(pipeline_options([*args, *(beam_args or [])]).get_all_options()) \
                and not is_remote(spec.store or ""):
            raise ConfigError(f"{spec.source_file or 'compare spec'}: the pool runs on Dataflow, whose workers "
                              f"cannot write to {spec.store or spec.output} on this machine: set store: to a gs:// "
                              f"path (each selection is copied into output: for training)")


def select_into(scores, selector: dict, out, beam_args, progress: bool,
                pool: JobConfig | None = None) -> tuple[dict, bool]:
    """`curate select` from the scored pool into `out` (local or remote), unless `out`
    already holds this selector's pick from these scores; with the options of the `pool`
    job that scored them (its `select_beam_args`, else its `beam_args`)."""
    scores, out = str(scores), str(out)
    scoring = read_manifest(scores) or {}
    previous = read_manifest(out)
    if (previous and previous.get("scores_key") == scoring.get("scores_key")
            and previous.get("job", {}).get("selectors") == [selector]):
        return previous, True
    job = JobConfig(inputs=[], output=out, name=f"select-{selector['type']}", selectors=[selector],
                    **({"beam_args": pool.beam_args, "select_beam_args": pool.select_beam_args} if pool else {}))
    return select_from_scores(job, scores, beam_args, scoring=scoring, overwrite=True, progress=progress), False


def _select(spec: CompareSpec, selector: dict, parts: tuple[str, ...], beam_args,
            progress: bool) -> tuple[dict, bool, pathlib.Path]:
    """select_into `parts` under the store; returns (its manifest, whether it was there,
    the local dataset the trainer reads: with a `store:`, its kept rows copied under
    `output:`)."""
    out, local = under(spec.store or spec.output, *parts), pathlib.Path(spec.output, *parts)
    manifest, cached = select_into(spec.pool.output, selector, out, beam_args, progress, spec.pool)
    if spec.store:
        copy_kept(out, str(local))
    return manifest, cached, local


def evaluate(cfg, eval_sets: dict[str, list[dict]], weights: str | None) -> dict:
    """Mean response-token loss per set of `cfg.model`, with the trained `weights` (a LoRA
    adapter, or a fully fine-tuned model's directory) when given."""
    import torch

    device, dtype = resolve_device_dtype(cfg.device, cfg.dtype)
    full = weights is not None and cfg.method == "full"
    lm, tokenizer = load_model(weights if full else cfg.model, device=device, dtype=dtype)
    if weights is not None and not full:
        from peft import PeftModel

        lm = PeftModel.from_pretrained(lm, weights)
    lm.eval()
    autocast = dtype if dtype == torch.bfloat16 else None
    out = {}
    for name, rows in eval_sets.items():
        r = evaluate_loss(lm, tokenizer, rows, cfg.template, cfg.max_length,
                          batch_tokens=cfg.eval_batch_tokens, autocast_dtype=autocast)
        out[name] = {k: r[k] for k in ("loss", "n_tokens", "n_examples", "n_truncated")}
    return out


def _eval_key(cfg, eval_sets) -> str:
    return digest([cfg.model, cfg.dtype, cfg.template, cfg.max_length,
                   {k: [r["id"] for r in v] for k, v in eval_sets.items()}])


def train_and_evaluate(cfg, selection: pathlib.Path, run_dir: pathlib.Path, eval_sets: dict) -> dict:
    """Fine-tune on a selection's kept rows (cached by config + rows), then evaluate."""
    import datasets

    ids = sorted(datasets.load_from_disk(str(selection))["id"])
    cfg_key = {k: v for k, v in cfg.to_dict().items() if k not in ("threads", "log_every")}
    key = digest([cfg_key, ids, _eval_key(cfg, eval_sets)])
    cached = read_json(run_dir / "compare.json")
    if cached and cached.get("key") == key:
        return {**cached, "cached": True}
    if cached:  # another selection or setting trained here before: the trainer refuses to mix runs
        shutil.rmtree(run_dir)
    m = train(str(selection), cfg, run_dir, resume=True, progress=False)
    result = {"key": key, "train": {k: m.get(k) for k in (
        "n_train", "steps", "train_tokens", "train_time_s", "tokens_per_s", "device", "compute_dtype")},
        "eval": evaluate(cfg, eval_sets, m["weights"])}
    write_json(run_dir / "compare.json", result)
    return {**result, "cached": False}


def verdict(value: float, random_values: list[float]) -> tuple[float, str]:
    """(value - random's mean, "better" | "worse" | "tie"): lower loss is better, and only
    a difference larger than random's sample sd over its seeds counts."""
    mean, sd = statistics.fmean(random_values), statistics.stdev(random_values)
    diff = value - mean
    return diff, ("tie" if abs(diff) <= sd else "better" if diff < 0 else "worse")


def has_budget(selector: dict) -> bool:
    cls = steps.find("selector", selector["type"])
    return cls is not None and "budget" in inspect.signature(cls).parameters


# ---------------------------------------------------------------------------- the run
def run_compare(spec: CompareSpec, beam_args: list[str] | None = None, progress: bool = True) -> dict:
    """Score, select, train and evaluate (module docstring); returns the results."""
    check_store(spec, beam_args)
    work = pathlib.Path(spec.output)
    work.mkdir(parents=True, exist_ok=True)
    clock = Clock(work / "stage_times.json", quiet=not progress)
    for mname, method in spec.methods.items():  # every method checked against the pool's columns first
        try:
            Plan(dataclasses.replace(spec.pool, selectors=[{**method, **({"budget": 1} if has_budget(method) else {})}]))
        except ConfigError as exc:
            raise ConfigError(f"methods.{mname}: {exc}") from None
    n_subsets = len(spec.budgets) * (len(spec.random_seeds) + len(spec.methods))
    clock.expect("score")
    clock.expect("select", n_subsets + (1 if spec.grid else 0))
    clock.expect("train", n_subsets + len(spec.grid))
    clock.expect("eval")

    scores = spec.pool.output
    with clock.stage("pool: read, filter, score", "score") as st:
        scoring, st.cached = score_once(spec.pool, scores, beam_args, overwrite=True, progress=progress)
        n_pool = scoring["counts"]["kept"]
        st.note = f"{n_pool} rows"
    eval_sets = {name: read_set(item) for name, item in spec.eval_sets.items()}
    overlap = _overlap(scores, eval_sets)
    if overlap:
        log.warning("%d evaluation rows have a prompt that is also in the pool: a method that picks them "
                    "is scored on its training rows (%s)", sum(overlap.values()),
                    ", ".join(f"{k} {v}" for k, v in overlap.items()))
    base = TrainConfig.from_dict(spec.train)
    tried = []
    if spec.grid:
        b = resolve_budget(spec.budgets[0], n_pool)
        val_sets = {name: read_set(item) for name, item in spec.validation_sets.items()}
        subset = {"type": RANDOM, "budget": b, "seed": 1000}
        with clock.stage(f"settings: random subset of {b} rows", "select") as st:
            _, st.cached, picked = _select(spec, subset, ("settings", "subset"), beam_args, progress)
        for epochs, lr in spec.grid:
            cfg = dataclasses.replace(base, epochs=epochs, lr=lr)
            with clock.stage(f"settings: train {epochs} epoch(s) at lr {lr:g} + validate", "train") as st:
                run = train_and_evaluate(cfg, picked, work / "settings" / f"e{epochs}-lr{lr:g}", val_sets)
                loss = statistics.fmean(v["loss"] for v in run["eval"].values())
                st.cached, st.note = run["cached"], f"validation mean loss {loss:.4f}"
            tried.append({"epochs": epochs, "lr": lr, "val_loss": loss})
        best = min(tried, key=lambda t: (t["val_loss"], t["epochs"]))
        base = dataclasses.replace(base, epochs=best["epochs"], lr=best["lr"])
        clock.say(f"settings: {best['epochs']} epoch(s) at lr {best['lr']:g} (validation mean loss "
                  f"{best['val_loss']:.4f})")

    with clock.stage("evaluate the model before fine-tuning", "eval") as st:
        path = work / "base-eval.json"
        cached = read_json(path)
        if cached and cached.get("key") == _eval_key(base, eval_sets):
            base_eval, st.cached = cached["eval"], True
        else:
            base_eval = evaluate(base, eval_sets, None)
            write_json(path, {"key": _eval_key(base, eval_sets), "eval": base_eval})

    rows = []
    for budget in spec.budgets:
        b = resolve_budget(budget, n_pool)
        subsets = [(RANDOM, seed, {"type": RANDOM, "budget": b, "seed": seed}) for seed in spec.random_seeds]
        subsets += [(mname, None, {**m, **({"budget": b} if has_budget(m) else {})})
                    for mname, m in spec.methods.items()]
        for mname, seed, selector in subsets:
            label = mname if seed is None else f"{mname}-s{seed}"
            with clock.stage(f"budget {b}: select [{label}]", "select") as st:
                sel, st.cached, picked = _select(spec, selector, (f"b{b}", label, "selection"), beam_args, progress)
                st.note = f"{sel['counts']['kept']} rows"
            with clock.stage(f"budget {b}: train + evaluate [{label}] on {sel['counts']['kept']} rows", "train") as st:
                run = train_and_evaluate(base, picked, work / f"b{b}" / label / "train", eval_sets)
                st.cached = run["cached"]
                st.note = f"mean loss {statistics.fmean(v['loss'] for v in run['eval'].values()):.4f}"
            rows.append(_row(b, mname, seed, picked, run))
    results = {"name": spec.name, "spec": spec.source_file, "pool_rows": n_pool,
               "scores_key": scoring.get("scores_key"), "eval_sets": list(eval_sets),
               "eval_overlap": overlap, "settings": {"epochs": base.epochs, "lr": base.learning_rate},
               "settings_tried": tried, "train": base.to_dict(), "base_eval": base_eval,
               "rows": rows, "verdicts": verdicts(rows, list(eval_sets)), "stages": clock.stages}
    write_json(work / "compare.json", results)
    write_outputs(work, results)
    clock.say(f"wrote {work / 'compare.md'} and {work / 'report.html'}")
    return results


def _overlap(scores: str, eval_sets: dict) -> dict:
    pool = {p for batch in arrow_batches(scores, ["prompt_id"]) for p in batch.column(0).to_pylist()}
    return {k: n for k, v in eval_sets.items() if (n := sum(r["prompt_id"] in pool for r in v))}


def _row(budget: int, method: str, seed, selection: pathlib.Path, run: dict) -> dict:
    import datasets

    ds = datasets.load_from_disk(str(selection))
    losses = {k: v["loss"] for k, v in run["eval"].items()}
    return {"budget": budget, "method": method, "seed": seed, "rows": len(ds),
            "source_mix": dict(sorted(collections.Counter(ds["source"]).items())),
            "train_s": run["train"]["train_time_s"], "eval": losses, "mean": statistics.fmean(losses.values())}


def verdicts(rows: list[dict], sets: list[str]) -> list[dict]:
    """Per budget and method: each set's loss (and the mean's) against random's seeds."""
    out = []
    for b in sorted({r["budget"] for r in rows}):
        rand = [r for r in rows if r["budget"] == b and r["method"] == RANDOM]
        for r in rows:
            if r["budget"] != b or r["method"] == RANDOM:
                continue
            v = {"budget": b, "method": r["method"], "rows": r["rows"]}
            for s in sets + ["mean"]:
                value = r["mean"] if s == "mean" else r["eval"][s]
                ref = [x["mean"] if s == "mean" else x["eval"][s] for x in rand]
                v[s] = {"loss": value, "vs_random": verdict(value, ref)[0], "verdict": verdict(value, ref)[1],
                        "random_mean": statistics.fmean(ref), "random_sd": statistics.stdev(ref)}
            out.append(v)
    return out
