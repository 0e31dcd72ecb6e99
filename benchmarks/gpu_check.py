"""One prepared check of curate's model stages on an accelerator, for when a GPU is lent.

    python benchmarks/gpu_check.py                  # embedded SmolLM2-135M and MiniLM, cuda when present
    python benchmarks/gpu_check.py --target 1b      # a 1.07B Llama-shaped target, random weights
    python benchmarks/gpu_check.py --model DIR --embedder DIR --device cpu --rows 12   # the test's tiny run

On the device (`--device`: cuda when torch sees one, else cpu), in one process:
  matmul    the measured n x n matmul rate in bf16 (fp32 where a CPU has no native bf16):
            the ceiling MFU is read against; on a known GPU its datasheet dense bf16 peak too
  trainer   curate.train.train, LoRA, --train-steps steps of batch 8 on the rows, two
            checkpoints kept: tokens/s and MFU at 4 x parameters a token (forward 2N,
            backward to the activations 2N; as benchmarks/train_throughput.py counts)
  scorers   every model scorer, built as a job builds it and run through its worker-side
            `score_batch` (what RunInference calls): likelihood (GRAPE), ifd, weight_delta
            (DONOD), degradation (PASER, against a 50% magnitude-pruned copy), trajectory
            (S2L, over the trainer's checkpoints) and embedding. Rows/s, tokens/s and
            MFU = tokens/s x 2 x the parameters of every model a token goes through / the
            matmul rate (forward only: attention, and DONOD's head gradient, not counted)
  kmeans    faiss k-means as the diversity and S2L selectors run it (train_centroids and
            assign; faiss' GPU index when faiss-gpu is installed) on --kmeans-rows unit
            vectors of 384 dimensions
Each scorer scores --batch rows at a time until --rows are done or --seconds pass, after
one warm-up batch; the GPU is synchronised before each clock read.

Random weights (--target) give a model's speed, not its scores. That is also why the
check leaves `curate compare` out: no weights of a >= 1B model can reach a lent device
(no hub there, 64 MiB carried), and a comparison of random models measures nothing.
Writes --out (JSON; default benchmarks/results/gpu_check.json) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import machine_info  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
SOURCES = ("gsm8k_train.jsonl.gz", "codealpaca.jsonl.gz", "gpteacher_roleplay.jsonl.gz")
# dense bf16 FLOP/s from the datasheets (SXM parts), by a substring of the device name
DATASHEET_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12}
# Llama-shaped targets built with random weights and the embedded SmolLM2 tokenizer
TARGETS = {"1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8)}
SCORERS = ("likelihood", "ifd", "weight_delta", "degradation", "trajectory", "embedding")


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def compute_dtype(device: str):
    """bf16 on a GPU and on CPUs with native bf16; float32 elsewhere (as the scorers pick)."""
    import torch

    from curate.models.loading import pick_dtype

    return torch.bfloat16 if device.startswith("cuda") else pick_dtype(device, "auto")


def matmul_rate(device: str, n: int, seconds: float) -> dict:
    """FLOP/s of n x n matmuls in the compute dtype, over about `seconds` of calls."""
    import torch

    dtype = compute_dtype(device)
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    synchronize(device)
    started = time.perf_counter()
    a @ b
    synchronize(device)
    calls = max(3, int(seconds / max(time.perf_counter() - started, 1e-6)))
    started = time.perf_counter()
    for _ in range(calls):
        a @ b
    synchronize(device)
    elapsed = time.perf_counter() - started
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "calls": calls, "flops": 2 * n ** 3 * calls / elapsed}


def device_info(device: str) -> dict:
    import torch

    if not device.startswith("cuda"):
        return {"device": device, "name": "cpu", "datasheet_bf16_flops": None}
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in DATASHEET_BF16.items() if k in name), None)
    return {"device": device, "name": name, "memory_gb": round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1),
            "datasheet_bf16_flops": peak}


def make_target(size: str, path: Path) -> str:
    """A Llama of TARGETS[size] with random weights (bf16) and SmolLM2's tokenizer, saved as a
    model directory the scorers and the trainer load like any other."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from curate.models.loading import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model("default"))
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=4096, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None, **TARGETS[size])
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def load_rows(n: int) -> list[dict]:
    """n canonical records, taken in turn from SOURCES (short math, code, long role-play)."""
    from curate.train import read_jsonl_records

    per = math.ceil(n / len(SOURCES))
    lists = [read_jsonl_records(DATA / name, limit=per) for name in SOURCES]
    rows = [r for group in zip(*lists) for r in group]
    return rows[:n]


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def check_trainer(model: str, rows: list[dict], device: str, out: Path, steps: int, rate: float) -> dict:
    from curate.train import TrainConfig, train

    cfg = TrainConfig(model=model, max_steps=steps, batch_size=8, num_checkpoints=2, save_every=None,
                      device=device, log_every=max(steps, 1))
    m = train(rows, cfg, out)
    return {"stage": "trainer (LoRA)", "rows": m["n_train"], "steps": m["steps"], "seconds": m["train_time_s"],
            "tokens": m["train_tokens"], "tokens_per_s": m["tokens_per_s"], "params": m["total_params"],
            "flops_per_token": 4 * m["total_params"], "mfu": m["tokens_per_s"] * 4 * m["total_params"] / rate,
            "checkpoints": m["checkpoints"], "output_dir": str(out)}


def build_scorer(name: str, model: str, embedder: str, pruned: str, checkpoints: str, device: str):
    from curate.scorers import make_scorer

    extra = {"embedding": {"model": embedder}, "degradation": {"model": model, "pruned_model": pruned},
             "trajectory": {"model": model, "checkpoints": checkpoints}}.get(name, {"model": model})
    return make_scorer({"type": name, "device": device, **extra})


def counted_tokens(name: str, scorer, loaded, records: list[dict], reported: int) -> int:
    """Tokens a batch put through the model: what the scorer reports (IFD: both passes;
    S2L: every checkpoint); the embedder reports none, so its inputs are counted here."""
    if name != "embedding":
        return reported
    from curate.scorers.embedding import record_text

    texts = [record_text(r, scorer.field) for r in records]
    return sum(len(ids) for ids in loaded.tokenizer(texts, truncation=True, max_length=scorer.max_length)["input_ids"])


def check_scorer(name: str, scorer, rows: list[dict], batch: int, seconds: float, device: str, rate: float) -> dict:
    loaded = scorer.load()
    models = [getattr(loaded, a) for a in ("model", "original", "pruned") if hasattr(loaded, a)]
    params = sum(n_params(m) for m in models)
    scorer.score_batch(loaded, rows[:batch])  # warm-up: kernels, allocator
    synchronize(device)
    done = tokens = 0
    started = time.perf_counter()
    while done < len(rows) and time.perf_counter() - started < seconds:
        records = rows[done:done + batch]
        out, reported = scorer.score_batch(loaded, records)
        synchronize(device)
        if len(out) != len(records):
            raise RuntimeError(f"{name}: {len(records)} rows in, {len(out)} out")
        done += len(records)
        tokens += counted_tokens(name, scorer, loaded, records, reported)
    elapsed = time.perf_counter() - started
    per_s = tokens / elapsed
    return {"stage": name, "rows": done, "seconds": elapsed, "tokens": tokens, "rows_per_s": done / elapsed,
            "tokens_per_s": per_s, "params": params, "flops_per_token": 2 * params,
            "mfu": per_s * 2 * params / rate, "columns": sorted(scorer.output_columns())}


def check_kmeans(rows: int, k: int, seed: int = 0) -> dict:
    from curate.selectors.shared.kmeans import assign, train_centroids, use_gpu

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, 384)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    started = time.perf_counter()
    centroids = train_centroids(x, k, seed=seed, niter=20)
    trained = time.perf_counter()
    labels, _ = assign(x, centroids)
    done = time.perf_counter()
    return {"stage": "kmeans", "rows": rows, "k": k, "gpu": use_gpu("auto"), "train_s": trained - started,
            "assign_s": done - trained, "assign_rows_per_s": rows / (done - trained),
            "clusters_used": int(len(np.unique(labels)))}


def table(result: dict) -> str:
    lines = ["| stage | rows | tokens/s | rows/s | params | MFU |", "|---|---|---|---|---|---|"]
    for s in result["stages"]:
        rows_per_s = f"{s['rows_per_s']:,.1f}" if "rows_per_s" in s else "-"
        lines.append(f"| {s['stage']} | {s['rows']:,} | {s['tokens_per_s']:,.0f} | {rows_per_s} | "
                     f"{s['params']:,} | {100 * s['mfu']:.1f}% |")
    km = result["kmeans"]
    lines.append(f"\nkmeans ({'GPU' if km['gpu'] else 'CPU'} faiss): {km['rows']:,} x 384, K={km['k']}: "
                 f"train {km['train_s']:.2f} s, assign {km['assign_rows_per_s']:,.0f} rows/s")
    mm = result["matmul"]
    lines.append(f"matmul {mm['dtype']} n={mm['n']}: {mm['flops'] / 1e12:.2f} TFLOP/s measured"
                 + (f", datasheet {result['device']['datasheet_bf16_flops'] / 1e12:.0f}"
                    if result["device"]["datasheet_bf16_flops"] else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--model", default="default", help="the causal LM (name or directory)")
    ap.add_argument("--target", choices=sorted(TARGETS), help="instead of --model: random weights of this size")
    ap.add_argument("--embedder", default="minilm")
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=256, help="rows per score_batch call")
    ap.add_argument("--seconds", type=float, default=30.0, help="per scorer, after its warm-up batch")
    ap.add_argument("--train-steps", type=int, default=30)
    ap.add_argument("--matmul-n", type=int, default=0, help="0: 8192 on a GPU, 2048 on a CPU")
    ap.add_argument("--matmul-seconds", type=float, default=3.0)
    ap.add_argument("--kmeans-rows", type=int, default=200_000)
    ap.add_argument("--kmeans-k", type=int, default=1024)
    ap.add_argument("--scorers", default=",".join(SCORERS))
    ap.add_argument("--work-dir", help="models and checkpoints (default: a temporary folder)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check.json"))
    args = ap.parse_args(argv)

    from curate.models.loading import pick_device
    from curate.prune import make_pruned_copy

    device = pick_device(args.device)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    model = make_target(args.target, work / f"target-{args.target}") if args.target else args.model
    rows = load_rows(args.rows)
    n = args.matmul_n or (8192 if device.startswith("cuda") else 2048)
    rate = matmul_rate(device, n, args.matmul_seconds)
    result = {"command": "python benchmarks/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": machine_info(), "device": device_info(device), "model": model, "matmul": rate,
              "stages": []}
    started = time.perf_counter()
    result["stages"].append(check_trainer(model, rows, device, work / "train", args.train_steps, rate["flops"]))
    pruned = str(work / "pruned")
    scorers = [s for s in args.scorers.split(",") if s]
    if "degradation" in scorers and not Path(pruned).is_dir():
        make_pruned_copy(model, "magnitude", pruned, 0.5, device=device)
    for name in scorers:
        scorer = build_scorer(name, model, args.embedder, pruned, str(work / "train"), device)
        result["stages"].append(check_scorer(name, scorer, rows, args.batch, args.seconds, device, rate["flops"]))
        print(f"{name}: {result['stages'][-1]['tokens_per_s']:,.0f} tokens/s", flush=True)
    result["kmeans"] = check_kmeans(args.kmeans_rows, args.kmeans_k)
    result["total_s"] = time.perf_counter() - started
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(table(result))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
