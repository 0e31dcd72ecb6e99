"""Model loading: name resolution, device/dtype choice, the atomic conversion cache."""

from __future__ import annotations

import pathlib
import threading

import pytest
import torch

import curate.models.defaults as defaults
import curate.models.loading as loading
from curate.models import (
    ModelNotFoundError,
    load_causal_lm,
    load_embedder,
    pick_device,
    pick_dtype,
    prepare_smollm2,
    resolve_model,
)


def test_pick_dtype_explicit():
    assert pick_dtype("cpu", "float32") is torch.float32
    assert pick_dtype("cpu", "bf16") is torch.bfloat16
    assert pick_dtype("cuda", "float16") is torch.float16
    with pytest.raises(ValueError, match="unknown dtype"):
        pick_dtype("cpu", "int4")


@pytest.mark.parametrize("flags,want", [
    ({"avx2", "fma"}, torch.float32),
    ({"avx512f", "avx512_bf16"}, torch.bfloat16),
    ({"amx_bf16", "amx_tile"}, torch.bfloat16),
])
def test_pick_dtype_cpu_by_flags(monkeypatch, flags, want):
    monkeypatch.setattr(loading, "cpu_flags", lambda: frozenset(flags))
    assert pick_dtype("cpu") is want
    assert pick_dtype("cpu", "float32") is torch.float32


def test_pick_dtype_cuda_is_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert pick_dtype("cuda") is torch.bfloat16


def test_pick_device():
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device() == want
    assert pick_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            pick_device("cuda")


def test_resolve_local_and_embedded(tiny_lm_dir):
    assert resolve_model(str(tiny_lm_dir)) == str(tiny_lm_dir)
    minilm = pathlib.Path(resolve_model("minilm"))
    assert (minilm / "config.json").is_file()
    assert resolve_model("default-embedding") == str(minilm)
    with pytest.raises(ModelNotFoundError, match="no such local path"):
        resolve_model("./no/such/model/dir")


def test_resolve_unreachable_hub_id_fails_fast_and_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="not a local path.*hub cannot be reached"):
        resolve_model("curate-tests/surely-not-a-model-9f3a")


def test_resolve_default_uses_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("CURATE_CACHE", str(tmp_path))
    made = tmp_path / "models" / defaults.SMOLLM2_CACHE_NAME
    made.mkdir(parents=True)
    (made / defaults.CACHE_STAMP).write_text("{}")
    monkeypatch.setattr(defaults, "convert_gguf", _fail_convert)
    assert resolve_model("default") == str(made)
    assert resolve_model("SmolLM2") == str(made)


def _fail_convert(src, out):
    raise AssertionError("must not convert: the cache is complete")


@pytest.fixture
def fake_gguf(monkeypatch, tmp_path):
    """CURATE_CACHE in tmp, a fake .gguf, and a fake (fast) converter that counts calls."""
    monkeypatch.setenv("CURATE_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(defaults, "smollm2_gguf", lambda: gguf)
    calls = []

    def convert(src, out):
        calls.append(src)
        threading.Event().wait(0.2)  # long enough for a second caller to queue up
        (out / "config.json").write_text("{}")
    monkeypatch.setattr(defaults, "convert_gguf", convert)
    return tmp_path / "cache" / "models", calls


def test_conversion_cache_is_made_once(fake_gguf):
    models, calls = fake_gguf
    threads = [threading.Thread(target=prepare_smollm2) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    final = models / defaults.SMOLLM2_CACHE_NAME
    assert (final / "config.json").is_file() and (final / defaults.CACHE_STAMP).is_file()
    assert prepare_smollm2() == final and len(calls) == 1
    assert [p.name for p in models.iterdir() if p.is_dir()] == [final.name]


def test_killed_conversion_leaves_no_cache(fake_gguf, monkeypatch):
    models, _ = fake_gguf

    def dies(src, out):
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt
    monkeypatch.setattr(defaults, "convert_gguf", dies)
    with pytest.raises(KeyboardInterrupt):
        prepare_smollm2()
    assert not any(p.is_dir() for p in models.iterdir())  # neither final nor temp
    # an incomplete directory (no stamp) is not taken for a cache: it is rebuilt
    (models / defaults.SMOLLM2_CACHE_NAME).mkdir()
    monkeypatch.setattr(defaults, "convert_gguf",
                        lambda src, out: (out / "config.json").write_text("{}"))
    final = prepare_smollm2()
    assert (final / defaults.CACHE_STAMP).is_file()


def test_load_causal_lm(tiny_lm_dir):
    model, tokenizer = load_causal_lm(str(tiny_lm_dir), device="cpu", dtype="float32")
    assert not model.training
    assert model.config._attn_implementation == "sdpa"
    assert next(model.parameters()).dtype is torch.float32
    assert tokenizer.pad_token is not None
    model, _ = load_causal_lm(str(tiny_lm_dir), dtype="bfloat16")
    assert next(model.parameters()).dtype is torch.bfloat16


def test_pad_token_falls_back_to_eos(tiny_lm, tmp_path):
    model, tokenizer = tiny_lm
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    config = tmp_path / "tokenizer_config.json"
    text = config.read_text().replace('"pad_token": "<pad>"', '"pad_token": null')
    config.write_text(text)
    _, loaded = load_causal_lm(str(tmp_path))
    assert loaded.pad_token == loaded.eos_token == "<|endoftext|>"


def test_load_embedder_gives_bare_encoder(tiny_lm_dir):
    model, tokenizer = load_embedder(str(tiny_lm_dir))
    assert not model.training
    assert not hasattr(model, "lm_head")
    assert tokenizer.pad_token is not None


def test_load_tokenizer(tiny_lm_dir):
    from curate.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_lm_dir))
    assert tokenizer.pad_token == "<pad>"
    assert tokenizer("two plus two")["input_ids"]
