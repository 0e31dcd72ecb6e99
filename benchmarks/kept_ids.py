"""Kept ids of every job under jobs/ on a small input: a behaviour record for refactors
(issue 16: record before, show they are identical after).

    python benchmarks/kept_ids.py record [--out benchmarks/kept_ids.json] [--jobs a,b]
    python benchmarks/kept_ids.py check  [--out benchmarks/kept_ids.json] [--jobs a,b]

`record` runs each job in jobs/*.yaml (not jobs/grape_full.yaml: the whole pool, the
same pipeline as jobs/grape.yaml) on a small input and writes, per job, the sorted kept
(id, origin) pairs and the manifest's counts (and, for jobs with `scores:`, the scoring
run's counts). With --jobs and an existing file, only those jobs' entries are replaced.
`check` runs them again and compares with the file: per job "identical" or the
differences (ids only in before / only in after, counts that differ); exit 1 on any.

The small input (`small_job`), from the job as `curate.config.load_job` reads it:
- every input's `limit` capped at ROW_CAP rows (set when absent); an input using
  `limit_prompts` gets that capped at PROMPT_CAP prompts instead (every response to them);
  a trajectory scorer's `proxy.data` (the pool the proxy trains on) gets the same caps;
- count budgets (`budget: <int>`) capped at half the pool (the sum of the input limits),
  so that something is rejected; fractions and per-prompt `k` are left as they are;
- everything the job writes goes under the work directory (--work-dir, default a fresh
  temporary one, removed at the end unless --keep-work): `output`, `scores`, the
  iterative diversity selector's `work_dir`, the trajectory scorer's proxy `checkpoints`;
  each job has its own folder there, replaced when it runs (so every job scores its own
  pool, even the two diversity jobs that share `scores:` in jobs/);
- a degradation scorer's `pruned_model` points at a Wanda 50% copy of the default model
  made once into the work directory (PRUNE_CALIBRATION_ROWS calibration rows from the
  job's inputs; `curate prune --method wanda --sparsity 0.5`); a complete one made with
  the same settings in a given --work-dir is re-used.
Any option still naming a path under runs/ after this is an error: a job this script
does not know how to redirect must not write into the repository.

Jobs run in this process with `curate.pipeline.run.run_job(job, progress=False)`; the
wall time of each is printed (it is not recorded: the file must not change between runs).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import glob
import hashlib
import json
import logging
import os
import pathlib
import shutil
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "kept_ids.json"
EXCLUDED = {"grape_full"}  # the whole alpaca_eval pool; jobs/grape.yaml is its slice
ROW_CAP = 60
PROMPT_CAP = 6
PRUNE = {"method": "wanda", "sparsity": 0.5}
PRUNE_CALIBRATION_ROWS = 16
SHOW_IDS = 20  # ids listed per side of a difference


# ------------------------------------------------------------------ the jobs
def job_names() -> list[str]:
    return sorted(pathlib.Path(p).stem for p in glob.glob(str(ROOT / "jobs" / "*.yaml"))
                  if pathlib.Path(p).stem not in EXCLUDED)


def cap_inputs(specs: list[dict]) -> list[dict]:
    """Input specs (dicts as in a job file) with the small-input caps."""
    out = []
    for spec in specs:
        spec = dict(spec)
        if spec.get("limit_prompts") is not None:
            spec["limit_prompts"] = min(spec["limit_prompts"], PROMPT_CAP)
            if spec.get("limit") is not None:
                spec["limit"] = min(spec["limit"], ROW_CAP)
        else:
            spec["limit"] = min(spec.get("limit") or ROW_CAP, ROW_CAP)
        out.append(spec)
    return out


def pool_rows(specs: list[dict]) -> int | None:
    """Rows read at most (the sum of the limits); None when an input is limited by prompts."""
    if any(s.get("limit") is None for s in specs):
        return None
    return sum(s["limit"] for s in specs)


def _paths_under_runs(obj, where: str) -> list[str]:
    found = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            found += _paths_under_runs(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            found += _paths_under_runs(v, f"{where}[{i}]")
    elif isinstance(obj, str) and (obj.startswith("runs/") or obj.startswith("./runs/")):
        found.append(f"{where}: {obj}")
    return found


def small_job(name: str, job_dir: pathlib.Path, pruned_model: str | None = None):
    """jobs/<name>.yaml on a small input, everything it writes under `job_dir`."""
    from curate.config import InputConfig, load_job

    job = load_job(str(ROOT / "jobs" / f"{name}.yaml"))
    specs = cap_inputs([dataclasses.asdict(s) for s in job.inputs])
    inputs = [InputConfig(**s) for s in specs]
    pool = pool_rows(specs)

    scorers = []
    for i, s in enumerate(job.scorers):
        s = copy.deepcopy(s)
        if s["type"] == "trajectory":
            s["checkpoints"] = str(job_dir / f"proxy{i}")
            if isinstance(s.get("proxy"), dict) and isinstance(s["proxy"].get("data"), list):
                data = [{"path": d} if isinstance(d, str) else d for d in s["proxy"]["data"]]
                s["proxy"]["data"] = cap_inputs(data)
        if "pruned_model" in s:
            if pruned_model is None:
                raise RuntimeError(f"{name}: scorer {i} needs a pruned model")
            s["pruned_model"] = pruned_model
        scorers.append(s)

    selectors = []
    for i, s in enumerate(job.selectors):
        s = dict(s)
        budget = s.get("budget")
        if pool is not None and isinstance(budget, int) and not isinstance(budget, bool):
            s["budget"] = min(budget, pool // 2)
        if "work_dir" in s:
            s["work_dir"] = str(job_dir / f"work{i}")
        selectors.append(s)

    job = dataclasses.replace(job, inputs=inputs, scorers=scorers, selectors=selectors,
                              output=str(job_dir / "out"),
                              scores=str(job_dir / "scores") if job.scores else None)
    left = _paths_under_runs(dataclasses.asdict(job), name)
    if left:
        raise RuntimeError("options still pointing into runs/ (teach small_job to redirect them): "
                           + "; ".join(left))
    return job


def settings(job) -> dict:
    """What the small input is, for the record: per input its source and caps, per
    selector its budget (a check against different settings compares different things)."""
    return {"inputs": [{"source": i.source, "limit": i.limit, "limit_prompts": i.limit_prompts}
                       for i in job.inputs],
            "budgets": [s.get("budget") for s in job.selectors]}


def needs_pruned(name: str) -> bool:
    from curate.config import load_job

    return any("pruned_model" in s for s in load_job(str(ROOT / "jobs" / f"{name}.yaml")).scorers)


def ensure_pruned(work: pathlib.Path, name: str) -> str:
    """The Wanda 50% copy of the default model, made once into `work` (calibrated on
    PRUNE_CALIBRATION_ROWS rows of job `name`'s input files)."""
    from curate.config import load_job
    from curate.prune import make_pruned_copy

    out = work / "pruned-wanda50"
    calibration = sorted({i.path for i in load_job(str(ROOT / "jobs" / f"{name}.yaml")).inputs})
    want = {"method": PRUNE["method"], "sparsity": PRUNE["sparsity"], "calibration": calibration,
            "calibration_rows": PRUNE_CALIBRATION_ROWS}
    marker = out / "kept_ids_prune.json"
    if marker.exists() and json.loads(marker.read_text()) == want and (out / "prune.json").exists():
        print(f"pruned model: re-using {out}", flush=True)
        return str(out)
    t0 = time.time()
    make_pruned_copy("default", PRUNE["method"], str(out), sparsity=PRUNE["sparsity"],
                     calibration=calibration, calibration_rows=PRUNE_CALIBRATION_ROWS)
    marker.write_text(json.dumps(want))
    print(f"pruned model: {out} made in {time.time() - t0:.1f}s "
          f"(weights sha256 {_weights_digest(out)[:16]})", flush=True)
    return str(out)


def _weights_digest(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


# ------------------------------------------------------------------ running
def kept_pairs(output: str) -> list[list[str]]:
    """The (id, origin) of every kept row in a curate output (its data-*.arrow shards)."""
    import pyarrow as pa

    pairs = []
    for path in sorted(glob.glob(os.path.join(output, "data-*.arrow"))):
        with open(path, "rb") as fh:
            table = pa.ipc.open_stream(fh).read_all()
        pairs += [[str(i), str(o)] for i, o in zip(table.column("id").to_pylist(),
                                                   table.column("origin").to_pylist())]
    return sorted(pairs)


def run_one(name: str, work: pathlib.Path) -> tuple[dict, float]:
    from curate.pipeline.run import run_job

    job_dir = work / name
    if job_dir.exists():
        shutil.rmtree(job_dir)
    job_dir.mkdir(parents=True)
    pruned = ensure_pruned(work, name) if needs_pruned(name) else None
    job = small_job(name, job_dir, pruned)
    t0 = time.time()
    manifest = run_job(job, progress=False)
    wall = time.time() - t0
    entry = {"settings": settings(job), "kept": kept_pairs(job.output), "counts": manifest["counts"]}
    if manifest.get("scoring_counts") is not None:
        entry["scoring_counts"] = manifest["scoring_counts"]
    if len(entry["kept"]) != manifest["counts"]["kept"]:
        raise RuntimeError(f"{name}: {len(entry['kept'])} kept rows in the shards, "
                           f"the manifest says {manifest['counts']['kept']}")
    return entry, wall


def run_jobs(names: list[str], work: pathlib.Path, keep_going: bool) -> tuple[dict, dict, dict]:
    """{job: entry}, {job: wall seconds}, {job: error text} (errors only with keep_going)."""
    entries, walls, errors = {}, {}, {}
    for name in names:
        print(f"{name}: running", flush=True)
        t0 = time.time()
        try:
            entries[name], walls[name] = run_one(name, work)
        except Exception as exc:
            if not keep_going:
                raise
            errors[name] = f"{type(exc).__name__}: {exc}"
            print(f"{name}: FAILED after {time.time() - t0:.1f}s: {errors[name]}", flush=True)
            continue
        e = entries[name]
        print(f"{name}: {len(e['kept'])} kept of {e['counts']['examples']} examples, "
              f"{walls[name]:.1f}s (job), {time.time() - t0:.1f}s (with set-up)", flush=True)
    return entries, walls, errors


# ------------------------------------------------------------------ comparing
def _flat(obj, prefix: str = "") -> dict:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): obj}


def differences(before: dict, after: dict) -> list[str]:
    lines = []
    if before.get("settings") != after.get("settings"):
        lines.append(f"small-input settings differ: before {before.get('settings')}, "
                     f"after {after.get('settings')} (the job file changed?)")
    b = {tuple(p) for p in before["kept"]}
    a = {tuple(p) for p in after["kept"]}
    for label, only in (("only in before", sorted(b - a)), ("only in after", sorted(a - b))):
        if only:
            shown = ", ".join(f"{i} ({o})" for i, o in only[:SHOW_IDS])
            more = f" ... and {len(only) - SHOW_IDS} more" if len(only) > SHOW_IDS else ""
            lines.append(f"{len(only)} kept id(s) {label}: {shown}{more}")
    for key in ("counts", "scoring_counts"):
        fb, fa = _flat(before.get(key) or {}), _flat(after.get(key) or {})
        for k in sorted(set(fb) | set(fa)):
            if fb.get(k, "absent") != fa.get(k, "absent"):
                lines.append(f"{key}.{k}: before {fb.get(k, 'absent')}, after {fa.get(k, 'absent')}")
    return lines


# ------------------------------------------------------------------ commands
def dump(entries: dict) -> str:
    """One line per kept pair: diffs of the file stay readable."""
    parts = []
    for name in sorted(entries):
        e = entries[name]
        kept = ",\n".join(f"      {json.dumps(p)}" for p in e["kept"])
        body = [f'    "settings": {json.dumps(e["settings"], sort_keys=True)}',
                f'    "counts": {json.dumps(e["counts"], sort_keys=True)}']
        if "scoring_counts" in e:
            body.append(f'    "scoring_counts": {json.dumps(e["scoring_counts"], sort_keys=True)}')
        body.append(f'    "kept": [\n{kept}\n    ]' if kept else '    "kept": []')
        parts.append(f'  {json.dumps(name)}: {{\n' + ",\n".join(body) + "\n  }")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["record", "check"])
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="the record (default %(default)s)")
    ap.add_argument("--jobs", help="comma-separated job names (file stems under jobs/); default: all")
    ap.add_argument("--work-dir", help="where the jobs write (default: a fresh temporary directory, "
                                       "removed at the end); its <job>/ folders are replaced")
    ap.add_argument("--keep-work", action="store_true", help="keep the temporary work directory")
    ap.add_argument("-v", "--verbose", action="store_true", help="log at INFO (curate and Beam)")
    args = ap.parse_args(argv)

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    os.chdir(ROOT)  # jobs' relative paths are relative to the repository root
    names = job_names()
    if args.jobs:
        wanted = [j.strip() for j in args.jobs.split(",") if j.strip()]
        unknown = [j for j in wanted if j not in names]
        if unknown:
            ap.error(f"unknown job(s) {', '.join(unknown)}; known: {', '.join(names)}")
        names = wanted
    out = pathlib.Path(args.out)
    before = json.loads(out.read_text()) if out.exists() else None
    if args.command == "check" and before is None:
        ap.error(f"{out} does not exist: run `record` first")

    temporary = args.work_dir is None
    work = pathlib.Path(args.work_dir or tempfile.mkdtemp(prefix="kept_ids-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"work directory: {work}", flush=True)
    t0 = time.time()
    try:
        entries, walls, errors = run_jobs(names, work, keep_going=args.command == "check")
    finally:
        if temporary and not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    total = time.time() - t0
    print("\nwall time per job (s): " + ", ".join(f"{n} {walls[n]:.1f}" for n in names if n in walls)
          + f"; total {total:.1f} (with set-up)")

    if args.command == "record":
        merged = dict(before or {}) if args.jobs else {}
        merged.update(entries)
        out.write_text(dump(merged))
        print(f"recorded {len(entries)} job(s) in {out}")
        return 0

    failed = False
    missing = [] if args.jobs else sorted(set(before) - set(names))
    for name in names:
        if name in errors:
            print(f"{name}: FAILED: {errors[name]}")
            failed = True
        elif name not in before:
            print(f"{name}: not in {out} (record it first)")
            failed = True
        else:
            diff = differences(before[name], entries[name])
            print(f"{name}: " + ("identical" if not diff else "DIFFERENT"))
            for line in diff:
                print(f"    {line}")
            failed |= bool(diff)
    for name in missing:
        print(f"{name}: recorded but no longer under jobs/")
        failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
