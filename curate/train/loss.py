"""The response-token loss, held-out evaluation and sample generation.

Loss definition (training and evaluation alike): the mean negative log-likelihood of the
response tokens, token-weighted over the batch (or over the whole evaluation set):

    loss = sum over response tokens t of -log p(x_t | x_<t)  /  number of response tokens

Prompt tokens and padding carry label -100 and contribute nothing, neither to the sum nor
to the count. The response includes the EOS that `curate.formatting.encode` appends, so
the model is trained (and scored) on stopping. Because batches are token-weighted, a long
response weighs more than a short one, as in a per-token perplexity.
"""

from __future__ import annotations

import inspect
import math
from contextlib import nullcontext
from typing import Iterable

import torch
import torch.nn.functional as F

from curate.train.data import Tokenized, collate, micro_batches, tokenize

IGNORE = -100


def response_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of NLL over labelled tokens, number of labelled tokens).

    `logits[:, t]` predicts `labels[:, t + 1]` (the causal-LM shift); labels -100 are
    ignored. Computed in float32 whatever the logits' dtype."""
    shift_logits = logits[:, :-1, :]
    shift_labels = labels[:, 1:]
    total = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)).float(),
                            shift_labels.reshape(-1), ignore_index=IGNORE, reduction="sum")
    return total, (shift_labels != IGNORE).sum()


def _base_model(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _accepts_logits_to_keep(model) -> bool:
    cached = getattr(model, "_curate_logits_to_keep", None)
    if cached is None:
        try:
            cached = "logits_to_keep" in inspect.signature(_base_model(model).forward).parameters
        except (TypeError, ValueError):
            cached = False
        try:
            model._curate_logits_to_keep = cached
        except Exception:  # noqa: BLE001 - a model that refuses attributes just pays the check
            pass
    return cached


def batch_nll(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward one collated batch; (sum of response-token NLL, number of response tokens).

    Only the positions that predict a response token need logits, so where the model
    supports it (`logits_to_keep`, HF causal LMs) the LM head runs from the shortest
    prompt onwards instead of over the whole sequence: on a 49k vocabulary that head is a
    fifth of the model's FLOPs."""
    input_ids, attention, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    start = max(int(batch["prompt_lens"].min()) - 1, 0)
    if start > 0 and _accepts_logits_to_keep(model):
        out = model(input_ids=input_ids, attention_mask=attention, use_cache=False,
                    logits_to_keep=input_ids.size(1) - start)
        return response_nll(out.logits, labels[:, start:])
    out = model(input_ids=input_ids, attention_mask=attention, use_cache=False)
    return response_nll(out.logits, labels)


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def autocast_for(model, dtype: torch.dtype | None = None):
    """bf16 autocast when asked, or when the model holds bf16 weights (a LoRA run keeps
    its trainable weights in float32 over a bf16 base); otherwise a no-op."""
    if dtype is None:
        dtype = torch.bfloat16 if any(p.dtype == torch.bfloat16 for p in model.parameters()) else None
    if dtype is None or dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=model_device(model).type, dtype=dtype)


def _pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


@torch.no_grad()
def evaluate_tokenized(model, tok: Tokenized, pad_id: int, *, batch_tokens: int = 4096,
                       autocast_dtype: torch.dtype | None = None) -> dict:
    if len(tok) == 0:
        return {"loss": float("nan"), "ppl": float("nan"), "n_tokens": 0, "n_examples": 0}
    was_training = model.training
    model.eval()
    device = model_device(model)
    total, count = 0.0, 0
    try:
        for idx in micro_batches(tok.lengths, seed=0, epoch=0, batch_size=1,
                                 batch_tokens=batch_tokens, shuffle=False):
            batch = {k: v.to(device) for k, v in collate(tok, idx, pad_id).items()}
            with autocast_for(model, autocast_dtype):
                nll, n = batch_nll(model, batch)
            total += float(nll)
            count += int(n)
    finally:
        model.train(was_training)
    loss = total / max(count, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "n_tokens": count,
            "n_examples": len(tok), "n_truncated": tok.n_truncated}


def evaluate_loss(model, tokenizer, records: Iterable[dict], template: str = "plain",
                  max_length: int = 1024, *, batch_tokens: int = 4096,
                  autocast_dtype: torch.dtype | None = None) -> dict:
    """Mean response-token loss over `records` (token-weighted over the whole set):
    {"loss", "ppl": exp(loss), "n_tokens", "n_examples", "n_truncated"}."""
    tok = tokenize(records, tokenizer, template, max_length)
    return evaluate_tokenized(model, tok, _pad_id(tokenizer), batch_tokens=batch_tokens,
                              autocast_dtype=autocast_dtype)


@torch.no_grad()
def generate_samples(model, tokenizer, records: Iterable[dict], template: str = "plain",
                     max_length: int = 1024, max_new_tokens: int = 64) -> list[dict]:
    """Greedy continuations of each record's prompt (the exact prompt tokens training
    uses), with the reference response beside them."""
    tok = tokenize(records, tokenizer, template, max_length)
    was_training = model.training
    model.eval()
    device = model_device(model)
    out = []
    try:
        for ids, p, rid in zip(tok.input_ids, tok.prompt_lens, tok.ids):
            prompt = torch.tensor([ids[:p]], device=device)
            with autocast_for(model):
                gen = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                     max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=_pad_id(tokenizer))
            out.append({
                "id": rid,
                "prompt": tokenizer.decode(ids[:p], skip_special_tokens=True),
                "reference": tokenizer.decode(ids[p:], skip_special_tokens=True),
                "generated": tokenizer.decode(gen[0, p:].tolist(), skip_special_tokens=True),
            })
    finally:
        model.train(was_training)
    return out
