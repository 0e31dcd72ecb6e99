"""DON and NOD: how one SGD step on an example would move the output layer.

Paper: Hu, Yang, Zhou, Wu (2025), "DONOD: Robust and Generalizable Instruction
Fine-Tuning for LLMs via Model-Intrinsic Dataset Pruning" (arXiv 2504.14810). No
official code. docs/methods.md ("DONOD") is the specification followed here.

For an example with response tokens y_1..y_n, let h_t be the hidden state that predicts
y_t (the last hidden state after the final norm: exactly what feeds the LM head W, V x d),
z_t = W h_t, p_t = softmax(z_t), e_t the one-hot of y_t, and L the mean cross-entropy
over the response tokens. One SGD step of size eta on W alone gives W' = W - eta G with

    G = dL/dW = sum_t (p_t - e_t) h_t^T / n
    DON = ||W'||_F - ||W||_F   (the change of the norm, new minus old; ranked a benefit)
    NOD = ||W - W'||_F = eta ||G||_F   (cost: how far one example moves the layer)

Why DON's sign matters (docs/methods.md, corrected): <W, G> = mean over response tokens of
(CE - H), the token's cross-entropy minus the model's entropy there, so to first order
DON ~ -eta mean(CE - H) / ||W||. A target the model finds more surprising than its own
uncertainty (a wrong or mismatched answer) has a large CE - H and so a low DON: ranked
as a benefit, DON prefers rows the model can absorb, as NOD does. (This module first
computed ||W|| - ||W'||, the opposite sign; ranked as a benefit it preferred corrupted
rows: benchmarks/RESULTS_donod.md.)

Neither W' nor G (both V x d) is ever built, and there is no backward pass:

    <W, G>   = sum_t (p_t . z_t - z_t[y_t]) / n
    ||G||^2  = sum_{t,s} (h_t . h_s) ((p_t - e_t) . (p_s - e_s)) / n^2
    ||W'||^2 = ||W||^2 - 2 eta <W,G> + eta^2 ||G||^2
    DON      = (eta^2 ||G||^2 - 2 eta <W,G>) / (||W|| + ||W'||)

The last line is the difference of norms written without subtracting two nearly equal
numbers: with eta = 1e-4 the plain difference keeps about two digits in float32.

How it is computed (`don_nod`)
- One pass over the vocabulary in chunks of `vocab_chunk` rows of W, with an online
  softmax (running row maxima, sums rescaled as the maximum grows), so no T x V array
  exists; the logits block is at most time_chunk x vocab_chunk.
- The T x T Gram of (p_t - e_t) is accumulated over the chunks. To keep digits when the
  model is confident (p_t[y_t] close to 1, where p.p - 2 p[y] + 1 cancels), the target
  entry is kept out of the accumulated Gram and 1 - p_t[y_t] is carried as the sum of
  the other probabilities. With p'_t = p_t with its target entry zeroed and
  q_t = 1 - p_t[y_t]:
      (p_t - e_t).(p_s - e_s) = p'_t.p'_s - q_s p'_t[y_s] - q_t p'_s[y_t] + q_t q_s [y_t = y_s]
  and p_t . z_t - z_t[y_t] = sum_{v != y_t} p_t[v] (z_t[v] - z_t[y_t]).
- Responses longer than `time_chunk` are cut into time blocks; the Gram's cross-block
  terms recompute the logits of the pair of blocks (cost grows with the square of the
  number of blocks; the default covers `max_length`, so there is normally one block).
- Everything that is reduced is float32 or wider (the T x T reductions in float64), also
  when the model runs in bf16. ||W||_F is computed once per model (`weight_norm`).

Tied embedding / LM head (SmolLM2 ties them): W is treated as the head only. The
gradient that would reach the same matrix through the embedding lookup of the input
tokens is ignored, as docs/methods.md asks: DON/NOD measure the output layer's step.

Assumes logits = W h: a head with a bias, logit soft-capping or logit scaling is
refused rather than scored wrongly.

Step size: the paper does not pin one number for this single per-example step; the
default eta = 1e-4 is a typical SFT learning rate. The choice barely matters for
selection: NOD is proportional to eta and, for small eta, DON is too (DON ~ -eta <W,G> /
||W||), and TOPSIS normalises each column by its norm, so only the eta^2 ||G||^2 term
(which grows with eta) can reorder examples.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Sequence

import pyarrow as pa

from curate.formatting import Encoded
from curate.models.batching import map_token_batches, pad_batch, pad_id
from curate.scorers.base import CausalLMScorer

DEFAULT_ETA = 1e-4
DEFAULT_VOCAB_CHUNK = 8192
DEFAULT_TIME_CHUNK = 2048


# ------------------------------------------------------------------ pure math
def weight_norm(W, chunk: int = DEFAULT_VOCAB_CHUNK) -> float:
    """||W||_F accumulated in float64, a chunk of rows at a time (no full-size copy)."""
    import torch

    total = 0.0
    with torch.no_grad():
        for v0 in range(0, W.shape[0], chunk):
            total += float(W[v0:v0 + chunk].double().pow(2).sum())
    return math.sqrt(total)


def don_nod(hidden, targets, W, eta: float, W_norm: float | None = None,
            vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
            time_chunk: int = DEFAULT_TIME_CHUNK) -> tuple[float, float]:
    """(DON, NOD) of one example from the hidden states at its response positions.

    hidden: [T, d], hidden[t] predicts targets[t]; targets: [T] token ids; W: [V, d]
    the LM head. An empty response (T = 0) has G = 0, so (0.0, 0.0).
    """
    import torch

    n = int(targets.shape[0])
    if n == 0:
        return 0.0, 0.0
    if W_norm is None:
        W_norm = weight_norm(W, vocab_chunk)
    with torch.no_grad():
        w_dot_g, g_sq = _inner_and_sq_norm(hidden, targets, W, vocab_chunk, time_chunk)
    return step_metrics(W_norm, w_dot_g, g_sq, eta)


def step_metrics(W_norm: float, w_dot_g: float, g_sq: float, eta: float) -> tuple[float, float]:
    """(DON, NOD) from ||W||, <W,G> and ||G||^2, in the cancellation-free form."""
    new_sq = W_norm * W_norm - 2.0 * eta * w_dot_g + eta * eta * g_sq
    new_norm = math.sqrt(max(new_sq, 0.0))
    denom = W_norm + new_norm
    don = (eta * eta * g_sq - 2.0 * eta * w_dot_g) / denom if denom > 0 else 0.0
    return don, eta * math.sqrt(g_sq)


def _inner_and_sq_norm(hidden, targets, W, vocab_chunk: int, time_chunk: int) -> tuple[float, float]:
    """(<W,G>, ||G||_F^2) for one example; see the module docstring for the algebra."""
    import torch

    dev = W.device
    H = hidden.to(dev, torch.float32)
    y = targets.to(dev, torch.long)
    T, V = H.shape[0], W.shape[0]
    f64 = torch.float64
    blocks = [(a, min(a + time_chunk, T)) for a in range(0, T, max(1, time_chunk))]

    z_target = (H * W[y].float()).sum(-1)                   # z_t[y_t]
    m = torch.full((T,), -math.inf, dtype=torch.float32, device=dev)
    S = torch.zeros(T, dtype=f64, device=dev)               # sum_v exp(z - m)
    S_other = torch.zeros(T, dtype=f64, device=dev)         # same, target excluded
    B = torch.zeros(T, dtype=f64, device=dev)               # sum_{v!=y} exp(z-m)(z - z_y)
    Q = torch.zeros(T, T, dtype=f64, device=dev)            # sum_v E'_t[v] E'_s[v]

    for v0 in range(0, V, vocab_chunk):
        v1 = min(v0 + vocab_chunk, V)
        Wc = W[v0:v1].float()
        hit = (y >= v0) & (y < v1)

        def block_exp(Z, a0, a1, maxima):
            """exp(Z - maxima) for rows a0:a1 of this chunk, target entries zeroed."""
            E = torch.exp(Z - maxima[:, None])
            rows = torch.nonzero(hit[a0:a1]).squeeze(1)
            cols = y[a0:a1][rows] - v0
            target_e = E[rows, cols]
            E[rows, cols] = 0.0
            return E, rows, target_e

        scale = torch.ones(T, dtype=f64, device=dev)
        kept = None
        for a0, a1 in blocks:
            Z = H[a0:a1] @ Wc.T
            new_m = torch.maximum(m[a0:a1], Z.amax(dim=1))
            E, rows, target_e = block_exp(Z, a0, a1, new_m)
            f = torch.exp((m[a0:a1] - new_m).double())
            scale[a0:a1] = f
            m[a0:a1] = new_m
            other = E.sum(dim=1, dtype=f64)
            tsum = torch.zeros(a1 - a0, dtype=f64, device=dev)
            tsum[rows] = target_e.double()
            S[a0:a1] = S[a0:a1] * f + other + tsum
            S_other[a0:a1] = S_other[a0:a1] * f + other
            Z -= z_target[a0:a1, None]
            B[a0:a1] = B[a0:a1] * f + (Z * E).sum(dim=1, dtype=f64)
            kept = E if len(blocks) == 1 else None
            del Z, E
        Q *= scale[:, None] * scale[None, :]
        if kept is not None:
            Q += (kept @ kept.T).double()
        else:
            for i, (a0, a1) in enumerate(blocks):
                Ea = block_exp(H[a0:a1] @ Wc.T, a0, a1, m[a0:a1])[0]
                for b0, b1 in blocks[i + 1:]:
                    Eb = block_exp(H[b0:b1] @ Wc.T, b0, b1, m[b0:b1])[0]
                    part = (Ea @ Eb.T).double()
                    Q[a0:a1, b0:b1] += part
                    Q[b0:b1, a0:a1] += part.T
                Q[a0:a1, a0:a1] += (Ea @ Ea.T).double()

    n = T
    w_dot_g = float((B / S).sum()) / n
    lse = m.double() + torch.log(S)
    q = S_other / S                                           # 1 - p_t[y_t], without cancellation
    P_other = Q / (S[:, None] * S[None, :])                   # p'_t . p'_s
    same = y[:, None] == y[None, :]
    M = torch.exp((H @ W[y].float().T).double() - lse[:, None])  # p_t[y_s]
    M = M.masked_fill(same, 0.0)                              # p'_t[y_s]
    Mq = M * q[None, :]
    gram = P_other - Mq - Mq.T + (q[:, None] * q[None, :]) * same
    K = (H @ H.T).double()
    g_sq = max(float((K * gram).sum()) / (n * n), 0.0)
    return w_dot_g, g_sq


# ------------------------------------------------------------------ model level
def _check_head(model) -> Any:
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError("the model has no output embeddings (LM head) to score against")
    if getattr(head, "bias", None) is not None:
        raise NotImplementedError("DON/NOD closed form assumes logits = W h; this LM head has a bias")
    cfg = model.config
    cfg = cfg.get_text_config() if callable(getattr(cfg, "get_text_config", None)) else cfg
    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        value = getattr(cfg, name, None)
        if value not in (None, 0, 1, 1.0, False):
            raise NotImplementedError(f"DON/NOD closed form assumes logits = W h; the model sets {name}={value}")
    return head.weight


def _decoder(model):
    getter = getattr(model, "get_decoder", None)
    decoder = getter() if getter is not None else None
    return decoder if decoder is not None else model.model


def don_nod_batch(model, encoded: Sequence[Encoded], eta: float, W_norm: float | None = None,
                  pad_token_id: int = 0, vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
                  time_chunk: int = DEFAULT_TIME_CHUNK) -> list[tuple[float, float, int]]:
    """(DON, NOD, n response tokens) per example, from one forward of the base model.

    Examples are right-padded into one batch (the caller forms batches by token budget);
    the hidden states are the base model's last hidden state, i.e. what feeds
    `model.get_output_embeddings()`, and W is that head's weight.
    """
    import torch

    if not encoded:
        return []
    W = _check_head(model)
    if W_norm is None:
        W_norm = weight_norm(W, vocab_chunk)
    device = next(model.parameters()).device
    ids, mask = pad_batch(encoded, pad_token_id)
    with torch.inference_mode():
        hidden = _decoder(model)(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 use_cache=False).last_hidden_state
        out = []
        for i, e in enumerate(encoded):
            # hidden[t - 1] predicts token t, for every token t of the response span(s)
            t = torch.tensor(e.targets, dtype=torch.long)
            don, nod = don_nod(hidden[i, t.to(hidden.device) - 1], ids[i, t], W, eta, W_norm,
                               vocab_chunk, time_chunk)
            out.append((don, nod, len(t)))
    return out


# ------------------------------------------------------------------ Beam wrapper


@dataclasses.dataclass
class LoadedHead:
    """The model, its tokenizer and ||W||_F (computed once per model)."""

    model: Any
    tokenizer: Any
    W_norm: float
    max_tokens: int
    pad_token_id: int


@dataclasses.dataclass
class WeightDeltaScorer(CausalLMScorer):
    """DON and NOD of each example (docs/methods.md "DONOD"); the `donod` selector ranks them.

    Adds `don` (float64), `nod` (float64) and `n_response_tokens` (int64).
    Options: model ("default" = the embedded SmolLM2-135M-Instruct, or an HF id/path),
    template ("plain" | "chat"), max_length, eta (SGD step size, default 1e-4; see the
    module docstring), max_tokens_per_batch (padded tokens per forward; None: one example
    per forward on CPU, 65536 on CUDA), device and dtype ("auto": CUDA/bf16 when present, the CPU's best
    otherwise), vocab_chunk and time_chunk (bound the logits block).
    Resources: one model copy per SDK process (or `model_copies` shared ones), the
    activations of one batch, and per example a time_chunk x vocab_chunk float32 logits
    block (two of them while its exp is taken) plus T x T float64 Gram matrices.
    """

    type: ClassVar[str] = "weight_delta"

    eta: float = DEFAULT_ETA
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK
    time_chunk: int = DEFAULT_TIME_CHUNK

    def __post_init__(self):
        super().__post_init__()
        if not self.eta > 0:
            raise ValueError(f"weight_delta: eta must be > 0, got {self.eta}")
        if self.vocab_chunk < 1 or self.time_chunk < 1:
            raise ValueError("weight_delta: vocab_chunk and time_chunk must be >= 1")

    def output_columns(self) -> dict[str, pa.DataType]:
        return {"don": pa.float64(), "nod": pa.float64(), "n_response_tokens": pa.int64()}

    def load(self) -> LoadedHead:
        return self.loaded_from(*self.load_lm(self.model))

    def loaded_from(self, model, tokenizer) -> LoadedHead:
        """What `score_batch` needs, around an already loaded model (tests, benchmarks)."""
        W = _check_head(model)
        return LoadedHead(model.eval(), tokenizer, weight_norm(W, self.vocab_chunk), self.token_budget(W.device.type),
                          pad_id(tokenizer))

    def score_batch(self, m: LoadedHead, records: list[dict]) -> tuple[list[dict], int]:
        encoded = self.encode_all(records, m.tokenizer)
        results = map_token_batches(encoded, [len(e.input_ids) for e in encoded], m.max_tokens,
                                    lambda batch: don_nod_batch(m.model, batch, self.eta, m.W_norm, m.pad_token_id,
                                                                self.vocab_chunk, self.time_chunk))
        return ([{**r, "don": float(don), "nod": float(nod), "n_response_tokens": int(n)}
                 for r, (don, nod, n) in zip(records, results)], sum(len(e.input_ids) for e in encoded))

    def describe(self) -> dict:
        return {**super().describe(), "head": "LM head only (a tied embedding counts only its head path)"}
