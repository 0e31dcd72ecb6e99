"""The trainer's model loading: device and compute dtype, and (model, tokenizer) through
`curate.models`. Its own module so the trainer and the checkpoint reader share it
without importing each other."""

from __future__ import annotations

import logging

import torch

from curate.models import load_causal_lm, pick_device, pick_dtype

log = logging.getLogger("curate.train")

DTYPES = {"auto": "auto", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp32": "float32", "float32": "float32"}


def resolve_device_dtype(device: str = "auto", dtype: str = "auto") -> tuple[str, torch.dtype]:
    """The device and compute dtype (`curate.models.pick_device` / `pick_dtype`); training
    computes in bf16 or float32 only."""
    dev = str(pick_device(device))
    dt = pick_dtype(dev, DTYPES[str(dtype).lower()])
    if isinstance(dt, str):
        dt = getattr(torch, DTYPES.get(dt.lower(), dt))
    if dt not in (torch.bfloat16, torch.float32):
        log.warning("compute dtype %s is not supported for training; using float32", dt)
        dt = torch.float32
    return dev, dt


def load_model(name: str, device: str = "auto", dtype: str | torch.dtype = "auto",
               trust_remote_code: bool = False):
    """(model, tokenizer) through `curate.models.load_causal_lm`."""
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    return load_causal_lm(name, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
