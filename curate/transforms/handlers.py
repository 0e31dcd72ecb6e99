"""The Beam side of a scorer, written once: a `ModelHandler` over record dicts.

A scorer supplies a picklable zero-argument `load` that builds a *runner* on the worker:
an object holding the model with one method, `score(records) -> records`, that does all
the work (encode, batch by token budget, forward, add columns). Keeping the work inside
the runner is what lets Beam share one runner across processes: with `model_copies` set
the runner lives in a `MultiProcessShared` server process and `run_inference` calls it
through a proxy, so attribute access on the model from here would not work, method calls
do. Without it (the default) each SDK worker process loads its own copy, shared by the
threads in that process (Beam's `shared.Shared`): right for CPU workers, where every
process needs the cores anyway. For a GPU worker with several SDK processes set
`model_copies=1` (one model per GPU, not per process).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterable, Optional, Sequence

from apache_beam.ml.inference.base import ModelHandler

log = logging.getLogger(__name__)


class RecordModelHandler(ModelHandler):
    """RunInference handler: batches of record dicts in, the same records (same order)
    with the scorer's columns added out."""

    def __init__(self, load: Callable[[], Any], name: str, *, min_batch_size: int = 32,
                 max_batch_size: int = 1024, model_copies: Optional[int] = None):
        # Beam batches records; the runner re-batches each Beam batch by token budget
        # after sorting by length, so a large Beam batch mainly buys less padding.
        super().__init__(min_batch_size=min_batch_size, max_batch_size=max_batch_size,
                         model_copies=model_copies)
        self._load = load
        self._name = name

    def load_model(self):
        return self._load()

    def run_inference(self, batch: Sequence[dict], model, inference_args: Optional[dict] = None
                      ) -> Iterable[dict]:
        return model.score(list(batch))

    def get_metrics_namespace(self) -> str:
        return f"curate.{self._name}"


class Progress:
    """Logs rows and tokens per second every `every_s` seconds of scoring."""

    def __init__(self, name: str, every_s: float = 30.0):
        self.name = name
        self.every_s = every_s
        self.rows = 0
        self.tokens = 0
        self.busy_s = 0.0
        self._last_log = time.monotonic()

    def add(self, rows: int, tokens: int, seconds: float) -> None:
        self.rows += rows
        self.tokens += tokens
        self.busy_s += seconds
        now = time.monotonic()
        if now - self._last_log >= self.every_s:
            self._last_log = now
            log.info("%s: %d rows, %d tokens, %.0f tokens/s", self.name, self.rows,
                     self.tokens, self.tokens / max(self.busy_s, 1e-9))
