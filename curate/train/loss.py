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

import math
from contextlib import ExitStack, nullcontext
from typing import Iterable

import torch
import torch.nn.functional as F

from curate.models.batching import pad_id as tokenizer_pad_id
from curate.models.lm_head import body_and_head, chunked_nll, post_head, response_positions
from curate.train.data import Tokenized, collate, micro_batches, tokenize

IGNORE = -100


def response_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of NLL over labelled tokens, number of labelled tokens) from full logits: the
    plain definition, what `batch_nll` computes without building them.

    `logits[:, t]` predicts `labels[:, t + 1]` (the causal-LM shift); labels -100 are
    ignored. Computed in float32 whatever the logits' dtype."""
    shift_logits = logits[:, :-1, :]
    shift_labels = labels[:, 1:]
    total = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)).float(),
                            shift_labels.reshape(-1), ignore_index=IGNORE, reduction="sum")
    return total, (shift_labels != IGNORE).sum()


# Logits per chunk in training: 16 MiB of float32. A chunk's logits, their softmax and
# gradient are alive at the end of the forward, when every activation is too; smaller
# chunks cost nothing measurable (a head matmul of 85 rows is still a big one).
TRAIN_MAX_LOGIT_ELEMENTS = 1 << 22


def batch_nll(model, batch: dict,
              max_logit_elements: int = TRAIN_MAX_LOGIT_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward one collated batch; (sum of response-token NLL, number of response tokens).

    The body runs once; the LM head runs only on the hidden states that predict a
    response token, in chunks whose gradient is taken as they go (`curate.models.lm_head`),
    so the batch x length x vocabulary logits never exist, in training or evaluation. The
    value and gradient equal `response_nll` on the full logits."""
    body, head = body_and_head(model)
    input_ids, labels = batch["input_ids"], batch["labels"]
    # No attention mask: padding is on the right, and in a causal model a real token never
    # attends to a later position, so its hidden state is the same with or without the
    # mask; only the padded positions' states differ, and no loss is read there. Without a
    # mask SDPA keeps its fused causal kernel.
    hidden = body(input_ids=input_ids, use_cache=False).last_hidden_state
    rows, cols = response_positions(labels, IGNORE)
    targets = labels[rows, cols + 1]
    nll = chunked_nll(hidden[rows, cols], targets, head, post_head(model.config), max_logit_elements)
    return nll, torch.tensor(targets.numel())


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def autocast_for(model, dtype: torch.dtype | None = None):
    """bf16 autocast when asked, or when the model holds bf16 weights (a LoRA run keeps
    its trainable weights in float32 over a bf16 base); otherwise a no-op.

    Under autocast a PEFT adapter's input is not cast to its float32 weights first:
    autocast runs the adapter's matmuls in bf16 anyway, and the cast is a full copy of
    every adapted layer's input (measured: a sixth of a LoRA step's CPU time)."""
    if dtype is None:
        dtype = torch.bfloat16 if any(p.dtype == torch.bfloat16 for p in model.parameters()) else None
    if dtype is None or dtype == torch.float32:
        return nullcontext()
    stack = ExitStack()
    stack.enter_context(torch.autocast(device_type=model_device(model).type, dtype=dtype))
    if hasattr(model, "peft_config"):
        from peft.helpers import disable_input_dtype_casting

        stack.enter_context(disable_input_dtype_casting(model))
    return stack


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
    return evaluate_tokenized(model, tok, tokenizer_pad_id(tokenizer), batch_tokens=batch_tokens,
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
                                     pad_token_id=tokenizer_pad_id(tokenizer))
            out.append({
                "id": rid,
                "prompt": tokenizer.decode(ids[:p], skip_special_tokens=True),
                "reference": tokenizer.decode(ids[p:], skip_special_tokens=True),
                "generated": tokenizer.decode(gen[0, p:].tolist(), skip_special_tokens=True),
            })
    finally:
        model.train(was_training)
    return out
