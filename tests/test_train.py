"""The trainer stage: loss masking, learning, exact resume, adapter reload, retention."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest
import torch

from conftest import make_tiny_lm
from curate.records import make_record
from curate.train import (TrainConfig, evaluate_loss, list_checkpoints, load_checkpoint_model,
                          load_records, response_nll, run_train, tokenize, train)
from curate.train.data import collate, micro_batches, plan_steps, split_by_tokens
from curate.train.loss import batch_nll


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _records(n=12, offset=0):
    out = []
    for i in range(offset, offset + n):
        q = f"What is {i} plus {i}?" + (" Show the steps." if i % 3 == 0 else "")
        a = f"{i} plus {i} is {2 * i}." + (" Add the two numbers." * (i % 4))
        out.append(make_record([{"role": "user", "content": q},
                                {"role": "assistant", "content": a}], "test"))
    return out


def tokenizer_of(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


# fp32 whatever the CPU: these tests compare losses across reloads, not dtypes (bf16 has its own test)
FAST = dict(batch_size=4, warmup_ratio=0.0, seed=0, save_every=None, dtype="fp32")


# ---------------------------------------------------------------- loss masking


def test_loss_is_mean_response_token_nll_and_ignores_prompt(tiny_lm):
    model, tokenizer = tiny_lm
    tok = tokenize(_records(5), tokenizer, "plain", 64)
    batch = collate(tok, list(range(5)), tokenizer.pad_token_id)

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits.detach().requires_grad_(True)
    nll, n = response_nll(logits, batch["labels"])
    loss = nll / n

    # by hand: -log p(token | prefix) at each response position, averaged over all of them
    logp = torch.log_softmax(logits.detach().double(), dim=-1)
    terms = []
    for row, (ids, p) in enumerate(zip(tok.input_ids, tok.prompt_lens)):
        for t in range(p, len(ids)):
            terms.append(-logp[row, t - 1, ids[t]])
    assert int(n) == len(terms) == int(tok.response_lens.sum())
    assert float(loss.detach()) == pytest.approx(float(torch.stack(terms).mean()), rel=1e-5)

    # positions that predict a prompt token or padding get exactly zero gradient
    loss.backward()
    grad = logits.grad.abs().sum(-1)  # [batch, position]
    for row, (ids, p) in enumerate(zip(tok.input_ids, tok.prompt_lens)):
        assert torch.all(grad[row, : p - 1] == 0)       # predicting prompt tokens 1..p-1
        assert torch.all(grad[row, len(ids) - 1:] == 0)  # after the last token, padding
        assert torch.all(grad[row, p - 1: len(ids) - 1] > 0)

    # the trainer's forward (LM head over the response region only) gives the same loss
    with torch.no_grad():
        nll2, n2 = batch_nll(model, batch)
    assert int(n2) == int(n) and float(nll2) == pytest.approx(float(nll.detach()), rel=1e-5)

    # evaluation is token-weighted over the whole set: the same number
    ev = evaluate_loss(model, tokenizer, _records(5), "plain", 64, batch_tokens=40)
    assert ev["n_tokens"] == len(terms)
    assert ev["loss"] == pytest.approx(float(loss), rel=1e-5)
    assert ev["ppl"] == pytest.approx(np.exp(ev["loss"]))


@pytest.mark.parametrize("setup", ["lora", "full_untied", "full_tied", "softcap"])
def test_chunked_head_loss_and_gradients_match_autograd_of_the_full_logit_loss(setup):
    """batch_nll (hidden states at response positions, head in chunks whose gradient is
    taken in the forward) against plain autograd of the full-logit loss, fp32, to 1e-5:
    the loss and the gradient of every trainable parameter (LoRA adapters; or every
    weight, the tied head/embedding included)."""
    from peft import LoraConfig, get_peft_model

    model, tokenizer = make_tiny_lm(tie_word_embeddings=setup == "full_tied", seed=3)
    if setup == "softcap":
        model.config.final_logit_softcapping = 2.0  # the plain path must apply it too

        class Capped(torch.nn.Module):  # what Gemma's forward does after the head
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, **kw):
                out = self.m(**kw)
                out.logits = (out.logits / 2.0).tanh() * 2.0
                return out
    if setup == "lora":
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                 lora_dropout=0.0, task_type="CAUSAL_LM"))
        for name, p in model.named_parameters():  # non-zero B, so every adapter gets a gradient
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
    model.train()
    tok = tokenize(_records(6), tokenizer, "plain", 64)
    batch = collate(tok, list(range(6)), tokenizer.pad_token_id)
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(loss):
        return torch.autograd.grad(loss, params)

    plain_model = Capped(model) if setup == "softcap" else model
    logits = plain_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref_nll, ref_n = response_nll(logits, batch["labels"])
    ref = grads(ref_nll / ref_n)
    # 64 logits per chunk: several chunks per batch
    nll, n = batch_nll(model, batch, max_logit_elements=64 * len(tokenizer))
    got = grads(nll / n)
    assert int(n) == int(ref_n)
    assert float(nll) == pytest.approx(float(ref_nll), rel=1e-5)
    for g, r in zip(got, ref):
        assert torch.allclose(g, r, rtol=1e-5, atol=1e-7), float((g - r).abs().max())
    assert any(float(g.abs().sum()) > 0 for g in got)


# ---------------------------------------------------------------- batch plan


def test_batch_plan_is_deterministic_complete_and_length_grouped():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 300, size=500)
    a = micro_batches(lengths, seed=1, epoch=0, batch_size=8)
    assert a == micro_batches(lengths, seed=1, epoch=0, batch_size=8)
    assert a != micro_batches(lengths, seed=1, epoch=1, batch_size=8)
    assert sorted(i for b in a for i in b) == list(range(500))

    def padded(batches):
        return sum(len(b) * lengths[b].max() for b in batches)

    random = micro_batches(lengths, seed=1, epoch=0, batch_size=8, group_by_length=False)
    assert padded(a) < 0.8 * padded(random)

    budget = micro_batches(lengths, seed=1, epoch=0, batch_size=1, batch_tokens=1024)
    assert sorted(i for b in budget for i in b) == list(range(500))
    assert all(len(b) * lengths[b].max() <= 1024 for b in budget)

    steps = plan_steps(lengths, seed=1, epochs=2, max_steps=None, batch_size=8,
                       batch_tokens=None, grad_accum=2)
    assert len(steps) == 2 * 32 and {s.epoch for s in steps} == {0, 1}
    capped = plan_steps(lengths, seed=1, epochs=1, max_steps=40, batch_size=8,
                        batch_tokens=None, grad_accum=2)
    assert len(capped) == 40 and capped == steps[:40]


# ---------------------------------------------------------------- learning


def test_training_lowers_loss_on_its_data(tmp_path, tiny_lm_dir):
    data = _records(8)
    # A random 32-wide model's frozen LM head caps its logits (the final norm fixes the
    # hidden scale), so the adapter also goes on the head here; real models need no such help.
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    cfg = TrainConfig(model=str(tiny_lm_dir), method="lora", lr=2e-2, epochs=12, lora_r=8,
                      target_modules=targets, max_length=64, **FAST)
    m = train(data, cfg, tmp_path, eval_data=data, progress=False)
    assert m["eval_after"]["loss"] < m["eval_before"]["loss"] - 1.0
    assert m["train_curve"][-1]["loss"] < m["train_curve"][0]["loss"]
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["eval_after"] == m["eval_after"] and saved["n_train"] == 8
    assert saved["steps"] == 24 and saved["tokens_per_s"] > 0
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_full_finetune_from_jsonl_and_saved_dataset(tmp_path, tiny_lm_dir):
    import datasets
    from transformers import AutoModelForCausalLM

    qa = tmp_path / "qa.jsonl.gz"
    with gzip.open(qa, "wt") as fh:
        for r in _records(10):
            fh.write(json.dumps({"question": r["prompt"], "answer": r["response"]}) + "\n")
        fh.write(json.dumps({"question": "no answer"}) + "\n")  # skipped, with a warning
    saved = tmp_path / "shards"
    datasets.Dataset.from_list(_records(6, offset=20)).save_to_disk(str(saved))

    m = run_train(qa, model=str(tiny_lm_dir), output_dir=tmp_path / "run", eval_path=saved,
                  limit=8, method="full", lr=3e-3, epochs=4, max_length=24, progress=False,
                  n_samples=1, max_new_tokens=4, **FAST)
    assert m["n_train"] == 8 and m["n_eval"] == 6
    assert m["n_train_truncated"] > 0  # max_length 24 cuts the longer answers
    assert m["eval_after"]["loss"] < m["eval_before"]["loss"]
    assert set(m["samples"][0]) >= {"prompt", "reference", "generated", "generated_before"}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    ev = evaluate_loss(reloaded, tokenizer_of(tmp_path / "run" / "model"), load_records(saved),
                       "plain", 24)
    assert ev["loss"] == pytest.approx(m["eval_after"]["loss"], rel=1e-5)


def test_bf16_path_keeps_float32_master_weights(tmp_path, tiny_lm_dir):
    # What runs on a GPU (or an AMX CPU): bf16 base, float32 adapter, bf16 autocast.
    data = _records(4)
    m = train(data, TrainConfig(model=str(tiny_lm_dir), lr=1e-2, max_length=48,
                                **{**FAST, "dtype": "bf16"}), tmp_path, eval_data=data, progress=False)
    assert m["compute_dtype"] == "bfloat16"
    assert np.isfinite(m["eval_after"]["loss"]) and np.isfinite(m["train_loss_last"])
    assert {t.dtype for t in _adapter_weights(tmp_path).values()} == {torch.float32}


# ---------------------------------------------------------------- resume


class Interrupted(Exception):
    pass


def _adapter_weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "adapter" / "adapter_model.safetensors"))


def test_split_by_tokens_respects_the_budget_and_keeps_every_row():
    lengths = np.array([5, 40, 12, 12, 90, 7, 33])
    pieces = split_by_tokens([0, 1, 2, 3, 4, 5, 6], lengths, 64)
    assert sorted(i for p in pieces for i in p) == list(range(7))
    assert pieces[0] == [4]  # longer than the budget: alone, first
    assert all(len(p) * max(lengths[p]) <= 64 for p in pieces[1:])
    assert split_by_tokens([3, 1], lengths, 0) == [[3, 1]]
    assert split_by_tokens([3, 1, 2], lengths, 1) == [[1], [3], [2]]


def test_forward_pieces_change_memory_not_the_result(tmp_path, tiny_lm_dir):
    """One forward per example, per 60 tokens, or per whole micro-batch: the same steps
    (the loss is token-weighted over the optimizer step), so the same adapter."""
    runs = {}
    for forward_tokens in (0, 1, 60):
        cfg = TrainConfig(model=str(tiny_lm_dir), lr=1e-2, max_length=64, batch_size=5, max_steps=3,
                          forward_tokens=forward_tokens, **{k: v for k, v in FAST.items() if k != "batch_size"})
        runs[forward_tokens] = train(_records(15), cfg, tmp_path / str(forward_tokens), progress=False)
    base = _adapter_weights(tmp_path / "0")
    for forward_tokens in (1, 60):
        other = _adapter_weights(tmp_path / str(forward_tokens))
        for k in base:
            torch.testing.assert_close(other[k], base[k], rtol=1e-5, atol=1e-6)
        assert [r["loss"] for r in runs[forward_tokens]["train_curve"]] == pytest.approx(
            [r["loss"] for r in runs[0]["train_curve"]], rel=1e-5)
    assert runs[1]["train_response_tokens"] == runs[0]["train_response_tokens"]


def test_resume_continues_the_same_run(tmp_path, tiny_lm_dir):
    # LoRA dropout draws random numbers every step, so this also checks the RNG state.
    cfg = TrainConfig(model=str(tiny_lm_dir), lr=1e-2, epochs=2, max_length=64, lora_dropout=0.1,
                      batch_size=3, grad_accum=2, warmup_ratio=0.2, save_every=2,
                      keep_checkpoints=None)
    data = _records(12)
    whole = train(data, cfg, tmp_path / "whole", progress=False)
    assert whole["steps"] == 4

    def crash_at_3(step, record):
        if step == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        train(data, cfg, tmp_path / "cut", on_step=crash_at_3, progress=False)
    assert [s for s, _ in list_checkpoints(tmp_path / "cut")] == [2]
    resumed = train(data, cfg, tmp_path / "cut", progress=False)

    assert resumed["resumed_from"] == [2]
    a, b = _adapter_weights(tmp_path / "whole"), _adapter_weights(tmp_path / "cut")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert [r["loss"] for r in resumed["train_curve"]] == pytest.approx(
        [r["loss"] for r in whole["train_curve"]], rel=1e-5)

    # a finished run is not trained again; a different run does not resume these checkpoints
    again = train(data, cfg, tmp_path / "cut", progress=False)
    assert again["resumed_from"] == [2]
    with pytest.raises(ValueError, match="different run"):
        other = TrainConfig(**{**cfg.to_dict(), "lr": 5e-3})
        (tmp_path / "cut" / "metrics.json").unlink()
        train(data, other, tmp_path / "cut", progress=False)


# ---------------------------------------------------------------- adapter reload


def test_saved_adapter_reloads_and_reproduces_logits(tmp_path, tiny_lm_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, tokenizer = make_tiny_lm()  # trained in place
    data = _records(6)
    cfg = TrainConfig(lr=2e-2, epochs=3, max_length=64, **FAST)
    m = train(data, cfg, tmp_path, eval_data=data, model=model, tokenizer=tokenizer,
              progress=False)
    model.eval()

    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    x = torch.tensor([tokenize(data[:1], tokenizer, "plain", 64).input_ids[0]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, model(input_ids=x).logits,
                                   rtol=1e-5, atol=1e-5)
    again = evaluate_loss(reloaded, tokenizer, data, "plain", 64)
    assert again["loss"] == pytest.approx(m["eval_after"]["loss"], rel=1e-5)
    assert again["loss"] < m["eval_before"]["loss"]


# ---------------------------------------------------------------- retention


def test_checkpoint_retention(tmp_path, tiny_lm_dir):
    data = _records(12)
    base = dict(model=str(tiny_lm_dir), lr=1e-3, max_length=48, batch_size=2, warmup_ratio=0.0)

    def steps(out):
        found = list_checkpoints(out)
        assert [s for s, _ in found] == sorted(s for s, _ in found)
        return [s for s, _ in found]

    train(data, TrainConfig(**base, save_every=1, keep_checkpoints=2), tmp_path / "a", progress=False)
    assert steps(tmp_path / "a") == [5, 6]

    train(data, TrainConfig(**base, save_every=None, checkpoint_steps=[1, 3, 6]), tmp_path / "b",
          progress=False)
    assert steps(tmp_path / "b") == [1, 3, 6]

    m = train(data, TrainConfig(**base, save_every=2, keep_checkpoints=1, num_checkpoints=3,
                                eval_every=2), tmp_path / "c", eval_data=data[:4], progress=False)
    assert steps(tmp_path / "c") == [2, 4, 6]  # evenly spaced ones kept whatever keep says
    assert m["checkpoints"] == [2, 4, 6]

    train(data, TrainConfig(**base, save_every=2, keep_checkpoints=1, checkpoint_steps=[1]),
          tmp_path / "d", progress=False)
    assert steps(tmp_path / "d") == [1, 6]

    # a checkpoint loads as a model that scores what the run measured at that step
    (step, path), = [c for c in list_checkpoints(tmp_path / "c") if c[0] == 4]
    model, tokenizer = load_checkpoint_model(str(tiny_lm_dir), path)
    ev = evaluate_loss(model, tokenizer, data[:4], "plain", 48)
    at4 = next(e for e in m["eval_curve"] if e["step"] == 4)
    assert ev["loss"] == pytest.approx(at4["loss"], rel=1e-5)


# ---------------------------------------------------------------- real run (slow)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("CURATE_SLOW") != "1", reason="set CURATE_SLOW=1 for the real run")
def test_lora_on_gsm8k_with_embedded_model(tmp_path, shared_data):
    """The issue's done-when run, smaller (benchmarks/train_gsm8k.py is the full one): the
    embedded SmolLM2, LoRA, 32 GSM8K examples, 16 held out; ~10 min on a shared 2-core CPU."""
    from peft import PeftModel

    from curate.models import load_causal_lm

    m = run_train(shared_data / "gsm8k_train.jsonl.gz", model="default", output_dir=tmp_path,
                  eval_path=shared_data / "gsm8k_test.jsonl.gz", limit=32, eval_limit=16,
                  max_length=512, batch_size=4, lr=1e-3, warmup_ratio=0.0, progress=False)
    assert m["eval_after"]["loss"] < m["eval_before"]["loss"]
    base, tokenizer = load_causal_lm("default")
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    ev = evaluate_loss(reloaded, tokenizer,
                       load_records(shared_data / "gsm8k_test.jsonl.gz", limit=16), "plain", 512)
    assert ev["loss"] == pytest.approx(m["eval_after"]["loss"], rel=1e-3)
