"""The LM head applied where it is needed, in chunks: scoring and training share this.

A causal LM's `model(ids).logits` is batch x length x vocabulary floats. Every loss and
score in curate needs only the positions that predict a response token, so the body runs
once (`body_and_head`), the hidden states at those positions are gathered, and the head
runs over them in chunks of at most `max_logit_elements` logits, in float32 for the
log-softmax. For SmolLM2 (V = 49,152) a batch of 8 x 1,024 tokens would otherwise hold
1.6 GB of float32 logits, as much again for their log-softmax and for its gradient.

Training (`chunked_nll`) never keeps a chunk's logits for the backward pass either: the
gradient of each chunk's loss with respect to its hidden states (and any trainable head
parameter) is taken right after its forward, as Liger-Kernel's fused linear
cross-entropy does, so the peak is one chunk of logits and the backward costs no second
head matmul.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

DEFAULT_MAX_LOGIT_ELEMENTS = 1 << 24  # 64 MiB of float32 logits per chunk


def text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def body_and_head(model):
    """(the transformer body that returns `last_hidden_state`, the output head) of a causal
    LM, a PEFT wrapper unwrapped (its adapters live inside the body's modules)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    body = getattr(model, "base_model", None)
    head = model.get_output_embeddings()
    if body is None or body is model or head is None:
        raise NotImplementedError(
            f"{type(model).__name__}: need a causal LM with a separate body (base_model) "
            "and output head (get_output_embeddings)")
    return body, head


def post_head(config) -> Callable | None:
    """The logit transform the model applies after its head, as a function (or None):
    `logit_scale` (Cohere, multiplies), `logits_scaling` (Granite, divides),
    `final_logit_softcapping` (Gemma 2/3)."""
    config = text_config(config)
    scale = getattr(config, "logit_scale", None)
    divide = getattr(config, "logits_scaling", None)
    cap = getattr(config, "final_logit_softcapping", None)
    if not (scale or divide or cap):
        return None

    def transform(logits):
        if scale:
            logits = logits * scale
        if divide:
            logits = logits / divide
        if cap:
            logits = (logits / cap).tanh() * cap
        return logits

    return transform


def head_logits(head, transform: Callable | None, hidden: torch.Tensor) -> torch.Tensor:
    """float32 logits of `hidden` (positions x d)."""
    logits = head(hidden).float()
    return transform(logits) if transform is not None else logits


def chunk_rows(head, max_logit_elements: int = DEFAULT_MAX_LOGIT_ELEMENTS) -> int:
    return max(1, max_logit_elements // head.weight.shape[0])


def response_positions(labels: torch.Tensor, ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of the positions whose next token is labelled: position t of a row
    predicts labels[t + 1] (the causal shift)."""
    rows, cols = (labels[:, 1:] != ignore_index).nonzero(as_tuple=True)
    return rows, cols


class _ChunkedNLL(torch.autograd.Function):
    """sum_t CE(head(hidden_t), target_t), with gradients computed chunk by chunk during
    the forward (see the module docstring)."""

    @staticmethod
    def forward(ctx, hidden, targets, head, transform, chunk, *params):
        grad_hidden = torch.empty_like(hidden)
        grad_params = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start:start + chunk].detach().requires_grad_(True)
            with torch.enable_grad():
                loss = F.cross_entropy(head_logits(head, transform, h), targets[start:start + chunk],
                                       reduction="sum")
            grads = torch.autograd.grad(loss, [h, *params])
            grad_hidden[start:start + chunk] = grads[0]
            for acc, g in zip(grad_params, grads[1:]):
                acc += g
            total += loss.detach()
        ctx.save_for_backward(grad_hidden, *grad_params)
        ctx.param_dtypes = [p.dtype for p in params]
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, *grad_params = ctx.saved_tensors
        out = [grad_hidden * grad_total.to(grad_hidden.dtype), None, None, None, None]
        out += [(g * grad_total).to(dt) for g, dt in zip(grad_params, ctx.param_dtypes)]
        return tuple(out)


def chunked_nll(hidden: torch.Tensor, targets: torch.Tensor, head, transform: Callable | None = None,
                max_logit_elements: int = DEFAULT_MAX_LOGIT_ELEMENTS) -> torch.Tensor:
    """Sum over positions of the cross-entropy of head(hidden) against targets, without
    ever holding more than one chunk of logits; differentiable in `hidden` and in the
    head's trainable parameters. Without grad it is a plain chunked loop."""
    chunk = chunk_rows(head, max_logit_elements)
    params = [p for p in head.parameters() if p.requires_grad]
    if torch.is_grad_enabled() and (hidden.requires_grad or params):
        return _ChunkedNLL.apply(hidden, targets, head, transform, chunk, *params)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        total += F.cross_entropy(head_logits(head, transform, hidden[start:start + chunk]),
                                 targets[start:start + chunk], reduction="sum")
    return total
