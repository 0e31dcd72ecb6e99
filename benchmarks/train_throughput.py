"""Trainer throughput and memory: curate's trainer against what a user would otherwise run.

    python benchmarks/train_throughput.py                     # 256 GSM8K rows, all three
    python benchmarks/train_throughput.py --rows 32 --only curate   # a quick look

The same rows (the first `--rows` of gsm8k_train), the same tokens (the plain template
`Question: {q}\\nAnswer: {a}` + EOS, loss on the answer and EOS only) and the same
settings (LoRA r=16, alpha 32, no dropout, on every linear layer of attention and MLP;
batch 8; max_length 1024; one epoch; lr 2e-4, cosine, 3% warmup; AdamW; bf16 autocast
where the CPU has native bf16, float32 otherwise; seed 0), trained three ways:

  curate   curate.train.train (LM head on response positions only, chunked loss)
  hf       transformers.Trainer on input_ids/labels with -100 on the prompt: the usual
           response-only recipe (DataCollatorForSeq2Seq pads the labels with -100)
  trl      trl.SFTTrainer on prompt/completion columns (completion-only loss, TRL's
           default for that format), peft_config for the adapter

Each runs in a child process of its own, so its peak resident set (ru_maxrss: model,
data, activations, everything) is its own. Reported: tokens per CPU-second of the
training call (CPU time of the process, so a busy shared machine does not count against
a run), tokens per wall-second, peak RSS, the per-step loss curve and its last value.
The machine's bf16 (or float32) matmul rate per CPU-second gives the fraction of the
hardware limit, counting 4 x parameters FLOPs per token (LoRA: forward 2N, backward to the
activations 2N; attention and adapters left out).

Writes benchmarks/results/train_throughput.{json,md}; RESULTS_train.md quotes them.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = pathlib.Path(os.environ.get("CURATE_DATA", ROOT.parent / "shared" / "data"))
TRAINERS = ("curate", "hf", "trl")
SETTINGS = {"lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "batch_size": 8, "max_length": 1024,
            "epochs": 1, "lr": 2e-4, "warmup_ratio": 0.03, "scheduler": "cosine", "seed": 0}


def gsm8k_records(n: int) -> list[dict]:
    from curate.records import ADAPTERS, adapt

    out = []
    with gzip.open(DATA / "gsm8k_train.jsonl.gz", "rt") as fh:
        for i, line in enumerate(fh):
            if i >= n:
                break
            out.extend(adapt(json.loads(line), ADAPTERS["qa"], {}, "gsm8k_train"))
    return out


def load_base(dtype):
    """The embedded SmolLM2-135M-Instruct (converted once by `curate models prepare`)."""
    from curate.models import load_causal_lm

    return load_causal_lm("default", device="cpu", dtype=dtype)


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=SETTINGS["lora_r"], lora_alpha=SETTINGS["lora_alpha"],
                      lora_dropout=SETTINGS["lora_dropout"], target_modules="all-linear",
                      task_type="CAUSAL_LM")


def run_curate(records, bf16: bool, workdir: str) -> dict:
    from curate.train import TrainConfig, train

    cfg = TrainConfig(model="default", template="plain", method="lora", save_every=None,
                      dtype="bf16" if bf16 else "fp32", log_every=1000, **SETTINGS)
    c0, t0 = time.process_time(), time.perf_counter()
    m = train(records, cfg, workdir, resume=False, progress=False)
    return {"cpu_s": time.process_time() - c0, "wall_s": time.perf_counter() - t0,
            "curve": [r["loss"] for r in m["train_curve"]], "padding_fraction": m["padding_fraction"],
            "note": "includes model load and saving the adapter"}


def _hf_args(cls, bf16: bool, workdir: str, **extra):
    return cls(output_dir=workdir, per_device_train_batch_size=SETTINGS["batch_size"],
               num_train_epochs=SETTINGS["epochs"], learning_rate=SETTINGS["lr"],
               lr_scheduler_type=SETTINGS["scheduler"], warmup_steps=SETTINGS["warmup_ratio"],  # a ratio when < 1
               seed=SETTINGS["seed"], bf16=bf16, use_cpu=True, logging_steps=1, save_strategy="no",
               report_to=[], dataloader_num_workers=0, disable_tqdm=True, **extra)


def _curve(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def run_hf(records, bf16: bool, workdir: str) -> dict:
    import datasets
    import torch
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from curate.formatting import encode

    c0, t0 = time.process_time(), time.perf_counter()
    model, tok = load_base("float32")  # float32 master weights, bf16 autocast by the Trainer
    rows = []
    for r in records:
        e = encode(r, tok, "plain", SETTINGS["max_length"])
        rows.append({"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids),
                     "labels": [-100] * e.prompt_len + e.input_ids[e.prompt_len:]})
    torch.manual_seed(SETTINGS["seed"])
    model = get_peft_model(model, lora_config())
    trainer = Trainer(model=model, args=_hf_args(TrainingArguments, bf16, workdir),
                      train_dataset=datasets.Dataset.from_list(rows),
                      data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
    trainer.train()
    return {"cpu_s": time.process_time() - c0, "wall_s": time.perf_counter() - t0, "curve": _curve(trainer),
            "note": "includes model load and tokenisation"}


def run_trl(records, bf16: bool, workdir: str) -> dict:
    import datasets
    import torch
    from trl import SFTConfig, SFTTrainer

    from curate.formatting import split_text

    c0, t0 = time.process_time(), time.perf_counter()
    model, tok = load_base("float32")
    rows = [dict(zip(("prompt", "completion"), split_text(r, tok, "plain"))) for r in records]
    args = _hf_args(SFTConfig, bf16, workdir, max_length=SETTINGS["max_length"], completion_only_loss=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tok, peft_config=lora_config())
    trainer.train()
    return {"cpu_s": time.process_time() - c0, "wall_s": time.perf_counter() - t0, "curve": _curve(trainer),
            "note": "includes model load and tokenisation"}


def child(name: str, rows: int, threads: int) -> dict:
    import torch

    from curate.formatting import encode
    from curate.models import cpu_has_native_bf16, load_tokenizer

    torch.set_num_threads(threads)
    records = gsm8k_records(rows)
    tok = load_tokenizer("default")
    tokens = sum(len(encode(r, tok, "plain", SETTINGS["max_length"]).input_ids) for r in records)
    bf16 = cpu_has_native_bf16()
    with tempfile.TemporaryDirectory() as workdir:
        res = {"curate": run_curate, "hf": run_hf, "trl": run_trl}[name](records, bf16, workdir)
    res.update(trainer=name, rows=len(records), tokens=tokens, bf16=bf16, threads=threads,
               peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
               tokens_per_cpu_s=tokens / res["cpu_s"], tokens_per_wall_s=tokens / res["wall_s"],
               final_loss=res["curve"][-1] if res["curve"] else None)
    return res


def matmul_gflops(bf16: bool, threads: int, n: int = 2048, reps: int = 10) -> float:
    import torch

    torch.set_num_threads(threads)
    dt = torch.bfloat16 if bf16 else torch.float32
    a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
    a @ b
    c0 = time.process_time()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.process_time() - c0) / 1e9


def markdown(res: dict) -> str:
    runs = res["runs"]
    lines = [f"# Trainer throughput: {res['rows']} GSM8K rows, LoRA r=16 all-linear, batch 8, max_length 1024",
             "", f"Command: `{res['command']}`", "", f"Machine: {res['machine']}", "",
             f"Matmul limit: {res['matmul_gflops_per_cpu_s']:.0f} GFLOP per CPU-second "
             f"({'bf16' if res['bf16'] else 'float32'}, {res['threads']} threads); "
             f"4 x {res['params'] / 1e6:.0f}M FLOP per token.", "",
             "| trainer | tokens per CPU-s | tokens per wall-s | peak RSS (GB) | final loss | "
             "mean loss, last 5 steps | % of matmul limit |", "|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        tail = r["curve"][-5:]
        frac = 100 * r["tokens_per_cpu_s"] * 4 * res["params"] / 1e9 / res["matmul_gflops_per_cpu_s"]
        lines.append(f"| {name} | {r['tokens_per_cpu_s']:.0f} | {r['tokens_per_wall_s']:.0f} | "
                     f"{r['peak_rss_gb']:.2f} | {r['final_loss']:.4f} | {sum(tail) / len(tail):.4f} | {frac:.0f}% |")
    if "curate" in runs:
        for other in ("hf", "trl"):
            if other in runs:
                c, o = runs["curate"], runs[other]
                lines.append(f"\ncurate vs {other}: {c['tokens_per_cpu_s'] / o['tokens_per_cpu_s']:.2f}x tokens "
                             f"per CPU-second, {c['peak_rss_gb'] / o['peak_rss_gb']:.2f}x the peak RSS.")
    # curate's batches are length-grouped, so its step t holds other rows than the
    # others' step t: compare the curve over windows of steps
    window = 8
    steps = max(len(r["curve"]) for r in runs.values())
    lines += ["", f"Training loss, mean over windows of {window} steps (a step's loss depends on which rows "
              "it holds; curate groups rows by length, the others do not):", "",
              "| steps | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
    for s in range(0, steps, window):
        cells = [f"{sum(r['curve'][s:s + window]) / len(r['curve'][s:s + window]):.4f}"
                 if s < len(r["curve"]) else "" for r in runs.values()]
        lines.append(f"| {s + 1}-{min(s + window, steps)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2, help="torch threads in each run")
    ap.add_argument("--only", default=",".join(TRAINERS), help="comma-separated: curate,hf,trl")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--child", choices=TRAINERS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.rows, args.threads)), flush=True)
        return
    from benchmarks.machine import machine_info
    from curate.models import cpu_has_native_bf16

    bf16 = cpu_has_native_bf16()
    res = {"command": "python benchmarks/train_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "machine": machine_info(), "rows": args.rows, "threads": args.threads, "bf16": bf16,
           "matmul_gflops_per_cpu_s": matmul_gflops(bf16, args.threads), "settings": SETTINGS, "runs": {}}
    model, _ = load_base("float32")
    res["params"] = sum(p.numel() for p in model.parameters())
    del model
    for name in args.only.split(","):
        print(f"--- {name}", flush=True)
        proc = subprocess.run([sys.executable, __file__, "--child", name, "--rows", str(args.rows),
                               "--threads", str(args.threads)], capture_output=True, text=True)
        found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not found:
            raise SystemExit(f"{name} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
        res["runs"][name] = json.loads(found[-1][len("RESULT "):])
        r = res["runs"][name]
        print(f"{name}: {r['tokens_per_cpu_s']:.0f} tokens/CPU-s, peak RSS {r['peak_rss_gb']:.2f} GB, "
              f"final loss {r['final_loss']:.4f}", flush=True)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_throughput.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "train_throughput.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
