"""Model loading: embedded defaults, hub ids or local paths, the cache, device and dtype."""

from curate.models.defaults import (
    cache_root,
    minilm_path,
    prepare_default_models,
    prepare_smollm2,
    smollm2_gguf,
)
from curate.models.loading import (
    ModelNotFoundError,
    cpu_has_native_bf16,
    load_causal_lm,
    load_embedder,
    load_tokenizer,
    pick_device,
    pick_dtype,
    resolve_model,
)

__all__ = [
    "ModelNotFoundError", "cache_root", "cpu_has_native_bf16", "load_causal_lm",
    "load_embedder", "load_tokenizer", "minilm_path", "pick_device", "pick_dtype",
    "prepare_default_models", "prepare_smollm2", "resolve_model", "smollm2_gguf",
]
