"""Dedup at scale: curate's exact and near-dedup jobs against plain `datasets` and DataTrove.

    pip install -e '.[bench]'     # datatrove[io] 0.10.1, spacy (DataTrove's English word tokenizer), psutil
    python benchmarks/scale.py --rows 100000 250000 1000000 \\
        [--only curate-exact,curate-near,curate-near-exact,datasets,datatrove] [--work-dir runs/scale]

One invocation per size list; results of several invocations merge (keyed by size and
job) into benchmarks/results/scale.json and benchmarks/RESULTS_scale.md, so a long 1M
run can be done on its own. `--results-dir DIR` writes them under DIR instead (trials).
A curate job whose estimated memory (BYTES_PER_ROW x rows) exceeds the available memory
is not started unless --ignore-memory. Each job's output is removed once scored
(--keep-outputs keeps it); its log and job file stay in WORK/ROWS/JOB/.

1. The pool (`build_pool`), deterministic for (rows, seed) and cached in the work dir
   (WORK/pool-vN-ROWS-seedSEED-shardsK/: part-0000i.jsonl.gz, truth.jsonl.gz, pool.json),
   written row by row so a 1M-row pool never sits in memory:
   - base rows: the 22,827 rows of the four single-response files (gsm8k_train,
     codealpaca, gpteacher roleplay and toolformer) as alpaca rows; toolformer's tool
     description header (the same ~50 words on hundreds of rows) is cut to the task line,
     then every row whose 5-word-shingle Jaccard to an earlier kept row is >= 0.5 is
     dropped (found with 32x4-band LSH over curate's MinHash): ~22.0k rows, none a near
     copy of another.
   - ~70% distinct variants: two base rows a, b of similar length (neighbours in the
     rows sorted by shingle count) joined, instruction a + instruction b, inputs, output
     a + output b; each unordered pair at most once, so two variants share at most one
     half (true Jaccard ~1/3; up to ~0.65 where two similar base rows, below 0.5 to each
     other, met the same partner): 700k distinct variants exist. At 1M rows each base row is in ~64 variants, so
     ~44M pairs of variants share a half: what tests an LSH that does not verify (a
     16x8 band scheme makes a pair at Jaccard 1/3 a candidate with p ~ 0.0024).
   - ~10% exact copies of a random variant: half verbatim, half with only case and
     whitespace changed (exact dedup's normalisation makes them equal to the source).
   - ~20% near copies of a random variant: a few words of the instruction or the output
     replaced, deleted or inserted; the number of edits is drawn from a target Jaccard
     (85% of targets in [0.8, 0.97], the rest in [0.6, 0.8]); ~77% land at true Jaccard
     >= 0.8 (one edit already takes a short row below), each recorded.
   The rows are shuffled. truth.jsonl.gz has one line per planted copy: its row, its
   source row (the variant), kind (exact / case-space / near), edits and true Jaccard to
   the source, computed with curate's own definition (curate.filters.near_dedup:
   shingles(record_text(record), 5) of the record curate's alpaca adapter makes).
   Rows carry no id: every tool numbers them itself; a row is its position in the pool
   (shard order, then line).

2. The jobs, each its own subprocess, measured from outside (`measure`):
   curate-exact  `curate run`: length (chars, 10..20000), dedup, random budget 0.1 seed 0
   curate-near   the same with near_dedup after dedup (jobs/near_dedup.yaml's settings:
                 threshold 0.8, 5-word shingles, 128 permutations, 16 bands, keep longest)
                 and `verify: estimate` (the Jaccard estimated from the signatures)
   curate-near-exact  the same with `verify: exact`, near_dedup's default (pairs verified
                 by the Jaccard of their shingle sets)
   datasets      plain `datasets`: load_dataset("json"), the same length filter as one
                 batched filter, exact dedup on curate's normalisation (lower case,
                 whitespace runs to one space, stripped; per message) keeping the FIRST
                 occurrence (curate keeps the smallest content hash: the same groups, a
                 different survivor), shuffle(seed=0).select(10%), save_to_disk
   datatrove     DataTrove's MinHash, 4 stages (signatures, buckets, clustering, filter)
                 on LocalPipelineExecutor, 5-word n-grams, 16 buckets x 8 hashes (128),
                 its default English word tokenizer (spaCy) and text normalisation, the
                 same text curate shingles (every message joined by a newline); tasks:
                 one per pool shard (2) for stages 1 and 4, one per bucket for stage 2,
                 1 for stage 3; --workers (default: the cores) at once. Stage 3 saves
                 cluster ids and stage 4 writes the removed rows (exclusion writer): that
                 is how we learn what each removed row was merged with. Hashes: its
                 default, 64-bit xxhash of each shingle (with xxhash >= 4, which takes
                 bytes only, the shingle is UTF-8 encoded first, as xxhash 3 did).
   Measured: wall seconds; CPU seconds of the whole process tree, two ways: psutil
   samples of every descendant every 0.2 s (user + system, last value per process) and
   rusage of the reaped descendants (this process is a child subreaper, so orphaned
   workers, e.g. DataTrove's forkserver children, are reaped here and counted); the
   larger is reported, and which. Peak RSS: the largest sum over the tree at one sample,
   and the largest single process (its own peak, VmHWM, as last sampled).
   rows per CPU-s = pool rows / CPU seconds.

3. Quality (`score`), from each job's removals (curate: rejected/ with reject_reason
   naming the kept row; datasets: the first occurrence; DataTrove: the kept member of
   the cluster). A family is a distinct variant with its planted copies. "Kept" means
   survived the dedup steps (the random 10% afterwards is not a removal); rows the
   length filter dropped are left out of every count.
   - exact caught: share of exact / case-space copies C where C and its source are not
     both kept.
   - near recall: share of near copies N with true Jaccard >= 0.8 to their source S
     where N and S's exact class (S and its exact copies) are not both kept: the
     copy or the source was removed while the other stayed (when the whole family went,
     it is a wrong removal below). Also reported: the same share for near copies below 0.8.
   - wrong removals: families emptied, i.e. no member kept: the distinct row was merged
     into a row of another family (median true Jaccard between the variant and the kept
     row it was merged into, curate's shingles). Also in the JSON: "cross merges",
     every removed variant whose kept row lies in another family (its copy may survive).
"""

from __future__ import annotations

import argparse
import ctypes
import gzip
import hashlib
import json
import os
import pathlib
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib.metadata import version

import numpy as np
import psutil
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# curate, datasets, datatrove and torch (machine_info) are imported inside the functions
# that need them: each job's subprocess imports only its own tool, so its CPU is its own.

JOBS = ("curate-exact", "curate-near", "curate-near-exact", "datasets", "datatrove")
NEAR_JOBS = ("curate-near", "curate-near-exact", "datatrove")  # the jobs with a recall
BASE_FILES = ("gsm8k_train", "codealpaca", "gpteacher_roleplay", "gpteacher_toolformer")
LENGTH = {"type": "length", "unit": "chars", "min": 10, "max": 20000}
SAMPLE = {"type": "random", "budget": 0.1, "seed": 0}
EXACT_SHARE, NEAR_SHARE = 0.10, 0.20  # the rest are distinct variants
NEAR_HIGH_SHARE = 0.85  # near copies aimed at true Jaccard >= 0.8; the rest aimed below
BASE_MAX_JACCARD = 0.5  # base rows at least this similar to an earlier one are dropped
# a curate job's peak memory per pool row, to refuse what cannot fit: both jobs stream
# (curate.pipeline.streamed); measured between 100k and 250k rows, ~1.7 KB a row for the
# exact job and ~6.5 KB with near_dedup, with a margin. A job whose estimate exceeds the
# available memory is not started (--ignore-memory).
BYTES_PER_ROW = {"curate-exact": 3_000, "curate-near": 5_000, "curate-near-exact": 6_000}
SAMPLE_EVERY_S = 0.2
POOL_VERSION = 1  # part of the pool cache's name: raise it when build_pool makes different rows
RECALL_BINS = ("0.00-0.70", "0.70-0.75", "0.75-0.80", "0.80-0.85", "0.85-0.90", "0.90-0.95", "0.95-1.00")


def near_settings() -> dict:
    """The near_dedup step of jobs/near_dedup.yaml: curate's near job and DataTrove's
    settings both come from it."""
    job = yaml.safe_load((ROOT / "jobs" / "near_dedup.yaml").read_text())
    step = next(f for f in job["filters"] if f["type"] == "near_dedup")
    return dict(step)


# ================================================================ 1. the pool

_SPACE = re.compile(r"\s+")
_WORD = re.compile(r"[A-Za-z]{3,10}")
_ALNUM = re.compile(r"[0-9A-Za-z]")  # a token curate's shingles see as (part of) a word


def alpaca_prompt(row: dict) -> str:
    """The prompt curate's alpaca adapter makes: instruction, then input when not blank."""
    extra = row.get("input") or ""
    return row["instruction"] if not extra.strip() else f"{row['instruction']}\n\n{extra}"


def alpaca_text(row: dict) -> str:
    """What curate shingles and measures (record_text: every message, joined by a newline)."""
    return f"{alpaca_prompt(row)}\n{row['output']}"


def exact_key(row: dict) -> str:
    """curate's exact-dedup key (filters.dedup_key): each message lower-cased, whitespace
    runs made one space, stripped; messages joined by NUL."""
    return "\x00".join(_SPACE.sub(" ", t.strip().lower()) for t in (alpaca_prompt(row), row["output"]))


def shingle_set(row: dict, n: int = 5) -> set[str]:
    from curate.records import adapt_alpaca
    from curate.filters.near_dedup import record_text, shingles

    return shingles(record_text(next(adapt_alpaca(row, {}, "pool"))), n)


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def load_base(data: pathlib.Path, limit: int | None = None) -> list[dict]:
    """The base rows (module docstring), sorted by shingle count (ties: file order)."""
    from curate.filters.near_dedup import permutations, shingle_values, signature

    rows = []
    for name in BASE_FILES:
        with gzip.open(data / f"{name}.jsonl.gz", "rt", encoding="utf-8") as fh:
            for i, line in enumerate(fh):
                if limit is not None and i >= limit:
                    break
                r = json.loads(line)
                if "question" in r:
                    r = {"instruction": r["question"], "input": "", "output": r["answer"]}
                r = {"instruction": r["instruction"], "input": r.get("input") or "", "output": r["output"]}
                if name == "gpteacher_toolformer":
                    r["instruction"] = r["instruction"].strip().split("\n")[-1]
                if r["instruction"].strip() and r["output"].strip():
                    rows.append(r)
    sh = [shingle_set(r) for r in rows]
    a, b = permutations(128, 0)
    sigs = [signature(shingle_values(s), a, b) for s in sh]
    buckets: dict = {}
    earlier: dict[int, set] = {}
    for i, s in enumerate(sigs):
        for j in range(32):
            bucket = buckets.setdefault((j, s[4 * j:4 * j + 4].tobytes()), [])
            if bucket:
                earlier.setdefault(i, set()).update(bucket)
            bucket.append(i)
    kept: list[int] = []
    dropped: set[int] = set()
    for i in range(len(rows)):
        if any(j not in dropped and jaccard(sh[i], sh[j]) >= BASE_MAX_JACCARD for j in earlier.get(i, ())):
            dropped.add(i)
        else:
            kept.append(i)
    kept.sort(key=lambda i: len(sh[i]))
    return [rows[i] for i in kept]


def pair_variants(n_base: int, n_variants: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n_variants distinct unordered pairs (i, i + d) of base positions, d = 1..D, the
    smallest D that has enough; the two halves in random order."""
    if n_base < 2:
        raise ValueError("need at least two base rows")
    d_max, total = 0, 0
    while total < n_variants:
        d_max += 1
        if d_max >= n_base:
            raise ValueError(f"{n_base} base rows make at most {total} distinct variants, {n_variants} asked")
        total += n_base - d_max
    picks = np.sort(rng.choice(total, size=n_variants, replace=False))
    starts = np.cumsum([0] + [n_base - d for d in range(1, d_max + 1)])
    d = np.searchsorted(starts, picks, side="right")  # 1-based offset
    i = picks - starts[d - 1]
    first, second = i, i + d
    swap = rng.random(n_variants) < 0.5
    return np.where(swap, second, first), np.where(swap, first, second)


def variant_row(a: dict, b: dict) -> dict:
    return {"instruction": f"{a['instruction']}\n\n{b['instruction']}",
            "input": "\n\n".join(x for x in (a["input"], b["input"]) if x.strip()),
            "output": f"{a['output']}\n\n{b['output']}"}


def case_space_copy(row: dict, rng: random.Random) -> dict:
    """The row with only case and whitespace changed: exact_key(copy) == exact_key(row)."""
    out = dict(row)
    for field in ("instruction", "output"):
        spaces = out[field].count(" ")
        if spaces:
            out[field] = re.sub(" ", "  ", out[field], count=rng.randint(1, min(spaces, 5)))
    out["output"] += rng.choice([" ", "\n", "  \n"])
    cased = dict(out)
    field = rng.choice(["instruction", "output"])
    cased[field] = rng.choice([str.upper, str.lower, str.title, str.swapcase])(cased[field])
    return cased if exact_key(cased) == exact_key(row) else out  # e.g. "ß".upper() is "SS"


def near_copy(row: dict, rng: random.Random, vocab: list[str], edits: int) -> dict:
    """`edits` word edits at random positions of the instruction and the output: replace
    (1/2), delete (1/4), insert (1/4) a word; whitespace between words kept."""
    toks = {f: re.split(r"(\s+)", row[f]) for f in ("instruction", "output")}
    for _ in range(edits):
        slots = [(f, i) for f, ts in toks.items() for i in range(0, len(ts), 2) if _ALNUM.search(ts[i])]
        f, i = slots[rng.randrange(len(slots))]
        ts = toks[f]
        word = vocab[rng.randrange(len(vocab))]
        while word.lower() == ts[i].lower():
            word = vocab[rng.randrange(len(vocab))]
        op = rng.random()
        words_in_field = sum(1 for k in range(0, len(ts), 2) if ts[k])
        if op < 0.25 and words_in_field > 1:  # delete the word and one whitespace run beside it
            if i + 1 < len(ts):
                del ts[i:i + 2]
            else:
                del ts[i - 1:i + 1]
        elif op < 0.5:
            ts[i:i] = [word, " "]
        else:
            ts[i] = word
    return {**row, **{f: "".join(ts) for f, ts in toks.items()}}


def edits_for(n_shingles: int, target: float) -> int:
    """Word edits that bring a text of n shingles to about Jaccard `target`: each edit
    changes up to `shingle` (5) shingles, J ~ (S - 5e) / (S + 5e)."""
    return max(1, round(n_shingles * (1 - target) / (5 * (1 + target))))


def pool_dir(work: pathlib.Path, rows: int, seed: int, shards: int) -> pathlib.Path:
    return work / f"pool-v{POOL_VERSION}-{rows}-seed{seed}-shards{shards}"


def build_pool(work: pathlib.Path, rows: int, seed: int = 0, shards: int = 2,
               data: pathlib.Path | None = None, base: list[dict] | None = None) -> pathlib.Path:
    """The pool's directory, built unless pool.json (written last) is there already."""
    out = pool_dir(work, rows, seed, shards)
    if (out / "pool.json").exists():
        return out
    t0 = time.perf_counter()
    if base is None:
        base = load_base(data)
    n_exact, n_near = round(EXACT_SHARE * rows), round(NEAR_SHARE * rows)
    n_var = rows - n_exact - n_near
    rng = np.random.Generator(np.random.PCG64(seed))
    first, second = pair_variants(len(base), n_var, rng)
    # items: 0..n_var-1 variants, then the exact copies, then the near copies
    copy_source = rng.integers(0, n_var, size=n_exact + n_near)
    item_at = rng.permutation(rows)  # row position -> item
    row_of_item = np.empty(rows, dtype=np.int64)
    row_of_item[item_at] = np.arange(rows)
    vocab = sorted({w.lower() for r in base for w in _WORD.findall(r["output"])})

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    bounds = [rows * k // shards for k in range(shards + 1)]
    files = [f"part-{k:05d}.jsonl.gz" for k in range(shards)]
    kinds = {"exact": 0, "case-space": 0, "near": 0}
    near_j = []
    with gzip.open(tmp / "truth.jsonl.gz", "wt", encoding="utf-8", compresslevel=6) as truth:
        for k, name in enumerate(files):
            with gzip.open(tmp / name, "wt", encoding="utf-8", compresslevel=6) as fh:
                for r in range(bounds[k], bounds[k + 1]):
                    item = int(item_at[r])
                    if item < n_var:
                        fh.write(json.dumps(variant_row(base[first[item]], base[second[item]])) + "\n")
                        continue
                    src_item = int(copy_source[item - n_var])
                    src = variant_row(base[first[src_item]], base[second[src_item]])
                    crng = random.Random(f"{seed}:{item}")
                    src_sh = shingle_set(src)
                    if item < n_var + n_exact:
                        kind = "exact" if crng.random() < 0.5 else "case-space"
                        row, edits = (dict(src) if kind == "exact" else case_space_copy(src, crng)), 0
                    else:
                        kind = "near"
                        target = (crng.uniform(0.8, 0.97) if crng.random() < NEAR_HIGH_SHARE
                                  else crng.uniform(0.6, 0.8))
                        edits = edits_for(len(src_sh), target)
                        row = near_copy(src, crng, vocab, edits)
                    j = jaccard(src_sh, shingle_set(row))
                    while kind == "near" and j == 1.0:  # the edits cancelled out: one more
                        row, edits = near_copy(row, crng, vocab, 1), edits + 1
                        j = jaccard(src_sh, shingle_set(row))
                    kinds[kind] += 1
                    if kind == "near":
                        near_j.append(j)
                    fh.write(json.dumps(row) + "\n")
                    truth.write(json.dumps({"row": r, "source": int(row_of_item[src_item]), "kind": kind,
                                            "edits": edits, "jaccard": round(j, 6)}) + "\n")
    near_j.sort()
    meta = {"version": POOL_VERSION, "rows": rows, "seed": seed, "files": files, "offsets": bounds[:-1],
            "variants": n_var, "base_rows": len(base), "kinds": kinds,
            "near_jaccard": {"share_ge_0.8": round(sum(j >= 0.8 for j in near_j) / max(len(near_j), 1), 4),
                             "quantiles_10_50_90": [round(near_j[int(q * (len(near_j) - 1))], 3)
                                                    for q in (0.1, 0.5, 0.9)] if near_j else []},
            "build_s": round(time.perf_counter() - t0, 1)}
    (tmp / "pool.json").write_text(json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def read_meta(pool: pathlib.Path) -> dict:
    return json.loads((pool / "pool.json").read_text())


def read_truth(pool: pathlib.Path) -> dict:
    """{"source": row -> its variant's row (a variant: itself), "kind": row -> kind
    ("variant" where absent), "jaccard": row -> true Jaccard to its source}."""
    rows = read_meta(pool)["rows"]
    source = np.arange(rows)
    kind, jac = {}, {}
    with gzip.open(pool / "truth.jsonl.gz", "rt", encoding="utf-8") as fh:
        for line in fh:
            t = json.loads(line)
            source[t["row"]], kind[t["row"]], jac[t["row"]] = t["source"], t["kind"], t["jaccard"]
    return {"source": source, "kind": kind, "jaccard": jac}


def read_rows(pool: pathlib.Path, wanted: set[int]) -> dict[int, dict]:
    """The pool rows at these positions (one pass over the shards)."""
    meta, out, r = read_meta(pool), {}, 0
    for name in meta["files"]:
        with gzip.open(pool / name, "rt", encoding="utf-8") as fh:
            for line in fh:
                if r in wanted:
                    out[r] = json.loads(line)
                r += 1
    return out


def row_index(pool_meta: dict, file: str, line0: int) -> int:
    """A pool row's position from its shard file name and 0-based line."""
    return pool_meta["offsets"][pool_meta["files"].index(pathlib.PurePath(file).name)] + line0


# ================================================================ 2. measuring a job


def become_subreaper() -> bool:
    """Orphaned descendants (a pool's workers whose parent left first) are reparented to
    this process, so they are sampled to the end and their rusage is counted (Linux)."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def peak_rss(pid: int) -> int:
    """The process's own peak RSS so far (VmHWM), in bytes; 0 where unreadable. Not
    rusage's ru_maxrss: Linux starts a child's at its parent's RSS at fork (this
    process's, torch imported), so it would floor every job at ours."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def measure(cmd: list[str], log_path: pathlib.Path, env: dict) -> dict:
    """Run cmd, sampling its whole process tree; returns wall, CPU and memory (docstring, 2)."""
    me = psutil.Process()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_seen: dict = {}  # (pid, create time) -> last user + system seconds
    peak_tree = peak_one = 0
    status, wall_job = None, None
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        while True:
            tree = 0
            for p in me.children(recursive=True):
                try:
                    with p.oneshot():
                        ct, rss, key = p.cpu_times(), p.memory_info().rss, (p.pid, p.create_time())
                    peak_one = max(peak_one, rss, peak_rss(p.pid))
                except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                    continue
                cpu_seen[key] = ct.user + ct.system
                tree += rss
            peak_tree = max(peak_tree, tree)
            try:  # reap whatever has ended: the job, or orphans reparented to us
                while True:
                    pid, st, _ = os.wait4(-1, os.WNOHANG)
                    if pid == 0:
                        break
                    if pid == proc.pid:
                        status, wall_job = st, time.perf_counter() - t0
            except ChildProcessError:
                break  # no descendants left
            time.sleep(SAMPLE_EVERY_S)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status) if status is not None else -1
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_rusage = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    cpu_sampled = sum(cpu_seen.values())
    return {"rc": proc.returncode, "wall_s": round(wall, 2),
            "wall_job_s": round(wall_job, 2) if wall_job is not None else None,
            "cpu_s": round(max(cpu_rusage, cpu_sampled), 2),
            "cpu_source": "rusage" if cpu_rusage >= cpu_sampled else "psutil samples",
            "cpu_rusage_s": round(cpu_rusage, 2), "cpu_sampled_s": round(cpu_sampled, 2),
            "processes": len(cpu_seen),
            "peak_rss_tree_mb": round(peak_tree / 2**20), "largest_process_mb": round(peak_one / 2**20)}


# ================================================================ the jobs


def curate_job(pool: pathlib.Path, out: pathlib.Path, near: bool, verify: str = "estimate") -> dict:
    filters = [dict(LENGTH), {"type": "dedup"}] + ([{**near_settings(), "verify": verify}] if near else [])
    return {"name": "scale-near" if near else "scale-exact",
            "inputs": [{"path": str(pool / "part-*.jsonl.gz"), "source": "pool"}],
            "filters": filters, "selectors": [dict(SAMPLE)], "output": str(out)}


def curate_command() -> list[str]:
    script = pathlib.Path(sys.executable).with_name("curate")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from curate.cli import main; sys.exit(main())"]


def job_command(job: str, pool: pathlib.Path, job_dir: pathlib.Path, workers: int) -> list[str]:
    """The job's command line; curate's job YAML is written into job_dir first."""
    if job.startswith("curate-"):
        spec = curate_job(pool, job_dir / "out", near=job != "curate-exact",
                          verify="exact" if job == "curate-near-exact" else "estimate")
        (job_dir / "job.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        return curate_command() + ["run", str(job_dir / "job.yaml"), "-q"]
    return [sys.executable, str(pathlib.Path(__file__).resolve()), "--child", job, "--pool", str(pool),
            "--job-dir", str(job_dir), "--workers", str(workers)]


def run_datasets(pool: pathlib.Path, job_dir: pathlib.Path) -> None:
    """Plain `datasets`, the steps of curate's exact job (docstring, 2). Side output for
    scoring: removed.json, [[row, the row it duplicates], ...]."""
    import datasets

    meta = read_meta(pool)
    ds = datasets.load_dataset("json", data_files=[str(pool / f) for f in meta["files"]], split="train",
                               cache_dir=str(job_dir / "hf-cache"))

    def prompts(batch):
        return [i if not (x or "").strip() else f"{i}\n\n{x}" for i, x in zip(batch["instruction"], batch["input"])]

    too_long_or_short: list[int] = []

    def keep_length(batch):  # single process: the lists are this process's
        keep = [LENGTH["min"] <= len(p) + 1 + len(o) <= LENGTH["max"] for p, o in zip(prompts(batch), batch["output"])]
        too_long_or_short.extend(r for r, k in zip(batch["row"], keep) if not k)
        return keep

    def add_key(batch, idx):
        keys = [hashlib.blake2b("\x00".join(_SPACE.sub(" ", t.strip().lower()) for t in (p, o)).encode(),
                                digest_size=16).digest() for p, o in zip(prompts(batch), batch["output"])]
        return {"dedup_key": keys, "row": idx}

    first: dict[bytes, int] = {}
    removed: list[list[int]] = []

    def keep_first(batch):
        keep = []
        for key, row in zip(batch["dedup_key"], batch["row"]):
            seen = first.setdefault(key, row)
            keep.append(seen == row)
            if seen != row:
                removed.append([row, seen])
        return keep

    ds = ds.map(add_key, batched=True, with_indices=True)
    ds = ds.filter(keep_length, batched=True)
    ds = ds.filter(keep_first, batched=True)
    n = len(ds)
    k = min(n, int(SAMPLE["budget"] * n + 0.5))  # curate's rounding of a fractional budget
    ds = ds.shuffle(seed=SAMPLE["seed"]).select(range(k)).remove_columns(["dedup_key", "row"])
    ds.save_to_disk(str(job_dir / "out"))
    (job_dir / "removed.json").write_text(json.dumps({"after_dedup": n, "kept": k, "removed": removed,
                                                      "length_dropped": too_long_or_short}))


def datatrove_adapter(self, data: dict, path: str, id_in_file: int) -> dict:
    """JsonlReader adapter: the text curate shingles (instruction, input when not blank,
    output; joined as curate's record_text), id = shard file:line (0-based)."""
    extra = data.get("input") or ""
    prompt = data["instruction"] if not extra.strip() else f"{data['instruction']}\n\n{extra}"
    return {"text": f"{prompt}\n{data['output']}", "id": f"{path}:{id_in_file}", "metadata": {}}


def xxhash64_utf8(data: str | bytes) -> int:
    """DataTrove 0.10.1 hashes shingles as str; xxhash >= 4 takes bytes only (its
    `processing` extra pins xxhash < 4, which encoded str as UTF-8: the same hashes)."""
    import xxhash

    return xxhash.xxh64_intdigest(data.encode("utf-8") if isinstance(data, str) else data)


def run_datatrove(pool: pathlib.Path, job_dir: pathlib.Path, workers: int) -> None:
    """DataTrove's 4-stage MinHash (docstring, 2): kept rows in deduplicated/, removed
    rows (with their cluster id) in removed/."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter,
                                          MinhashDedupSignature)
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig

    near = near_settings()
    config = MinhashConfig(n_grams=near["shingle"], num_buckets=near["bands"],
                           hashes_per_bucket=near["num_perm"] // near["bands"], seed=near["seed"])
    shards = len(read_meta(pool)["files"])
    d = str(job_dir)

    def reader():
        return JsonlReader(str(pool), glob_pattern="part-*.jsonl.gz", adapter=datatrove_adapter)

    signatures = MinhashDedupSignature(output_folder=f"{d}/signatures", config=config)
    if int(version("xxhash").split(".")[0]) >= 4 and config.hash_config == HashConfig(64, "xxhash"):
        signatures._hash_func = xxhash64_utf8
    stages = [
        LocalPipelineExecutor([reader(), signatures],
                              tasks=shards, workers=min(workers, shards), logging_dir=f"{d}/logs/signatures"),
        LocalPipelineExecutor([MinhashDedupBuckets(input_folder=f"{d}/signatures", output_folder=f"{d}/buckets",
                                                   config=config)],
                              tasks=config.num_buckets, workers=workers, logging_dir=f"{d}/logs/buckets"),
        LocalPipelineExecutor([MinhashDedupCluster(input_folder=f"{d}/buckets", output_folder=f"{d}/remove_ids",
                                                   config=config, save_cluster_id=True)],
                              tasks=1, logging_dir=f"{d}/logs/clusters"),
        LocalPipelineExecutor([reader(),
                               MinhashDedupFilter(input_folder=f"{d}/remove_ids", load_cluster_ids=True,
                                                  exclusion_writer=JsonlWriter(f"{d}/removed")),
                               JsonlWriter(f"{d}/deduplicated")],
                              tasks=shards, workers=min(workers, shards), logging_dir=f"{d}/logs/filter"),
    ]
    for stage in stages:
        stage.run()


# ================================================================ 3. quality


_DUPLICATE_OF = re.compile(r"(?:near-)?duplicate of \S+ \((?P<origin>.*)\)(?:, (?:estimated )?Jaccard [0-9.]+)?")


def reject_target(reason: str) -> str:
    """The origin of the row a curate dedup / near_dedup rejection names as kept."""
    m = _DUPLICATE_OF.fullmatch(reason)
    if m is None:
        raise ValueError(f"not a dedup rejection: {reason!r}")
    return m.group("origin")


def removals_curate(job_dir: pathlib.Path, pool: pathlib.Path) -> dict:
    """{"removed": {row: row it was merged into}, "other": rows dropped by other filters,
    "after_dedup", "kept"} from a curate output: rejected/ rows of filter:dedup and
    filter:near_dedup name the row they duplicate in their reject_reason."""
    import pyarrow as pa

    meta = read_meta(pool)
    out = job_dir / "out"

    def row_of(origin: str) -> int:
        file, line = origin.rsplit(":", 1)
        return row_index(meta, file, int(line) - 1)

    removed, other, not_selected = {}, set(), 0
    for shard in sorted((out / "rejected").glob("data-*.arrow")):
        with pa.memory_map(str(shard)) as src:
            for batch in pa.ipc.open_stream(src):
                cols = batch.select(["origin", "reject_stage", "reject_reason"]).to_pydict()
                for origin, stage, reason in zip(cols["origin"], cols["reject_stage"], cols["reject_reason"]):
                    if stage in ("filter:dedup", "filter:near_dedup"):
                        removed[row_of(origin)] = row_of(reject_target(reason))
                    elif stage.startswith("filter:"):
                        other.add(row_of(origin))
                    else:
                        not_selected += 1
    manifest = json.loads((out / "manifest.json").read_text())
    kept = manifest["counts"]["kept"]
    return {"removed": removed, "other": other, "after_dedup": kept + not_selected, "kept": kept}


def removals_datasets(job_dir: pathlib.Path, pool: pathlib.Path) -> dict:
    side = json.loads((job_dir / "removed.json").read_text())
    return {"removed": {r: t for r, t in side["removed"]}, "other": set(side["length_dropped"]),
            "after_dedup": side["after_dedup"], "kept": side["kept"]}


def removals_datatrove(job_dir: pathlib.Path, pool: pathlib.Path) -> dict:
    """Removed rows (exclusion writer) merged into the kept row of their cluster."""
    meta = read_meta(pool)

    def docs(folder):
        for f in sorted((job_dir / folder).glob("*.jsonl*")):
            with gzip.open(f, "rt", encoding="utf-8") if f.suffix == ".gz" else open(f) as fh:
                for line in fh:
                    d = json.loads(line)
                    file, line0 = d["id"].rsplit(":", 1)
                    yield row_index(meta, file, int(line0)), d.get("metadata", {}).get("minhash_cluster_id", -1)

    kept_of_cluster, kept = {}, 0
    for row, cluster in docs("deduplicated"):
        kept += 1
        if cluster != -1:
            kept_of_cluster[cluster] = row
    removed = {row: kept_of_cluster[cluster] for row, cluster in docs("removed")}
    return {"removed": removed, "other": set(), "after_dedup": kept, "kept": kept}


def final_target(removed: dict[int, int], row: int) -> int:
    """The kept row a removed row ends in (a dedup survivor may itself be near-deduped)."""
    seen = set()
    while row in removed and row not in seen:
        seen.add(row)
        row = removed[row]
    return row


def jaccard_bin(j: float) -> str:
    for b in RECALL_BINS:
        lo, hi = float(b[:4]), float(b[5:])
        if lo <= j < hi or j == hi == 1.0:
            return b
    raise ValueError(j)


def score(truth: dict, rm: dict, rows_text: dict[int, dict] | None = None, pool: pathlib.Path | None = None) -> dict:
    """The quality numbers of the module docstring (3). rows_text: the pool rows that the
    wrong-removal Jaccards need (read from `pool` when not given)."""
    source, kind, jac = truth["source"], truth["kind"], truth["jaccard"]
    removed, other = rm["removed"], rm["other"]
    n = len(source)

    def kept(r):
        return r not in removed and r not in other

    exact_class: dict[int, list[int]] = {}
    family: dict[int, list[int]] = {}
    for r in range(n):
        family.setdefault(int(source[r]), []).append(r)
        if kind.get(r, "variant") != "near":
            exact_class.setdefault(int(source[r]), []).append(r)

    exact = [r for r, k in kind.items() if k in ("exact", "case-space") and r not in other and source[r] not in other]
    caught = sum(not (kept(r) and kept(int(source[r]))) for r in exact)
    near_hi, near_lo, found_hi, found_lo = 0, 0, 0, 0
    by_bin = {b: [0, 0] for b in RECALL_BINS}  # [found, copies]
    for r, k in kind.items():
        if k != "near" or r in other or source[r] in other:
            continue
        found = not (kept(r) and any(kept(m) for m in exact_class[int(source[r])]))
        if jac[r] >= 0.8:
            near_hi, found_hi = near_hi + 1, found_hi + found
        else:
            near_lo, found_lo = near_lo + 1, found_lo + found
        by_bin[jaccard_bin(jac[r])][0] += found
        by_bin[jaccard_bin(jac[r])][1] += 1

    emptied = [v for v, members in family.items()
               if v not in other and not any(kept(m) for m in members)]
    cross = [v for v in family if v in removed and int(source[final_target(removed, v)]) != v]
    pairs = {v: final_target(removed, v) for v in set(emptied) | set(cross)}
    if rows_text is None:
        rows_text = read_rows(pool, set(pairs) | set(pairs.values())) if pairs else {}
    pair_j = {v: jaccard(shingle_set(rows_text[v]), shingle_set(rows_text[t])) for v, t in pairs.items()}

    def median(vs):
        return round(statistics.median(vs), 3) if vs else None

    return {"removed_as_duplicates": len(removed),
            "exact_copies": len(exact), "exact_caught": round(caught / max(len(exact), 1), 4),
            "near_copies_ge_0.8": near_hi, "near_recall": round(found_hi / max(near_hi, 1), 4),
            "near_copies_below_0.8": near_lo, "near_removed_below_0.8": round(found_lo / max(near_lo, 1), 4),
            "near_found_by_jaccard": {b: f"{f}/{c}" for b, (f, c) in by_bin.items()},
            "wrong_removals": len(emptied), "wrong_removals_median_jaccard": median([pair_j[v] for v in emptied]),
            "wrong_removals_jaccard": sorted(round(pair_j[v], 3) for v in emptied)[:50],
            "rows_lost_with_them": sum(len(family[v]) for v in emptied),
            "cross_merges": len(cross), "cross_merges_median_jaccard": median([pair_j[v] for v in cross])}


# ================================================================ 4. report


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except OSError:
        return "unknown"


def fmt(v, spec=",.0f"):
    return "-" if v is None else format(v, spec)


def short_commit(commit: str) -> str:
    return commit[:12] + (" (uncommitted changes)" if commit.endswith("-dirty") else "")


def short(command: str) -> str:
    """A job's command with this checkout's and the interpreter's paths left out."""
    return (command.replace(sys.executable, "python").replace(str(pathlib.Path(sys.executable).parent) + "/", "")
            .replace(str(ROOT) + "/", ""))


def render(results: dict) -> str:
    near = near_settings()
    md = ["# Dedup at scale: curate against plain `datasets` and DataTrove", "",
          "Written by `benchmarks/scale.py` (its docstring: the pool, the jobs, how CPU and memory are "
          "measured, the quality definitions). Each size's runs name their command, machine and commit.", "",
          f"Jobs: **curate-exact** length (chars 10-20000) + exact dedup + random 10% (seed 0); **curate-near** "
          f"the same + near_dedup (threshold {near['threshold']}, {near['shingle']}-word shingles, "
          f"{near['num_perm']} permutations in {near['bands']} bands, keep {near['keep']}, `verify: estimate`: "
          "the Jaccard estimated from the signatures); **curate-near-exact** the same with `verify: exact`, "
          "near_dedup's default (a candidate pair's Jaccard from its shingle sets); **datasets** the "
          "exact job in plain `datasets` (batched map/filter, keeps the first occurrence); **datatrove** "
          f"DataTrove MinHash, 4 stages, {near['shingle']}-grams, {near['bands']} buckets x "
          f"{near['num_perm'] // near['bands']} hashes, spaCy word tokenizer (its English default), no "
          "verification of bucket collisions. DataTrove normalises text its own way (numbers to 0, punctuation "
          "dropped, spaCy tokens), so its own similarity of a pair can differ from the true Jaccard here, which "
          "is always curate's (5 words, letters and digits).", "",
          "CPU s: the whole process tree (workers included). Kept: rows in the job's output (after the 10% "
          "sample for the exact jobs). Recall: near copies at true Jaccard >= 0.8 (curate's shingles) where "
          "the copy or its source was removed and the other kept. Wrong removals: families (a distinct row "
          "and its planted copies) emptied by merging into an unrelated row, with the median true Jaccard "
          "of the pairs.", ""]
    for size in sorted(results["runs"], key=int):
        runs = results["runs"][size]
        pool = results.get("pools", {}).get(size, {})
        md += [f"## {int(size):,} rows", ""]
        if pool:
            k = pool["kinds"]
            md += [f"Pool: {pool['variants']:,} distinct variants, {k['exact']:,} verbatim and {k['case-space']:,} "
                   f"case/space copies, {k['near']:,} near copies ({pool['near_jaccard']['share_ge_0.8']:.1%} "
                   f"at true Jaccard >= 0.8); seed {pool['seed']}, built from {pool['base_rows']:,} base rows.", ""]
        md += ["| job | wall s | CPU s | rows per CPU-s | peak RSS tree | largest process | after dedup | kept "
               "| exact caught | recall (J >= 0.8) | wrong removals (median J) |",
               "|---|---|---|---|---|---|---|---|---|---|---|"]
        for job in JOBS:
            if job not in runs:
                continue
            r = runs[job]
            if r.get("rc", 0) != 0:
                md.append(f"| {job} | failed (exit {r['rc']}; see {r.get('log', 'its log')}) |||||||||| ")
                continue
            q = r["quality"]
            recall = f"{q['near_recall']:.2%}" if job in NEAR_JOBS else "-"
            wrong = f"{q['wrong_removals']:,}" + (f" ({q['wrong_removals_median_jaccard']:.3f})"
                                                  if q["wrong_removals_median_jaccard"] is not None else "")
            md.append(f"| {job} | {r['wall_s']:,.1f} | {r['cpu_s']:,.1f} ({r['cpu_source']}) | "
                      f"{r['rows_per_cpu_s']:,.0f} | {r['peak_rss_tree_mb'] / 1024:,.2f} GB | "
                      f"{r['largest_process_mb'] / 1024:,.2f} GB | {r['after_dedup']:,} | {r['kept']:,} | "
                      f"{q['exact_caught']:.2%} | {recall} | {wrong} |")
        md.append("")
        for job in NEAR_JOBS:
            if "quality" in runs.get(job, {}):
                q = runs[job]["quality"]
                md.append(f"- {job}, near copies found by true Jaccard: "
                          + ", ".join(f"{b} {v}" for b, v in q["near_found_by_jaccard"].items())
                          + f"; cross merges {q['cross_merges']:,} "
                          f"(median J {fmt(q['cross_merges_median_jaccard'], '.3f')})")
        for job in JOBS:
            if job in runs:
                r = runs[job]
                md.append(f"- {job}: `{short(r['command'])}` from `{r['invocation']}` at {short_commit(r['commit'])}, "
                          f"{r['finished']}; {r['processes']} process(es), CPU by rusage {r['cpu_rusage_s']:,.1f} s, "
                          f"by samples {r['cpu_sampled_s']:,.1f} s")
        for m in {json.dumps(r["machine"], sort_keys=True) for r in runs.values()}:
            md.append("- machine: " + ", ".join(f"{k} {v}" for k, v in json.loads(m).items()))
        md.append("")
    return "\n".join(md) + "\n"


def merge_results(results_dir: pathlib.Path, size: int, job: str, entry: dict, pool_meta: dict) -> dict:
    path = results_dir / "results" / "scale.json"
    results = json.loads(path.read_text()) if path.exists() else {"runs": {}, "pools": {}}
    results["runs"].setdefault(str(size), {})[job] = entry
    results["pools"][str(size)] = pool_meta
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    (results_dir / "RESULTS_scale.md").write_text(render(results))
    return results


# ================================================================ main


def run_job(job: str, size: int, pool: pathlib.Path, args, machine: dict, command: str) -> dict:
    job_dir = args.work_dir / str(size) / job
    shutil.rmtree(job_dir, ignore_errors=True)
    job_dir.mkdir(parents=True)
    cmd = job_command(job, pool, job_dir, args.workers)
    env = dict(os.environ)  # the jobs import this checkout's curate, whatever is installed
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    print(f"[{size:,}] {job}: {' '.join(cmd)}", flush=True)
    m = measure(cmd, job_dir / "job.log", env)
    entry = {**m, "command": " ".join(cmd), "invocation": command, "pool": pool.name, "machine": machine,
             "commit": git_commit(), "finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
             "log": str(job_dir / "job.log"), "rows_per_cpu_s": round(size / m["cpu_s"]) if m["cpu_s"] else None}
    if m["rc"] != 0:
        print(f"  failed (exit {m['rc']}): see {job_dir / 'job.log'}", flush=True)
        return entry
    rm = {"curate-exact": removals_curate, "curate-near": removals_curate, "curate-near-exact": removals_curate,
          "datasets": removals_datasets,
          "datatrove": removals_datatrove}[job](job_dir, pool)
    entry.update(after_dedup=rm["after_dedup"], kept=rm["kept"], quality=score(read_truth(pool), rm, pool=pool))
    print(f"  wall {m['wall_s']:.1f} s, CPU {m['cpu_s']:.1f} s ({m['cpu_source']}), tree peak "
          f"{m['peak_rss_tree_mb']:,} MB, largest {m['largest_process_mb']:,} MB; kept {rm['kept']:,}; "
          + json.dumps({k: v for k, v in entry["quality"].items() if k != "wrong_removals_jaccard"}), flush=True)
    if not args.keep_outputs:
        for name in ("out", "hf-cache", "signatures", "buckets", "deduplicated", "removed"):
            shutil.rmtree(job_dir / name, ignore_errors=True)
    return entry


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000])
    ap.add_argument("--only", default=",".join(JOBS), help=f"comma-separated, of {', '.join(JOBS)}")
    ap.add_argument("--work-dir", type=pathlib.Path, default=ROOT / "runs" / "scale")
    ap.add_argument("--data", type=pathlib.Path,
                    default=pathlib.Path(os.environ.get("CURATE_DATA", ROOT.parent / "shared" / "data")))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shards", type=int, default=2, help="pool files (DataTrove's tasks for stages 1 and 4)")
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="DataTrove's workers")
    ap.add_argument("--results-dir", type=pathlib.Path, default=ROOT / "benchmarks",
                    help="RESULTS_scale.md and results/scale.json go here")
    ap.add_argument("--keep-outputs", action="store_true", help="keep each job's output (default: removed once scored)")
    ap.add_argument("--ignore-memory", action="store_true",
                    help="start a curate job even where its estimated memory exceeds what is available")
    ap.add_argument("--child", choices=["datasets", "datatrove"], help=argparse.SUPPRESS)
    ap.add_argument("--pool", type=pathlib.Path, help=argparse.SUPPRESS)
    ap.add_argument("--job-dir", type=pathlib.Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child == "datasets":
        return run_datasets(args.pool, args.job_dir)
    if args.child == "datatrove":
        return run_datatrove(args.pool, args.job_dir, args.workers)

    jobs = [j.strip() for j in args.only.split(",") if j.strip()]
    unknown = set(jobs) - set(JOBS)
    if unknown:
        ap.error(f"unknown jobs {sorted(unknown)}; known: {', '.join(JOBS)}")
    args.work_dir = args.work_dir.resolve()
    command = "python benchmarks/scale.py " + " ".join(sys.argv[1:] if argv is None else argv)
    become_subreaper()
    from benchmarks.machine import machine_info

    machine = {**machine_info(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    base = None
    for size in args.rows:
        pool = pool_dir(args.work_dir, size, args.seed, args.shards)
        if not (pool / "pool.json").exists():
            print(f"[{size:,}] building the pool in {pool}", flush=True)
            base = base if base is not None else load_base(args.data)
            build_pool(args.work_dir, size, args.seed, args.shards, base=base)
        meta = read_meta(pool)
        print(f"[{size:,}] pool {pool}: {json.dumps(meta)}", flush=True)
        for job in jobs:
            need, avail = size * BYTES_PER_ROW.get(job, 0), psutil.virtual_memory().available
            if need > avail and not args.ignore_memory:
                print(f"[{size:,}] {job} not started: ~{need / 2**30:.1f} GiB estimated ({BYTES_PER_ROW[job]:,} "
                      f"bytes per row), {avail / 2**30:.1f} GiB available; --ignore-memory starts it anyway",
                      flush=True)
                continue
            entry = run_job(job, size, pool, args, machine, command)
            merge_results(args.results_dir, size, job, entry, meta)
    print(f"results: {args.results_dir / 'RESULTS_scale.md'}, {args.results_dir / 'results' / 'scale.json'}")


if __name__ == "__main__":
    main()
