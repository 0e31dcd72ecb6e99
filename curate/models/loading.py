"""Resolve a model name, pick device and dtype, load a model and its tokenizer.

One code path for CPU and GPU: CUDA when present (bf16, SDPA attention); on CPU bf16
only where the CPU computes it natively (avx512_bf16 or AMX: about 4x the fp32 matmul
rate there), float32 otherwise (emulated bf16 is far slower than fp32).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import pathlib
import re
import socket
from urllib.parse import urlparse

from curate.config import ConfigError
from curate.models.defaults import embedded_path

log = logging.getLogger(__name__)

DTYPES = {
    "float32": "float32", "fp32": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


class ModelNotFoundError(FileNotFoundError):
    """A model name that is neither embedded, nor a local path, nor reachable on the hub."""


def _looks_like_path(name: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else can only be a path."""
    return name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1


def _in_hf_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return False
    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an id the hub would reject (bad characters, ...)
        return False
    return isinstance(found, str)


def _hub_unreachable_reason(timeout: float = 3.0) -> str | None:
    """None when the hub answers a TCP connect; otherwise why not."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return "HF_HUB_OFFLINE is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as err:
        return f"{host}:{port} cannot be reached ({err})"


def resolve_model(name: str) -> str:
    """A name -> something `from_pretrained` accepts (a local directory or a hub id).

    "default"/"smollm2" -> the converted embedded SmolLM2 (converted on first use);
    "minilm"/"default-embedding" -> the embedded all-MiniLM-L6-v2; an existing local
    path -> itself; a hub id -> itself when cached locally or the hub is reachable.
    Anything else raises `ModelNotFoundError` saying why, at once rather than after the
    hub client's retries.
    """
    if not name or not str(name).strip():
        raise ModelNotFoundError("empty model name")
    name = str(name).strip()
    embedded = embedded_path(name)
    if embedded is not None:
        return embedded
    path = pathlib.Path(name).expanduser()
    if path.exists():
        return str(path)
    if _looks_like_path(name):
        raise ModelNotFoundError(f"model {name!r}: no such local path")
    if _in_hf_cache(name):
        return name
    reason = _hub_unreachable_reason()
    if reason is not None:
        raise ModelNotFoundError(
            f"model {name!r} is not an embedded default (default, smollm2, minilm), not a local "
            f"path and not in the Hugging Face cache, and the hub cannot be reached: {reason}")
    return name


def model_files(name: str) -> str | None:
    """The local directory (or file) holding a model's files, found without the network:
    an embedded default's converted directory, a local path with `~` expanded, or a hub
    id's snapshot in the Hugging Face cache; None when none is found. What saved scores
    are keyed by (`curate.pipeline.saved_work.scorer_key`): the files, not the name."""
    if not isinstance(name, str) or not name.strip():
        return None
    name = name.strip()
    embedded = embedded_path(name)
    if embedded is not None:
        return embedded
    path = pathlib.Path(name).expanduser()
    if path.exists():
        return str(path.resolve())
    if _looks_like_path(name):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json")
    except Exception:  # not a hub id the client accepts
        return None
    return os.path.dirname(found) if isinstance(found, str) else None


_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def check_device_dtype(device: str, dtype: str, where: str) -> None:
    """At plan time, not on a worker: a device or dtype that cannot be is a ConfigError."""
    if not _DEVICE.match(str(device).strip().lower()):
        raise ConfigError(f"{where}: device must be auto, cpu, cuda, cuda:N or mps, got {device!r}")
    if str(dtype).strip().lower() not in ("auto", *DTYPES):
        raise ConfigError(f"{where}: dtype must be auto or one of {', '.join(DTYPES)}, got {dtype!r}")


def pick_device(requested: str = "auto") -> str:
    import torch

    requested = (requested or "auto").strip().lower()
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {requested!r} requested but CUDA is not available")
    return requested


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16() -> bool:
    return any(flag in cpu_flags() for flag in CPU_BF16_FLAGS)


def pick_dtype(device: str, requested: str = "auto"):
    """The torch dtype to load weights in: an explicit request, else by hardware."""
    import torch

    requested = (requested or "auto").strip().lower()
    if requested != "auto":
        if requested not in DTYPES:
            raise ValueError(f"unknown dtype {requested!r}; expected auto or one of "
                             f"{', '.join(sorted(set(DTYPES.values())))}")
        return getattr(torch, DTYPES[requested])
    if str(device).startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if str(device) == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def _dtype_kwarg(dtype) -> dict:
    import transformers

    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    # `torch_dtype` was renamed `dtype` in transformers 4.56.
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


@contextlib.contextmanager
def _refusing_remote_code(name: str):
    """transformers refuses a model whose config needs its own code unless
    trust_remote_code: that refusal, as one line naming the setting."""
    try:
        yield
    except ValueError as err:
        if "trust_remote_code" not in str(err):
            raise
        raise ConfigError(f"model {name!r} needs to run code shipped in its own files (its config has an "
                          f"auto_map); curate runs it only when the step sets trust_remote_code: true") from None


def _from_pretrained(auto_cls, name: str, path: str, kwargs: dict):
    with _refusing_remote_code(name):
        try:
            return auto_cls.from_pretrained(path, attn_implementation="sdpa", **kwargs)
        except (ValueError, ImportError) as err:
            if "sdpa" not in str(err).lower() and "attn_implementation" not in str(err):
                raise
            log.info("%s does not support SDPA attention; using its default", name)
            return auto_cls.from_pretrained(path, **kwargs)


def _finish_tokenizer(tokenizer, name: str):
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {name!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(name: str = "default", trust_remote_code: bool = False):
    """The tokenizer alone (length filters, token counts), with a pad token set."""
    from transformers import AutoTokenizer

    path = resolve_model(name)
    with _refusing_remote_code(name):
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return _finish_tokenizer(tokenizer, name)


def load_causal_lm(name: str = "default", device: str = "auto", dtype: str = "auto",
                   trust_remote_code: bool = False):
    """(model, tokenizer): the model in eval mode on `device`, tokenizer with a pad token."""
    from transformers import AutoModelForCausalLM

    path = resolve_model(name)
    device = pick_device(device)
    torch_dtype = pick_dtype(device, dtype)
    kwargs = {"trust_remote_code": trust_remote_code, **_dtype_kwarg(torch_dtype)}
    model = _from_pretrained(AutoModelForCausalLM, name, path, kwargs)
    model.to(device).eval()
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    log.info("loaded causal LM %s (%s) on %s in %s", name, path, device, torch_dtype)
    return model, tokenizer


def load_embedder(name: str = "minilm", device: str = "auto", dtype: str = "auto",
                  trust_remote_code: bool = False):
    """(model, tokenizer) for sentence embeddings: the bare encoder (AutoModel), eval mode."""
    from transformers import AutoModel

    path = resolve_model(name)
    device = pick_device(device)
    torch_dtype = pick_dtype(device, dtype)
    kwargs = {"trust_remote_code": trust_remote_code, **_dtype_kwarg(torch_dtype)}
    model = _from_pretrained(AutoModel, name, path, kwargs)
    model.to(device).eval()
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    log.info("loaded embedder %s (%s) on %s in %s", name, path, device, torch_dtype)
    return model, tokenizer
