"""Make a pruned copy of a causal LM: the "pruned model" PASER recovers (docs/methods.md, PASER).

Three methods, all over the decoder blocks only (embeddings, final norm and LM head are
never touched; with tied embeddings the head is the embedding matrix, so it stays whole):

- `magnitude` (unstructured): in every linear layer of every decoder block (attention
  q/k/v/o and MLP gate/up/down for Llama-style models), zero the floor(s * numel)
  weights of smallest |W|. Each layer hits the sparsity s exactly.
- `wanda` (Sun et al., 2024, "A Simple and Effective Pruning Approach for Large
  Language Models"): score S_ij = |W_ij| * ||X_j||_2, where ||X_j||_2 is the L2 norm of
  input feature j over all calibration tokens (padding excluded), and in each output
  row i zero the floor(s * in_features) lowest-scoring weights (the paper's per-output
  comparison group). As in the authors' code, blocks are pruned in order and the
  calibration activations of block l are those of the *already pruned* blocks < l:
  the inputs of block 0 are captured once, then each block runs on them, is pruned,
  and runs again to give the next block its inputs (two block passes per block, not
  one full forward per block). Calibration comes from the pool (`load_calibration`),
  not from C4 as in the paper: the recovery data and the calibration data then agree.
- `layer_drop`: remove whole decoder blocks, the last N (`layers=N`) or a chosen list
  (`layers=[i, j, ...]`). `config.num_hidden_layers`, per-layer config lists
  (`layer_types`, `no_rope_layers`) and every module's `layer_idx` (what the KV cache
  is indexed by) are renumbered, so the copy loads and generates like any model.

Zeros are stored densely: the pruned copy is the same size on disk and runs at the
same speed; it exists to measure and recover capability, not to be fast.
`save_pruned` writes a normal Hugging Face directory (`save_pretrained` + tokenizer +
`prune.json` describing what was done) that `AutoModelForCausalLM` loads.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
from typing import Any, Iterable, Sequence

from curate.config import ConfigError, InputConfig
from curate.formatting import encode
from curate.inputs.files import read_records
from curate.models import load_causal_lm

log = logging.getLogger(__name__)

METHODS = ("magnitude", "wanda", "layer_drop")
# config attributes that hold one entry per decoder layer
PER_LAYER_CONFIG = ("layer_types", "no_rope_layers")


# ------------------------------------------------------------------ model structure
def decoder_layers(model):
    """The decoder blocks (an nn.ModuleList) of a Hugging Face causal LM."""
    base = getattr(model, "model", None) or getattr(model, "transformer", None) or model
    for name in ("layers", "h", "blocks"):
        layers = getattr(base, name, None)
        if layers is not None:
            return layers
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


def block_linears(layer) -> list[tuple[str, Any]]:
    """(name, nn.Linear) for every linear layer inside one decoder block."""
    import torch.nn as nn

    return [(name, m) for name, m in layer.named_modules() if isinstance(m, nn.Linear)]


def linear_sparsity(model) -> dict[str, float]:
    """Fraction of exact zeros in each decoder linear layer's weight, by qualified name."""
    out = {}
    for i, layer in enumerate(decoder_layers(model)):
        for name, lin in block_linears(layer):
            w = lin.weight
            out[f"layers.{i}.{name}"] = float((w == 0).sum()) / w.numel()
    return out


# ------------------------------------------------------------------ the math
def magnitude_prune_(weight, sparsity: float) -> int:
    """Zero the floor(sparsity * numel) entries of smallest |W| in place; returns that count."""
    import torch

    k = int(weight.numel() * sparsity)
    if k <= 0:
        return 0
    with torch.no_grad():
        flat = weight.view(-1)
        idx = torch.topk(flat.abs().float(), k, largest=False, sorted=False).indices
        flat[idx] = 0
    return k


def wanda_prune_(weight, input_norm, sparsity: float) -> int:
    """Wanda in place: per output row, zero the floor(sparsity * in) lowest |W_ij| * ||X_j||.

    weight: [out, in]; input_norm: [in], the L2 norm of each input feature over the
    calibration tokens. Returns the number of weights zeroed.
    """
    import torch

    k = int(weight.shape[1] * sparsity)
    if k <= 0:
        return 0
    with torch.no_grad():
        score = weight.abs().float() * input_norm.to(weight.device, torch.float32)[None, :]
        idx = torch.topk(score, k, dim=1, largest=False, sorted=False).indices
        weight.scatter_(1, idx, torch.zeros_like(idx, dtype=weight.dtype))
    return k * weight.shape[0]


# ------------------------------------------------------------------ methods
def _check_sparsity(sparsity: float) -> float:
    sparsity = float(sparsity)
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    return sparsity


def prune_magnitude(model, sparsity: float) -> dict:
    sparsity = _check_sparsity(sparsity)
    zeroed = total = 0
    for layer in decoder_layers(model):
        for _, lin in block_linears(layer):
            zeroed += magnitude_prune_(lin.weight.data, sparsity)
            total += lin.weight.numel()
    return {"zeroed": zeroed, "weights": total}


def _batches(calibration: Sequence[Sequence[int]], batch_size: int, pad_id: int):
    """Right-padded (input_ids, attention_mask) batches, sorted by length to pad little."""
    import torch

    rows = sorted((list(r) for r in calibration if len(r) > 0), key=len)
    for b in range(0, len(rows), batch_size):
        chunk = rows[b:b + batch_size]
        width = max(len(r) for r in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, r in enumerate(chunk):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = 1
        yield ids, mask


class _StopForward(Exception):
    pass


def _first_block_inputs(model, batches) -> list[tuple[tuple, dict, Any]]:
    """(args, kwargs, token mask) with which the model calls decoder block 0, per batch."""
    import torch

    layers = decoder_layers(model)
    device = next(model.parameters()).device
    captured: list = []

    def grab(module, args, kwargs):
        captured.append((args, kwargs))
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    out = []
    try:
        with torch.no_grad():
            for ids, mask in batches:
                try:
                    model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                except _StopForward:
                    pass
                args, kwargs = captured.pop()
                out.append((args, kwargs, mask.to(device).bool()))
    finally:
        handle.remove()
    return out


def _hidden_arg(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args, kwargs, hidden):
    if args:
        return (hidden,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def prune_wanda(model, sparsity: float, calibration: Sequence[Sequence[int]], batch_size: int = 8,
                pad_token_id: int = 0) -> dict:
    """Wanda over the decoder blocks in order; `calibration` is a list of token-id lists."""
    import torch

    sparsity = _check_sparsity(sparsity)
    if not calibration:
        raise ValueError("wanda needs calibration examples (token ids) for the activation norms")
    layers = decoder_layers(model)
    inputs = _first_block_inputs(model, _batches(calibration, batch_size, pad_token_id))
    n_tokens = int(sum(int(m.sum()) for _, _, m in inputs))
    zeroed = total = 0
    log.info("wanda: %d calibration rows, %d tokens, %d blocks", len(calibration), n_tokens, len(layers))
    with torch.no_grad():
        for index, layer in enumerate(layers):
            linears = block_linears(layer)
            sq = {name: torch.zeros(lin.in_features, dtype=torch.float64, device=lin.weight.device)
                  for name, lin in linears}
            current = {"mask": None}

            def hook_for(name):
                def hook(module, args):
                    x = args[0]
                    m = current["mask"]
                    # rows of x are tokens; drop padding before the norm
                    x = x[m] if m is not None and x.shape[:2] == m.shape else x.reshape(-1, x.shape[-1])
                    sq[name] += x.float().pow(2).sum(0, dtype=torch.float64)
                return hook

            handles = [lin.register_forward_pre_hook(hook_for(name)) for name, lin in linears]
            try:
                for args, kwargs, mask in inputs:
                    current["mask"] = mask
                    layer(*args, **kwargs)
            finally:
                for h in handles:
                    h.remove()
            for name, lin in linears:
                zeroed += wanda_prune_(lin.weight.data, sq[name].sqrt(), sparsity)
                total += lin.weight.numel()
            # the next block sees this block's pruned outputs
            for j, (args, kwargs, mask) in enumerate(inputs):
                out = layer(*args, **kwargs)
                hidden = out[0] if isinstance(out, (tuple, list)) else out
                args, kwargs = _with_hidden(args, kwargs, hidden)
                inputs[j] = (args, kwargs, mask)
            log.info("wanda: pruned block %d of %d", index + 1, len(layers))
    return {"zeroed": zeroed, "weights": total, "calibration_rows": len(calibration),
            "calibration_tokens": n_tokens}


def drop_layers(model, layers: int | Sequence[int]) -> dict:
    """Remove decoder blocks in place: the last N (int) or the listed indices."""
    import torch.nn as nn

    blocks = decoder_layers(model)
    n = len(blocks)
    if isinstance(layers, int) and not isinstance(layers, bool):
        if not 0 < layers < n:
            raise ValueError(f"layer_drop: can drop 1..{n - 1} of {n} layers, asked for {layers}")
        drop = list(range(n - layers, n))
    else:
        drop = sorted({int(i) for i in layers})
        bad = [i for i in drop if not 0 <= i < n]
        if bad or not drop or len(drop) >= n:
            raise ValueError(f"layer_drop: layer indices must be distinct, in 0..{n - 1}, and leave at "
                             f"least one layer; got {list(layers)}")
    keep = [i for i in range(n) if i not in set(drop)]
    kept = nn.ModuleList([blocks[i] for i in keep])
    for new_idx, block in enumerate(kept):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    parent = getattr(model, "model", None) or getattr(model, "transformer", None) or model
    for name in ("layers", "h", "blocks"):
        if getattr(parent, name, None) is blocks:
            setattr(parent, name, kept)
            break
    cfg = model.config
    cfg.num_hidden_layers = len(keep)
    for attr in PER_LAYER_CONFIG:
        value = getattr(cfg, attr, None)
        if isinstance(value, (list, tuple)) and len(value) == n:
            setattr(cfg, attr, [value[i] for i in keep])
    return {"dropped_layers": drop, "kept_layers": keep, "layers_before": n, "layers_after": len(keep)}


def prune_model(model, method: str, sparsity: float = 0.5, *, layers: int | Sequence[int] | None = None,
                calibration: Sequence[Sequence[int]] | None = None, batch_size: int = 8,
                pad_token_id: int = 0) -> dict:
    """Prune `model` in place; returns a report (method, settings, achieved sparsity).

    method: "magnitude" | "wanda" (needs `calibration`, a list of token-id lists) |
    "layer_drop" (needs `layers`: how many of the last blocks, or a list of indices).
    """
    model.eval()
    if method == "magnitude":
        report = prune_magnitude(model, sparsity)
    elif method == "wanda":
        report = prune_wanda(model, sparsity, calibration or [], batch_size, pad_token_id)
    elif method == "layer_drop":
        if layers is None:
            raise ValueError("layer_drop needs `layers`: a count (the last N) or a list of indices")
        report = drop_layers(model, layers)
    else:
        raise ValueError(f"unknown pruning method {method!r}; expected one of {METHODS}")
    report = {"method": method, **report}
    if method != "layer_drop":
        report["sparsity"] = sparsity
        report["achieved_sparsity"] = report["zeroed"] / max(report["weights"], 1)
    return report


# ------------------------------------------------------------------ calibration and saving
def load_calibration(paths: Iterable[str], n_rows: int = 64, seed: int = 0) -> list[dict]:
    """`n_rows` records drawn uniformly (seeded reservoir sample) from pool files.

    Any input the pipeline reads works (jsonl/json/parquet/arrow, globs, adapters
    detected), read by the pipeline's readers (`curate.inputs`); unreadable rows are
    skipped here (the pipeline's dead letter reports them).
    """

    rng = random.Random(seed)
    sample: list[dict] = []
    recs, _ = read_records([InputConfig(path=p) for p in paths], max_chars=10**9)
    for seen, rec in enumerate(recs, 1):
        if len(sample) < n_rows:
            sample.append(rec)
        else:
            j = rng.randrange(seen)
            if j < n_rows:
                sample[j] = rec
    return sample


def calibration_ids(recs: Sequence[dict], tokenizer, template: str = "plain",
                    max_length: int = 512) -> list[list[int]]:
    """Token ids of calibration records, formatted exactly as scorers and the trainer see them."""

    return [encode(r, tokenizer, template, max_length).input_ids for r in recs]


def check_prune_output(output_dir: str) -> None:
    """Only an empty directory or an earlier pruned copy (prune.json) may be replaced."""

    if os.path.isdir(output_dir) and os.listdir(output_dir) and not os.path.exists(
            os.path.join(output_dir, "prune.json")):
        raise ConfigError(f"{output_dir} exists and is not a pruned copy made by curate (no prune.json); "
                          f"refusing to replace it: choose another --output")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ConfigError(f"{output_dir} is an existing file; refusing to replace it")


def save_pruned(model, tokenizer, output_dir: str, report: dict) -> str:
    """Write the pruned model as a normal HF directory, atomically (temp dir, then rename)."""
    output_dir = os.path.abspath(output_dir)
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(output_dir) + ".tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is a normal directory
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "prune.json"), "w") as fh:
            json.dump(report, fh, indent=2, default=str)
        check_prune_output(output_dir)  # again: something may have appeared while pruning
        if os.path.exists(output_dir):
            shutil.rmtree(output_dir)
        os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output_dir


def summarise(report: dict) -> str:
    if report["method"] == "layer_drop":
        return (f"layer_drop: dropped layers {report['dropped_layers']} "
                f"({report['layers_before']} -> {report['layers_after']})")
    return (f"{report['method']}: {report['zeroed']:,} of {report['weights']:,} decoder linear weights "
            f"zeroed ({report['achieved_sparsity']:.4f}; asked {report['sparsity']})")


def make_pruned_copy(model: str, method: str, output: str, sparsity: float = 0.5,
                     layers: int | Sequence[int] | None = None, calibration: Sequence[str] = (),
                     calibration_rows: int = 64, template: str = "plain", max_length: int = 512,
                     device: str = "auto", dtype: str = "float32", seed: int = 0) -> dict:
    """Load `model` ("default", an HF id or a path), prune it, save it to `output`.

    Pruning runs in `dtype` (float32 by default, so the activation norms and the |W|
    ranking are exact) and the copy is saved in that dtype.
    """

    if method not in METHODS:
        raise ConfigError(f"unknown pruning method {method!r}; expected one of {', '.join(METHODS)}")
    check_prune_output(output)
    if method == "wanda" and not calibration:
        raise ConfigError("wanda needs calibration data from the pool: --calibration FILE (jsonl, globs ok)")
    if method == "layer_drop" and layers is None:
        raise ConfigError("layer_drop needs --layers N (drop the last N) or --layers i,j,... (those indices)")

    lm, tokenizer = load_causal_lm(model, device=device, dtype=dtype)
    calib_ids = None
    if method == "wanda":
        recs = load_calibration(calibration, calibration_rows, seed)
        if not recs:
            raise ConfigError(f"no readable calibration rows in {list(calibration)}")
        calib_ids = calibration_ids(recs, tokenizer, template, max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    report = prune_model(lm, method, sparsity, layers=layers, calibration=calib_ids, pad_token_id=pad)
    report.update({"source_model": model, "dtype": dtype, "template": template,
                   "calibration": list(calibration) if calib_ids else None,
                   "calibration_max_length": max_length if calib_ids else None, "seed": seed})
    save_pruned(lm, tokenizer, output, report)
    report["output"] = os.path.abspath(output)
    return report
