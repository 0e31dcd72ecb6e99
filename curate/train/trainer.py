"""Supervised fine-tuning (LoRA by default, or full) on curated records.

A small explicit torch loop rather than HF Trainer: it is short, every example is
formatted by `curate.formatting.encode` (so a training loss means what a scorer's loss
means), and resuming is exact: the batch plan is a pure function of the data and the
seed (`curate.train.data`), and a checkpoint holds weights, optimizer, scheduler, torch
RNG and the step index (`curate.train.checkpoints`). An interrupted run continues the
same run: same data order, same result as an uninterrupted one, to float tolerance.

Loss: mean NLL over the response tokens of an optimizer step, token-weighted across its
micro-batches (see `curate.train.loss`); prompt tokens and padding contribute nothing.

Precision: where `curate.models.pick_dtype` says bf16 (CUDA, or CPUs with AMX /
avx512_bf16), the forward runs under bf16 autocast. Master weights stay float32: LoRA
loads the frozen base in bf16 and keeps the adapter in float32; full fine-tuning keeps the
whole model in float32. fp16 is refused (it would need loss scaling).

Defaults: LoRA r=16, alpha=32, no dropout, on every linear projection of attention and
MLP (peft "all-linear": not the LM head), lr 2e-4 for LoRA (the common QLoRA/Alpaca-LoRA
setting; adapters need a higher rate than full weights) and 2e-5 for full fine-tuning,
AdamW, cosine schedule with 3% warmup, gradient clipping at 1.0.

Memory and speed: the LM head runs only on the positions that predict a response token,
in chunks (`curate.models.lm_head`), so the batch x length x vocabulary logits never
exist; on CPU each example is its own forward (`forward_tokens`), unpadded. LoRA dropout
is off by default because on CPU its masks cost more than the adapted layer's matmul.
Measured against HF Trainer and TRL: benchmarks/RESULTS_train.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from curate import __version__
from curate.config import ConfigError, make_step
from curate.formatting import TEMPLATES, TURNS
from curate.models.batching import pad_id as tokenizer_pad_id
from curate.train import checkpoints as ckpts
from curate.train.data import (Tokenized, collate, load_records, plan_steps, read_examples, split_by_tokens,
                               tokenize, with_response_tokens)
from curate.train.loading import DTYPES, load_model, resolve_device_dtype
from curate.train.loss import (autocast_for, batch_nll, evaluate_tokenized,
                               generate_samples)

log = logging.getLogger("curate.train")

METHODS = ("lora", "full")
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
DEFAULT_LR = {"lora": 2e-4, "full": 2e-5}
# On CPU one example per forward: no padding, so no attention mask and SDPA keeps its
# causal kernel, and activations of one sequence at a time (benchmarks/RESULTS_train.md).
# On a GPU, whole micro-batches fill the device.
DEFAULT_FORWARD_TOKENS = {"cpu": 1, "cuda": 0}
# Forward widths are rounded up to this many tokens (see `collate`): on CPU, a kernel per
# distinct length cost more than the few padded positions.
PAD_MULTIPLE = 32

# Config fields that change what a run computes: a checkpoint made under other values of
# these is a different run and is not resumed. (Where checkpoints go, evaluation and
# logging do not change the trained weights.)
_RUN_FIELDS = ("model", "template", "turns", "max_length", "method", "lora_r", "lora_alpha",
               "lora_dropout", "target_modules", "lr", "epochs", "max_steps", "batch_size",
               "batch_tokens", "grad_accum", "group_by_length", "warmup_ratio", "scheduler",
               "weight_decay", "max_grad_norm", "seed")


@dataclass
class TrainConfig:
    """Everything a training run needs besides its data. The job YAML's `train:` section
    maps onto these fields one to one (`TrainConfig.from_dict`)."""

    model: str = "default"            # "default" (embedded SmolLM2-135M-Instruct), HF id or path
    template: str = "plain"           # "plain" | "chat" (curate.formatting)
    turns: str = "all"                # chat: loss on "all" assistant turns or the "last" one
    max_length: int = 1024            # tokens; longer examples are truncated and counted
    method: str = "lora"              # "lora" | "full"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0        # dropout on adapter inputs: on CPU it costs more than the step
    target_modules: list[str] | str | None = None  # None: "all-linear" (attention + MLP)
    lr: float | None = None           # None: 2e-4 for LoRA, 2e-5 for full fine-tuning
    epochs: int = 1
    max_steps: int | None = None      # when set, decides the run's length (overrides epochs)
    batch_size: int = 8               # examples per micro-batch ...
    batch_tokens: int | None = None   # ... or, when set, padded tokens per micro-batch
    grad_accum: int = 1               # micro-batches per optimizer step
    # forward/backward pieces of each micro-batch, at most this many padded tokens (longest
    # x rows) each; the gradient is the same (token-weighted over the step), only the peak
    # memory and the padding change. None: by device (DEFAULT_FORWARD_TOKENS); 0: whole.
    forward_tokens: int | None = None
    group_by_length: bool = True      # length-grouped batches: less padding
    warmup_ratio: float = 0.03
    scheduler: str = "cosine"
    weight_decay: float = 0.0         # on matrices only, never on biases / norms
    max_grad_norm: float = 1.0
    seed: int = 0
    save_every: int | None = 100      # steps between periodic checkpoints (None: none)
    keep_checkpoints: int | None = 2  # newest periodic checkpoints kept (None: all)
    checkpoint_steps: list[int] | None = None  # steps always saved and kept (S2L)
    num_checkpoints: int | None = None  # or: this many evenly spaced over the run, kept
    eval_every: int | None = None     # steps between held-out evaluations during training
    eval_batch_tokens: int = 4096
    n_samples: int = 0                # greedy generations for this many eval prompts
    max_new_tokens: int = 64
    gradient_checkpointing: bool = False
    device: str = "auto"
    dtype: str = "auto"               # "auto" | "bf16" | "fp32"
    trust_remote_code: bool = False
    threads: int | None = None        # torch CPU threads (process-wide); None leaves torch's
    log_every: int = 10

    def __post_init__(self):
        if self.template not in TEMPLATES:
            raise ValueError(f"template: {self.template!r}, expected one of {TEMPLATES}")
        if self.turns not in TURNS:
            raise ValueError(f"turns: {self.turns!r}, expected one of {TURNS}")
        if self.method not in METHODS:
            raise ValueError(f"method: {self.method!r}, expected one of {METHODS}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler: {self.scheduler!r}, expected one of {SCHEDULERS}")
        if str(self.dtype).lower() not in DTYPES:
            raise ValueError(f"dtype: {self.dtype!r}: training runs in bf16 (autocast, float32 "
                             f"master weights) or fp32; expected one of {sorted(DTYPES)}")
        for name in ("max_length", "lora_r", "batch_size", "grad_accum", "epochs",
                     "eval_batch_tokens", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.forward_tokens is not None and self.forward_tokens < 0:
            raise ValueError("forward_tokens must be >= 0 or unset")
        for name in ("max_steps", "batch_tokens", "save_every", "eval_every", "num_checkpoints",
                     "threads"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise ValueError(f"{name} must be >= 1 or unset")
        if self.keep_checkpoints is not None and self.keep_checkpoints < 0:
            raise ValueError("keep_checkpoints must be >= 0 or unset (keep all)")
        if self.checkpoint_steps is not None:
            self.checkpoint_steps = sorted({int(s) for s in self.checkpoint_steps})
            if self.checkpoint_steps and self.checkpoint_steps[0] < 1:
                raise ValueError("checkpoint_steps must be >= 1")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError("warmup_ratio must be in [0, 1)")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["lr"] = self.learning_rate
        return d

    @classmethod
    def from_dict(cls, d: dict | None) -> "TrainConfig":
        return make_step(cls, dict(d or {}), "train")


def _prepare_model(model, cfg: TrainConfig):
    """Wrap with LoRA (trainable adapter in float32) or make every weight trainable."""
    if cfg.method == "lora":
        from peft import LoraConfig, get_peft_model

        for p in model.parameters():
            p.requires_grad_(False)
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=cfg.target_modules or "all-linear", task_type="CAUSAL_LM")
        torch.manual_seed(cfg.seed)  # adapter init
        model = get_peft_model(model, lora)
        for p in model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
    else:
        model = model.float()
        for p in model.parameters():
            p.requires_grad_(True)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _optimizer(model, cfg: TrainConfig):
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.learning_rate)


def _scheduler(optimizer, cfg: TrainConfig, total_steps: int):
    from transformers import get_scheduler

    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    return get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=warmup,
                         num_training_steps=total_steps)


# ---------------------------------------------------------------- the run


def _fingerprint(cfg: TrainConfig, tok: Tokenized) -> str:
    d = cfg.to_dict()
    run = {k: d[k] for k in _RUN_FIELDS}
    blob = json.dumps(run, sort_keys=True, default=str) + tok.fingerprint()
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def _save_steps(cfg: TrainConfig, total_steps: int) -> set[int]:
    steps = set(cfg.checkpoint_steps or [])
    if cfg.num_checkpoints:
        steps |= set(ckpts.evenly_spaced_steps(total_steps, cfg.num_checkpoints))
    return {s for s in steps if s <= total_steps}


def train(data: Any, cfg: TrainConfig, output_dir: str | os.PathLike, eval_data: Any = None,
          resume: bool = True, *, model=None, tokenizer=None,
          on_step: Callable[[int, dict], None] | None = None, progress: bool = True) -> dict:
    """Fine-tune `cfg.model` on `data` and return the run's metrics (also written to
    `output_dir/metrics.json`).

    data, eval_data: a `datasets.Dataset`, a `save_to_disk` directory, a JSONL(.gz) file
        or a list of record dicts (`curate.train.data.load_records`).
    resume: continue from the newest checkpoint in `output_dir` when there is one (it must
        be the same run: same config and data); False starts over, deleting them.
    model, tokenizer: an already loaded model to train in place instead of `cfg.model`.
    on_step: called as on_step(step, record) after each optimizer step and its checkpoint.
    Writes `output_dir/adapter/` (LoRA; `peft.PeftModel.from_pretrained(base, it)`) or
    `output_dir/model/` (full), `checkpoints/step-XXXXXX/`, `metrics.json`.

    What a user can get wrong is a `ConfigError`, raised before `output_dir` is created or
    touched: a run directory that overlaps the data (`checkpoints.check_run_dir`), no examples, no
    example with a response token left after truncation to `max_length` (examples with
    none are left out, with a warning, and counted in `n_train_no_response`), checkpoints
    in `output_dir` of a different run.
    """
    wall_start = time.perf_counter()
    if cfg.threads:
        # On a CPU shared with other work, one thread per process can beat two several times
        # over: OpenMP's barriers wait for whichever thread the scheduler has parked.
        torch.set_num_threads(cfg.threads)
    out = Path(output_dir)
    ckpts.check_run_dir(out, [d for d in (data, eval_data) if isinstance(d, (str, os.PathLike))])
    records = read_examples(data, "training data")
    if eval_data is not None:
        eval_data = read_examples(eval_data, "held-out data")
    device, compute_dtype = resolve_device_dtype(cfg.device, cfg.dtype)
    if model is None:
        load_dtype = compute_dtype if cfg.method == "lora" else torch.float32
        model, tokenizer = load_model(cfg.model, device=device, dtype=load_dtype,
                                      trust_remote_code=cfg.trust_remote_code)
    elif tokenizer is None:
        raise ValueError("pass the tokenizer with the model")
    model.to(device)
    pad_id = tokenizer_pad_id(tokenizer)
    autocast_dtype = compute_dtype if compute_dtype == torch.bfloat16 else None

    all_tok = tokenize(records, tokenizer, cfg.template, cfg.max_length, cfg.turns)
    tok = with_response_tokens(all_tok, "training data", cfg.max_length)
    eval_tok = None
    if eval_data is not None:
        eval_tok = with_response_tokens(tokenize(eval_data, tokenizer, cfg.template, cfg.max_length, cfg.turns),
                                  "held-out data", cfg.max_length)
    eval_records = []
    if eval_data is not None and cfg.n_samples:
        eval_records = list(load_records(eval_data, limit=cfg.n_samples))

    plan = plan_steps(tok.lengths, seed=cfg.seed, epochs=cfg.epochs, max_steps=cfg.max_steps,
                      batch_size=cfg.batch_size, batch_tokens=cfg.batch_tokens,
                      grad_accum=cfg.grad_accum, group_by_length=cfg.group_by_length)
    total_steps = len(plan)
    fingerprint = _fingerprint(cfg, tok)
    save_steps = _save_steps(cfg, total_steps)
    metrics_path = out / "metrics.json"
    if resume and metrics_path.is_file():
        done = json.loads(metrics_path.read_text())
        if done.get("completed") and done.get("fingerprint") == fingerprint:
            log.info("%s: this run is already complete; returning its metrics", out)
            return done
    existing = ckpts.list_checkpoints(out) if resume else []
    saved = ckpts.load_trainer_state(existing[-1][1]) if existing else None
    if saved is not None and saved.get("fingerprint") != fingerprint:
        # "different run": curate.train.proxy recognises this error by these words
        raise ConfigError(f"{output_dir} holds checkpoints of a different run (other config or data); "
                          f"choose another --output, or delete that directory to start over")

    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        for name in (ckpts.CHECKPOINTS, "adapter", "model", "metrics.json"):
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    torch.manual_seed(cfg.seed)
    model = _prepare_model(model, cfg)
    optimizer = _optimizer(model, cfg)
    scheduler = _scheduler(optimizer, cfg, total_steps)
    trainable = [p for p in model.parameters() if p.requires_grad]
    state: dict[str, Any] = {"step": 0, "epoch": 0, "fingerprint": fingerprint, "train_curve": [],
                             "eval_curve": [], "eval_before": None, "samples_before": [],
                             "train_time_s": 0.0, "tokens": 0, "response_tokens": 0,
                             "padded_tokens": 0, "resumed_from": []}
    if saved is not None:
        step0, path = existing[-1]
        ckpts.load_trainable_weights(model, path, cfg.method)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        ckpts.set_rng_state(saved["rng"])
        state.update({k: saved[k] for k in state if k in saved})
        state["resumed_from"] = list(state["resumed_from"]) + [step0]
        log.info("resuming %s from step %d of %d", out, step0, total_steps)
    if eval_tok is not None and state["eval_before"] is None:
        state["eval_before"] = evaluate_tokenized(model, eval_tok, pad_id,
                                                  batch_tokens=cfg.eval_batch_tokens,
                                                  autocast_dtype=autocast_dtype)
        log.info("held-out loss before training: %.4f", state["eval_before"]["loss"])
        if eval_records:
            state["samples_before"] = generate_samples(model, tokenizer, eval_records, cfg.template,
                                                       cfg.max_length, cfg.max_new_tokens)

    from tqdm.auto import tqdm

    lengths = tok.lengths
    response_lens = tok.response_lens
    forward_tokens = cfg.forward_tokens
    if forward_tokens is None:
        forward_tokens = DEFAULT_FORWARD_TOKENS.get(torch.device(device).type, 0)
    model.train()
    bar = tqdm(total=total_steps, initial=state["step"], disable=not progress, desc="train",
               unit="step", dynamic_ncols=True)
    try:
        while state["step"] < total_steps:
            step_plan = plan[state["step"]]
            t0 = time.perf_counter()
            n_resp = int(sum(response_lens[i] for mb in step_plan.micro_batches for i in mb))
            step_nll = 0.0
            step_tokens = step_padded = 0
            for mb in (piece for mb in step_plan.micro_batches
                       for piece in split_by_tokens(mb, lengths, forward_tokens)):
                batch = {k: v.to(device) for k, v in collate(tok, mb, pad_id, PAD_MULTIPLE).items()}
                with autocast_for(model, autocast_dtype):
                    nll, _ = batch_nll(model, batch)
                # token-weighted mean over the whole optimizer step, across micro-batches
                (nll / n_resp).backward()
                step_nll += float(nll.detach())
                step_tokens += int(lengths[list(mb)].sum())
                step_padded += batch["input_ids"].numel()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0

            state["step"] += 1
            state["epoch"] = step_plan.epoch
            state["train_time_s"] += dt
            state["tokens"] += step_tokens
            state["response_tokens"] += n_resp
            state["padded_tokens"] += step_padded
            record = {"step": state["step"], "epoch": step_plan.epoch, "loss": step_nll / n_resp,
                      "lr": lr, "grad_norm": grad_norm, "tokens": step_tokens,
                      "tokens_per_s": step_tokens / dt}
            state["train_curve"].append(record)
            step = state["step"]
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}",
                            tok_s=f"{state['tokens'] / state['train_time_s']:.0f}")
            if step % cfg.log_every == 0 or step == total_steps:
                log.info("step %d/%d loss %.4f lr %.2e tokens/s %.0f", step, total_steps,
                         record["loss"], lr, state["tokens"] / state["train_time_s"])

            if eval_tok is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                ev = evaluate_tokenized(model, eval_tok, pad_id, batch_tokens=cfg.eval_batch_tokens,
                                        autocast_dtype=autocast_dtype)
                state["eval_curve"].append({"step": step, **ev})
                log.info("step %d held-out loss %.4f", step, ev["loss"])

            if step in save_steps or (cfg.save_every and step % cfg.save_every == 0):
                ckpts.save_checkpoint(out, step, model, cfg.method, optimizer, scheduler,
                                      dict(state), tokenizer=tokenizer)
                ckpts.prune_checkpoints(out, cfg.keep_checkpoints, save_steps)
            if on_step is not None:
                on_step(step, record)
    finally:
        bar.close()
    model.eval()
    metrics = {
        "completed": True,
        "fingerprint": fingerprint,
        "output_dir": str(out),
        "config": cfg.to_dict(),
        "device": device,
        "compute_dtype": str(compute_dtype).removeprefix("torch."),
        "n_train": len(tok),
        "n_train_truncated": tok.n_truncated,
        "n_train_no_response": len(all_tok) - len(tok),  # left out: nothing left to learn
        "steps": total_steps,
        "epochs_run": (plan[-1].epoch + 1) if plan else 0,
        "trainable_params": sum(p.numel() for p in trainable),
        "total_params": sum(p.numel() for p in model.parameters()),
        "train_tokens": state["tokens"],
        "train_response_tokens": state["response_tokens"],
        "padding_fraction": 1.0 - state["tokens"] / max(state["padded_tokens"], 1),
        "train_time_s": state["train_time_s"],
        "tokens_per_s": state["tokens"] / max(state["train_time_s"], 1e-9),
        "train_loss_first": state["train_curve"][0]["loss"] if state["train_curve"] else None,
        "train_loss_last": state["train_curve"][-1]["loss"] if state["train_curve"] else None,
        "train_curve": state["train_curve"],
        "eval_curve": state["eval_curve"],
        "resumed_from": state["resumed_from"],
        "checkpoints": [s for s, _ in ckpts.list_checkpoints(out)],
        "versions": _versions(),
    }
    if eval_tok is not None:
        metrics["n_eval"] = len(eval_tok)
        metrics["eval_before"] = state["eval_before"]
        metrics["eval_after"] = evaluate_tokenized(model, eval_tok, pad_id,
                                                   batch_tokens=cfg.eval_batch_tokens,
                                                   autocast_dtype=autocast_dtype)
        log.info("held-out loss %.4f -> %.4f", metrics["eval_before"]["loss"],
                 metrics["eval_after"]["loss"])
        if eval_records:
            metrics["samples"] = [
                {**before, "generated_before": before["generated"], "generated": after["generated"]}
                for before, after in zip(state["samples_before"],
                                         generate_samples(model, tokenizer, eval_records,
                                                          cfg.template, cfg.max_length,
                                                          cfg.max_new_tokens))]
    final = ckpts.save_weights(model, out, cfg.method, tokenizer)
    metrics["weights"] = str(final)
    metrics["wall_time_s"] = time.perf_counter() - wall_start  # this invocation
    _write_json(metrics_path, metrics)
    return metrics


def _versions() -> dict:
    import peft
    import transformers

    return {"curate": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}


def run_train(data_path: str | os.PathLike, model: str = "default",
              output_dir: str | os.PathLike = "train_out", eval_path: str | os.PathLike | None = None,
              *, limit: int | None = None, eval_limit: int | None = None, resume: bool = True,
              progress: bool = True, **overrides) -> dict:
    """What `curate train` calls: read the data (a `curate run` output directory, any
    `save_to_disk` directory, or a JSONL(.gz) of records / alpaca / qa / messages rows),
    take the first `limit` (and `eval_limit`) examples, train with `TrainConfig(model=model,
    **overrides)` and return the metrics."""
    cfg = TrainConfig.from_dict({"model": model, **overrides})
    for name, value in (("limit", limit), ("eval_limit", eval_limit)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be >= 1 or unset")
    ckpts.check_run_dir(output_dir, [p for p in (data_path, eval_path) if p is not None])
    data = read_examples(data_path, "training data", limit)
    eval_data = read_examples(eval_path, "held-out data", eval_limit) if eval_path is not None else None
    return train(data, cfg, output_dir, eval_data=eval_data, resume=resume, progress=progress)
