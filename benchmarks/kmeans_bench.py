"""k-means for the diversity selector (and S2L): speed and memory on this machine.

Part 1, synthetic: N x 384 float32 vectors (default 1M; unit-norm like sentence
embeddings, drawn around 2,000 random directions), then what the pipeline does:
  - train centroids with faiss on a uniform sample (the pipeline's `sample_size`,
    default 100k), for each K;
  - assign every row to its nearest centroid in batches of 1,024 (the DoFn's batches)
    with the same flat index the Beam DoFn builds: rows/s over all N;
  - the Beam AssignClusters step itself on a slice of the rows (record dicts made inside
    a local-runner pipeline, the pipeline timed with and without the step, embeddings as
    lists and as NumPy arrays), so the step's per-row cost is visible next to faiss';
  - K by silhouette over a grid on the first `search_rows` (20k) sample rows.
Peak memory is the process's peak RSS (ru_maxrss) after each phase; the vectors alone
are N x 384 x 4 bytes (1.5 GB for 1M).

Part 2, the real pool (--real): `curate score jobs/diversity.yaml` (embeddings with the
embedded MiniLM), then `curate select --method diversity` from the stored scores (no
model): the selection time, and the source mix / purity of the clusters.

    python benchmarks/kmeans_bench.py                      # both parts, ~10 min on 2 cores
    python benchmarks/kmeans_bench.py --rows 200000 --no-real

Writes benchmarks/results/kmeans_bench.json (and prints it).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import machine_info  # noqa: E402
from curate.selectors.shared import kmeans as km  # noqa: E402


class Timer:
    """Wall and process CPU seconds (CPU time is what other load on a shared machine
    does not inflate much; faiss' threads add up in it)."""

    def __enter__(self):
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = round(time.perf_counter() - self.w, 2)
        self.cpu = round(time.process_time() - self.c, 2)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def machine() -> dict:
    import faiss

    return {**machine_info(), "faiss": faiss.__version__, "faiss_gpus": faiss.get_num_gpus(),
            "faiss_threads": faiss.omp_get_max_threads()}


def synthetic(n: int, d: int, seed: int = 0, centres: int = 2000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=(centres, d)).astype(np.float32)
    mu /= np.linalg.norm(mu, axis=1, keepdims=True)
    x = np.empty((n, d), np.float32)
    step = 100_000
    for s in range(0, n, step):
        m = min(step, n - s)
        idx = rng.integers(centres, size=m)
        block = mu[idx] + 0.08 * rng.standard_normal((m, d), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        x[s:s + m] = block
    return x


def bench_synthetic(args) -> dict:
    out: dict = {"rows": args.rows, "dim": args.dim, "sample_size": args.sample, "niter": args.niter,
                 "batch": 1024}
    with Timer() as t:
        x = synthetic(args.rows, args.dim)
    out["generate_s"] = t.wall
    out["data_mb"] = round(x.nbytes / 2**20, 1)
    out["rss_after_data_mb"] = round(rss_mb(), 1)
    rng = np.random.default_rng(1)
    sample = x[rng.choice(len(x), size=min(args.sample, len(x)), replace=False)]
    runs = []
    for k in args.k:
        r = {"k": k}
        with Timer() as t:
            km.kmeans_plusplus_init(sample, k, 0)
        r["kmeans++_init_s"], r["kmeans++_init_cpu_s"] = t.wall, t.cpu
        with Timer() as t:
            centroids = km.train_centroids(sample, k, seed=0, niter=args.niter)
        # train includes its own k-means++ init
        r["train_s"], r["train_cpu_s"] = t.wall, t.cpu
        r["peak_rss_after_train_mb"] = round(peak_rss_mb(), 1)
        index = km.flat_index(centroids)
        counts = np.zeros(k, np.int64)
        with Timer() as t:
            for s in range(0, len(x), 1024):
                labels, _ = km.search(index, x[s:s + 1024])
                counts += np.bincount(labels, minlength=k)
        r["assign_all_s"], r["assign_all_cpu_s"] = t.wall, t.cpu
        r["assign_rows_per_s"] = round(len(x) / t.wall)
        r["peak_rss_after_assign_mb"] = round(peak_rss_mb(), 1)
        r["cluster_size_min_median_max"] = [int(counts.min()), int(np.median(counts)), int(counts.max())]
        runs.append(r)
        print(json.dumps(r), flush=True)
    out["runs"] = runs
    if args.grid:
        with Timer() as t:
            best, scores = km.choose_k_by_silhouette(sample[:args.search_rows], args.grid, seed=0,
                                                     niter=args.niter)
        out["silhouette"] = {"grid": args.grid, "rows": min(args.search_rows, len(sample)), "best_k": best,
                             "scores": {str(k): round(v, 4) for k, v in scores.items()},
                             "time_s": t.wall, "cpu_s": t.cpu}
        print(json.dumps(out["silhouette"]), flush=True)
    out["beam_assign"] = bench_beam_assign(x[:args.beam_rows], args.k[0], sample)
    out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return out


def _bench_rows(chunk: int, dim: int, per_chunk: int, as_list: bool):
    """`per_chunk` record dicts with unit-norm vectors, made inside the pipeline from a
    seed: a beam.Create of the rows (or a side argument holding the vectors) would pickle
    and bz2-compress every vector into the graph, which costs more than the step measured."""
    block = np.random.default_rng(chunk).standard_normal((per_chunk, dim)).astype(np.float32)
    block /= np.linalg.norm(block, axis=1, keepdims=True)
    for i, v in enumerate(block):
        key = chunk * per_chunk + i
        yield {"id": f"r{key}", "origin": f"bench:{key}", "embedding": v.tolist() if as_list else v}


def bench_beam_assign(x: np.ndarray, k: int, sample: np.ndarray) -> dict:
    """AssignClusters (the Beam step) on record dicts through the local runner: the same
    pipeline (rows made in a DoFn, reshuffled, counted) with and without the step, so the
    difference is the step's own CPU per row; embeddings as lists of floats (what the
    embedding scorer and the readers carry today) and as NumPy arrays."""
    import apache_beam as beam

    from curate.pipeline.run import pipeline_options

    model = km.fit_model(sample[:20_000], k, seed=0, niter=5)
    per_chunk = 1000
    chunks = list(range(-(-len(x) // per_chunk)))  # rows: len(x) rounded up to per_chunk

    def run(assign: bool, as_list: bool) -> Timer:
        with Timer() as t:
            with beam.Pipeline(options=pipeline_options([])) as p:
                rows = (p | "Chunks" >> beam.Create(chunks)
                        | "Rows" >> beam.FlatMap(_bench_rows, x.shape[1], per_chunk, as_list)
                        | "Spread" >> beam.Reshuffle())
                if assign:
                    m = p | "Model" >> beam.Create([model])
                    rows = (rows | km.AssignClusters(m, "embedding"))["assigned"]
                _ = rows | beam.combiners.Count.Globally()
        return t

    res = {"rows": len(x), "k": k}
    for name, as_list in (("list", True), ("numpy", False)):
        base, step = run(False, as_list), run(True, as_list)
        per_row_us = (step.cpu - base.cpu) / len(x) * 1e6
        res[name] = {"pipeline_cpu_s": base.cpu, "with_assign_cpu_s": step.cpu, "with_assign_wall_s": step.wall,
                     "assign_cpu_us_per_row": round(per_row_us, 1),
                     "assign_rows_per_cpu_s": round(1e6 / per_row_us) if per_row_us > 0 else None}
    print(json.dumps(res), flush=True)
    return res


def children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def bench_real(args) -> dict:
    """Score the job's pool once (embeddings), then select from the stored scores."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    curate = [sys.executable, "-m", "curate.cli"]
    from curate.config import load_job

    job = load_job(str(ROOT / args.job))
    # the job's own score store when it has one (what `curate run` filled), else a fresh one
    scores = ROOT / (job.scores or "runs/bench-diversity-scores")
    out: dict = {"job": args.job, "scores": str(scores.relative_to(ROOT))}
    if not (scores / "manifest.json").exists() or args.rescore:
        cmd = curate + ["score", args.job, "--output", str(scores)]
        t, c = time.perf_counter(), children_cpu_s()
        subprocess.run(cmd, check=True, cwd=ROOT, env=env)
        out["score_cmd"] = "curate " + " ".join(cmd[3:]).replace(str(ROOT) + "/", "")
        out["score_wall_s"] = round(time.perf_counter() - t, 1)
        out["score_cpu_s"] = round(children_cpu_s() - c, 1)
    m = json.loads((scores / "manifest.json").read_text())
    out["pool_rows"] = m["counts"]["kept"]
    out["score_created"] = m.get("created")
    out["score_pipeline_s"] = m["timings_s"].get("pipeline")
    selections = []
    for extra in (["--set", "k=16"], ["--set", "k=auto"], ["--set", "k=16", "--set", "allocation=equal"]):
        dest = ROOT / "runs" / f"bench-diversity-select-{'-'.join(e.split('=')[1] for e in extra[1::2])}"
        cmd = curate + ["select", "--scores", str(scores), "--method", "diversity", "--budget", "300",
                        *extra, "--output", str(dest)]
        t, c = time.perf_counter(), children_cpu_s()
        subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
        wall, cpu = time.perf_counter() - t, children_cpu_s() - c
        sm = json.loads((dest / "manifest.json").read_text())
        selections.append({"cmd": "curate " + " ".join(cmd[3:]).replace(str(ROOT) + "/", ""),
                           "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
                           "pipeline_s": sm["timings_s"].get("pipeline"),
                           "kept": sm["counts"]["kept"], **mix_and_purity(dest)})
        print(json.dumps(selections[-1]), flush=True)
    out["selections"] = selections
    return out


def mix_and_purity(out_dir: Path) -> dict:
    import datasets

    kept = datasets.load_from_disk(str(out_dir))
    rej = datasets.load_from_disk(str(out_dir / "rejected"))
    clusters = list(kept["cluster"]) + list(rej["cluster"])  # datasets 4 gives Column objects
    sources = list(kept["source"]) + list(rej["source"])
    pairs = [(c, s) for c, s in zip(clusters, sources) if c is not None]
    by: dict = {}
    for c, s in pairs:
        by.setdefault(c, Counter())[s] += 1
    purity = sum(v.most_common(1)[0][1] for v in by.values()) / len(pairs)
    return {"k": len(by), "purity": round(purity, 4), "kept_sources": dict(Counter(list(kept["source"]))),
            "kept_clusters_covered": len(set(list(kept["cluster"])))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--sample", type=int, default=100_000)
    ap.add_argument("--k", type=int, nargs="+", default=[100, 1024])
    ap.add_argument("--niter", type=int, default=20)
    ap.add_argument("--grid", type=int, nargs="*", default=[64, 128, 256, 512])
    ap.add_argument("--search-rows", type=int, default=20_000)
    ap.add_argument("--beam-rows", type=int, default=20_000)
    ap.add_argument("--no-real", dest="real", action="store_false")
    ap.add_argument("--no-synthetic", dest="synthetic", action="store_false")
    ap.add_argument("--rescore", action="store_true")
    ap.add_argument("--job", default="jobs/diversity.yaml")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "kmeans_bench.json"))
    args = ap.parse_args()
    res = {"machine": machine(), "command": "python " + " ".join(sys.argv).replace(str(ROOT) + "/", ""),
           "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    if args.synthetic:
        res["synthetic"] = bench_synthetic(args)
    if args.real:
        res["real_pool"] = bench_real(args)
    res["machine"]["load_avg_at_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
