"""Loss trajectories for S2L (Yang et al., 2024): every example's mean response-token loss
at each of a proxy run's T checkpoints, in training-step order.

    trajectory (list<float64>, length T): [loss at step s_1, ..., loss at step s_T],
                                          s_1 < ... < s_T; NaN (and +-inf) -> 0

The loss is the one the trainer minimises and the authors' `get_trajectories.py` records
(HF `model(input_ids, labels).loss` per example, prompt tokens masked): the mean over the
response tokens of -log p(token | everything before it), on the example as
`curate.formatting.encode` formats it, computed by `curate.scorers.likelihood`
(`score_encoded`: token-budget batches, LM head only on response positions), so it is
-`logprob_mean` of the likelihood scorer at that checkpoint.

Checkpoints (`checkpoints:` a directory):
- a curate trainer run (`checkpoints/step-N/adapter` or `.../model`), found with
  `curate.train.list_checkpoints`, or
- any directory of `checkpoint-N/` or `step-N/` subdirectories (HF Trainer's layout, the
  authors' code), each a peft adapter or a saved model,
ordered by the step number N, never by name: the released code globs checkpoint
directories unsorted, so its trajectory coordinates come in filesystem order, and
`checkpoint-1000` sorts before `checkpoint-500` as a string. `steps: [...]` keeps a
subset.

Memory: not T models at once. LoRA checkpoints (the default proxy run): the base model
is loaded once and the T adapters (a few MB each) are put on it with peft under one name
per step; each batch of records is encoded once and run T times, `set_adapter` switching
between passes. Full-model checkpoints: one model in memory, its weights replaced from
the checkpoint's safetensors before each pass (T weight loads per batch, so raise
`min_batch_size` to amortise them). Either way one pass costs one forward of the proxy;
a row costs T forwards.

Proxy training from the job (`proxy: {<trainer options>, data: optional inputs}`): a
model stage before the pipeline (`curate.pipeline.model_stages`) reads the pool (the job's
inputs, or `data`) through the pipeline's readers, validation and filters, and trains the
proxy into `checkpoints` unless that run is already complete there
(`curate.train.proxy.train_proxy`; the trainer resumes a partial run).
With `scores:` in the job the trajectories are computed once and `curate select --scores
DIR --method s2l` re-selects from them without any model.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from pathlib import Path
from typing import ClassVar, Optional

import numpy as np
import pyarrow as pa

from curate.config import ConfigError
from curate.models.batching import pad_id
from curate.models.logprobs import score_encoded
from curate.scorers.base import CausalLMScorer
from curate.train.checkpoints import list_checkpoints, load_model_weights
from curate.steps import ModelStage

log = logging.getLogger(__name__)

_HF_STEP_DIR = re.compile(r"^(?:checkpoint|step)[-_](\d+)$")


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path       # the directory with adapter_config.json (LoRA) or config.json (full)
    kind: str        # "lora" | "full"


def _weights_dir(path: Path) -> tuple[Path, str] | None:
    for sub in ("adapter", "model", "."):
        d = path / sub
        if (d / "adapter_config.json").is_file():
            return d.resolve(), "lora"
        if (d / "config.json").is_file() and any(d.glob("*.safetensors")):
            return d.resolve(), "full"
    return None


def discover_checkpoints(root: str | Path, steps: Optional[list[int]] = None) -> list[Checkpoint]:
    """The checkpoints under `root`, sorted by step (numerically)."""

    root = Path(root)
    found = list_checkpoints(root)
    if not found and root.is_dir():
        found = [(int(m.group(1)), p) for p in root.iterdir()
                 if p.is_dir() and (m := _HF_STEP_DIR.match(p.name))]
    out = []
    for step, path in sorted(found, key=lambda item: item[0]):
        weights = _weights_dir(path)
        if weights is None:
            raise ConfigError(f"{path}: neither a peft adapter nor a saved model")
        out.append(Checkpoint(step, *weights))
    if steps is not None:
        wanted = {int(s) for s in steps}
        missing = sorted(wanted - {c.step for c in out})
        if missing:
            raise ConfigError(f"{root}: no checkpoint at step(s) {missing}; found "
                              f"{[c.step for c in out]}")
        out = [c for c in out if c.step in wanted]
    kinds = {c.kind for c in out}
    if len(kinds) > 1:
        raise ConfigError(f"{root}: a mix of LoRA and full-model checkpoints")
    return out


def finite_or_zero(x: float) -> float:
    """S2L's NaN -> 0 (and +-inf, which would wreck k-means, likewise)."""
    return x if math.isfinite(x) else 0.0


@dataclasses.dataclass
class LoadedProxy:
    """Worker side: the proxy (base + T adapters, or one model reloaded per checkpoint)."""

    checkpoints: list[Checkpoint]
    model: object        # what response_logprobs runs (with LoRA layers in place for adapters)
    peft: object | None  # the PeftModel holding one adapter per checkpoint, or None
    tokenizer: object
    max_tokens: int
    pad_token_id: int

    def use(self, c: Checkpoint) -> None:
        if self.peft is not None:
            self.peft.set_adapter(adapter_name(c))
        else:
            load_model_weights(self.model, c.path)


def adapter_name(c: Checkpoint) -> str:
    return f"step-{c.step}"


@dataclasses.dataclass
class TrajectoryScorer(CausalLMScorer):
    """S2L loss trajectories: adds `trajectory` (list<float64>, one loss per checkpoint).

    Options: `checkpoints` (the proxy run directory), `model` (the base the LoRA
    adapters were trained on), `proxy` (trainer options, and `data` to train on other inputs
    than the job's: a model stage trains the proxy into `checkpoints` first unless that
    run is complete there), `steps` (a subset of
    checkpoint steps), template / max_length (as the proxy was trained: the defaults
    match `train_proxy`'s), batching and device as the likelihood scorer.
    Resources: one base model + T adapters per SDK process (or `model_copies` shared),
    activations for `max_tokens_per_batch` tokens; T forward passes per row.
    """

    type: ClassVar[str] = "trajectory"

    checkpoints: str = "runs/s2l-proxy"
    proxy: Optional[dict] = None
    steps: Optional[list] = None
    max_length: int = 512
    column: str = "trajectory"
    max_logit_elements: int = 1 << 24

    def __post_init__(self):
        super().__post_init__()
        if self.proxy is not None and not isinstance(self.proxy, dict):
            raise ValueError("trajectory: proxy must be a mapping of trainer options (and optional 'data')")
        self._proxy_metrics: dict | None = None
        self._found: list[Checkpoint] | None = None

    def output_columns(self) -> dict[str, pa.DataType]:
        return {self.column: pa.list_(pa.float64())}

    def written_paths(self) -> tuple[str, ...]:
        """Path options this scorer's model stage writes (`curate.pipeline.saved_work`)."""
        return ("checkpoints",) if self.proxy is not None else ()

    def model_stage(self) -> ModelStage | None:
        """With `proxy:`, the proxy run before the pipeline (curate.pipeline.model_stages):
        trained on the pool (`proxy.data`, or else the job's inputs) after the job's
        validation and filters; the trainer returns at once when the same run is already
        complete in `checkpoints`."""
        if self.proxy is None:
            return None
        return ModelStage("proxy", {**self.proxy, "output_dir": self.checkpoints, "model": self.model,
                                    "template": self.template, "turns": self.turns, "max_length": self.max_length})

    def use_model_stage(self, report: dict) -> None:
        self._proxy_metrics = {k: v for k, v in report.items() if k != "proxy_run"}

    def prepare(self) -> list[Checkpoint]:
        """Driver side, after the model stage: the checkpoints to score with."""
        if self._found is not None:
            return self._found
        found = discover_checkpoints(self.checkpoints, self.steps)
        if not found:
            raise ConfigError(f"trajectory: no checkpoints in {self.checkpoints}; train a proxy "
                              f"there (`proxy:` option, or `curate train ... --output DIR` with "
                              f"checkpoints) or point `checkpoints:` at one")
        log.info("trajectory: %d checkpoints at steps %s", len(found), [c.step for c in found])
        self._found = found
        return found

    def load(self) -> LoadedProxy:
        checkpoints = self.prepare()  # found on the driver; pickled with the scorer
        kind = checkpoints[0].kind
        model, tokenizer = self.load_lm(self.model if kind == "lora" else str(checkpoints[0].path))
        peft = None
        if kind == "lora":
            from peft import PeftModel

            names = [adapter_name(c) for c in checkpoints]
            peft = PeftModel.from_pretrained(model, str(checkpoints[0].path), adapter_name=names[0])
            for c, name in zip(checkpoints[1:], names[1:]):
                peft.load_adapter(str(c.path), adapter_name=name)
            peft.eval()
            # the transformer with the LoRA layers in place: what response_logprobs runs
            model = peft.get_base_model()
        return LoadedProxy(checkpoints, model, peft, tokenizer,
                           self.token_budget(model.get_output_embeddings().weight.device.type), pad_id(tokenizer))

    def losses(self, proxy: LoadedProxy, encoded: list) -> list[list[float]]:
        """[example][checkpoint] mean response-token loss, checkpoints in step order."""
        per_ckpt = []
        for c in proxy.checkpoints:
            proxy.use(c)
            scored = score_encoded(proxy.model, encoded, max_tokens_per_batch=proxy.max_tokens,
                                   pad_token_id=proxy.pad_token_id, max_logit_elements=self.max_logit_elements)
            per_ckpt.append([finite_or_zero(-mean) for _, mean, _ in scored])
        return [list(row) for row in zip(*per_ckpt)]

    def score_batch(self, proxy: LoadedProxy, records: list[dict]) -> tuple[list[dict], int]:
        encoded = self.encode_all(records, proxy.tokenizer)
        out = [{**r, self.column: np.asarray(t, dtype=np.float64)} for r, t in zip(records, self.losses(proxy, encoded))]
        return out, len(proxy.checkpoints) * sum(len(e.input_ids) for e in encoded)

    def model_handler(self):
        self.prepare()  # the driver trains the proxy / finds the checkpoints before the graph runs
        return super().model_handler()

    def describe(self) -> dict:
        out = super().describe()
        if self._found is not None:
            out["checkpoint_steps"] = [c.step for c in self._found]
            out["checkpoint_kind"] = self._found[0].kind
        if self._proxy_metrics is not None:
            out["proxy_run"] = self._proxy_metrics
        return out
