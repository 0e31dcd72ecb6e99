"""Likelihood-scorer throughput against plain Hugging Face loops, and GRAPE pick agreement
between the bf16 and fp32 scorers.

    python benchmarks/scorer_throughput.py [--rows N] [--out benchmarks/results/scorer_throughput.json]

On the default causal LM (SmolLM2-135M-Instruct, converted once by `curate models
prepare`), on short rows (gsm8k_train) and long rows (alpaca_eval_pool outputs), it times:

  loop_fp32       per example: model(ids).logits -> log_softmax -> gather, float32
  loop_bf16       the same loop in bfloat16
  padded_unsorted batches of --padded-batch rows in input order (no length sort), full
                  logits, in the scorer's dtype: what batching alone buys
  scorer          curate's LikelihoodScorer runner: dtype by hardware (bf16 where the CPU
                  has avx512_bf16/AMX), token-budget batches after a length sort, LM head on
                  response positions only, one-row forwards padded to a multiple of 32
                  tokens on CPU; fed --beam-batch records at a time, as RunInference would
  scorer_exact_widths  the same with every forward at the row's own length (the scorer
                  before widths were rounded: one oneDNN kernel shape per length)

Each method runs in a fresh process (so peak RSS is its own), over the same rows in the
same order, timed after one warm-up example, stopping early at --time-cap seconds (a
method that stops early is marked partial; its tokens/s is over the rows it finished).
Tokens are real (unpadded) prompt + response tokens. The hardware limit is the measured
matmul rate: fraction = tokens/s x 2 x n_params / matmul FLOP/s of that dtype.

GRAPE agreement: --grape-instructions instructions of alpaca_eval_pool, all 10 candidates
each, scored by the scorer in float32 and in bfloat16 (each capped at --grape-time-cap);
the share of instructions whose best candidate (argmax mean response log-prob) is the same.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gzip
import json
import math
import multiprocessing
import os
import pathlib
import random
import resource
import sys
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import machine_info  # noqa: E402

DATA = pathlib.Path(os.environ.get("CURATE_DATA", ROOT.parent / "shared" / "data"))
METHODS = ("loop_fp32", "loop_bf16", "padded_unsorted", "scorer", "scorer_exact_widths")


# ---------------------------------------------------------------- data

def read_jsonl(path: pathlib.Path) -> list[dict]:
    with gzip.open(path, "rt") as handle:
        return [json.loads(line) for line in handle]


def short_rows(n: int, seed: int) -> list[dict]:
    from curate.records import adapt_qa

    rows = random.Random(seed).sample(read_jsonl(DATA / "gsm8k_train.jsonl.gz"), n)
    return [r for row in rows for r in adapt_qa(row, {}, "gsm8k_train")]


def pool_rows() -> list[dict]:
    """The pool's valid rows (a few outputs are empty: the reader dead-letters those)."""
    from curate.records import RowError, adapt_alpaca

    out = []
    for row in read_jsonl(DATA / "alpaca_eval_pool.jsonl.gz"):
        try:
            out.extend(adapt_alpaca(row, {}, "alpaca_eval_pool"))
        except RowError:
            pass
    return out


def long_rows(n: int, seed: int) -> list[dict]:
    return random.Random(seed).sample(pool_rows(), n)


def grape_rows(n_instructions: int, seed: int) -> list[dict]:
    """All candidates of n instructions, grouped by instruction (groups in random order)."""
    groups: dict[str, list[dict]] = {}
    for r in pool_rows():
        groups.setdefault(r["prompt_id"], []).append(r)
    chosen = random.Random(seed).sample(sorted(groups), n_instructions)
    return [r for pid in chosen for r in groups[pid]]


# ---------------------------------------------------------------- machine

def cpu_seconds() -> float:
    """User + system CPU time of this process so far (all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def matmul_flops(dtype_name: str, n: int = 2048, min_seconds: float = 2.0,
                 max_seconds_per_call: float = 2.0) -> dict:
    """FLOP/s of n x n matmuls. Grows from 256 to n, stopping early where one call would
    take longer than max_seconds_per_call (emulated bf16 on CPUs without native support)."""
    import torch

    dtype = getattr(torch, dtype_name)
    size = 256
    while True:
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        started = time.perf_counter()
        a @ b
        one_call = time.perf_counter() - started
        if size >= n or one_call * 8 > max_seconds_per_call:
            break
        size *= 2
    a @ b
    calls, started, cpu_started = 0, time.perf_counter(), cpu_seconds()
    while time.perf_counter() - started < min_seconds:
        a @ b
        calls += 1
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
    work = 2 * size ** 3 * calls
    return {"n": size, "calls": calls, "flops": work / seconds, "flops_per_cpu_s": work / cpu}


# ---------------------------------------------------------------- the methods (worker side)

def _loop(model, encoded, budget):
    import torch

    out = []
    for e in encoded:
        if budget():
            break
        ids = torch.tensor([e.input_ids])
        with torch.inference_mode():
            logits = model(ids).logits[0]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        targets = ids[0, e.prompt_len:]
        token = logprobs[e.prompt_len - 1: -1].gather(1, targets[:, None]).squeeze(1)
        out.append((token.sum().item(), token.mean().item(), len(targets)))
    return out


def _padded(model, encoded, budget, batch_size, pad_id):
    import torch

    out = []
    for start in range(0, len(encoded), batch_size):
        if budget():
            break
        batch = encoded[start: start + batch_size]
        width = max(len(e.input_ids) for e in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, e in enumerate(batch):
            ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
            mask[i, : len(e.input_ids)] = 1
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        for i, e in enumerate(batch):
            n = len(e.input_ids)
            targets = ids[i, e.prompt_len: n]
            token = logprobs[i, e.prompt_len - 1: n - 1].gather(1, targets[:, None]).squeeze(1)
            out.append((token.sum().item(), token.mean().item(), len(targets)))
    return out


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class _PeakRSS:
    """Samples RSS every 20 ms while a block runs."""

    def __enter__(self):
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def run_method(spec: dict) -> dict:
    """One method over one row set, in this (fresh) process."""
    import torch

    from curate.formatting import encode
    from curate.models import load_causal_lm, pick_dtype
    from curate.scorers.likelihood import LikelihoodScorer

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    method, records, cap = spec["method"], spec["records"], spec["time_cap"]
    auto = str(pick_dtype("cpu")).replace("torch.", "")
    dtype = {"loop_fp32": "float32", "loop_bf16": "bfloat16"}.get(method, spec.get("dtype") or auto)
    if method == "scorer_exact_widths":
        import curate.models.logprobs

        curate.models.logprobs.CPU_WIDTH_MULTIPLE = 1
    if method.startswith("scorer"):
        runner = LikelihoodScorer(model=spec["model"], dtype=dtype, device="cpu").load_runner()
        model, tokenizer = runner.loaded.model, runner.loaded.tokenizer
    else:
        model, tokenizer = load_causal_lm(spec["model"], device="cpu", dtype=dtype)
    encoded = [encode(r, tokenizer, "plain", 2048) for r in records]
    warm = min(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    deadline = [math.inf]

    def budget():
        return time.perf_counter() > deadline[0]

    def run(subset_records, subset_encoded):
        if method in ("loop_fp32", "loop_bf16"):
            return _loop(model, subset_encoded, budget)
        if method == "padded_unsorted":
            return _padded(model, subset_encoded, budget, spec["padded_batch"],
                           tokenizer.pad_token_id or 0)
        out = []
        step = spec["beam_batch"]
        for start in range(0, len(subset_records), step):
            if budget():
                break
            for r in runner.score(subset_records[start: start + step]):
                out.append((r["logprob_sum"], r["logprob_mean"], r["n_response_tokens"]))
        return out

    run([records[warm]], [encoded[warm]])  # warm-up, untimed
    with _PeakRSS() as rss:
        started, cpu_started = time.perf_counter(), cpu_seconds()
        deadline[0] = started + cap
        scores = run(records, encoded)
        seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
    done = len(scores)
    tokens = sum(len(e.input_ids) for e in encoded[:done])
    return {
        "method": method, "dtype": dtype, "rows": len(records), "rows_done": done,
        "complete": done == len(records), "tokens": tokens,
        "mean_tokens_per_row": sum(len(e.input_ids) for e in encoded) / len(encoded), "seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds else None,
        "cpu_seconds": cpu, "tokens_per_cpu_s": tokens / cpu if cpu else None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "scoring_rss_increase_mb": (rss.peak - rss.start) / 2**20,
        "n_params": sum(p.numel() for p in model.parameters()),
        "scores": [{"id": r["id"], "prompt_id": r["prompt_id"], "mean": s[1], "n": s[2]}
                   for r, s in zip(records, scores)],
    }


def in_fresh_process(spec: dict) -> dict:
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(run_method, spec).result()


# ---------------------------------------------------------------- driver

def max_abs_diff(a: list[dict], b: list[dict]) -> float | None:
    bm = {s["id"]: s["mean"] for s in b}
    diffs = [abs(s["mean"] - bm[s["id"]]) for s in a if s["id"] in bm]
    return max(diffs) if diffs else None


def grape_agreement(fp32: list[dict], bf16: list[dict]) -> dict:
    def best(scores):
        groups: dict[str, list[dict]] = {}
        for s in scores:
            groups.setdefault(s["prompt_id"], []).append(s)
        return {pid: max(g, key=lambda s: s["mean"])["id"] for pid, g in groups.items()
                if len(g) >= 2}

    counts: dict[str, int] = {}
    for s in fp32:
        counts[s["prompt_id"]] = counts.get(s["prompt_id"], 0) + 1
    done_b = {}
    for s in bf16:
        done_b[s["prompt_id"]] = done_b.get(s["prompt_id"], 0) + 1
    # only instructions whose candidates were all scored by both
    complete = {p for p, c in counts.items() if done_b.get(p) == c}
    a = {p: v for p, v in best(fp32).items() if p in complete}
    b = {p: v for p, v in best(bf16).items() if p in complete}
    same = sum(a[p] == b[p] for p in a)
    return {"instructions_compared": len(a), "same_pick": same,
            "agreement": same / len(a) if a else None,
            "max_abs_diff_mean_logprob": max_abs_diff(fp32, bf16)}


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=64, help="short rows (gsm8k_train)")
    parser.add_argument("--long-rows", type=int, default=32, help="long rows (alpaca_eval_pool)")
    parser.add_argument("--grape-instructions", type=int, default=20)
    parser.add_argument("--time-cap", type=float, default=40.0, help="seconds per method and row set")
    parser.add_argument("--grape-time-cap", type=float, default=120.0, help="seconds per dtype")
    parser.add_argument("--padded-batch", type=int, default=8)
    parser.add_argument("--beam-batch", type=int, default=64)
    parser.add_argument("--model", default="default")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scorer_throughput.json"))
    parser.add_argument("--md", default=str(ROOT / "benchmarks" / "RESULTS_scorer.md"))
    args = parser.parse_args(argv)

    from curate.models import prepare_default_models

    if args.model == "default":
        prepare_default_models()  # convert before timing anything
    started = time.time()
    result = {"command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
              "settings": {k: v for k, v in vars(args).items() if k not in ("out", "md")},
              "machine": machine_info(), "load_average_start": load_average()}
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
        result["machine"]["torch_threads"] = args.threads
    print("machine:", result["machine"], "load:", result["load_average_start"], flush=True)
    result["matmul"] = {d: matmul_flops(d) for d in ("float32", "bfloat16")}
    print("matmul GFLOP/s:", {d: round(v["flops"] / 1e9, 1) for d, v in result["matmul"].items()},
          flush=True)

    base = {"model": args.model, "time_cap": args.time_cap, "padded_batch": args.padded_batch,
            "beam_batch": args.beam_batch, "threads": args.threads}
    rowsets = {"short (gsm8k_train)": short_rows(args.rows, args.seed),
               "long (alpaca_eval_pool)": long_rows(args.long_rows, args.seed)}
    result["rowsets"] = {}
    for name, records in rowsets.items():
        entry = {"rows": len(records), "methods": {}}
        for method in args.methods.split(","):
            r = in_fresh_process({**base, "method": method, "records": records})
            flops = result["matmul"][r["dtype"]]["flops"]
            r["fraction_of_limit"] = r["tokens_per_s"] * 2 * r["n_params"] / flops
            r["fraction_of_limit_cpu"] = (r["tokens_per_cpu_s"] * 2 * r["n_params"]
                                          / result["matmul"][r["dtype"]]["flops_per_cpu_s"])
            entry["methods"][method] = r
            print(f"{name:>24} {method:>16} {r['dtype']:>9} {r['tokens_per_s']:8.1f} tok/s "
                  f"{r['tokens_per_cpu_s']:8.1f} tok/CPU-s "
                  f"rows {r['rows_done']}/{r['rows']} rss {r['peak_rss_mb']:.0f} MB", flush=True)
        methods = entry["methods"]
        if "loop_fp32" in methods:
            ref = methods["loop_fp32"]
            for r in methods.values():
                r["speedup_vs_loop_fp32"] = r["tokens_per_s"] / ref["tokens_per_s"]
                r["cpu_speedup_vs_loop_fp32"] = r["tokens_per_cpu_s"] / ref["tokens_per_cpu_s"]
                r["max_abs_diff_mean_vs_loop_fp32"] = max_abs_diff(r["scores"], ref["scores"])
        entry["mean_tokens_per_row"] = next(iter(methods.values()))["mean_tokens_per_row"]
        result["rowsets"][name] = entry

    if args.grape_instructions > 0:
        records = grape_rows(args.grape_instructions, args.seed)
        grape = {"instructions": args.grape_instructions, "rows": len(records)}
        runs = {}
        for dtype in ("float32", "bfloat16"):
            # fed 10 rows (about one instruction's candidates) at a time, so the time cap
            # stops between instructions rather than after one long call
            runs[dtype] = in_fresh_process({**base, "method": "scorer", "dtype": dtype,
                                            "records": records, "time_cap": args.grape_time_cap,
                                            "beam_batch": 10})
            grape[dtype] = {k: runs[dtype][k] for k in ("rows_done", "tokens", "seconds",
                                                        "tokens_per_s", "complete")}
            print(f"grape {dtype}: {runs[dtype]['rows_done']}/{len(records)} rows, "
                  f"{runs[dtype]['tokens_per_s']:.1f} tok/s", flush=True)
        grape.update(grape_agreement(runs["float32"]["scores"], runs["bfloat16"]["scores"]))
        result["grape"] = grape
        print("grape agreement:", grape["agreement"], "over", grape["instructions_compared"],
              "instructions", flush=True)

    result["load_average_end"] = load_average()
    result["wall_seconds"] = time.time() - started
    for entry in result["rowsets"].values():
        for r in entry["methods"].values():
            r.pop("scores", None)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    if args.md:
        pathlib.Path(args.md).write_text(markdown(result))
    print(f"wrote {out}" + (f" and {args.md}" if args.md else ""))
    return 0


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Likelihood scorer throughput",
        "",
        f"Command: `{result['command']}` ({result['wall_seconds']:.0f} s wall).",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, native bf16: {m['native_bf16']}, "
        f"torch {m['torch']} ({m['torch_threads']} threads), transformers {m.get('transformers')}. "
        f"Load average (1/5/15 min) at start {result['load_average_start']}, "
        f"at end {result['load_average_end']}: the machine is shared, so treat absolute "
        "numbers as lower bounds and compare methods within a run.",
        "",
        "Matmul rate: " + ", ".join(
            f"{d} {v['flops'] / 1e9:.1f} GFLOP/s wall, {v['flops_per_cpu_s'] / 1e9:.1f} GFLOP "
            f"per CPU-second ({v['n']}x{v['n']})" for d, v in result["matmul"].items()) + ".",
        "",
        "tokens/s is wall-clock; tokens/CPU-s divides by the CPU time the process used, which "
        "on a shared machine is the steadier measure of work per token (with --threads 1 it is "
        "close to what one dedicated core would do). Fractions of the matmul limit are "
        "tokens x 2 x n_params over the matmul rate of the same dtype, each measured the same "
        "way (wall / CPU).",
        "",
    ]
    for name, entry in result["rowsets"].items():
        lines += [f"## {name}: {entry['rows']} rows, {entry['mean_tokens_per_row']:.0f} tokens "
                  "per row on average", "",
                  "| method | dtype | rows done | tokens | tokens/s | x loop_fp32 | tokens/CPU-s "
                  "| x loop_fp32 (CPU) | fraction of limit (wall / CPU) | peak RSS MB "
                  "| RSS increase while scoring MB | max abs diff of mean vs loop_fp32 |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for method, r in entry["methods"].items():
            diff = r.get("max_abs_diff_mean_vs_loop_fp32")
            lines.append(
                f"| {method} | {r['dtype']} | {r['rows_done']}/{r['rows']} | {r['tokens']} | "
                f"{r['tokens_per_s']:.1f} | {r.get('speedup_vs_loop_fp32', float('nan')):.2f} | "
                f"{r['tokens_per_cpu_s']:.1f} | {r.get('cpu_speedup_vs_loop_fp32', float('nan')):.2f} | "
                f"{r['fraction_of_limit']:.3f} / {r['fraction_of_limit_cpu']:.3f} | "
                f"{r['peak_rss_mb']:.0f} | "
                f"{r['scoring_rss_increase_mb']:.0f} | "
                f"{'n/a' if diff is None else f'{diff:.2e}'} |")
        lines.append("")
    g = result.get("grape")
    if g:
        agreement = "n/a" if g["agreement"] is None else f"{g['agreement']:.1%}"
        lines += ["## GRAPE picks: bf16 scorer vs fp32 scorer", "",
                  f"{g['instructions']} alpaca_eval_pool instructions x all candidates "
                  f"({g['rows']} rows). fp32: {g['float32']['rows_done']} rows in "
                  f"{g['float32']['seconds']:.0f} s ({g['float32']['tokens_per_s']:.1f} tok/s); "
                  f"bf16: {g['bfloat16']['rows_done']} rows in {g['bfloat16']['seconds']:.0f} s "
                  f"({g['bfloat16']['tokens_per_s']:.1f} tok/s).", "",
                  f"Same best candidate on {g['same_pick']} of {g['instructions_compared']} "
                  f"instructions scored completely by both "
                  f"(agreement {agreement}); "
                  f"max |mean log-prob difference| {g['max_abs_diff_mean_logprob']}.", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
