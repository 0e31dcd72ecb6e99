"""Checkpoints of a training run.

Layout, under the run's output directory:

    checkpoints/step-000040/
        adapter/            LoRA run: the adapter (peft `save_pretrained`), or
        model/              full fine-tuning: the whole model (`save_pretrained`)
        trainer_state.pt    optimizer, scheduler, torch RNG states, step, epoch, the
                            run fingerprint (data order + config), loss history so far
        state.json          the same step/epoch/loss, readable

A checkpoint is written to `step-XXXXXX.tmp` and renamed into place, so a directory
named `step-XXXXXX` is always complete. The trainer draws randomness only from torch
(dropout) and from its own seeded data-order generator, so restoring the torch RNG and
the step index restores the run exactly. `check_run_dir` refuses a run directory that
overlaps the data or holds the working, home or root directory, before anything is written.
"""

from __future__ import annotations

import json
import os
import logging
import re
import shutil
from pathlib import Path

import torch

from curate.config import ConfigError
from curate.paths import canonical_path, guarded_inside, overlap
from curate.train.loading import load_model

log = logging.getLogger("curate.train")

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"step-{step:06d}"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as (step, path), sorted by step."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def save_weights(model, path: Path, method: str, tokenizer=None) -> Path:
    """The trained weights where peft / transformers load them: `path/adapter` (LoRA) or
    `path/model` (full). Written beside and renamed in, so never half-written."""
    name = "adapter" if method == "lora" else "model"
    final = path / name
    tmp = path / f".{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    _replace_dir(tmp, final)
    return final


def save_checkpoint(output_dir: str | Path, step: int, model, method: str, optimizer,
                    scheduler, state: dict, tokenizer=None) -> Path:
    final = checkpoint_dir(output_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    # a full model is loaded on its own, so it carries its tokenizer; an adapter uses the base's
    save_weights(model, tmp, method, tokenizer if method == "full" else None)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": rng_state(), **state}, tmp / STATE_FILE)
    readable = {k: v for k, v in state.items() if isinstance(v, (int, float, str, type(None)))}
    (tmp / "state.json").write_text(json.dumps(readable, indent=2))
    _replace_dir(tmp, final)
    return final


def load_trainable_weights(model, ckpt: Path, method: str) -> None:
    """Put a checkpoint's weights into the model being trained (in place)."""
    from safetensors.torch import load_file

    if method == "lora":
        from peft.utils import set_peft_model_state_dict

        weights = load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(model, weights)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise RuntimeError(f"{ckpt}: adapter weights do not fit the model: {unexpected[:5]}")
        return
    if not list((ckpt / "model").glob("*.safetensors")):
        raise FileNotFoundError(f"{ckpt / 'model'}: no safetensors weights")
    load_model_weights(model, ckpt / "model")


def load_model_weights(model, path: Path) -> None:
    """The weights of a saved model directory (`*.safetensors`) into `model`, in place; a
    RuntimeError naming the directory when they do not fit (a tied LM head may be absent)."""
    from safetensors.torch import load_file

    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and "lm_head" not in k]
    if missing or unexpected:
        raise RuntimeError(f"{path}: weights do not fit the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    if tied:
        model.tie_weights()


def load_trainer_state(ckpt: Path) -> dict:
    # Our own file, holding tensors and plain Python values only.
    return torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)


def prune_checkpoints(output_dir: str | Path, keep_last: int | None, protected: set[int]) -> list[int]:
    """Delete periodic checkpoints beyond the newest `keep_last` (None keeps all);
    steps in `protected` (explicit `checkpoint_steps`) are always kept. Returns the
    deleted steps."""
    if keep_last is None:
        return []
    periodic = [(s, p) for s, p in list_checkpoints(output_dir) if s not in protected]
    doomed = periodic[:max(len(periodic) - keep_last, 0)]
    for _, p in doomed:
        shutil.rmtree(p)
    return [s for s, _ in doomed]


def evenly_spaced_steps(total_steps: int, n: int) -> list[int]:
    """`n` steps spread evenly over a run of `total_steps`, the last one at the end
    (S2L's T checkpoints of a proxy model)."""
    if n <= 0 or total_steps <= 0:
        return []
    return sorted({max(1, round(total_steps * i / n)) for i in range(1, n + 1)})


def load_checkpoint_model(base_model_name: str | None, ckpt_path: str | Path, *,
                          device: str = "auto", dtype: str = "auto",
                          trust_remote_code: bool = False):
    """(model, tokenizer) in eval mode from a checkpoint directory, a run's final
    `adapter/` or `model/` directory, or a run directory (its final weights).

    LoRA: the base model is loaded by name (`curate.models.load_causal_lm`) and the
    adapter put on it with peft. Full fine-tuning: the saved model is loaded as it is
    (`base_model_name` is only used for the tokenizer when the directory has none)."""

    path = Path(ckpt_path)
    if (path / "adapter").is_dir():
        path = path / "adapter"
    elif (path / "model").is_dir():
        path = path / "model"
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        if base_model_name is None:
            raise ValueError(f"{path} is a LoRA adapter: name its base model")
        base, tokenizer = load_model(base_model_name, device=device, dtype=dtype,
                                     trust_remote_code=trust_remote_code)
        model = PeftModel.from_pretrained(base, str(path))
        model.to(next(base.parameters()).device)
        return model.eval(), tokenizer
    if (path / "config.json").is_file():
        model, tokenizer = load_model(str(path), device=device, dtype=dtype,
                                      trust_remote_code=trust_remote_code)
        return model.eval(), tokenizer
    raise FileNotFoundError(f"{ckpt_path}: neither a LoRA adapter nor a saved model")


def check_run_dir(output_dir: str | os.PathLike, data_paths: list) -> None:
    """Refuse, before anything is written, a run directory that is, contains or lies
    inside the training or held-out data (`data_paths`: the paths among them), or that
    contains the working, home or root directory: a run writes checkpoints/, adapter/ (or
    model/) and metrics.json there, and starting over deletes them."""
    run = canonical_path(str(output_dir))
    for path in data_paths:
        how = overlap(run, canonical_path(str(path)))
        if how:
            raise ConfigError(f"run directory {output_dir} {how} the data {path}: training would "
                              f"write its checkpoints and weights among the data; choose another --output")
    name = guarded_inside(run)
    if name:
        raise ConfigError(f"run directory {output_dir} contains {name}: training writes and deletes "
                          f"checkpoints/, adapter/ and model/ there; name a new directory (e.g. runs/NAME-sft)")
