"""The model step of the diversity method's iterative refinement (Yu et al., 2024, Alg. 1).

Given the rows drawn so far: fine-tune the model on them (`curate.train.train`, LoRA by
default), generate a response to each prompt with the fine-tuned model (greedy), and
score each row

    perplexity gap (default):  S = -log(PPL(x + y_gen) / PPL(x + y_gold))
                                 = mean logp(y_gen | x) - mean logp(y_gold | x)
    reward gap:                S = r(x, y_gold) - r(x, y_gen)

Log-probabilities are over response tokens only (the EOS that `curate.formatting.encode`
appends included, as in every curate loss), under the fine-tuned model, with the same
template the trainer used. A generation cut at `max_new_tokens` is scored with that EOS
too: a small penalty for not stopping. The reward model is any HF sequence-classification
model with one output (its first logit is the reward); it reads
"###Human: {prompt} ###Assistant: {response}", the released code's format.

Each round starts again from the base model (the rows drawn so far are its training
set), as the released scripts do; the fine-tuned weights are kept under
`work_dir/round-<r>/` when a work_dir is given, otherwise in a temporary directory that
is removed afterwards. Everything is seeded; the rows arrive in a fixed order.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from curate.formatting import encode
from curate.models.batching import pad_id
from curate.train.data import collate, tokenize
from curate.train.loading import load_model, resolve_device_dtype
from curate.train.loss import autocast_for, model_device
from curate.train.trainer import TrainConfig, train

log = logging.getLogger(__name__)

# the trainer's defaults, except: no periodic checkpoints (one short run per round)
_TRAIN_DEFAULTS = {"save_every": None, "keep_checkpoints": 0}
# base models loaded in this process, shared by the rounds' steps (never trained in place)
_BASE_MODELS: dict = {}


@dataclass
class RefineConfig:
    model: str = "default"          # the model fine-tuned each round: "default", HF id or path
    gap: str = "perplexity"         # "perplexity" | "reward"
    reward_model: str | None = None
    template: str = "plain"
    max_length: int = 512
    max_new_tokens: int = 64
    batch_size: int = 8             # generation and scoring
    train: dict = field(default_factory=dict)  # curate.train.TrainConfig overrides
    device: str = "auto"
    dtype: str = "auto"

    def __post_init__(self):
        if self.gap not in ("perplexity", "reward"):
            raise ValueError(f"gap {self.gap!r}: expected perplexity or reward")
        if self.gap == "reward" and not self.reward_model:
            raise ValueError("gap: reward needs reward_model")
        for name in ("max_length", "max_new_tokens", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1")
        self.train_config(seed=0)  # unknown or invalid trainer options fail now

    @classmethod
    def from_dict(cls, d: dict) -> "RefineConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown refinement option(s) {unknown}")
        return cls(**d)

    def train_config(self, seed: int):
        opts = {**_TRAIN_DEFAULTS, "template": self.template, "max_length": self.max_length,
                "device": self.device, "dtype": self.dtype, "seed": seed, **self.train,
                "model": self.model}
        return TrainConfig.from_dict(opts)


# ---------------------------------------------------------------- scoring and generation


def mean_response_logprobs(model, tokenizer, records: Sequence[dict], template: str = "plain",
                           max_length: int = 512, batch_size: int = 8) -> list[float]:
    """Mean log-probability of each record's response tokens given its prompt."""
    import torch

    tok = tokenize(records, tokenizer, template, max_length)
    out = [float("nan")] * len(tok)
    order = sorted(range(len(tok)), key=lambda i: len(tok.input_ids[i]))
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                batch = collate(tok, idx, pad_id(tokenizer))
                ids = batch["input_ids"].to(device)
                with autocast_for(model):
                    logits = model(input_ids=ids, attention_mask=batch["attention_mask"].to(device),
                                   use_cache=False).logits
                logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
                labels = batch["labels"][:, 1:].to(device)
                mask = labels != -100
                picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
                means = picked.sum(1) / mask.sum(1).clamp(min=1)
                for i, m in zip(idx, means.tolist()):
                    out[i] = m
    finally:
        model.train(was_training)
    return out


def generate_responses(model, tokenizer, records: Sequence[dict], template: str = "plain",
                       max_length: int = 512, max_new_tokens: int = 64, batch_size: int = 8) -> list[str]:
    """Greedy responses to each record's prompt (the exact prompt tokens training uses),
    batched with left padding, shortest prompts together."""
    import torch

    prompts = []
    for r in records:
        enc = encode(r, tokenizer, template, max_length)
        prompts.append(enc.input_ids[:enc.prompt_len])
    pad = pad_id(tokenizer)
    device = model_device(model)
    out = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                width = max(len(prompts[i]) for i in idx)
                ids = torch.full((len(idx), width), pad, dtype=torch.long)
                attn = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):
                    p = prompts[i]
                    ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
                    attn[row, width - len(p):] = 1
                with autocast_for(model):
                    gen = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device),
                                         max_new_tokens=max_new_tokens, do_sample=False,
                                         pad_token_id=pad)
                for row, i in enumerate(idx):
                    out[i] = tokenizer.decode(gen[row, width:].tolist(), skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
    return out


def with_response(record: dict, response: str) -> dict:
    """The record with another response (in `response` and as the last message)."""
    messages = [dict(m) for m in (record.get("messages") or [])]
    if messages and messages[-1].get("role") == "assistant":
        messages[-1] = {**messages[-1], "content": response}
    return {**record, "response": response, "messages": messages}


def reward_scores(reward_model, reward_tokenizer, records: Sequence[dict], max_length: int = 512,
                  batch_size: int = 8) -> list[float]:
    import torch

    texts = [f"###Human: {r['prompt']} ###Assistant: {r['response']}" for r in records]
    if reward_tokenizer.pad_token is None:
        reward_tokenizer.pad_token = reward_tokenizer.eos_token
    device = next(reward_model.parameters()).device
    out: list[float] = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            enc = reward_tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                                   truncation=True, max_length=max_length).to(device)
            out += reward_model(**enc).logits[:, 0].float().tolist()
    return out


# ---------------------------------------------------------------- the step


class TrainGenerateScore:
    """gap_fn for the diversity selector: rows -> (S per row, info for the round log)."""

    def __init__(self, cfg: RefineConfig):
        self.cfg = cfg
        self._base = None
        self._reward = None

    def _load(self):
        if self._base is None:
            device, dtype = resolve_device_dtype(self.cfg.device, self.cfg.dtype)
            method = self.cfg.train.get("method", "lora")
            # LoRA trains over a frozen base in the compute dtype; full fine-tuning in fp32
            load_dtype = dtype if method == "lora" else "float32"
            key = (self.cfg.model, device, str(load_dtype))
            if key not in _BASE_MODELS:
                _BASE_MODELS[key] = load_model(self.cfg.model, device=device, dtype=load_dtype)
            self._base = _BASE_MODELS[key]
        return self._base

    def _load_reward(self):
        if self._reward is None:
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            tok = AutoTokenizer.from_pretrained(self.cfg.reward_model)
            model = AutoModelForSequenceClassification.from_pretrained(self.cfg.reward_model).eval()
            if model.config.pad_token_id is None:
                model.config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            self._reward = (model, tok)
        return self._reward

    def __call__(self, rows: Sequence[dict], round_index: int, seed: int,
                 work_dir: str | None = None) -> tuple[list[float], dict]:

        base, tokenizer = self._load()
        model = copy.deepcopy(base)  # every round fine-tunes the base afresh
        tmp = None
        if work_dir and "://" not in work_dir:
            out_dir = Path(work_dir) / f"round-{round_index}"
        else:
            tmp = out_dir = Path(tempfile.mkdtemp(prefix=f"curate-diversity-r{round_index}-"))
        try:
            cfg = self.cfg.train_config(seed)
            # train() wraps `model` with peft in place (get_peft_model injects the adapter
            # layers into it) or trains all its weights: afterwards `model` is the fine-tuned one
            metrics = train(list(rows), cfg, out_dir, resume=False, model=model, tokenizer=tokenizer,
                            progress=False)
            model.eval()
            c = self.cfg
            generated = generate_responses(model, tokenizer, rows, c.template, c.max_length,
                                           c.max_new_tokens, c.batch_size)
            gen_rows = [with_response(r, g) for r, g in zip(rows, generated)]
            if c.gap == "perplexity":
                gold = mean_response_logprobs(model, tokenizer, rows, c.template, c.max_length, c.batch_size)
                gen = mean_response_logprobs(model, tokenizer, gen_rows, c.template, c.max_length, c.batch_size)
                gaps = [g - o for g, o in zip(gen, gold)]
            else:
                rm, rtok = self._load_reward()
                gold = reward_scores(rm, rtok, rows, c.max_length, c.batch_size)
                gen = reward_scores(rm, rtok, gen_rows, c.max_length, c.batch_size)
                gaps = [o - g for g, o in zip(gen, gold)]
        finally:
            del model
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        info = {"train": {k: metrics.get(k) for k in ("steps", "n_train", "train_loss_first",
                                                      "train_loss_last", "train_time_s", "device")},
                "gap": self.cfg.gap,
                "mean_gold": _mean(gold), "mean_generated": _mean(gen),
                "examples": [{"id": r["id"], "generated": g[:300]} for r, g in zip(rows[:3], generated[:3])]}
        if work_dir and tmp is None:
            info["train"]["output_dir"] = str(out_dir)
        return gaps, info


def _mean(xs: Sequence[float]) -> float | None:
    vals = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(vals) / len(vals) if vals else None
