"""The trainer's done-when run: LoRA SFT of the embedded SmolLM2-135M-Instruct on GSM8K.

    python benchmarks/train_gsm8k.py --out /tmp/train_gsm8k [--model default]

Trains on the first 200 rows of gsm8k_train, measures held-out response-token loss on the
first 100 rows of gsm8k_test before and after, saves the adapter, and checks that it
reloads with peft. Results: benchmarks/RESULTS_train.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path

DATA = Path(os.environ.get("CURATE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--out", default="/tmp/train_gsm8k")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--eval-limit", type=int, default=100)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-resume", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    import torch

    from curate.train import run_train

    t0 = time.perf_counter()
    m = run_train(DATA / "gsm8k_train.jsonl.gz", model=args.model, output_dir=args.out,
                  eval_path=DATA / "gsm8k_test.jsonl.gz", limit=args.limit,
                  eval_limit=args.eval_limit, resume=not args.no_resume,
                  max_length=args.max_length, lr=args.lr, batch_size=args.batch_size,
                  grad_accum=args.grad_accum, save_every=5, keep_checkpoints=1, n_samples=3,
                  log_every=1, threads=args.threads)
    wall = time.perf_counter() - t0

    # the adapter reloads with peft onto a fresh base
    from peft import PeftConfig

    PeftConfig.from_pretrained(str(Path(args.out) / "adapter"))
    summary = {
        "command": "python benchmarks/train_gsm8k.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v not in (False, None)),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "load_avg_end": os.getloadavg()},
        "wall_time_s": round(wall, 1),
        "train_time_s": round(m["train_time_s"], 1),
        "tokens_per_s": round(m["tokens_per_s"], 1),
        "train_tokens": m["train_tokens"],
        "train_response_tokens": m["train_response_tokens"],
        "steps": m["steps"],
        "padding_fraction": round(m["padding_fraction"], 3),
        "n_train": m["n_train"], "n_eval": m["n_eval"],
        "truncated": m["n_train_truncated"],
        "eval_loss_before": m["eval_before"]["loss"], "eval_loss_after": m["eval_after"]["loss"],
        "ppl_before": m["eval_before"]["ppl"], "ppl_after": m["eval_after"]["ppl"],
        "eval_tokens": m["eval_after"]["n_tokens"],
        "train_loss_first_last": [m["train_loss_first"], m["train_loss_last"]],
        "resumed_from": m["resumed_from"],
    }
    print(json.dumps(summary, indent=2))
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
