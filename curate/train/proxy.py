"""S2L's proxy run: fine-tune a small model on the whole pool and keep T checkpoints.

`train_proxy(records, output_dir, **options)` runs the trainer stage
(`curate.train.train`) with S2L's schedule on the pool's records. The trajectory
scorer's model stage (`curate.pipeline.model_stages`) reads them the way the pipeline reads
them (the same readers, adapters, validation and the job's filters, in read order), so
a proxy example is byte for byte the record the scorer later sees. The trainer resumes an interrupted run
and returns at once when the same run (config + data fingerprint) is already complete,
so calling this before every trajectory job costs a model load and a tokenisation, not
a retraining; checkpoints of a *different* run in `output_dir` are an error.

Defaults (PROXY_DEFAULTS), from the paper / authors' config (Pythia-70M, 3 epochs,
lr 2e-5 full fine-tuning, cosine, 3% warmup, batch 4 x 8 accumulation = 32, 512 tokens,
12 checkpoints kept) and where they differ:
- LoRA by default (the trainer's default; full fine-tuning with `method: full`, then
  lr 2e-5 as in the paper). LoRA's lr is the trainer's 2e-4: adapters need ~10x.
- T = 12 checkpoints, evenly spaced over the run (`num_checkpoints`), the last at the
  end; the authors save every 500 steps and keep the last 12. `checkpoint_steps: [...]`
  gives an explicit schedule instead. No periodic checkpoints (`save_every: null`).
- Batch: 8 examples x 4 micro-batches = 32 per step, as the authors' effective batch.
- On a CPU the job caps the run (`max_steps`) and the pool (`limit:`): see jobs/s2l.yaml.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from curate.config import ConfigError
from curate.train.trainer import TrainConfig, train

log = logging.getLogger("curate.train")

PROXY_DEFAULTS: dict[str, Any] = {
    "epochs": 3,
    "num_checkpoints": 12,
    "save_every": None,
    "keep_checkpoints": None,
    "batch_size": 8,
    "grad_accum": 4,
    "max_length": 512,
    "scheduler": "cosine",
    "warmup_ratio": 0.03,
}


def proxy_config(options: dict, model: str, template: str, max_length: int | None = None):
    """TrainConfig for the proxy run: PROXY_DEFAULTS < the scorer's model/template/length
    < the user's options."""

    options = dict(options)
    if "model" in options and options["model"] != model:
        raise ConfigError(f"proxy: model {options['model']!r} differs from the scorer's model "
                          f"{model!r}; the trajectories load the adapters onto that model")
    merged = {**PROXY_DEFAULTS, "model": model, "template": template}
    if max_length is not None:
        merged["max_length"] = max_length
    merged.update(options)
    if merged.get("checkpoint_steps") and "num_checkpoints" not in options:
        merged["num_checkpoints"] = None  # an explicit schedule replaces the even one
    try:
        return TrainConfig.from_dict(merged)
    except ValueError as exc:
        raise ConfigError(f"proxy: {exc}") from None


def train_proxy(records: list[dict], output_dir: str | Path, *, model: str = "default",
                template: str = "plain", max_length: int | None = None,
                progress: bool = True, **options) -> dict:
    """Train (or resume, or find complete) the proxy run; returns the trainer's metrics
    plus `proxy_wall_s` (this call's time)."""

    t0 = time.perf_counter()
    cfg = proxy_config(options, model, template, max_length)
    if not records:
        raise ConfigError("proxy: the pool is empty (after the job's filters)")
    log.info("proxy: %d examples -> %s (%s, %d checkpoints)", len(records), output_dir, cfg.method,
             len(cfg.checkpoint_steps or []) or cfg.num_checkpoints or 0)
    try:
        metrics = train(records, cfg, output_dir, resume=True, progress=progress)
    except ValueError as exc:
        if "different run" not in str(exc):
            raise
        raise ConfigError(f"proxy: {output_dir} holds checkpoints of another proxy run (other "
                          f"options or pool): delete it or set `checkpoints:` elsewhere") from None
    wanted = len(cfg.checkpoint_steps or []) or cfg.num_checkpoints or 0
    if len(metrics["checkpoints"]) < wanted:
        log.warning("proxy: %d checkpoints asked for, but a run of %d steps gives %d distinct "
                    "ones; lower batch_size / grad_accum or raise epochs for more steps",
                    wanted, metrics["steps"], len(metrics["checkpoints"]))
    return {**metrics, "proxy_wall_s": time.perf_counter() - t0}
