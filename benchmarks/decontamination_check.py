"""Decontamination check (issue 17): does the `decontaminate` filter catch evaluation
questions planted in a training file, and what does it find in the real one?

    python benchmarks/decontamination_check.py [--data ../shared/data] [--n 13]

1. Planted: 50 gsm8k_test questions (seeded draw) appended to gsm8k_train as training
   rows with an unrelated answer: a third verbatim, a third re-cased (upper case, commas
   turned into " ;"), a third wrapped in a sentence before and after. All must be caught.
2. Clean: gsm8k_train against gsm8k_test as shipped; the rows caught are real overlap,
   listed with the shared n-gram.
Both run `jobs/decontaminate.yaml`'s filter through the pipeline (curate.pipeline.run.run_job)
on the local runner. Writes benchmarks/RESULTS_decontamination.md and
benchmarks/results/decontamination.json.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pathlib
import random
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.machine import machine_info  # noqa: E402

WRAP = ("Here is a word problem for you to work through carefully.", "Please show each step of your working.")


def planted_rows(test_rows: list[dict], k: int = 50, seed: int = 0) -> list[tuple[str, dict]]:
    picks = random.Random(seed).sample(range(len(test_rows)), k)
    out = []
    for j, i in enumerate(picks):
        q = test_rows[i]["question"]
        kind = ("verbatim", "recased", "wrapped")[j % 3]
        text = q if kind == "verbatim" else q.upper().replace(",", " ;") if kind == "recased" else \
            f"{WRAP[0]} {q} {WRAP[1]}"
        out.append((kind, {"question": text, "answer": "I would need to think about that one. #### 0"}))
    return out


def run(train: str, eval_path: str, out: str, n: int) -> tuple[dict, list[dict], float]:
    import datasets

    from curate.config import parse_job
    from curate.pipeline.run import run_job

    job = parse_job({"name": "decontamination-check", "inputs": [{"path": train, "source": "gsm8k"}],
                     "output": out, "filters": [{"type": "decontaminate", "n": n,
                                                 "eval": [{"path": eval_path, "source": "gsm8k_test"}]}]})
    t0 = time.perf_counter()
    manifest = run_job(job, progress=False)
    seconds = time.perf_counter() - t0
    rejected = datasets.load_from_disk(os.path.join(out, "rejected")).to_list()
    return manifest, rejected, seconds


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=os.environ.get("CURATE_DATA", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--n", type=int, default=13)
    ap.add_argument("--results", default=str(ROOT / "benchmarks"))
    args = ap.parse_args(argv)
    data = pathlib.Path(args.data)
    with gzip.open(data / "gsm8k_test.jsonl.gz", "rt") as fh:
        test_rows = [json.loads(line) for line in fh]
    with gzip.open(data / "gsm8k_train.jsonl.gz", "rt") as fh:
        train_lines = fh.read().splitlines()
    plants = planted_rows(test_rows)
    with tempfile.TemporaryDirectory() as tmp:
        planted = os.path.join(tmp, "gsm8k_train_planted.jsonl")
        with open(planted, "w") as fh:
            fh.write("\n".join(train_lines + [json.dumps(r) for _, r in plants]) + "\n")
        first_planted = len(train_lines) + 1
        m_planted, rej_planted, s_planted = run(planted, str(data / "gsm8k_test.jsonl.gz"),
                                                os.path.join(tmp, "planted"), args.n)
        m_clean, rej_clean, s_clean = run(str(data / "gsm8k_train.jsonl.gz"), str(data / "gsm8k_test.jsonl.gz"),
                                          os.path.join(tmp, "clean"), args.n)

    def line(r):
        return int(r["origin"].rsplit(":", 1)[1])

    caught = {line(r) for r in rej_planted if line(r) >= first_planted}
    by_kind = {}
    for j, (kind, _) in enumerate(plants):
        by_kind.setdefault(kind, [0, 0])
        by_kind[kind][1] += 1
        by_kind[kind][0] += (first_planted + j) in caught
    clean = sorted(rej_clean, key=line)
    result = {
        "machine": machine_info(), "n": args.n,
        "planted": {"caught": len(caught), "of": len(plants), "by_kind": by_kind,
                    "other_rejects": len(rej_planted) - len(caught), "seconds": round(s_planted, 1),
                    "counts": m_planted["counts"]},
        "clean": {"rows": m_clean["counts"]["examples"], "rejected": len(clean), "seconds": round(s_clean, 1),
                  "examples": [{"origin": r["origin"], "reason": r["reject_reason"], "prompt": r["prompt"][:160]}
                               for r in clean]},
    }
    res = pathlib.Path(args.results)
    (res / "results").mkdir(parents=True, exist_ok=True)
    (res / "results" / "decontamination.json").write_text(json.dumps(result, indent=2, default=str))
    lines = ["# Decontamination check", "", "Command: `python benchmarks/decontamination_check.py`", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in result["machine"].items()), "",
             f"Filter: `decontaminate`, n = {args.n} words, gsm8k_train against gsm8k_test (questions and "
             "answers), local runner.", "",
             "## Planted test questions", "",
             "| kind | caught |", "|---|---|"]
    lines += [f"| {k} | {c} / {t} |" for k, (c, t) in by_kind.items()]
    lines += ["", f"**{len(caught)} of {len(plants)} planted questions caught** "
              f"({s_planted:.0f} s for {m_planted['counts']['examples']:,} rows).", "",
              "## The shipped training file", "",
              f"{len(clean)} of {m_clean['counts']['examples']:,} gsm8k_train rows share a {args.n}-gram with "
              f"gsm8k_test ({s_clean:.0f} s):", ""]
    lines += [f"- `{e['origin']}`: {e['reason']} (prompt: \"{e['prompt']}\")" for e in result["clean"]["examples"][:10]]
    if len(clean) > 10:
        lines.append(f"- ... {len(clean) - 10} more in results/decontamination.json")
    (res / "RESULTS_decontamination.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
