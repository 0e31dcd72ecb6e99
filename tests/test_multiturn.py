"""Multi-turn conversations: the loss on every assistant turn (chat template, turns: all)
or the last one (turns: last); checked against the template's own rendering."""

import logging

import pytest
import torch

from curate.config import ConfigError
from curate.formatting import encode
from curate.records import ADAPTERS, adapt
from curate.train.data import collate, tokenize
from curate.scorers import make_scorer
from curate.models.logprobs import response_logprobs

CONVERSATION = {"messages": [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a prime."},
    {"role": "assistant", "content": "Seven."},
    {"role": "user", "content": "A bigger one?"},
    {"role": "assistant", "content": "Thirteen, or 101."},
    {"role": "user", "content": "And an even prime?"},
    {"role": "assistant", "content": "Only 2."},
]}
ANSWERS = ["Seven.", "Thirteen, or 101.", "Only 2."]


def record():
    (rec,) = adapt(CONVERSATION, ADAPTERS["messages"], {}, "chat")
    return rec


@pytest.fixture(scope="module")
def smollm_tokenizer():
    from curate.models import load_tokenizer

    return load_tokenizer("default")


@pytest.mark.integration
def test_every_assistant_turn_carries_the_loss_token_by_token(smollm_tokenizer):
    tok = smollm_tokenizer
    enc = encode(record(), tok, "chat", max_length=4096, turns="all")
    rendered = tok.apply_chat_template(CONVERSATION["messages"], tokenize=False)
    assert tok.decode(enc.input_ids) == rendered  # the whole conversation, as the template writes it
    # SmolLM2's template closes an assistant turn with "<|im_end|>\n": the loss covers the
    # answer and that end, and nothing else
    assert [tok.decode(enc.input_ids[a:b]) for a, b in enc.loss_spans] == [a + "<|im_end|>\n" for a in ANSWERS]
    in_loss = {t for a, b in enc.loss_spans for t in range(a, b)}
    context = tok.decode([t for i, t in enumerate(enc.input_ids) if i not in in_loss])
    assert not any(a in context for a in ANSWERS)
    assert context.count("<|im_start|>assistant\n") == 3 and "A bigger one?" in context
    # the trainer's labels are those positions exactly
    batch = collate(tokenize([record()], tok, "chat", 4096), [0], pad_id=tok.pad_token_id)
    assert {int(i) for i in (batch["labels"][0] != -100).nonzero()} == in_loss
    assert enc.prompt_len == enc.loss_spans[-1][0]  # generation prompts still end before the last answer


@pytest.mark.integration
def test_last_turn_only_and_without_the_end_of_turn(smollm_tokenizer):
    tok = smollm_tokenizer
    last = encode(record(), tok, "chat", max_length=4096, turns="last")
    assert [tok.decode(last.input_ids[a:b]) for a, b in last.loss_spans] == ["Only 2.<|im_end|>\n"]
    assert tok.decode(last.input_ids) == tok.apply_chat_template(CONVERSATION["messages"], tokenize=False)
    bare = encode(record(), tok, "chat", max_length=4096, turns="all", include_eos=False)
    assert [tok.decode(bare.input_ids[a:b]) for a, b in bare.loss_spans] == ANSWERS


@pytest.mark.integration
def test_truncation_keeps_a_window_and_clips_the_spans(smollm_tokenizer):
    tok = smollm_tokenizer
    full = encode(record(), tok, "chat", max_length=4096)
    cut = encode(record(), tok, "chat", max_length=len(full.input_ids) - 12)
    assert cut.truncated and full.input_ids[12:] == cut.input_ids  # the left end goes first
    expected = {t - 12 for t in full.targets if t >= 12}
    assert set(cut.targets) == expected and len(cut.loss_spans) == 3


def test_likelihood_sums_every_assistant_turn_as_a_direct_forward_does(tiny_lm):
    model, tok = tiny_lm
    encs = [encode(record(), tok, "chat", 512, turns=t) for t in ("all", "last")]
    got = response_logprobs(model, encs, pad_token_id=tok.pad_token_id)
    for enc, (total, mean, n) in zip(encs, got):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([enc.input_ids])).logits[0].double(), -1)
        direct = sum(float(logp[t - 1, enc.input_ids[t]]) for a, b in enc.loss_spans for t in range(a, b))
        assert n == enc.n_response and total == pytest.approx(direct, rel=1e-4)
    assert len(encs[0].loss_spans) == 3 and got[0][2] > got[1][2]


def test_plain_template_is_single_turn_and_says_so(tiny_lm, caplog):
    import curate.formatting as formatting

    _, tok = tiny_lm
    formatting._warned_plain = False
    with caplog.at_level(logging.WARNING, logger="curate.formatting"):
        enc = encode(record(), tok, "plain", 512)
    assert "last assistant turn only" in caplog.text
    assert tok.decode(enc.input_ids[enc.prompt_len:]) == " Only 2.<|endoftext|>"
    assert len(enc.loss_spans) == 1


def test_turns_is_checked_in_the_config():
    with pytest.raises(ConfigError, match="turns must be one of 'all', 'last'"):
        make_scorer({"type": "likelihood", "turns": "first"})
    assert make_scorer({"type": "likelihood", "template": "chat", "turns": "last"}).turns == "last"


def test_a_bare_prompt_response_record_still_encodes(tiny_lm):
    _, tok = tiny_lm
    enc = encode({"prompt": "Q?", "response": "A."}, tok, "plain", 64)
    assert tok.decode(enc.input_ids[enc.prompt_len:]) == " A.<|endoftext|>"
