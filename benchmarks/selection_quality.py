"""Selection quality: do the selected subsets train better models? (issue 10)

    python benchmarks/selection_quality.py                   # --scale cpu: ~35 min on 2 idle cores
    python benchmarks/selection_quality.py --threads 1       # the same on a shared CPU (~55 min)
    python benchmarks/selection_quality.py --scale gpu       # a GPU machine (device auto)
    python benchmarks/selection_quality.py --model DIR --embedder DIR --scale tiny \\
        --out /tmp/sq/results --summary /tmp/sq/RESULTS.md --work-dir /tmp/sq/work   # dev run

For a pool and a budget, select with every method and with random (several seeds),
fine-tune the same model with the same settings on each subset (curate's trainer, LoRA),
and measure held-out mean response-token loss on fixed evaluation sets.

Mixed pool (variant `clean`): `rows_per_source` rows drawn (seeded) from each of
gsm8k_train, codealpaca, gpteacher_roleplay and gpteacher_toolformer; budget = 10% of the
pool (the same row count for every method). Evaluation sets: the first `eval_rows` rows
of gsm8k_test, and for the three other sources `eval_rows` rows of the same file that are
not in the pool (no shared prompt). Reported per set and as the plain mean of the sets.

Methods, each through the pipeline's score-once / select-many path (one `curate score`
style pipeline per scorer set into `WORK/<variant>/scores-<set>`, then
`select_from_scores` per method; nothing is re-implemented here):
    random     the `random` selector, seeds 0, 1, 2 (--seeds)
    diversity  kMQ: `embedding` (MiniLM, prompt + response, 128 tokens) + `diversity`
    donod      `weight_delta` + `donod` (TOPSIS over DON benefit / NOD cost), budget as a count
    paser      `curate.prune` Wanda 50% copy of the model (calibrated on the clean pool; the
               same copy serves both variants), then `embedding` (instruction) +
               `degradation` + `paser`
    s2l        `trajectory` with a proxy run trained by the scorer (see the scale's `s2l`
               settings: at CPU scale a few steps and checkpoints, far from the paper) + `s2l`
    full       the whole pool (--full-pool; 10x the training cost)
    base       the model before fine-tuning (reference row, not a method)
Variant `noisy` (--noisy, on by default where the scale says so): the same pool with 20%
of the responses swapped among themselves (a derangement, seeded: every corrupted row
answers another row's prompt; the idea of benchmarks/donod_bench.py), the same methods and
evaluation sets; reports how many corrupted rows each method kept (random: 20% expected).
Variant `grape` (method `grape` in --methods): `grape_instructions` alpaca_eval
instructions with all 10 candidate responses; one response per instruction by GRAPE
(`likelihood` + `grape`), by a random generator per instruction (3 seeds: the baseline)
and by the longest response (characters); evaluated on `grape_eval` other instructions
with gpt4_1106_preview's response as the gold.

Training (every subset alike): LoRA (the trainer's defaults r=16, alpha=32, all linear
projections), plain template, the scale's max_length / epochs / lr / batch, training seed
0. A "tie" is a method whose difference from random's mean is within random's seed spread
(sample standard deviation over the seeds), per evaluation set and for the mean.

Everything is cached in --work-dir (default runs/selection_quality, git-ignored): the
pools, scores (keyed by content, as `curate run` with `scores:`), selections (keyed by
scores + selector), training runs (the trainer's fingerprint) and evaluations, so a rerun
only computes what is missing. Writes --out/selection_quality.{md,csv,json,png} and the
--summary markdown (machine, date, command, settings, tables, stage times).
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import datetime
import gzip
import hashlib
import json
import logging
import os
import pathlib
import random
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.machine import machine_info  # noqa: E402

log = logging.getLogger("selection_quality")

# (source name in the pool, pool file, evaluation file: None = held-out rows of the pool file)
SOURCES = [
    ("gsm8k", "gsm8k_train", "gsm8k_test"),
    ("codealpaca", "codealpaca", None),
    ("gpteacher_roleplay", "gpteacher_roleplay", None),
    ("gpteacher_toolformer", "gpteacher_toolformer", None),
]
GRAPE_FILE = "alpaca_eval_pool"
GRAPE_GOLD = "gpt4_1106_preview"
METHODS = ("random", "diversity", "donod", "paser", "s2l", "full", "grape")
POOL_METHODS = ("diversity", "donod", "paser", "s2l")
# scorer set each method selects from (one scores directory per set and variant)
SCORER_SET = {"diversity": "embed", "donod": "weight_delta", "paser": "paser", "s2l": "trajectory"}


# ---------------------------------------------------------------------------- settings
@dataclass
class Scale:
    """Sizes and settings of one run; `--scale` picks one, flags override fields."""

    rows_per_source: int
    eval_rows: int
    budget: float = 0.10                   # fraction of the pool, the same count for all methods
    max_length: int = 256                  # training and evaluation, tokens
    epochs: int = 1
    lr: float = 1e-3                       # short LoRA runs need more than the 2e-4 default
    batch_size: int = 4
    grad_accum: int = 1
    score_max_length: int = 256            # weight_delta, degradation, likelihood
    embed_max_length: int = 128            # MiniLM (as jobs/diversity.yaml)
    diversity_k_grid: tuple = (4, 8, 16, 32)
    paser_clusters: object = "auto"
    prune_calibration_rows: int = 64
    s2l_k: int = 8
    s2l_max_length: int = 128              # proxy training and trajectories
    s2l_proxy_steps: int = 12              # proxy optimizer steps (paper: 3 epochs of the pool)
    s2l_proxy_batch: int = 8
    s2l_checkpoints: int = 3               # T (paper: 12)
    grape_instructions: int = 24
    grape_eval: int = 20
    grape_max_length: int = 256            # GRAPE likelihood scoring
    noise: float = 0.2
    noisy: bool = True
    full_pool: bool = False
    eval_batch_tokens: int = 4096


SCALES = {
    # Sized from tokens per CPU-second measured with SmolLM2-135M in bf16 on one core of the
    # 2-core AMD EPYC (avx512_bf16): LoRA training 90, evaluation 300, weight_delta 430,
    # degradation 340 (both models), at ~140 tokens a pool row (max_length 256). One variant
    # (pool 256 rows, budget 26, 7 trainings, 8 evaluations of 80 rows) is ~21 min on one
    # core; both variants + GRAPE + pruning ~55 min with --threads 1, ~35 min on two idle cores.
    "cpu": Scale(rows_per_source=64, eval_rows=20),
    # a GPU machine: a real pool, longer sequences, paper-like S2L (T=12)
    "gpu": Scale(rows_per_source=2000, eval_rows=200, max_length=512, epochs=2, lr=5e-4,
                 batch_size=8, grad_accum=2, score_max_length=1024, embed_max_length=256,
                 diversity_k_grid=(8, 16, 32, 64, 128), paser_clusters="auto",
                 prune_calibration_rows=128, s2l_k=50, s2l_max_length=512,
                 s2l_proxy_steps=400, s2l_proxy_batch=8, s2l_checkpoints=12,
                 grape_instructions=400, grape_eval=200, grape_max_length=1024,
                 full_pool=True, eval_batch_tokens=32768),
    # development and tests: a tiny random model, seconds per stage
    "tiny": Scale(rows_per_source=12, eval_rows=4, budget=0.25, max_length=64, epochs=1,
                  batch_size=4, score_max_length=64, embed_max_length=32,
                  diversity_k_grid=(2, 3), paser_clusters=2, prune_calibration_rows=8,
                  s2l_k=2, s2l_max_length=64, s2l_proxy_steps=4, s2l_proxy_batch=4,
                  s2l_checkpoints=2, grape_instructions=6, grape_eval=3, grape_max_length=64),
}


@dataclass
class Options:
    """What the command line decides besides the scale."""

    scale: Scale
    scale_name: str = "cpu"
    data: str = ""
    work_dir: str = "runs/selection_quality"
    out: str = "benchmarks/results"
    summary: str | None = "benchmarks/RESULTS_selection_quality.md"
    methods: tuple = ("random", "diversity", "donod", "paser", "s2l", "grape")
    seeds: tuple = (0, 1, 2)
    pool_seed: int = 0
    model: str = "default"
    embedder: str = "minilm"
    device: str = "auto"
    dtype: str = "auto"
    threads: int | None = None
    command: str = ""
    beam_args: list = field(default_factory=list)


# ---------------------------------------------------------------------------- helpers
def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def files_digest(paths) -> str:
    """Content hash of input files: a cache keyed by path alone would survive a changed pool."""
    h = hashlib.sha256()
    for p in paths:
        h.update(pathlib.Path(p).read_bytes())
    return h.hexdigest()[:16]


def write_json(path: pathlib.Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def read_json(path: pathlib.Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_jsonl(path: pathlib.Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
    if not path.exists() or path.read_text() != text:  # same bytes: same scores key anyway
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


class Clock:
    """Prints each stage with the elapsed time of the whole run and records its duration.

    A stage found in the cache takes ~0 s in this run; the seconds it took when it was
    computed are kept in `times_file`, so the report shows both."""

    def __init__(self, times_file: pathlib.Path | None = None):
        self.start = time.perf_counter()
        self.stages: list[dict] = []
        self.times_file = times_file
        self.computed: dict = (read_json(times_file) or {}) if times_file else {}

    def elapsed(self) -> str:
        s = int(time.perf_counter() - self.start)
        return f"{s // 3600:d}:{s // 60 % 60:02d}:{s % 60:02d}"

    def say(self, msg: str) -> None:
        print(f"[{self.elapsed()}] {msg}", flush=True)

    def stage(self, name: str):
        clock = self

        class _Stage:
            def __enter__(self):
                self.t0 = time.perf_counter()
                self.note = ""
                self.cached = False
                clock.say(f"{name} ...")
                return self

            def __exit__(self, exc_type, exc, tb):
                dt = time.perf_counter() - self.t0
                if exc_type is None:
                    if not self.cached:
                        clock.computed[name] = {"seconds": round(dt, 1), "note": self.note,
                                                "at": datetime.datetime.now().isoformat(timespec="seconds")}
                        if clock.times_file:
                            write_json(clock.times_file, clock.computed)
                    first = clock.computed.get(name, {})
                    clock.stages.append({"stage": name, "seconds": round(dt, 1), "cached": self.cached,
                                         "computed_seconds": first.get("seconds"),
                                         "note": self.note if not self.cached else first.get("note", self.note)})
                    clock.say(f"{name}: done in {dt:.1f} s{' (' + self.note + ')' if self.note else ''}")
                return False

        return _Stage()


# ---------------------------------------------------------------------------- data
def read_records(path: pathlib.Path, source: str) -> list[dict]:
    """Canonical records of a shared data file (the same adapters the pipeline uses)."""
    from curate.train.data import read_jsonl_records

    return list(read_jsonl_records(path, source=source))


def unique_by_prompt(records: list[dict]) -> list[dict]:
    seen, out = set(), []
    for r in records:
        if r["prompt_id"] not in seen:
            seen.add(r["prompt_id"])
            out.append(r)
    return out


def pool_row(r: dict) -> dict:
    return {"prompt": r["prompt"], "response": r["response"]}


def record_id(prompt: str, response: str, source: str) -> str:
    """The id the pipeline's reader gives a {prompt, response} row."""
    from curate.records import ADAPTERS, adapt

    return adapt({"prompt": prompt, "response": response}, ADAPTERS["prompt_response"], {}, source)[0]["id"]


def eval_record(r: dict) -> dict:
    return {"id": r["id"], "prompt": r["prompt"], "response": r["response"], "source": r["source"]}


def build_data(opts: Options, clock: Clock) -> dict:
    """Pool files (clean and noisy), evaluation sets and the GRAPE pool, in WORK/data."""
    sc, data, work = opts.scale, pathlib.Path(opts.data), pathlib.Path(opts.work_dir) / "data"
    with clock.stage("data: pools and evaluation sets") as st:
        pool: dict[str, list[dict]] = {}
        evals: dict[str, list[dict]] = {}
        for source, pool_file, eval_file in SOURCES:
            recs = unique_by_prompt(read_records(data / f"{pool_file}.jsonl.gz", source))
            order = list(range(len(recs)))
            random.Random(f"selection-quality:{opts.pool_seed}:{source}").shuffle(order)
            need = sc.rows_per_source + (0 if eval_file else sc.eval_rows)
            if len(recs) < need:
                raise SystemExit(f"{pool_file}: {len(recs)} usable rows, the scale needs {need}")
            pool[source] = [recs[i] for i in order[:sc.rows_per_source]]
            if eval_file:
                held = read_records(data / f"{eval_file}.jsonl.gz", source)[:sc.eval_rows]
            else:
                held = [recs[i] for i in order[sc.rows_per_source:need]]
            pool_prompts = {r["prompt_id"] for r in pool[source]}
            if any(r["prompt_id"] in pool_prompts for r in held):
                raise SystemExit(f"{source}: an evaluation prompt is in the pool")
            evals[source] = [eval_record(r) for r in held]
            write_jsonl(work / "clean" / f"{source}.jsonl", [pool_row(r) for r in pool[source]])
            write_jsonl(work / "eval" / f"{source}.jsonl", evals[source])

        # noisy: a seeded 20% of the whole pool's responses, rotated among themselves
        flat = [(s, r) for s, rows in pool.items() for r in rows]
        rng = random.Random(f"selection-quality-noise:{opts.pool_seed}")
        n_bad = int(round(sc.noise * len(flat)))
        bad = sorted(rng.sample(range(len(flat)), n_bad))
        answers = [flat[i][1]["response"] for i in bad]
        shifted = dict(zip(bad, answers[1:] + answers[:1]))
        corrupted, noisy_rows = [], collections.defaultdict(list)
        for i, (s, r) in enumerate(flat):
            response = shifted.get(i, r["response"])
            noisy_rows[s].append({"prompt": r["prompt"], "response": response})
            if i in shifted:
                corrupted.append(record_id(r["prompt"], response, s))
        for s, rows in noisy_rows.items():
            write_jsonl(work / "noisy" / f"{s}.jsonl", rows)

        meta = {"pool_ids": {s: [r["id"] for r in rows] for s, rows in pool.items()},
                "eval_ids": {s: [r["id"] for r in rows] for s, rows in evals.items()},
                "corrupted_ids": corrupted, "n_pool": len(flat), "n_corrupted": n_bad}
        grape = None
        if "grape" in opts.methods:
            grape = build_grape_data(opts, data, work)
            meta["grape"] = {k: v for k, v in grape.items() if k != "eval"}
        write_json(work / "data.json", meta)
        st.note = (f"pool {len(flat)} rows ({sc.rows_per_source} per source), "
                   f"{sum(len(v) for v in evals.values())} eval rows, {n_bad} corrupted in the noisy pool")
    return {"evals": evals, "corrupted": set(corrupted), "grape": grape,
            "inputs": {v: [{"path": str(work / v / f"{s}.jsonl"), "source": s, "adapter": "prompt_response"}
                           for s, _, _ in SOURCES] for v in ("clean", "noisy")}}


def build_grape_data(opts: Options, data: pathlib.Path, work: pathlib.Path) -> dict:
    sc = opts.scale
    by_instruction: dict[str, dict[str, str]] = collections.defaultdict(dict)
    with gzip.open(data / f"{GRAPE_FILE}.jsonl.gz", "rt", encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            out = row.get("output")
            if isinstance(out, str) and out.strip() and isinstance(row.get("instruction"), str):
                by_instruction[row["instruction"]][row["generator"]] = out
    full = max(len(g) for g in by_instruction.values())
    instructions = sorted(i for i, g in by_instruction.items()
                          if len(g) == full and GRAPE_GOLD in g and i.strip())
    random.Random(f"selection-quality-grape:{opts.pool_seed}").shuffle(instructions)
    need = sc.grape_instructions + sc.grape_eval
    if len(instructions) < need:
        raise SystemExit(f"{GRAPE_FILE}: {len(instructions)} complete instructions, need {need}")
    train, held = instructions[:sc.grape_instructions], instructions[sc.grape_instructions:need]
    rows = [{"instruction": i, "output": by_instruction[i][g], "generator": g}
            for i in train for g in sorted(by_instruction[i])]
    write_jsonl(work / "grape" / "pool.jsonl", rows)
    from curate.records import ADAPTERS, adapt

    gold = [eval_record(adapt({"instruction": i, "output": by_instruction[i][GRAPE_GOLD]},
                              ADAPTERS["alpaca"], {}, "alpaca_eval")[0]) for i in held]
    write_jsonl(work / "eval" / "alpaca_eval_gold.jsonl", gold)
    return {"input": {"path": str(work / "grape" / "pool.jsonl"), "source": "alpaca_eval",
                      "adapter": "alpaca"},
            "n_instructions": len(train), "n_candidates": len(rows), "generators": full,
            "eval": {"alpaca_eval": gold}}


# ---------------------------------------------------------------------------- pipelines
def _job(inputs, output, name, scorers=(), selectors=(), filters=({"type": "dedup"},)):
    from curate.config import InputConfig, JobConfig

    return JobConfig(inputs=[InputConfig(**i) for i in inputs], output=str(output), name=name,
                     filters=[dict(f) for f in filters], scorers=[dict(s) for s in scorers],
                     selectors=[dict(s) for s in selectors])


def score_into(opts: Options, inputs, scorers, out: pathlib.Path, name: str) -> tuple[dict, bool]:
    """`curate score`: read, dedup, score into `out` once; re-used while the inputs,
    filters and scorers are unchanged (the pipeline's scores key)."""
    from curate.pipeline.build import read_manifest, run_pipeline, scores_key
    from curate.pipeline.readers import plan_inputs

    job = _job(inputs, out, name, scorers=scorers)
    key = scores_key(job, plan_inputs(job.inputs, job.validate.max_chars))
    previous = read_manifest(str(out))
    if previous and previous.get("scores_key") == key:
        return previous, True
    return run_pipeline(job, opts.beam_args, extra={"scores_key": key}), False


def select_into(opts: Options, scores: pathlib.Path, selector: dict, out: pathlib.Path) -> tuple[dict, bool]:
    """`curate select`: run one selector over a scores directory, no model loaded."""
    from curate.config import JobConfig
    from curate.pipeline.build import read_manifest, select_from_scores

    scoring = read_manifest(str(scores)) or {}
    previous = read_manifest(str(out))
    if (previous and previous.get("scores_key") == scoring.get("scores_key")
            and previous.get("job", {}).get("selectors") == [selector]):
        return previous, True
    job = JobConfig(inputs=[], output=str(out), name=f"select-{selector['type']}", selectors=[selector])
    return select_from_scores(job, str(scores), opts.beam_args, scoring=scoring), False


def token_counts(opts: Options, rows: list[dict], max_length: int) -> int:
    """Tokens (prompt + response, as `curate.formatting.encode` cuts them) of `rows`: the
    work a scorer or an epoch does, for tokens-per-second figures."""
    from curate.formatting import encode
    from curate.models import load_tokenizer

    tok = load_tokenizer(opts.model)
    return sum(len(encode(r, tok, "plain", max_length).input_ids) for r in rows)


def load_selection(path: pathlib.Path) -> list[dict]:
    """Kept rows, in id order (the trainer then shuffles them with its own seed)."""
    import datasets

    ds = datasets.load_from_disk(str(path))
    cols = [c for c in ("id", "prompt_id", "source", "prompt", "response", "messages", "generator")
            if c in ds.column_names]
    rows = ds.select_columns(cols).to_list()
    return sorted(rows, key=lambda r: r["id"])


# ---------------------------------------------------------------------------- scoring
def scorer_sets(opts: Options, work: pathlib.Path, inputs: list[dict],
                pruned: str | None) -> dict[str, list[dict]]:
    sc = opts.scale
    common = {"device": opts.device, "dtype": opts.dtype}
    sets = {}
    needed = {SCORER_SET[m] for m in opts.methods if m in SCORER_SET}
    if "embed" in needed:
        sets["embed"] = [{"type": "embedding", "model": opts.embedder, "field": "prompt_response",
                          "max_length": sc.embed_max_length, **common}]
    if "weight_delta" in needed:
        sets["weight_delta"] = [{"type": "weight_delta", "model": opts.model, "template": "plain",
                                 "max_length": sc.score_max_length, "eta": 1e-4, **common}]
    if "paser" in needed:
        sets["paser"] = [
            {"type": "embedding", "model": opts.embedder, "field": "prompt",
             "max_length": sc.embed_max_length, **common},
            {"type": "degradation", "model": opts.model, "pruned_model": pruned, "template": "plain",
             "max_length": sc.score_max_length, **common}]
    if "trajectory" in needed:
        proxy = {"data": [dict(i) for i in inputs], "epochs": 1, "max_steps": sc.s2l_proxy_steps,
                 "num_checkpoints": sc.s2l_checkpoints, "batch_size": sc.s2l_proxy_batch,
                 "grad_accum": 1, "device": opts.device, "dtype": opts.dtype}
        if opts.threads:
            proxy["threads"] = opts.threads
        # one directory per proxy run: a changed setting trains a new proxy, never mixes
        pool = files_digest(i["path"] for i in inputs)
        ckpt = work / f"s2l-proxy-{digest([opts.model, sc.s2l_max_length, proxy, pool])}"
        sets["trajectory"] = [{"type": "trajectory", "model": opts.model, "checkpoints": str(ckpt),
                               "template": "plain", "max_length": sc.s2l_max_length,
                               "proxy": proxy, **common}]
    return sets


def selectors_for(opts: Options, method: str, budget: int, seed: int = 0) -> dict:
    sc = opts.scale
    if method == "random":
        return {"type": "random", "budget": budget, "seed": seed}
    if method == "diversity":
        return {"type": "diversity", "budget": budget, "k": "auto", "k_grid": list(sc.diversity_k_grid),
                "allocation": "proportional", "seed": 0}
    if method == "donod":
        return {"type": "donod", "budget": budget, "criteria": [["don", "benefit"], ["nod", "cost"]]}
    if method == "paser":
        return {"type": "paser", "budget": budget, "n_clusters": sc.paser_clusters, "seed": 0}
    if method == "s2l":
        return {"type": "s2l", "budget": budget, "k": sc.s2l_k, "seed": 0}
    raise ValueError(method)


def make_pruned(opts: Options, clock: Clock, inputs: list[dict]) -> str:
    """Wanda 50% copy of the model, calibrated on the clean pool (`curate prune`)."""
    from curate.prune import make_pruned_copy

    sc = opts.scale
    spec = {"model": opts.model, "method": "wanda", "sparsity": 0.5, "rows": sc.prune_calibration_rows,
            "max_length": sc.score_max_length, "calibration": [i["path"] for i in inputs],
            "pool": files_digest(i["path"] for i in inputs)}
    out = pathlib.Path(opts.work_dir) / f"pruned-wanda50-{digest(spec)}"
    with clock.stage("prune: Wanda 50% copy for PASER") as st:
        if (out / "prune.json").is_file():
            st.note, st.cached = f"cached {out}", True
            return str(out)
        report = make_pruned_copy(opts.model, "wanda", str(out), sparsity=0.5,
                                  calibration=spec["calibration"], calibration_rows=sc.prune_calibration_rows,
                                  max_length=sc.score_max_length, device=opts.device)
        st.note = f"{report['achieved_sparsity']:.3f} of decoder linear weights zeroed"
    return str(out)


# ---------------------------------------------------------------------------- training
def train_config(opts: Options):
    from curate.train import TrainConfig

    sc = opts.scale
    return TrainConfig(model=opts.model, template="plain", max_length=sc.max_length, method="lora",
                       lr=sc.lr, epochs=sc.epochs, batch_size=sc.batch_size, grad_accum=sc.grad_accum,
                       save_every=None, keep_checkpoints=None, seed=0, threads=opts.threads,
                       device=opts.device, dtype=opts.dtype, log_every=5,
                       eval_batch_tokens=sc.eval_batch_tokens)


def evaluate(opts: Options, eval_sets: dict[str, list[dict]], adapter: str | None) -> dict:
    """Mean response-token loss per evaluation set, the base model with `adapter` (LoRA) on it."""
    import torch

    from curate.train import evaluate_loss, load_model
    from curate.train.loading import resolve_device_dtype

    device, dtype = resolve_device_dtype(opts.device, opts.dtype)
    model, tokenizer = load_model(opts.model, device=device, dtype=dtype)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    autocast = dtype if dtype == torch.bfloat16 else None
    out = {}
    for name, rows in eval_sets.items():
        r = evaluate_loss(model, tokenizer, rows, "plain", opts.scale.max_length,
                          batch_tokens=opts.scale.eval_batch_tokens, autocast_dtype=autocast)
        out[name] = {"loss": r["loss"], "n_tokens": r["n_tokens"], "n_examples": r["n_examples"],
                     "n_truncated": r["n_truncated"]}
    return out


def eval_key(opts: Options, eval_sets) -> str:
    return digest([opts.model, opts.dtype, opts.scale.max_length,
                   {k: [r["id"] for r in v] for k, v in eval_sets.items()}])


def train_and_evaluate(opts: Options, records: list[dict], run_dir: pathlib.Path,
                       eval_sets: dict) -> dict:
    """Fine-tune on `records` (cached by config + data), then evaluate (cached)."""
    from curate.train import train

    cfg = train_config(opts)
    cfg_key = {k: v for k, v in cfg.to_dict().items() if k not in ("threads", "log_every")}
    key = digest([cfg_key, [r["id"] for r in records], eval_key(opts, eval_sets)])
    cached = read_json(run_dir / "benchmark.json")
    if cached and cached.get("key") == key:
        return {**cached, "cached": True}
    m = train(records, cfg, run_dir, resume=True, progress=False)
    result = {"key": key, "train": {k: m.get(k) for k in (
        "n_train", "n_train_truncated", "steps", "train_tokens", "train_response_tokens",
        "train_time_s", "tokens_per_s", "train_loss_first", "train_loss_last", "device",
        "compute_dtype", "trainable_params")},
        "eval": evaluate(opts, eval_sets, m["weights"])}
    write_json(run_dir / "benchmark.json", result)
    return {**result, "cached": False}


def base_evaluation(opts: Options, eval_sets: dict, clock: Clock, name: str) -> dict:
    path = pathlib.Path(opts.work_dir) / f"base-eval-{name}.json"
    key = eval_key(opts, eval_sets)
    cached = read_json(path)
    with clock.stage(f"{name}: evaluate the base model (no fine-tuning)") as st:
        if cached and cached.get("key") == key:
            st.note, st.cached = "cached", True
            return cached["eval"]
        ev = evaluate(opts, eval_sets, None)
        write_json(path, {"key": key, "eval": ev})
        st.note = ", ".join(f"{k} {v['loss']:.4f}" for k, v in ev.items())
        return ev


def result_row(variant: str, method: str, seed, rows: list[dict], run: dict | None,
               corrupted: set | None = None, select_s: float | None = None, base_eval=None,
               extra: dict | None = None) -> dict:
    order = [s for s, _, _ in SOURCES]
    mix = collections.Counter(r.get("source") for r in rows)
    gens = collections.Counter(r.get("generator") for r in rows if r.get("generator"))
    ev = run["eval"] if run else base_eval
    losses = {k: v["loss"] for k, v in ev.items()}
    row = {"variant": variant, "method": method, "seed": seed, "rows": len(rows),
           "source_mix": dict(sorted(mix.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order
                                                                  else len(order), kv[0]))),
           "generator_mix": dict(gens.most_common()) if gens else {},
           "noisy_kept": (sum(r["id"] in corrupted for r in rows) if corrupted is not None and rows else None),
           "select_s": select_s,
           "train_s": run["train"]["train_time_s"] if run else None,
           "train_tokens": run["train"]["train_tokens"] if run else None,
           "train_tokens_per_s": run["train"]["tokens_per_s"] if run else None,
           "steps": run["train"]["steps"] if run else None,
           "eval": losses, "eval_mean": statistics.fmean(losses.values()),
           "eval_tokens": {k: v["n_tokens"] for k, v in ev.items()}}
    if extra:
        row.update(extra)
    return row


# ---------------------------------------------------------------------------- the variants
def run_pool_variant(opts: Options, variant: str, data: dict, clock: Clock, pruned: str | None,
                     base_eval: dict) -> list[dict]:
    work = pathlib.Path(opts.work_dir) / variant
    inputs = data["inputs"][variant]
    corrupted = data["corrupted"] if variant == "noisy" else None
    evals = data["evals"]
    with clock.stage(f"{variant}: pool (read, dedup)") as st:
        pool_manifest, cached = score_into(opts, inputs, [], work / "pool", f"{variant}-pool")
        n_pool = pool_manifest["counts"]["kept"]
        st.note, st.cached = f"{n_pool} rows" + (", cached" if cached else ""), cached
    from curate.config import resolve_budget

    budget = resolve_budget(opts.scale.budget, n_pool)
    sc = opts.scale
    with clock.stage(f"{variant}: budget and pool token counts") as st:
        pool_rows = load_selection(work / "pool")
        tokens = {n: token_counts(opts, pool_rows, n) for n in sorted({sc.max_length, sc.score_max_length,
                                                                        sc.s2l_max_length})}
        st.note = (f"budget {budget} of {n_pool} rows; pool tokens "
                   + ", ".join(f"{v} at max_length {k} ({v / n_pool:.0f} a row)" for k, v in tokens.items()))
    score_tokens = {"weight_delta": tokens[sc.score_max_length], "paser": 2 * tokens[sc.score_max_length],
                    "trajectory": sc.s2l_checkpoints * tokens[sc.s2l_max_length]}
    rows: list[dict] = []
    base = result_row(variant, "base", None, [], None, base_eval=base_eval,
                      extra={"note": "no fine-tuning"})
    rows.append(base)

    # score once per scorer set
    sets = scorer_sets(opts, work, inputs, pruned)
    scores_dir, score_s = {}, {}
    for name, scorers in sets.items():
        with clock.stage(f"{variant}: score [{name}]") as st:
            m, cached = score_into(opts, inputs, scorers, work / f"scores-{name}", f"{variant}-{name}")
            scores_dir[name] = work / f"scores-{name}"
            score_s[name] = m["timings_s"]["total"]
            st.cached = cached
            st.note = ("cached; " if cached else "") + f"{m['counts']['kept']} rows scored in {score_s[name]:.0f} s"
            if name in score_tokens:
                st.note += (f", {score_tokens[name] / max(score_s[name], 1e-9):.0f} model tokens/s "
                            f"({score_tokens[name]} forward tokens"
                            + (", proxy training included" if name == "trajectory" else "") + ")")
            if m["counts"]["kept"] != n_pool:
                raise RuntimeError(f"{variant}/{name}: {m['counts']['kept']} rows scored, pool has {n_pool}")

    # select many, then train and evaluate each subset
    plan = [("random", s) for s in opts.seeds] if "random" in opts.methods else []
    plan += [(m, None) for m in opts.methods if m in POOL_METHODS]
    for method, seed in plan:
        label = method if seed is None else f"{method}:{seed}"
        src = work / "pool" if method == "random" else scores_dir[SCORER_SET[method]]
        spec = selectors_for(opts, method, budget, seed or 0)
        with clock.stage(f"{variant}: select [{label}]") as st:
            m, cached = select_into(opts, src, spec, work / "select" / label.replace(":", "-"))
            st.note, st.cached = f"{m['counts']['kept']} kept" + (", cached" if cached else ""), cached
        selected = load_selection(work / "select" / label.replace(":", "-"))
        rows.append(_train_row(opts, clock, variant, method, seed, selected, work, evals, corrupted,
                               m["timings_s"]["total"],
                               {"score_s": score_s.get(SCORER_SET.get(method, ""))}))
    if opts.scale.full_pool:
        selected = load_selection(work / "pool")
        rows.append(_train_row(opts, clock, variant, "full", None, selected, work, evals, corrupted, None, {}))
    return rows


def _train_row(opts, clock, variant, method, seed, selected, work, evals, corrupted, select_s, extra):
    label = method if seed is None else f"{method}:{seed}"
    with clock.stage(f"{variant}: train + evaluate [{label}] on {len(selected)} rows") as st:
        run = train_and_evaluate(opts, selected, work / "train" / label.replace(":", "-"), evals)
        ev = run["eval"]
        st.cached = run["cached"]
        st.note = (("cached; " if run["cached"] else "")
                   + f"{run['train']['train_tokens']} tokens, {run['train']['tokens_per_s']:.0f} tok/s; "
                   + "mean loss " + f"{statistics.fmean(v['loss'] for v in ev.values()):.4f}")
    return result_row(variant, method, seed, selected, run, corrupted, select_s, extra=extra)


def run_grape_variant(opts: Options, data: dict, clock: Clock) -> list[dict]:
    work = pathlib.Path(opts.work_dir) / "grape"
    g = data["grape"]
    evals = g["eval"]
    base_eval = base_evaluation(opts, evals, clock, "grape")
    rows = [result_row("grape", "base", None, [], None, base_eval=base_eval,
                       extra={"note": "no fine-tuning"})]
    scorers = [{"type": "likelihood", "model": opts.model, "template": "plain",
                "max_length": opts.scale.grape_max_length, "device": opts.device, "dtype": opts.dtype}]
    with clock.stage("grape: score [likelihood]") as st:
        m, cached = score_into(opts, [g["input"]], scorers, work / "scores-likelihood", "grape-likelihood")
        score_s = m["timings_s"]["total"]
        st.note, st.cached = ("cached; " if cached else "") + f"{m['counts']['kept']} candidates in {score_s:.0f} s", cached
    with clock.stage("grape: select [grape]") as st:
        m, cached = select_into(opts, work / "scores-likelihood", {"type": "grape", "k": 1}, work / "select" / "grape")
        st.note, st.cached = f"{m['counts']['kept']} kept" + (", cached" if cached else ""), cached
    selected = load_selection(work / "select" / "grape")
    rows.append(_train_row(opts, clock, "grape", "grape", None, selected, work, evals, None,
                           m["timings_s"]["total"], {"score_s": score_s}))

    # baselines over the same scored candidates: one per instruction, by a seeded draw or length
    import datasets

    cands = datasets.load_from_disk(str(work / "scores-likelihood")).select_columns(
        ["id", "prompt_id", "source", "prompt", "response", "messages", "generator"]).to_list()
    by_prompt = collections.defaultdict(list)
    for r in cands:
        by_prompt[r["prompt_id"]].append(r)
    groups = [sorted(v, key=lambda r: r["id"]) for _, v in sorted(by_prompt.items())]
    if "random" in opts.methods:
        for seed in opts.seeds:
            pick = [grp[random.Random(f"{seed}:{grp[0]['prompt_id']}").randrange(len(grp))] for grp in groups]
            rows.append(_train_row(opts, clock, "grape", "random", seed, sorted(pick, key=lambda r: r["id"]),
                                   work, evals, None, None, {"note": "a random generator per instruction"}))
    longest = [max(grp, key=lambda r: (len(r["response"]), r["id"])) for grp in groups]
    rows.append(_train_row(opts, clock, "grape", "longest", None, sorted(longest, key=lambda r: r["id"]),
                           work, evals, None, None, {"note": "the longest response (characters)"}))
    return rows


# ---------------------------------------------------------------------------- reporting
def summarise(rows: list[dict]) -> dict:
    """Per variant: random's mean and spread per set, and each method's verdict."""
    out = {}
    for variant in dict.fromkeys(r["variant"] for r in rows):
        vr = [r for r in rows if r["variant"] == variant]
        rand = [r for r in vr if r["method"] == "random"]
        sets = list(vr[0]["eval"])
        stats = {}
        for s in sets + ["mean"]:
            vals = [r["eval_mean"] if s == "mean" else r["eval"][s] for r in rand]
            if vals:
                stats[s] = {"mean": statistics.fmean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                            "min": min(vals), "max": max(vals), "n": len(vals)}
        verdicts = {}
        for r in vr:
            if r["method"] in ("random", "base") or not stats:
                continue
            v = {}
            for s in sets + ["mean"]:
                val = r["eval_mean"] if s == "mean" else r["eval"][s]
                d = val - stats[s]["mean"]
                v[s] = {"delta": d, "verdict": "tie" if abs(d) <= stats[s]["sd"] else ("better" if d < 0 else "worse")}
            verdicts[r["method"]] = v
        noisy = {}
        if any(r.get("noisy_kept") is not None for r in vr):
            for r in vr:
                if r.get("noisy_kept") is not None and r["rows"]:
                    key = r["method"] if r["seed"] is None else f"{r['method']}:{r['seed']}"
                    noisy[key] = {"kept": r["noisy_kept"], "rows": r["rows"], "share": r["noisy_kept"] / r["rows"]}
        out[variant] = {"sets": sets, "random": stats, "verdicts": verdicts, "noisy": noisy}
    return out


def _fmt(x, nd=4):
    return "" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


SHORT = {"gpteacher_roleplay": "roleplay", "gpteacher_toolformer": "toolformer"}
TITLES = {"clean": "Mixed pool", "noisy": "Mixed pool, 20% of responses swapped (noisy)",
          "grape": "GRAPE: one response per alpaca_eval instruction"}


def markdown_tables(rows: list[dict], summary: dict) -> str:
    lines = []
    for variant, s in summary.items():
        vr = [r for r in rows if r["variant"] == variant]
        sets = s["sets"]
        lines += [f"### {TITLES.get(variant, variant)}", ""]
        mix_name = "generator mix (top 3)" if variant == "grape" else "source mix"
        head = (["method", "rows", mix_name] + (["noisy kept"] if variant == "noisy" else [])
                + ["train s", "train tok"] + [SHORT.get(x, x) for x in sets] + ["mean", "vs random (mean)"])
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in vr:
            label = "random generator" if (variant == "grape" and r["method"] == "random") else r["method"]
            name = label if r["seed"] is None else f"{label} (seed {r['seed']})"
            if variant == "grape":
                mix = ", ".join(f"{k} {v}" for k, v in list(r["generator_mix"].items())[:3])
            else:
                mix = ", ".join(f"{SHORT.get(k, k)} {v}" for k, v in r["source_mix"].items())
            cells = [name, str(r["rows"]) if r["rows"] else "-", mix or "-"]
            if variant == "noisy":
                cells.append("-" if r["noisy_kept"] is None else
                             f"{r['noisy_kept']} ({100 * r['noisy_kept'] / r['rows']:.0f}%)")
            cells += [_fmt(r["train_s"], 0) or "-", _fmt(r["train_tokens"]) or "-"]
            v = s["verdicts"].get(r["method"]) if r["seed"] is None else None
            for x in sets + ["mean"]:
                val = r["eval_mean"] if x == "mean" else r["eval"][x]
                mark = f" ({v[x]['verdict']})" if v else ""
                cells.append(f"{val:.4f}{mark}")
            cells.append(f"{v['mean']['delta']:+.4f}" if v else "")
            lines.append("| " + " | ".join(cells) + " |")
        if s["random"]:
            st = s["random"]
            n = st["mean"]["n"]
            cells = [f"**random, mean ± sd ({n} seeds)**", "", ""] + ([""] if variant == "noisy" else []) + ["", ""]
            cells += [f"{st[x]['mean']:.4f} ± {st[x]['sd']:.4f}" for x in sets + ["mean"]] + [""]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        if s["noisy"]:
            rand = [v for k, v in s["noisy"].items() if k.startswith("random")]
            random_share = (f". Random's mean share: {100 * statistics.fmean(v['share'] for v in rand):.0f}%."
                            if rand else ".")
            lines += ["Corrupted rows kept (the noisy pool is 20% corrupted; random keeps 20% in expectation): "
                      + "; ".join(f"{k} {v['kept']}/{v['rows']} ({100 * v['share']:.0f}%)"
                                  for k, v in s["noisy"].items()) + random_share, ""]
    return "\n".join(lines)


def write_csv(rows: list[dict], path: pathlib.Path) -> None:
    known = [s for s, _, _ in SOURCES] + ["alpaca_eval"]
    sets = sorted({k for r in rows for k in r["eval"]}, key=lambda k: (known.index(k) if k in known else 99, k))
    fields = ["variant", "method", "seed", "rows", "source_mix", "generator_mix", "noisy_kept",
              "score_s", "select_s", "train_s", "train_tokens", "train_tokens_per_s", "steps"] + \
             [f"loss_{s}" for s in sets] + ["loss_mean"]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({**{k: r.get(k) for k in fields if not k.startswith("loss_")},
                        "source_mix": ";".join(f"{k}:{v}" for k, v in r["source_mix"].items()),
                        "generator_mix": ";".join(f"{k}:{v}" for k, v in r["generator_mix"].items()),
                        **{f"loss_{s}": r["eval"].get(s) for s in sets}, "loss_mean": r["eval_mean"]})


def plot(rows: list[dict], summary: dict, path: pathlib.Path) -> None:
    """Per variant: each method's loss minus random's mean, per set and for the mean;
    the grey band is random's ± one seed standard deviation (inside it: a tie)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [v for v in summary if summary[v]["random"]]
    if not variants:
        return
    fig, axes = plt.subplots(1, len(variants), figsize=(6.5 * len(variants), 4.6), squeeze=False)
    for ax, variant in zip(axes[0], variants):
        s = summary[variant]
        cols = s["sets"] + ["mean"]
        methods = [r for r in rows if r["variant"] == variant and r["method"] not in ("random", "base")]
        width = 0.8 / max(len(methods), 1)
        for j, x in enumerate(cols):
            sd = s["random"][x]["sd"]
            ax.fill_between([j - 0.45, j + 0.45], -sd, sd, color="0.85", lw=0)
        for i, r in enumerate(methods):
            deltas = [(r["eval_mean"] if x == "mean" else r["eval"][x]) - s["random"][x]["mean"] for x in cols]
            ax.bar([j - 0.4 + width * (i + 0.5) for j in range(len(cols))], deltas, width, label=r["method"])
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(range(len(cols)))
        ax.set_xticklabels([SHORT.get(c, c) for c in cols], rotation=20)
        ax.set_ylabel("eval loss − random's mean (lower is better)")
        ax.set_title(TITLES.get(variant, variant), fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle("Held-out response-token loss after LoRA on each subset; grey: random ± 1 sd over seeds",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def settings_lines(opts: Options) -> list[str]:
    sc = opts.scale
    return [
        f"- scale `{opts.scale_name}`; model `{opts.model}`, embedder `{opts.embedder}`, "
        f"device {opts.device}, dtype {opts.dtype}",
        f"- pool: {sc.rows_per_source} rows per source x 4 sources (seeded draw, pool seed {opts.pool_seed}); "
        f"budget {sc.budget:.0%} of the pool (the same row count for every method)",
        f"- evaluation: {sc.eval_rows} rows per set (gsm8k_test first rows; held-out rows of the other three "
        f"files, no prompt shared with the pool), loss = mean NLL over response tokens, max_length {sc.max_length}",
        f"- training: LoRA r=16 alpha=32 (all linear), plain template, max_length {sc.max_length}, "
        f"{sc.epochs} epoch(s), batch {sc.batch_size} x {sc.grad_accum}, lr {sc.lr}, cosine, seed 0",
        f"- random seeds {list(opts.seeds)}; tie = |method - random mean| <= random's sample sd over seeds",
        f"- scorers: weight_delta / degradation at {sc.score_max_length} tokens; MiniLM at {sc.embed_max_length}; "
        f"diversity k auto over {list(sc.diversity_k_grid)}; PASER Wanda 50% (calibration {sc.prune_calibration_rows} "
        f"pool rows), n_clusters {sc.paser_clusters}",
        f"- S2L: the model itself as proxy (LoRA), {sc.s2l_proxy_steps} steps x {sc.s2l_proxy_batch} rows at "
        f"{sc.s2l_max_length} tokens, T={sc.s2l_checkpoints} checkpoints, k={sc.s2l_k} (paper: Pythia-70M proxy, "
        f"3 epochs over the pool, T=12, k=100)",
        f"- noisy variant: {'on' if sc.noisy else 'off'} ({sc.noise:.0%} of responses swapped); full pool: "
        f"{'on' if sc.full_pool else 'off'}",
        f"- GRAPE: {sc.grape_instructions} alpaca_eval instructions x all candidates, likelihood at "
        f"{sc.grape_max_length} tokens; evaluated on {sc.grape_eval} other instructions, gold = {GRAPE_GOLD} "
        f"(one of the candidates' generators too: the generator mix shows how often a method trained on it)",
        f"- data: {opts.data}",
    ]


def write_reports(opts: Options, rows: list[dict], clock: Clock, machine: dict, final: bool) -> dict:
    summary = summarise(rows)
    out = pathlib.Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    tables = markdown_tables(rows, summary)
    stem = out / "selection_quality"
    meta = {"command": opts.command, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": {**machine, "load_average_end": round(os.getloadavg()[0], 2)},
            "scale": opts.scale_name, "settings": dataclasses.asdict(opts.scale),
            "methods": list(opts.methods), "seeds": list(opts.seeds), "complete": final,
            "stages": clock.stages, "wall_s": round(time.perf_counter() - clock.start, 1)}
    write_json(stem.with_suffix(".json"), {**meta, "rows": rows, "summary": summary})
    write_csv(rows, stem.with_suffix(".csv"))
    plot(rows, summary, stem.with_suffix(".png"))
    header = [f"# Selection quality ({opts.scale_name} scale){'' if final else ' (partial)'}", "",
              f"Command: `{opts.command}`", "", f"Date: {meta['date']}; wall time {meta['wall_s'] / 60:.1f} min", "",
              "Machine: " + ", ".join(f"{k} {v}" for k, v in meta["machine"].items()), "", "## Settings", ""]
    body = header + settings_lines(opts) + ["", "## Results (held-out loss, lower is better)", "", tables]
    stage_lines = ["## Stage times", "",
                   "Seconds in this invocation, and when the stage was computed (a rerun finds finished "
                   "stages in the work dir).", "",
                   "| stage | s (this run) | s (computed) | note |", "|---|---|---|---|"]
    stage_lines += [f"| {s['stage']} | {s['seconds']} | {_fmt(s['computed_seconds'], 1)} | {s['note']} |"
                    for s in clock.stages]
    text = "\n".join(body + [""] + stage_lines) + "\n"
    stem.with_suffix(".md").write_text(text)
    if final and opts.summary:
        pathlib.Path(opts.summary).parent.mkdir(parents=True, exist_ok=True)
        verdict_lines = ["## Verdicts (mean over evaluation sets, against random's seed spread)", ""]
        for variant, s in summary.items():
            for m, v in s["verdicts"].items():
                per_set = ", ".join(f"{SHORT.get(k, k)} {x['verdict']}" for k, x in v.items() if k != "mean")
                verdict_lines.append(f"- {variant} / {m}: **{v['mean']['verdict']}** "
                                     f"({v['mean']['delta']:+.4f} vs random {s['random']['mean']['mean']:.4f} "
                                     f"± {s['random']['mean']['sd']:.4f}); per set: {per_set}")
        pathlib.Path(opts.summary).write_text(
            "\n".join(body + verdict_lines + ["", f"Files: `{stem}.md`, `.csv`, `.json`, `.png`", ""]
                      + stage_lines) + "\n")
    return summary


# ---------------------------------------------------------------------------- main
def run(opts: Options) -> dict:
    """The whole benchmark; returns {"rows": [...], "summary": {...}}."""
    import torch

    if opts.threads:
        torch.set_num_threads(opts.threads)
    clock = Clock(pathlib.Path(opts.work_dir) / "stage_times.json")
    machine = machine_info()
    clock.say(f"selection quality, scale {opts.scale_name}: methods {','.join(opts.methods)}, "
              f"seeds {list(opts.seeds)}, work dir {opts.work_dir}")
    data = build_data(opts, clock)
    rows: list[dict] = []
    pruned = make_pruned(opts, clock, data["inputs"]["clean"]) if "paser" in opts.methods else None
    if any(m in opts.methods for m in ("random", "full") + POOL_METHODS):
        base_eval = base_evaluation(opts, data["evals"], clock, "pool")
        for variant in ("clean", "noisy") if opts.scale.noisy else ("clean",):
            rows += run_pool_variant(opts, variant, data, clock, pruned, base_eval)
            write_reports(opts, rows, clock, machine, final=False)
    if "grape" in opts.methods:
        rows += run_grape_variant(opts, data, clock)
    summary = write_reports(opts, rows, clock, machine, final=True)
    clock.say(f"done: {opts.out}/selection_quality.md" + (f", {opts.summary}" if opts.summary else ""))
    return {"rows": rows, "summary": summary}


def parse_args(argv=None) -> Options:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    ap.add_argument("--methods", default=None,
                    help=f"comma list of {','.join(METHODS)} (default: all but full; full also with --full-pool)")
    ap.add_argument("--seeds", default="0,1,2", help="random selection seeds (default 0,1,2)")
    ap.add_argument("--model", default="default", help="causal LM: 'default' (SmolLM2-135M-Instruct) or a dir")
    ap.add_argument("--embedder", default="minilm", help="sentence encoder: 'minilm' or a dir")
    ap.add_argument("--data", default=os.environ.get("CURATE_DATA", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--work-dir", default=None, help="cache of every stage (default runs/selection_quality[-SCALE])")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--summary", default=None,
                    help="the RESULTS markdown (default benchmarks/RESULTS_selection_quality.md for cpu/gpu "
                         "scale with the default model; none otherwise); 'none' to skip")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--pool-seed", type=int, default=0)
    ap.add_argument("--noisy", dest="noisy", action="store_true", default=None, help="run the noisy variant")
    ap.add_argument("--no-noisy", dest="noisy", action="store_false")
    ap.add_argument("--full-pool", dest="full_pool", action="store_true", default=None,
                    help="also train on the whole pool")
    ap.add_argument("--no-full-pool", dest="full_pool", action="store_false")
    for name, typ in (("rows_per_source", int), ("eval_rows", int), ("budget", float), ("max_length", int),
                      ("epochs", int), ("lr", float), ("batch_size", int), ("grad_accum", int),
                      ("s2l_proxy_steps", int), ("s2l_checkpoints", int), ("s2l_k", int),
                      ("grape_instructions", int), ("grape_eval", int)):
        ap.add_argument("--" + name.replace("_", "-"), type=typ, default=None, help=f"override the scale's {name}")
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("beam_args", nargs="*", help="Beam pipeline options, after `--`")
    args = ap.parse_args(argv)

    scale = dataclasses.replace(SCALES[args.scale])
    for f in dataclasses.fields(Scale):
        value = getattr(args, f.name, None)
        if value is not None:
            setattr(scale, f.name, value)
    methods = tuple(m.strip() for m in (args.methods or "").split(",") if m.strip()) or \
        tuple(m for m in METHODS if m != "full")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    if "full" in methods:
        scale.full_pool = True
    seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
    summary = args.summary
    if summary is None:
        summary = (str(ROOT / "benchmarks" / "RESULTS_selection_quality.md")
                   if args.scale in ("cpu", "gpu") and args.model == "default" else None)
    elif summary.lower() == "none":
        summary = None
    work = args.work_dir or str(ROOT / "runs" / ("selection_quality" if args.scale == "cpu"
                                                   else f"selection_quality-{args.scale}"))
    argv_list = list(sys.argv[1:] if argv is None else argv)
    return Options(scale=scale, scale_name=args.scale, data=args.data, work_dir=work, out=args.out,
                   summary=summary, methods=methods, seeds=seeds, pool_seed=args.pool_seed,
                   model=args.model, embedder=args.embedder, device=args.device, dtype=args.dtype,
                   threads=args.threads, beam_args=list(args.beam_args),
                   command=("python benchmarks/selection_quality.py " + shlex.join(argv_list)).rstrip())


def main(argv=None) -> dict:
    import warnings

    opts = parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    verbose = "-v" in (argv or sys.argv) or "--verbose" in (argv or sys.argv)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("apache_beam", "urllib3", "filelock", "httpx", "datasets", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not verbose:
        import transformers

        transformers.utils.logging.disable_progress_bar()  # a "Loading weights" bar per model load
    return run(opts)


if __name__ == "__main__":
    main()
