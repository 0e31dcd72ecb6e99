"""Resume check (issue 17): a GRAPE job killed part-way, rerun, against one uninterrupted run.

    python benchmarks/resume_check.py [--job jobs/grape.yaml] [--kill-after 0.5]

1. Uninterrupted: `curate run JOB --output A` (time T).
2. Killed: `curate run JOB --output B` in a subprocess, sent SIGKILL once the scorer's
   saved work holds `--kill-after` of the pool's rows (time to the kill).
3. Resumed: the same command again (time R): only the missing rows are scored.
Checks that B's kept and rejected shards equal A's byte for byte and that the manifest's
`from_saved` count is the number of rows saved before the kill. Writes
benchmarks/RESULTS_resume.md and benchmarks/results/resume.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.machine import machine_info  # noqa: E402


def curate(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "curate.cli", *args, "-q"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def shards(out: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("data-*.arrow"))}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--job", default="jobs/grape.yaml")
    ap.add_argument("--kill-after", type=float, default=0.5, help="share of the pool saved before the kill")
    ap.add_argument("--summary", default=str(ROOT / "benchmarks" / "RESULTS_resume.md"))
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "resume.json"))
    args = ap.parse_args(argv)

    from curate.config import load_job
    from curate.pipeline import saved_work
    from curate.scorers import make_scorer

    job = load_job(str(ROOT / args.job))
    (spec,) = job.scorers
    with tempfile.TemporaryDirectory(dir=ROOT / "runs" if (ROOT / "runs").is_dir() else None) as tmp:
        a, b = pathlib.Path(tmp) / "uninterrupted", pathlib.Path(tmp) / "resumed"
        t0 = time.perf_counter()
        proc = curate(["run", args.job, "--output", str(a)])
        assert proc.wait() == 0, proc.stderr.read().decode()[-2000:]
        uninterrupted_s = time.perf_counter() - t0
        manifest_a = json.loads((a / "manifest.json").read_text())
        pool = manifest_a["counts"]["examples"] - sum(manifest_a["counts"]["filtered"].values())

        store = saved_work.scorer_dir(saved_work.default_dir(str(b)), make_scorer(dict(spec)))
        t0 = time.perf_counter()
        proc = curate(["run", args.job, "--output", str(b)])
        while True:
            saved = sum(1 for s in saved_work.saved_shards(store) for _ in saved_work.read_shard(s))
            if saved >= args.kill_after * pool or proc.poll() is not None:
                break
            time.sleep(0.5)
        assert proc.poll() is None, "the run finished before the kill"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        killed_s = time.perf_counter() - t0
        saved = sum(1 for s in saved_work.saved_shards(store) for _ in saved_work.read_shard(s))

        t0 = time.perf_counter()
        proc = curate(["run", args.job, "--output", str(b)])
        assert proc.wait() == 0, proc.stderr.read().decode()[-2000:]
        resumed_s = time.perf_counter() - t0
        manifest_b = json.loads((b / "manifest.json").read_text())
        identical = shards(a) == shards(b)
    stage = next(iter(manifest_b["counts"]["from_saved"]))
    out = {"job": args.job, "rows_scored": pool, "saved_before_kill": saved,
           "from_saved": manifest_b["counts"]["from_saved"][stage],
           "uninterrupted_s": round(uninterrupted_s, 1), "killed_after_s": round(killed_s, 1),
           "resumed_s": round(resumed_s, 1), "identical_shards": identical,
           "kept": manifest_b["counts"]["kept"], "machine": machine_info()}
    pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.json).write_text(json.dumps(out, indent=2))
    write_summary(args.summary, out)
    print(json.dumps({k: v for k, v in out.items() if k != "machine"}, indent=2))
    return out


def write_summary(path: str, out: dict) -> None:
    m, pool, saved = out["machine"], out["rows_scored"], out["saved_before_kill"]
    lines = [
        "# Resume check",
        "",
        f"`python benchmarks/resume_check.py` ({out['job']}); {m['cpu']}, {m['cores']} cores, {m['mem_gb']} GB, "
        f"torch {m['torch']}.",
        "",
        "| run | wall time | rows scored |",
        "|---|---|---|",
        f"| uninterrupted | {out['uninterrupted_s']} s | {pool:,} |",
        f"| killed with SIGKILL once {saved:,} rows were saved | {out['killed_after_s']} s | {saved:,} saved |",
        f"| the same command again | {out['resumed_s']} s | {pool - out['from_saved']:,} "
        f"({out['from_saved']:,} from saved work) |",
        "",
        f"Kept and rejected shards of the resumed run equal the uninterrupted run's byte for byte: "
        f"{'yes' if out['identical_shards'] else 'NO'}. Killed + resumed: "
        f"{out['killed_after_s'] + out['resumed_s']:.1f} s against {out['uninterrupted_s']} s uninterrupted: what "
        "the kill cost is the rows scored after the last saved shard, and starting again (model load).",
    ]
    if out["from_saved"] != saved:
        lines += ["", f"{out['from_saved']:,} rows came from {saved:,} saved scores: saved work is addressed by "
                      "the conversation, and some rows of this pool repeat another row's conversation (same "
                      "instruction and response), so one saved score serves both."]
    pathlib.Path(path).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
