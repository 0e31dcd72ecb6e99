"""The scorers' contract.

A `Scorer` is a step used through Beam's `RunInference`: it says which columns it adds
and gives a `ModelHandler`; the pipeline composes scorers and knows nothing about torch.

`ModelScorer` is the base of every model-backed scorer and owns the mechanics once:
    resources    device, dtype, token budget per forward, model copies, Beam batch sizes
                 (the same fields in every scorer's config); on Dataflow the declared
                 device is checked against the job's workers before launch
                 (`curate.dataflow.check_worker_resources`)
    loading      `load()` runs on the worker, once per model copy; `load_lm` /
                 `load_encoder` apply the resource fields
    batching     `token_budget` by device
    Beam         `model_handler()`: `RecordModelHandler` (OOM halving, bisection to the
                 failing row, one batch at a time per model, see handlers.py)
    progress     rows and tokens of every batch, counted by `ModelRunner`
    describe     every config field, for the manifest
A scorer implements `load()`, `score_batch(loaded, records) -> (records with its
columns, tokens processed)` and `output_columns()`. `CausalLMScorer` adds what a scorer
over a causal LM reads rows with (model, template, turns, max_length) and `encode_all`
(every row of a batch as tokens, the failing record named).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal, Optional

import pyarrow as pa

from curate.formatting import TEMPLATES, encode
from curate.models import load_causal_lm, load_embedder
from curate.progress import StageProgress
from curate.scorers.handlers import RecordModelHandler
from curate.steps import Step


class Scorer(Step):
    kind = "scorer"
    # set by the pipeline before `model_handler()`: the stage name shown in progress lines,
    # and on local runs the directory the workers write their counts to
    stage: str = ""
    progress_dir: str | None = None

    def progress(self):
        """The worker's progress counter for this scorer (rows, tokens)."""
        return StageProgress(self.stage or f"score:{self.type}", self.progress_dir)

    def output_columns(self) -> dict[str, pa.DataType]:
        """Columns this scorer adds to every record, with their Arrow types."""
        raise NotImplementedError

    def model_handler(self):
        """An `apache_beam.ml.inference.base.ModelHandler` over record dicts."""
        raise NotImplementedError



@dataclasses.dataclass
class ModelScorer(Scorer):
    """A scorer backed by one or more models; see the module docstring."""

    # tokens per forward pass (batch size x longest length) when `max_tokens_per_batch` is
    # None, by device type; scorers override
    TOKENS_PER_BATCH: ClassVar[dict[str, int]] = {"cpu": 1, "cuda": 65536}

    device: str = "auto"
    dtype: str = "auto"
    max_tokens_per_batch: Optional[int] = None   # None: TOKENS_PER_BATCH by device
    trust_remote_code: bool = False
    min_batch_size: int = 32                     # Beam's batches; the runner re-batches by tokens
    max_batch_size: int = 1024
    model_copies: Optional[int] = None           # set (e.g. 1 per GPU) to share across processes

    # ---- what a scorer implements
    def load(self) -> Any:
        """Worker side, once per model copy: whatever `score_batch` needs."""
        raise NotImplementedError

    def score_batch(self, loaded: Any, records: list[dict]) -> tuple[list[dict], int]:
        """The records (same order) with this scorer's columns added, and the tokens processed."""
        raise NotImplementedError

    # ---- shared mechanics
    def load_lm(self, name: str):
        """(causal LM in eval mode, tokenizer) with this scorer's device, dtype and trust."""

        return load_causal_lm(name, device=self.device, dtype=self.dtype, trust_remote_code=self.trust_remote_code)

    def load_encoder(self, name: str):
        return load_embedder(name, device=self.device, dtype=self.dtype, trust_remote_code=self.trust_remote_code)

    def token_budget(self, device_type: str) -> int:
        return self.max_tokens_per_batch or self.TOKENS_PER_BATCH.get(device_type, self.TOKENS_PER_BATCH["cpu"])

    def load_runner(self) -> "ModelRunner":
        return ModelRunner(self)

    def model_handler(self):
        return RecordModelHandler(self.load_runner, self.type, min_batch_size=self.min_batch_size,
                                  max_batch_size=self.max_batch_size, model_copies=self.model_copies)

    def describe(self) -> dict:
        return {"type": self.type, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}

    def resources(self) -> dict:
        return {"device": self.device, "model": getattr(self, "model", None)}


@dataclasses.dataclass
class CausalLMScorer(ModelScorer):
    """A scorer over a causal LM that reads each row as tokens (curate.formatting.encode):
    `model`, the prompt `template`, the assistant `turns` a chat template scores, and
    `max_length` (tokens kept; each scorer sets its own default)."""

    model: str = "default"
    template: str = "plain"
    turns: Literal["all", "last"] = "all"  # chat template: loss on every assistant turn, or the last
    max_length: int = 1024

    def __post_init__(self):
        if self.template not in TEMPLATES:
            raise ValueError(f"{self.type}: unknown template {self.template!r}; expected one of {', '.join(TEMPLATES)}")
        if self.max_length < 2:
            raise ValueError(f"{self.type}: max_length must be at least 2")

    def encode_all(self, records: list[dict], tokenizer, **options) -> list:
        """`curate.formatting.encode` of every record with this scorer's template, length and
        turns; a record that cannot be encoded fails the batch naming it (the handler then
        bisects to it and sends it to the dead letter)."""
        out = []
        for record in records:
            try:
                out.append(encode(record, tokenizer, self.template, self.max_length, turns=self.turns, **options))
            except Exception as err:
                raise ValueError(f"{self.type}: cannot encode record {record.get('id')!r}: {err}") from err
        return out


class ModelRunner:
    """Worker side: the loaded models of one scorer; `score(records)` is what the handler
    calls (through a MultiProcessShared proxy when `model_copies` is set)."""

    def __init__(self, scorer: ModelScorer):
        self.scorer = scorer
        self.loaded = scorer.load()
        self.progress = scorer.progress()

    def score(self, records: list[dict]) -> list[dict]:
        out, tokens = self.scorer.score_batch(self.loaded, records)
        self.progress.add(len(records), tokens)
        return out
