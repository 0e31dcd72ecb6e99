"""Shared fixtures: tiny randomly initialised models that build offline in a second."""

from __future__ import annotations

import os
import pathlib

import pytest

# no network here or in CI: fail fast instead of retrying the hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

@pytest.fixture
def torch_one_thread():
    """One torch thread for the test (tiny models on a shared 2-core machine: thread
    hand-offs cost more than the math), restored afterwards: the setting is process-wide."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SHARED_DATA = pathlib.Path(os.environ.get("CURATE_DATA", pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"))

_CORPUS = [
    "Question: What is two plus two?\nAnswer: Two plus two is four.",
    "Write a function that adds two numbers in Python. def add(a, b): return a + b",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "You are a pirate captain. Describe your ship! Arr, she be the fastest ship on the seven seas.",
    "The quick brown fox jumps over the lazy dog. 0123456789 +-*/=()[]{}<>.,;:!?'\"",
]


def make_tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>")
    fast.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|endoftext|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    return fast


def make_tiny_lm(tie_word_embeddings: bool = False, seed: int = 0, hidden_size: int = 32):
    """A 2-layer Llama with a byte-level BPE tokenizer; random weights, float32, CPU."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tiny_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, tie_word_embeddings=tie_word_embeddings,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config).eval()
    return model, tokenizer


@pytest.fixture(scope="session")
def tiny_lm():
    return make_tiny_lm()


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory, tiny_lm):
    """The tiny model saved as a normal HF directory (what `curate.models` loads)."""
    model, tokenizer = tiny_lm
    path = tmp_path_factory.mktemp("tiny-lm")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """A 2-layer BERT encoder with the tiny tokenizer, saved as a model directory."""
    import torch
    from transformers import BertConfig, BertModel

    tokenizer = make_tiny_tokenizer()
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512,
                        pad_token_id=tokenizer.pad_token_id)
    path = tmp_path_factory.mktemp("tiny-bert")
    BertModel(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


def pytest_collection_modifyitems(config, items):
    """`slow` tests run only with CURATE_SLOW=1 (make test-all)."""
    if os.environ.get("CURATE_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set CURATE_SLOW=1 (make test-all)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
