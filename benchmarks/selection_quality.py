"""Selection quality: do the selected subsets train better models than random? (issue 15)

    python benchmarks/selection_quality.py                   # --scale cpu (2-core CPU; see RESULTS for its time)
    python benchmarks/selection_quality.py --scale gpu       # one large GPU (device auto)
    python benchmarks/selection_quality.py --model DIR --embedder DIR --scale tiny \\
        --out /tmp/sq/results --summary /tmp/sq/RESULTS.md --work-dir /tmp/sq/work   # dev run

For a pool and a budget, select with every method and with random (several seeds),
fine-tune the same model with the same settings on each subset (curate's trainer, LoRA),
and measure the held-out mean response-token loss on fixed evaluation sets.

Data (all drawn with seeds, disjoint by prompt):
    pool        `rows_per_source` rows from each of gsm8k_train, codealpaca,
                gpteacher_roleplay, gpteacher_toolformer; budget = 10% of the pool, the
                same row count for every method
    evaluation  `eval_rows` per source: gsm8k_test's first rows; held-out rows of the
                other three files
    validation  `val_rows` per source, held-out rows of the pool files: the training
                settings (epochs, lr) are chosen once on it, from `hp_grid`, training on a
                random subset of the budget's size, and then used for every subset
Variants:
    clean       every method trains the base model on its pick of the pool
    noisy       the same pool with 20% of the rows corrupted, a third each: responses
                swapped among the corrupted rows, responses truncated to 30%, a wrong
                final answer (GSM8K rows); reports the share of corrupted rows each method
                kept and the loss (benchmarks/corruptions.py)
    heavy       the same with 60% of the rows corrupted: a pool where noise costs random
                something, so a method that avoids it has room to win (fixed beforehand,
                not chosen on the evaluation rows)
    recovery-*  PASER's own setting: a pruned copy of the model (Wanda 50%; 8 decoder
                blocks dropped) is fine-tuned on PASER's pick and on random subsets;
                recovery = share of the pruning's loss increase that training won back
                (run with paser unless --variants leaves out `recovery`)
    grape       one response per alpaca_eval instruction (10 generators' answers, repeats
                dropped by the dedup) by GRAPE, by a random generator (the seeds) and by
                the longest; evaluated on held-out instructions against the gpt4 gold
                answer and, apart, against every generator's answer (mean over generators)
Methods (pool variants), each through the pipeline's score-once / select-many path:
    random               the `random` selector, one row per seed
    full                 the whole pool (clean only: 10x the training cost)
    longest              `top` on response_chars
    ppl_low / ppl_high   `top` on the base model's mean response loss (IFD scorer's
                         ifd_loss_conditioned), lowest / highest
    ifd                  `top` on IFD below 1 (Li et al. 2023)
    diversity            kMQ: MiniLM embeddings + `diversity` (k by silhouette)
    diversity_iterative  the same with 3 rounds of train / generate / reweight
    donod                `weight_delta` + `donod` (TOPSIS: DON benefit, NOD cost)
    s2l                  `trajectory` on a small proxy: the model with 20 of its 30
                         blocks dropped (`curate prune --method layer_drop`), LoRA over
                         the pool, T=6 checkpoints; + `s2l`
    paser                `degradation` against the Wanda 50% copy + `paser`; in the
                         clean/noisy tables the base model trains on its pick, the
                         recovery tables are its real setting
    <method>_strat       longest, ppl_low, ppl_high, ifd, donod and paser again with
                         `stratify_by: source`: the budget shared among the sources in the
                         pool's proportions, the method run inside each
    headroom             an upper bound, not a method: the pool rows nearest to the
                         evaluation rows (MiniLM cosine), the budget shared evenly among
                         the evaluation sets (`headroom_ids`); it reads the evaluation rows
A method is better or worse than random only outside random's seed spread (|method -
random's mean| > the sample sd over seeds); inside it, a tie.

Everything is cached in --work-dir (default runs/selection_quality, git-ignored): pools,
scores (keyed by content, as `curate run` with `scores:`), pruned copies, selections,
training runs (the trainer's fingerprint) and evaluations; a rerun after a crash or a
change computes only what is missing. Each stage prints the elapsed time and an ETA.
Writes --out/selection_quality.{md,csv,json,png} and the --summary markdown after each
variant (titled partial until the run completes), so a stopped run still shows what it has.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
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
from dataclasses import dataclass, field

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.corruptions import CORRUPTIONS  # noqa: E402
from benchmarks.machine import machine_info  # noqa: E402
# `curate compare`'s selection and evaluation, and the stage clock and cache helpers it shares
from curate import compare  # noqa: E402
from curate.stage_clock import Clock, digest, read_json, write_json  # noqa: E402

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
# the scorer set each pool method selects from (None: the pool itself)
SCORER_SET = {"random": None, "full": None, "longest": None, "ppl_low": "ifd", "ppl_high": "ifd",
              "ifd": "ifd", "diversity": "embed", "diversity_iterative": "embed",
              "donod": "weight_delta", "s2l": "trajectory", "paser": "paser-wanda50"}
# the score-based methods again with `stratify_by: source` (the budget shared among the
# sources in the pool's proportions, the method run inside each): "<method>_strat"
STRATIFIED = ("longest", "ppl_low", "ppl_high", "ifd", "donod", "paser")
SCORER_SET.update({f"{m}_strat": SCORER_SET[m] for m in STRATIFIED})
# an upper bound, never a method: it looks at the evaluation rows (`headroom_ids`)
SCORER_SET["headroom"] = "embed"
POOL_METHODS = tuple(SCORER_SET)
METHODS = POOL_METHODS + ("grape",)
# pruned copies for PASER's recovery variants: name -> (method, what it is)
PRUNED = {"wanda50": "Wanda, 50% of every decoder linear weight", "layerdrop": "layer drop"}


# ---------------------------------------------------------------------------- settings
@dataclass
class Scale:
    """Sizes and settings of one run; `--scale` picks one, flags override fields."""

    rows_per_source: int
    eval_rows: int
    val_rows: int = 25
    budget: float = 0.10                   # fraction of the pool, the same count for all methods
    max_length: int = 256                  # training and evaluation, tokens
    hp_grid: tuple = ((1, 3e-4), (1, 1e-3), (1, 3e-3), (2, 1e-3))  # (epochs, lr) tried on validation
    hp_seed: int = 1000                    # the random subset the settings are chosen on
    batch_size: int = 4
    grad_accum: int = 1
    score_max_length: int = 256            # ifd, weight_delta, degradation, trajectory
    embed_max_length: int = 128            # MiniLM (as jobs/diversity.yaml)
    diversity_k_grid: tuple = (4, 8, 16, 32)
    diversity_rounds: int = 3              # the iterative variant (paper: 3)
    refine_max_new_tokens: int = 32        # its generations between rounds
    paser_clusters: object = "auto"
    prune_calibration_rows: int = 64
    layer_drop_fraction: float = 0.25      # PASER's second pruned copy: blocks dropped before the last
    s2l_proxy_keep: float = 1 / 3          # S2L proxy: the share of blocks kept (the first ones + the last)
    s2l_k: int = 8
    s2l_proxy_epochs: int = 1              # over the whole pool (paper: 3)
    s2l_proxy_batch: int = 8
    s2l_proxy_lr: float = 1e-3             # LoRA
    s2l_checkpoints: int = 6               # T (paper: 12)
    grape_instructions: int = 200
    grape_eval: int = 40
    grape_max_length: int = 256            # GRAPE likelihood scoring
    noise: float = 0.2                     # the noisy variant's corrupted share
    heavy_noise: float = 0.6               # the heavy variant's
    variants: tuple = ("clean", "noisy", "heavy", "recovery")  # recovery: PASER's, when it runs
    eval_batch_tokens: int = 4096


SCALES = {
    # 2,000-row pool, budget 200, 100 evaluation rows per source, SmolLM2-135M on the CPU
    "cpu": Scale(rows_per_source=500, eval_rows=100),
    # a GPU machine: a bigger pool, longer sequences, paper-like S2L (T=12)
    "gpu": Scale(rows_per_source=2500, eval_rows=200, val_rows=50, max_length=512,
                 hp_grid=((1, 2e-4), (1, 5e-4), (2, 2e-4), (2, 5e-4), (3, 2e-4)),
                 batch_size=8, grad_accum=2, score_max_length=1024, embed_max_length=256,
                 diversity_k_grid=(8, 16, 32, 64, 128), refine_max_new_tokens=128,
                 prune_calibration_rows=128, s2l_k=50, s2l_proxy_epochs=3, s2l_proxy_batch=32,
                 s2l_checkpoints=12, grape_instructions=800, grape_eval=100, grape_max_length=1024,
                 eval_batch_tokens=32768),
    # development and tests: a tiny random model, seconds per stage
    "tiny": Scale(rows_per_source=12, eval_rows=4, val_rows=2, budget=0.25, max_length=64,
                  hp_grid=((1, 1e-3), (2, 1e-3)), score_max_length=64, embed_max_length=32,
                  diversity_k_grid=(2, 3), diversity_rounds=2, refine_max_new_tokens=4,
                  paser_clusters=2, prune_calibration_rows=8, s2l_k=2, s2l_proxy_batch=4,
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
    methods: tuple = tuple(m for m in METHODS)
    seeds: tuple = (0, 1, 2, 3, 4)
    pool_seed: int = 0
    model: str = "default"
    embedder: str = "minilm"
    device: str = "auto"
    dtype: str = "auto"
    threads: int | None = None
    command: str = ""
    beam_args: list = field(default_factory=list)
    chosen: dict = field(default_factory=dict)   # the training settings picked on validation


# ---------------------------------------------------------------------------- helpers
def files_digest(paths) -> str:
    """Content hash of input files: a cache keyed by path alone would survive a changed pool."""
    h = hashlib.sha256()
    for p in paths:
        h.update(pathlib.Path(p).read_bytes())
    return h.hexdigest()[:16]


def write_jsonl(path: pathlib.Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
    if not path.exists() or path.read_text() != text:  # same bytes: same scores key anyway
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


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


NOISE = {"noisy": "noise", "heavy": "heavy_noise"}  # a corrupted variant: its Scale field


def corrupt_pool(opts: Options, pool: dict[str, list[dict]], variant: str) -> tuple[dict, dict]:
    """A corrupted pool: the variant's share of the rows corrupted, a third each by kind,
    the wrong answers on GSM8K rows. Returns ({source: rows}, {corrupted id: kind})."""
    flat = [r for rows in pool.values() for r in rows]
    salt = "" if variant == "noisy" else f":{variant}"  # the noisy pool as it was published
    rng = random.Random(f"selection-quality-noise:{opts.pool_seed}{salt}")
    n_bad = int(round(getattr(opts.scale, NOISE[variant]) * len(flat)))
    gsm8k = [i for i, r in enumerate(flat) if r["source"] == "gsm8k"]
    n_wrong = min(n_bad // 3, len(gsm8k))
    chosen = {"wrong_answer": sorted(rng.sample(gsm8k, n_wrong))}
    rest = sorted(set(range(len(flat))) - set(chosen["wrong_answer"]))
    others = rng.sample(rest, n_bad - n_wrong)
    half = len(others) // 2
    chosen["swapped"], chosen["truncated"] = sorted(others[:half]), sorted(others[half:])
    changed, kinds = {}, {}
    for kind, idx in chosen.items():
        for i, rec in CORRUPTIONS[kind](flat, idx, rng).items():
            changed[i] = rec
            kinds[record_id(rec["prompt"], rec["response"], rec["source"])] = kind
    noisy = collections.defaultdict(list)
    for i, r in enumerate(flat):
        noisy[r["source"]].append(pool_row(changed.get(i, r)))
    return dict(noisy), kinds


def build_data(opts: Options, clock: Clock) -> dict:
    """Pool files (clean and noisy), validation and evaluation sets, the GRAPE pool, in WORK/data."""
    sc, data, work = opts.scale, pathlib.Path(opts.data), pathlib.Path(opts.work_dir) / "data"
    with clock.stage("data: pools, validation and evaluation sets", "data") as st:
        pool: dict[str, list[dict]] = {}
        evals: dict[str, list[dict]] = {}
        val: dict[str, list[dict]] = {}
        for source, pool_file, eval_file in SOURCES:
            recs = unique_by_prompt(read_records(data / f"{pool_file}.jsonl.gz", source))
            order = list(range(len(recs)))
            random.Random(f"selection-quality:{opts.pool_seed}:{source}").shuffle(order)
            n_pool, n_eval = sc.rows_per_source, (0 if eval_file else sc.eval_rows)
            need = n_pool + n_eval + sc.val_rows
            if len(recs) < need:
                raise SystemExit(f"{pool_file}: {len(recs)} usable rows, the scale needs {need}")
            pool[source] = [recs[i] for i in order[:n_pool]]
            if eval_file:
                held = read_records(data / f"{eval_file}.jsonl.gz", source)[:sc.eval_rows]
            else:
                held = [recs[i] for i in order[n_pool:n_pool + n_eval]]
            val[source] = [eval_record(recs[i]) for i in order[n_pool + n_eval:need]]
            pool_prompts = {r["prompt_id"] for r in pool[source]}
            val_prompts = {r["prompt_id"] for r in recs if r["id"] in {v["id"] for v in val[source]}}
            if any(r["prompt_id"] in pool_prompts | val_prompts for r in held) or pool_prompts & val_prompts:
                raise SystemExit(f"{source}: pool, validation and evaluation share a prompt")
            evals[source] = [eval_record(r) for r in held]
            write_jsonl(work / "clean" / f"{source}.jsonl", [pool_row(r) for r in pool[source]])
        corrupted = {}
        for variant in NOISE:
            rows_by_source, corrupted[variant] = corrupt_pool(opts, pool, variant)
            for source, rows in rows_by_source.items():
                write_jsonl(work / variant / f"{source}.jsonl", rows)
        n_pool = sum(len(v) for v in pool.values())
        meta = {"pool_ids": {s: [r["id"] for r in rows] for s, rows in pool.items()},
                "eval_ids": {s: [r["id"] for r in rows] for s, rows in evals.items()},
                "val_ids": {s: [r["id"] for r in rows] for s, rows in val.items()},
                "corrupted": corrupted, "n_pool": n_pool, "n_corrupted": {v: len(c) for v, c in corrupted.items()}}
        grape = None
        if "grape" in opts.methods:
            grape = build_grape_data(opts, data, work)
            meta["grape"] = {k: v for k, v in grape.items() if k != "eval"}
        write_json(work / "data.json", meta)
        st.note = (f"pool {n_pool} rows ({sc.rows_per_source} per source), {sum(map(len, evals.values()))} "
                   f"evaluation and {sum(map(len, val.values()))} validation rows; " + "; ".join(
                       f"{v} pool: {len(c)} corrupted ("
                       + ", ".join(f"{k} {n}" for k, n in sorted(collections.Counter(c.values()).items())) + ")"
                       for v, c in corrupted.items()))
    return {"evals": evals, "val": val, "corrupted": corrupted, "grape": grape,
            "inputs": {v: [{"path": str(work / v / f"{s}.jsonl"), "source": s, "adapter": "prompt_response"}
                           for s, _, _ in SOURCES] for v in ("clean", *NOISE)}}


def build_grape_data(opts: Options, data: pathlib.Path, work: pathlib.Path) -> dict:
    """Instructions every generator answered: `grape_instructions` for the pool (all their
    candidates), `grape_eval` others for evaluation, one set per generator."""
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

    generators = sorted(by_instruction[held[0]])
    evals = {g: [eval_record(adapt({"instruction": i, "output": by_instruction[i][g]},
                                   ADAPTERS["alpaca"], {}, "alpaca_eval")[0]) for i in held]
             for g in generators}
    return {"input": {"path": str(work / "grape" / "pool.jsonl"), "source": "alpaca_eval", "adapter": "alpaca"},
            "n_instructions": len(train), "n_candidates": len(rows), "generators": generators, "eval": evals}


# ---------------------------------------------------------------------------- pipelines
def _job(inputs, output, name, scorers=(), selectors=(), filters=({"type": "dedup"},)):
    from curate.config import InputConfig, JobConfig

    return JobConfig(inputs=[InputConfig(**i) for i in inputs], output=str(output), name=name,
                     filters=[dict(f) for f in filters], scorers=[dict(s) for s in scorers],
                     selectors=[dict(s) for s in selectors])


def score_into(opts: Options, inputs, scorers, out: pathlib.Path, name: str) -> tuple[dict, bool]:
    """`curate score`: read, dedup, score into `out` once; re-used while the inputs,
    filters and scorers are unchanged (the pipeline's scores key). Every scoring saves
    its rows in one store (`saved_work`, by example id and scorer config), so the noisy
    pool's uncorrupted rows take their scores from the clean pool's run."""
    from curate.pipeline.run import score_once

    job = _job(inputs, out, name, scorers=scorers)
    job.saved_work = str(pathlib.Path(opts.work_dir) / "saved-scores")
    m, cached = score_once(job, str(out), opts.beam_args)
    if cached and scorers:
        save_scores_of(out, scorers, job.saved_work)
    return m, cached


def save_scores_of(scores: pathlib.Path, scorers: list[dict], store: str) -> None:
    """Put a finished scores directory's rows into the saved-work store of each of its
    scorers, once (scores computed before the store existed)."""
    import datasets
    import pyarrow as pa

    from curate.pipeline import saved_work
    from curate.scorers import make_scorer

    table = None
    for spec in scorers:
        scorer = make_scorer(dict(spec))
        directory = saved_work.scorer_dir(store, scorer)
        if saved_work.saved_shards(directory):
            continue
        if table is None:
            table = datasets.load_from_disk(str(scores)).data.table
        schema = saved_work.saved_schema(scorer)
        keys = pa.array([saved_work.content_key({"messages": m}) for m in table.column("messages").to_pylist()])
        saved_work.write_shard(directory, pa.Table.from_arrays(
            [keys, *(table.column(f.name).cast(f.type) for f in list(schema)[1:])], schema=schema))


def select_into(opts: Options, scores: pathlib.Path, selector: dict, out: pathlib.Path) -> tuple[dict, bool]:
    """`curate select`: one selector over a scores directory, no model loaded (the
    iterative diversity selector excepted: it trains between its rounds)."""
    return compare.select_into(scores, selector, out, opts.beam_args, progress=False)


def headroom_ids(opts: Options, embedded: pathlib.Path, eval_sets: dict[str, list[dict]], budget: int) -> list[str]:
    """The headroom oracle: the pool rows nearest to the evaluation rows (MiniLM, cosine),
    the budget shared evenly among the evaluation sets (each set in turn takes the unpicked
    row with the highest similarity to any of its rows). It reads the evaluation rows, so
    it is an upper bound on what a subset of this size can win here, never a method."""
    import datasets
    import numpy as np

    from curate.models import load_embedder
    from curate.scorers.embedding import embed_texts, record_text

    pool = datasets.load_from_disk(str(embedded)).select_columns(["id", "embedding"])
    ids, vectors = pool["id"], np.asarray(pool["embedding"], dtype=np.float32)
    model, tokenizer = load_embedder(opts.embedder)
    nearest = []  # per evaluation set: pool rows, most similar first
    for rows in eval_sets.values():
        e = embed_texts(model, tokenizer, [record_text(r, "prompt_response") for r in rows],
                        max_length=opts.scale.embed_max_length)
        nearest.append(list(np.argsort(-(vectors @ e.T).max(axis=1), kind="stable")))
    picked, seen = [], set()
    while len(picked) < min(budget, len(ids)):
        for order in nearest:
            while order and order[0] in seen:
                order.pop(0)
            if order and len(picked) < budget:
                seen.add(order[0])
                picked.append(ids[order.pop(0)])
    return picked


def load_selection(path: pathlib.Path) -> list[dict]:
    """Kept rows, in id order (the trainer then shuffles them with its own seed)."""
    import datasets

    ds = datasets.load_from_disk(str(path))
    cols = [c for c in ("id", "prompt_id", "source", "prompt", "response", "messages", "generator")
            if c in ds.column_names]
    return sorted(ds.select_columns(cols).to_list(), key=lambda r: r["id"])


# ---------------------------------------------------------------------------- models
def n_layers(model: str) -> int:
    from transformers import AutoConfig

    from curate.models.loading import resolve_model

    return AutoConfig.from_pretrained(resolve_model(model)).num_hidden_layers


def drop_before_last(n: int, fraction: float) -> list[int]:
    """Indices of round(fraction * n) blocks (at least 1, at most n - 2) just before the
    last one: the first blocks and the last stay (the last maps into the head's space)."""
    k = min(max(1, int(fraction * n + 0.5)), max(n - 2, 1))
    return list(range(n - 1 - k, n - 1))


def make_pruned(opts: Options, clock: Clock, name: str, inputs: list[dict]) -> str:
    """A pruned copy of the model (`curate prune`): `wanda50` calibrated on the clean pool,
    `layerdrop` (PASER's second setting) or `s2l-proxy` (blocks dropped, S2L's small proxy)."""
    from curate.prune import make_pruned_copy

    sc = opts.scale
    if name == "wanda50":
        spec = {"method": "wanda", "sparsity": 0.5, "calibration": [i["path"] for i in inputs],
                "calibration_rows": sc.prune_calibration_rows, "max_length": sc.score_max_length}
        pool = files_digest(i["path"] for i in inputs)
    else:
        fraction = sc.layer_drop_fraction if name == "layerdrop" else 1 - sc.s2l_proxy_keep
        spec, pool = {"method": "layer_drop", "layers": drop_before_last(n_layers(opts.model), fraction)}, None
    out = pathlib.Path(opts.work_dir) / f"pruned-{name}-{digest([opts.model, spec, pool])}"
    with clock.stage(f"prune: {name} copy of the model", "prune") as st:
        if (out / "prune.json").is_file():
            st.note, st.cached = f"cached {out.name}", True
            return str(out)
        report = make_pruned_copy(opts.model, spec["method"], str(out), device=opts.device,
                                  **{k: v for k, v in spec.items() if k != "method"})
        st.note = (f"{report['achieved_sparsity']:.3f} of decoder linear weights zeroed" if name == "wanda50"
                   else f"blocks {spec['layers'][0]}-{spec['layers'][-1]} dropped")
    return str(out)


# ---------------------------------------------------------------------------- training
def train_config(opts: Options, model: str | None = None, epochs: int | None = None, lr: float | None = None):
    """The trainer's settings of every run (evaluation reads only its model, template and lengths)."""
    from curate.train import TrainConfig

    sc = opts.scale
    return TrainConfig(model=model or opts.model, template="plain", max_length=sc.max_length, method="lora",
                       lr=lr or opts.chosen.get("lr"), epochs=epochs or opts.chosen.get("epochs", 1),
                       batch_size=sc.batch_size, grad_accum=sc.grad_accum, save_every=None,
                       keep_checkpoints=None, seed=0, threads=opts.threads, device=opts.device,
                       dtype=opts.dtype, log_every=5, eval_batch_tokens=sc.eval_batch_tokens)


def evaluate(opts: Options, eval_sets: dict[str, list[dict]], adapter: str | None, model: str | None = None) -> dict:
    """Mean response-token loss per evaluation set, `model` (default the base) with `adapter` (LoRA) on it."""
    return compare.evaluate(train_config(opts, model), eval_sets, adapter)


def eval_key(opts: Options, eval_sets, model: str | None = None) -> str:
    return digest([model or opts.model, opts.dtype, opts.scale.max_length,
                   {k: [r["id"] for r in v] for k, v in eval_sets.items()}])


def train_and_evaluate(opts: Options, records: list[dict], run_dir: pathlib.Path, eval_sets: dict,
                       model: str | None = None, epochs: int | None = None, lr: float | None = None) -> dict:
    """Fine-tune on `records` (cached by config + data), then evaluate (cached)."""
    from curate.train import train

    cfg = train_config(opts, model, epochs, lr)
    cfg_key = {k: v for k, v in cfg.to_dict().items() if k not in ("threads", "log_every")}
    key = digest([cfg_key, [r["id"] for r in records], eval_key(opts, eval_sets, model)])
    cached = read_json(run_dir / "benchmark.json")
    if cached and cached.get("key") == key:
        return {**cached, "cached": True}
    m = train(records, cfg, run_dir, resume=True, progress=False)
    result = {"key": key, "train": {k: m.get(k) for k in (
        "n_train", "n_train_truncated", "steps", "train_tokens", "train_response_tokens",
        "train_time_s", "tokens_per_s", "train_loss_first", "train_loss_last", "device",
        "compute_dtype", "trainable_params")},
        "eval": evaluate(opts, eval_sets, m["weights"], model)}
    write_json(run_dir / "benchmark.json", result)
    return {**result, "cached": False}


def base_evaluation(opts: Options, eval_sets: dict, clock: Clock, name: str, model: str | None = None) -> dict:
    path = pathlib.Path(opts.work_dir) / f"base-eval-{name}.json"
    key = eval_key(opts, eval_sets, model)
    cached = read_json(path)
    with clock.stage(f"{name}: evaluate the {'model' if model is None else 'pruned copy'} before fine-tuning",
                     "eval") as st:
        if cached and cached.get("key") == key:
            st.note, st.cached = "cached", True
            return cached["eval"]
        ev = evaluate(opts, eval_sets, None, model)
        write_json(path, {"key": key, "eval": ev})
        st.note = ", ".join(f"{k} {v['loss']:.4f}" for k, v in ev.items())
        return ev


def choose_training(opts: Options, data: dict, clock: Clock) -> list[dict]:
    """Train a random subset of the budget's size with each (epochs, lr) of the grid, keep
    the lowest mean loss on the validation sets (never the evaluation sets)."""
    work = pathlib.Path(opts.work_dir) / "settings"
    sc = opts.scale
    from curate.config import resolve_budget

    pool, n_pool = pool_stage(opts, "clean", data, clock)
    budget = resolve_budget(sc.budget, n_pool)
    spec = {"type": "random", "budget": budget, "seed": sc.hp_seed}
    with clock.stage(f"settings: random subset (seed {sc.hp_seed})", "select") as st:
        m, st.cached = select_into(opts, pool, spec, work / "subset")
        st.note = f"{m['counts']['kept']} rows"
    subset = load_selection(work / "subset")
    tried = []
    for epochs, lr in sc.hp_grid:
        with clock.stage(f"settings: train {epochs} epoch(s) at lr {lr:g} + validate", "train") as st:
            run = train_and_evaluate(opts, subset, work / f"e{epochs}-lr{lr:g}", data["val"], epochs=epochs, lr=lr)
            loss = statistics.fmean(v["loss"] for v in run["eval"].values())
            st.cached, st.note = run["cached"], f"validation mean loss {loss:.4f}"
        tried.append({"epochs": epochs, "lr": lr, "val_loss": loss,
                      "val": {k: v["loss"] for k, v in run["eval"].items()}})
    best = min(tried, key=lambda t: (t["val_loss"], t["epochs"]))
    opts.chosen = {"epochs": best["epochs"], "lr": best["lr"]}
    clock.say(f"settings: {best['epochs']} epoch(s) at lr {best['lr']:g} (validation mean loss {best['val_loss']:.4f})")
    return tried


# ---------------------------------------------------------------------------- rows
def result_row(variant: str, method: str, seed, rows: list[dict], run: dict | None,
               corrupted: dict | None = None, base_eval=None, extra: dict | None = None) -> dict:
    order = [s for s, _, _ in SOURCES]
    mix = collections.Counter(r.get("source") for r in rows)
    gens = collections.Counter(r.get("generator") for r in rows if r.get("generator"))
    ev = run["eval"] if run else (base_eval or {})  # neither: selected, not trained yet
    losses = {k: v["loss"] for k, v in ev.items()}
    kept_kinds = collections.Counter(corrupted[r["id"]] for r in rows if r["id"] in corrupted) \
        if corrupted is not None else None
    row = {"variant": variant, "method": method, "seed": seed, "rows": len(rows),
           "source_mix": dict(sorted(mix.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order
                                                                  else len(order), kv[0]))),
           "generator_mix": dict(gens.most_common()) if gens else {},
           "noisy_kept": sum(kept_kinds.values()) if kept_kinds is not None and rows else None,
           "noisy_kept_by_kind": dict(sorted(kept_kinds.items())) if kept_kinds is not None and rows else None,
           "train_s": run["train"]["train_time_s"] if run else None,
           "train_tokens": run["train"]["train_tokens"] if run else None,
           "train_tokens_per_s": run["train"]["tokens_per_s"] if run else None,
           "steps": run["train"]["steps"] if run else None,
           "eval": losses, "eval_mean": statistics.fmean(losses.values()) if losses else None,
           "eval_tokens": {k: v["n_tokens"] for k, v in ev.items()}}
    if extra:
        row.update(extra)
    return row


def train_row(opts: Options, clock: Clock, variant: str, method: str, seed, selected: list[dict],
              run_dir: pathlib.Path, evals: dict, corrupted=None, model: str | None = None,
              extra: dict | None = None) -> dict:
    label = method if seed is None else f"{method}:{seed}"
    with clock.stage(f"{variant}: train + evaluate [{label}] on {len(selected)} rows", "train") as st:
        run = train_and_evaluate(opts, selected, run_dir, evals, model)
        st.cached = run["cached"]
        st.note = (("cached; " if run["cached"] else "")
                   + f"{run['train']['train_tokens']} tokens, {run['train']['tokens_per_s']:.0f} tok/s; "
                   + f"mean loss {statistics.fmean(v['loss'] for v in run['eval'].values()):.4f}")
    return result_row(variant, method, seed, selected, run, corrupted, extra=extra)


# ---------------------------------------------------------------------------- the variants
def pool_stage(opts: Options, variant: str, data: dict, clock: Clock) -> tuple[pathlib.Path, int]:
    """The variant's pool read and deduplicated as the pipeline does; (directory, rows)."""
    out = pathlib.Path(opts.work_dir) / variant / "pool"
    with clock.stage(f"{variant}: pool (read, dedup)", "data") as st:
        m, st.cached = score_into(opts, data["inputs"][variant], [], out, f"{variant}-pool")
        st.note = f"{m['counts']['kept']} rows"
    return out, m["counts"]["kept"]


def scorer_sets(opts: Options, variant: str, inputs: list[dict], pruned: dict[str, str],
                names) -> dict[str, list[dict]]:
    """Scorer configs of each named scorer set (one scores dir each)."""
    sc = opts.scale
    common = {"device": opts.device, "dtype": opts.dtype}
    sets = {}
    for name in dict.fromkeys(names):
        if name == "ifd":
            sets[name] = [{"type": "ifd", "model": opts.model, "template": "plain",
                           "max_length": sc.score_max_length, **common}]
        elif name == "embed":
            sets[name] = [{"type": "embedding", "model": opts.embedder, "field": "prompt_response",
                           "max_length": sc.embed_max_length, **common}]
        elif name == "weight_delta":
            sets[name] = [{"type": "weight_delta", "model": opts.model, "template": "plain",
                           "max_length": sc.score_max_length, "eta": 1e-4, **common}]
        elif name == "trajectory":
            proxy = {"data": [dict(i) for i in inputs], "epochs": sc.s2l_proxy_epochs,
                     "num_checkpoints": sc.s2l_checkpoints, "batch_size": sc.s2l_proxy_batch,
                     "grad_accum": 1, "lr": sc.s2l_proxy_lr, **common}
            if opts.threads:
                proxy["threads"] = opts.threads
            # one directory per proxy run: a changed setting trains a new proxy, never mixes
            pool = files_digest(i["path"] for i in inputs)
            ckpt = pathlib.Path(opts.work_dir) / variant / f"s2l-proxy-{digest([pruned['s2l-proxy'], sc.score_max_length, proxy, pool])}"
            sets[name] = [{"type": "trajectory", "model": pruned["s2l-proxy"], "checkpoints": str(ckpt),
                           "template": "plain", "max_length": sc.score_max_length, "proxy": proxy, **common}]
        elif name.startswith("paser-"):
            sets[name] = [
                {"type": "embedding", "model": opts.embedder, "field": "prompt",
                 "max_length": sc.embed_max_length, **common},
                {"type": "degradation", "model": opts.model, "pruned_model": pruned[name.removeprefix("paser-")],
                 "template": "plain", "max_length": sc.score_max_length, **common}]
    return sets


def selector_spec(opts: Options, method: str, budget: int, seed: int, work: pathlib.Path) -> dict:
    sc = opts.scale
    if method.endswith("_strat"):
        return {**selector_spec(opts, method[:-len("_strat")], budget, seed, work), "stratify_by": "source"}
    top = {"type": "top", "budget": budget}
    if method == "random":
        return {"type": "random", "budget": budget, "seed": seed}
    if method == "longest":
        return {**top, "column": "response_chars", "order": "highest"}
    if method in ("ppl_low", "ppl_high"):
        return {**top, "column": "ifd_loss_conditioned", "order": "lowest" if method == "ppl_low" else "highest"}
    if method == "ifd":
        return {**top, "column": "ifd", "order": "highest", "below": 1.0}
    if method in ("diversity", "diversity_iterative"):
        spec = {"type": "diversity", "budget": budget, "k": "auto", "k_grid": list(sc.diversity_k_grid),
                "allocation": "proportional", "seed": 0}
        if method == "diversity_iterative":
            spec.update({"rounds": sc.diversity_rounds, "gap": "perplexity", "model": opts.model,
                         "template": "plain", "max_length": sc.max_length,
                         "max_new_tokens": sc.refine_max_new_tokens, "batch_size": 16,
                         "train": {"method": "lora", "epochs": opts.chosen["epochs"], "lr": opts.chosen["lr"],
                                   "batch_size": sc.batch_size},
                         "device": opts.device, "dtype": opts.dtype,
                         "work_dir": str(work / "select" / "diversity_iterative.work")})
        return spec
    if method == "donod":
        return {"type": "donod", "budget": budget, "criteria": [["don", "benefit"], ["nod", "cost"]]}
    if method == "paser":
        return {"type": "paser", "budget": budget, "n_clusters": sc.paser_clusters, "seed": 0}
    if method == "s2l":
        return {"type": "s2l", "budget": budget, "k": sc.s2l_k, "seed": 0}
    raise ValueError(method)


def score_set(opts: Options, clock: Clock, variant: str, name: str, inputs, scorers, n_pool: int) -> pathlib.Path:
    out = pathlib.Path(opts.work_dir) / variant / f"scores-{name}"
    with clock.stage(f"{variant}: score [{name}]", "score") as st:
        m, st.cached = score_into(opts, inputs, scorers, out, f"{variant}-{name}")
        c = m["counts"]
        dropped = sum(c["filtered"].values())
        st.note = f"{c['kept']} rows scored in {m['timings_s']['total']:.0f} s" + (
            f", {dropped} dropped as duplicates" if dropped else "")
    # exact duplicates (GRAPE: two generators giving the same answer) are dropped by the
    # pipeline's dedup and counted; any other loss means a row failed to score
    if c["read"] != n_pool or c["kept"] + dropped != n_pool:
        raise RuntimeError(f"{variant}/{name}: {c['kept']} rows scored and {dropped} filtered "
                           f"out of {c['read']} read; the pool has {n_pool}")
    return out


def select_stage(opts: Options, clock: Clock, variant: str, label: str, source: pathlib.Path,
                 spec: dict, out: pathlib.Path) -> list[dict]:
    with clock.stage(f"{variant}: select [{label}]", "select") as st:
        m, st.cached = select_into(opts, source, spec, out)
        st.note = f"{m['counts']['kept']} kept"
    return load_selection(out)


def pool_methods(opts: Options, variant: str) -> list[tuple[str, int | None]]:
    """(method, seed) in table order: random's seeds first."""
    plan = [("random", s) for s in opts.seeds] if "random" in opts.methods else []
    plan += [(m, None) for m in POOL_METHODS if m in opts.methods and m != "random"
             and not (m == "full" and variant != "clean")]
    return plan


def select_pool_variant(opts: Options, variant: str, data: dict, clock: Clock,
                        pruned: dict[str, str]) -> list[tuple[str, int | None, list[dict]]]:
    """Score the variant's pool once per scorer set, then select with every method:
    [(method, seed, kept rows)]. The selections come before the variant's trainings, so
    the corrupted rows each method keeps are known early (printed, and in the work dir)."""
    from curate.config import resolve_budget

    work = pathlib.Path(opts.work_dir) / variant
    inputs = data["inputs"][variant]
    pool, n_pool = pool_stage(opts, variant, data, clock)
    budget = resolve_budget(opts.scale.budget, n_pool)
    plan = pool_methods(opts, variant)
    sets = scorer_sets(opts, variant, inputs, pruned, [SCORER_SET[m] for m, _ in plan if SCORER_SET[m]])
    scores = {name: score_set(opts, clock, variant, name, inputs, scorers, n_pool) for name, scorers in sets.items()}
    picks = []
    for method, seed in plan:
        label = method if seed is None else f"{method}-{seed}"
        if method == "full":
            selected = load_selection(pool)
        elif method == "headroom":
            path = work / "select" / "headroom.json"
            key = digest([budget, opts.embedder, opts.scale.embed_max_length,
                          {k: [r["id"] for r in v] for k, v in data["evals"].items()}, files_digest(
                              i["path"] for i in inputs)])
            with clock.stage(f"{variant}: select [headroom: nearest to the evaluation rows]", "select") as st:
                cached = read_json(path)
                st.cached = bool(cached and cached.get("key") == key)
                picked = cached["ids"] if st.cached else headroom_ids(opts, scores["embed"], data["evals"], budget)
                write_json(path, {"key": key, "ids": picked})
            wanted = set(picked)
            selected = [r for r in load_selection(scores["embed"]) if r["id"] in wanted]
        else:
            source = scores[SCORER_SET[method]] if SCORER_SET[method] else pool
            selected = select_stage(opts, clock, variant, label, source,
                                    selector_spec(opts, method, budget, seed or 0, work), work / "select" / label)
        picks.append((method, seed, selected))
    if variant in NOISE:
        kept = {(m if s is None else f"{m}:{s}"): sum(r["id"] in data["corrupted"][variant] for r in rows)
                for m, s, rows in picks}
        write_json(work / "corrupted_kept.json", {"budget": budget, "kept": kept})
        clock.say(f"{variant}: corrupted rows kept of {budget}: "
                  + ", ".join(f"{k} {v}" for k, v in kept.items()))
    return picks


def train_pool_variant(opts: Options, variant: str, picks, data: dict, clock: Clock, base_eval: dict) -> list[dict]:
    work = pathlib.Path(opts.work_dir) / variant
    corrupted = data["corrupted"].get(variant)
    rows = [result_row(variant, "base", None, [], None, base_eval=base_eval, extra={"note": "no fine-tuning"})]
    for method, seed, selected in picks:
        label = method if seed is None else f"{method}-{seed}"
        rows.append(train_row(opts, clock, variant, method, seed, selected, work / "train" / label,
                              data["evals"], corrupted))
    return rows


def run_recovery_variant(opts: Options, name: str, data: dict, clock: Clock, pruned: dict[str, str],
                         base_eval: dict) -> list[dict]:
    """PASER's setting: fine-tune the pruned copy on PASER's pick and on random subsets of
    the clean pool (the same subsets as the clean variant's random rows)."""
    from curate.config import resolve_budget

    variant, model = f"recovery-{name}", pruned[name]
    clean = pathlib.Path(opts.work_dir) / "clean"
    inputs = data["inputs"]["clean"]
    pool, n_pool = pool_stage(opts, "clean", data, clock)
    budget = resolve_budget(opts.scale.budget, n_pool)
    set_name = f"paser-{name}"
    scores = score_set(opts, clock, "clean", set_name, inputs,
                       scorer_sets(opts, "clean", inputs, pruned, [set_name])[set_name], n_pool)
    pruned_eval = base_evaluation(opts, data["evals"], clock, variant, model)
    l0, lp = statistics.fmean(v["loss"] for v in base_eval.values()), statistics.fmean(
        v["loss"] for v in pruned_eval.values())

    def recovery(row: dict) -> dict:
        row["recovery"] = (lp - row["eval_mean"]) / (lp - l0) if lp != l0 else None
        return row

    rows = [result_row(variant, "unpruned", None, [], None, base_eval=base_eval,
                       extra={"note": "the model before pruning, no fine-tuning", "recovery": 1.0}),
            recovery(result_row(variant, "base", None, [], None, base_eval=pruned_eval,
                                extra={"note": f"the pruned copy ({PRUNED[name]}), no fine-tuning"}))]
    plan = [("random", s) for s in opts.seeds] + [("paser", None)]
    for method, seed in plan:
        label = method if seed is None else f"{method}-{seed}"
        # the clean variant's selections: its random subsets, and its PASER pick for wanda50
        sel_label = f"paser-{name}" if method == "paser" and name != "wanda50" else label
        selected = select_stage(opts, clock, variant, label, scores if method == "paser" else pool,
                                selector_spec(opts, method, budget, seed or 0, clean), clean / "select" / sel_label)
        rows.append(recovery(train_row(opts, clock, variant, method, seed, selected,
                                       pathlib.Path(opts.work_dir) / variant / "train" / label, data["evals"],
                                       model=model)))
    return rows


def grape_view(row: dict, generators: list[str]) -> dict:
    """A GRAPE row's per-generator losses -> `gold` (gpt4's answers) and `all_generators`
    (the mean over every generator's answers, gpt4 included); the sets stay in
    `eval_by_generator`."""
    by_gen = row["eval"]
    row["eval_by_generator"] = by_gen
    row["eval"] = {"gold": by_gen[GRAPE_GOLD], "all_generators": statistics.fmean(by_gen[g] for g in generators)}
    row["eval_mean"] = statistics.fmean(row["eval"].values())
    row["eval_tokens"] = {"gold": row["eval_tokens"][GRAPE_GOLD], "all_generators": sum(row["eval_tokens"].values())}
    return row


def run_grape_variant(opts: Options, data: dict, clock: Clock) -> list[dict]:
    work = pathlib.Path(opts.work_dir) / "grape"
    g = data["grape"]
    evals, gens = g["eval"], g["generators"]
    base_eval = base_evaluation(opts, evals, clock, "grape")
    rows = [grape_view(result_row("grape", "base", None, [], None, base_eval=base_eval,
                                  extra={"note": "no fine-tuning"}), gens)]
    scorers = [{"type": "likelihood", "model": opts.model, "template": "plain",
                "max_length": opts.scale.grape_max_length, "device": opts.device, "dtype": opts.dtype}]
    scores = score_set(opts, clock, "grape", "likelihood", [g["input"]], scorers, g["n_candidates"])
    selected = select_stage(opts, clock, "grape", "grape", scores, {"type": "grape", "k": 1}, work / "select" / "grape")
    rows.append(grape_view(train_row(opts, clock, "grape", "grape", None, selected, work / "train" / "grape", evals),
                           gens))

    # baselines over the same scored candidates: one per instruction, by a seeded draw or length
    import datasets

    cands = datasets.load_from_disk(str(scores)).select_columns(
        ["id", "prompt_id", "source", "prompt", "response", "messages", "generator"]).to_list()
    by_prompt = collections.defaultdict(list)
    for r in cands:
        by_prompt[r["prompt_id"]].append(r)
    groups = [sorted(v, key=lambda r: r["id"]) for _, v in sorted(by_prompt.items())]
    picks = []
    if "random" in opts.methods:
        for seed in opts.seeds:
            pick = [grp[random.Random(f"{seed}:{grp[0]['prompt_id']}").randrange(len(grp))] for grp in groups]
            picks.append(("random", seed, pick, "a random generator per instruction"))
    picks.append(("longest", None, [max(grp, key=lambda r: (len(r["response"]), r["id"])) for grp in groups],
                  "the longest response (characters)"))
    for method, seed, pick, note in picks:
        label = method if seed is None else f"{method}-{seed}"
        rows.append(grape_view(train_row(opts, clock, "grape", method, seed, sorted(pick, key=lambda r: r["id"]),
                                         work / "train" / label, evals, extra={"note": note}), gens))
    return rows


# ---------------------------------------------------------------------------- main
def expect_stages(opts: Options, clock: Clock) -> None:
    """The stages this run will go through, by kind, for the ETA."""
    n_seeds = len(opts.seeds) if "random" in opts.methods else 0
    paser, s2l = "paser" in opts.methods, "s2l" in opts.methods
    clock.expect("data", 1)
    clock.expect("prune", 2 * paser + s2l)
    if not opts.chosen:
        clock.expect("data", 1)             # choosing the training settings: the clean pool,
        clock.expect("select", 1)           # a random subset, one training per grid point
        clock.expect("train", len(opts.scale.hp_grid))
    if any(m in POOL_METHODS for m in opts.methods):
        clock.expect("eval", 1)
        for v in (v for v in opts.scale.variants if v != "recovery"):  # recovery: counted below
            plan = pool_methods(opts, v)
            clock.expect("data", 1)
            clock.expect("score", len({SCORER_SET[m] for m, _ in plan if SCORER_SET[m]}))
            clock.expect("select", sum(m != "full" for m, _ in plan))
            clock.expect("train", len(plan))
    if paser and "recovery" in opts.scale.variants:
        clock.expect("data", 2)
        clock.expect("score", 2)            # the Wanda copy's (cached) and the layer-drop copy's
        clock.expect("eval", 2)
        clock.expect("select", 2 * (n_seeds + 1))
        clock.expect("train", 2 * (n_seeds + 1))
    if "grape" in opts.methods:
        clock.expect("eval", 1)
        clock.expect("score", 1)
        clock.expect("select", 1)
        clock.expect("train", 2 + n_seeds)


def run(opts: Options) -> dict:
    """The whole benchmark; returns {"rows": [...], "summary": {...}}."""
    import torch

    from benchmarks.selection_quality_report import write_reports

    if opts.threads:
        torch.set_num_threads(opts.threads)
    clock = Clock(pathlib.Path(opts.work_dir) / "stage_times.json")
    expect_stages(opts, clock)
    machine = machine_info()
    clock.say(f"selection quality, scale {opts.scale_name}: methods {','.join(opts.methods)}, "
              f"seeds {list(opts.seeds)}, work dir {opts.work_dir}")
    data = build_data(opts, clock)
    pruned: dict[str, str] = {}
    if "paser" in opts.methods or "paser_strat" in opts.methods:
        for name in PRUNED:
            pruned[name] = make_pruned(opts, clock, name, data["inputs"]["clean"])
    if "s2l" in opts.methods:
        pruned["s2l-proxy"] = make_pruned(opts, clock, "s2l-proxy", data["inputs"]["clean"])
    tried = choose_training(opts, data, clock) if not opts.chosen else []
    parts: dict[str, list[dict]] = {}  # rows by variant, reported in this order
    order = ["clean", *NOISE] + [f"recovery-{name}" for name in PRUNED] + ["grape"]

    def report(final: bool = False) -> dict:
        rows = [r for v in order for r in parts.get(v, [])]
        return write_reports(opts, rows, tried, clock, machine, final)

    if any(m in POOL_METHODS for m in opts.methods):
        base_eval = base_evaluation(opts, data["evals"], clock, "pool")
        # the clean table first; the corrupted variants' selections (their corrupted shares
        # need no training) before PASER's recovery runs and their trainings
        if "clean" in opts.scale.variants:
            picks = select_pool_variant(opts, "clean", data, clock, pruned)
            parts["clean"] = train_pool_variant(opts, "clean", picks, data, clock, base_eval)
            report()
        noisy_picks = {v: select_pool_variant(opts, v, data, clock, pruned) for v in NOISE if v in opts.scale.variants}
        for v, picks in noisy_picks.items():  # the corrupted shares in the tables now, the losses after training
            parts[v] = [result_row(v, m, s, rows, None, data["corrupted"][v],
                                   extra={"note": "selected, not trained yet"}) for m, s, rows in picks]
            report()
        if "paser" in opts.methods and "recovery" in opts.scale.variants:
            for name in PRUNED:
                parts[f"recovery-{name}"] = run_recovery_variant(opts, name, data, clock, pruned, base_eval)
                report()
        for v, picks in noisy_picks.items():
            parts[v] = train_pool_variant(opts, v, picks, data, clock, base_eval)
            report()
    if "grape" in opts.methods:
        parts["grape"] = run_grape_variant(opts, data, clock)
    summary = report(final=True)
    rows = [r for v in order for r in parts.get(v, [])]
    clock.say(f"done: {opts.out}/selection_quality.md" + (f", {opts.summary}" if opts.summary else ""))
    return {"rows": rows, "summary": summary}


def parse_args(argv=None) -> Options:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    ap.add_argument("--methods", default=None, help=f"comma list of {','.join(METHODS)} (default: all)")
    ap.add_argument("--seeds", default="0,1,2,3,4", help="random selection seeds (default 0,1,2,3,4)")
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
    ap.add_argument("--settings", default=None, metavar="EPOCHS,LR",
                    help="train with these settings instead of choosing them on validation (e.g. the "
                         "ones an earlier run chose, to add methods to its table)")
    ap.add_argument("--variants", default=None, type=lambda v: tuple(x.strip() for x in v.split(",") if x.strip()),
                    help="variants, a comma list of clean,noisy,heavy,recovery (default: all; "
                         "recovery runs with paser)")
    for name, typ in (("rows_per_source", int), ("eval_rows", int), ("val_rows", int), ("budget", float),
                      ("max_length", int), ("batch_size", int), ("grad_accum", int), ("s2l_checkpoints", int),
                      ("s2l_k", int), ("grape_instructions", int), ("grape_eval", int)):
        ap.add_argument("--" + name.replace("_", "-"), type=typ, default=None, help=f"override the scale's {name}")
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("beam_args", nargs="*", help="Beam pipeline options, after `--`")
    args = ap.parse_args(argv)

    scale = dataclasses.replace(SCALES[args.scale])
    for f in dataclasses.fields(Scale):
        value = getattr(args, f.name, None)
        if value is not None:
            setattr(scale, f.name, value)
    known = ("clean", *NOISE, "recovery")
    if set(scale.variants) - set(known):
        ap.error(f"unknown variant(s) {sorted(set(scale.variants) - set(known))}; choose from {', '.join(known)}")
    methods = tuple(m.strip() for m in (args.methods or "").split(",") if m.strip()) or METHODS
    bad = [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
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
    chosen = {}
    if args.settings:
        epochs, lr = args.settings.split(",")
        chosen = {"epochs": int(epochs), "lr": float(lr)}
    return Options(scale=scale, scale_name=args.scale, data=args.data, work_dir=work, out=args.out, chosen=chosen,
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
