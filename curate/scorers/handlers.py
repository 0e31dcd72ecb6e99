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

The loaded runner is wrapped in `GuardedRunner`: one batch at a time per model, so
concurrent SDK threads and processes never stack their forwards on one GPU.

Fault tolerance lives here too, because every scorer's batches pass through
`run_inference`: a batch that runs out of memory is split in half and each half retried
(recursively), and a batch that fails for any other reason is bisected the same way to
find the row(s) at fault. A single row that still fails is not fatal: it comes back with
`SCORE_ERROR` set (the scorer and the exception) and no score columns, and the pipeline
sends it to the dead-letter output instead of the selectors.
"""

from __future__ import annotations

import gc
import logging
import sys
import threading
from typing import Any, Callable, Iterable, Optional, Sequence

from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler

log = logging.getLogger(__name__)

# set on a record whose scoring failed on its own: "<scorer> failed: <Type>: <message>"
SCORE_ERROR = "_score_error"
MAX_WARNINGS = 20  # failed rows and split batches logged per process


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA (or MPS/CPU allocator) out of memory, or a Python MemoryError."""
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")  # no torch import just to classify an error
    if torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


class BatchOutOfMemory(MemoryError):
    """A batch ran out of memory; raised after the model's process released what it could."""


def _free_accelerator_memory() -> None:
    # the failed batch's tensors are garbage once its traceback is gone; hand the cached
    # blocks back so the halves start from a clean allocator
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


class GuardedRunner:
    """A scorer's runner behind a lock: one batch at a time per loaded model, whichever SDK
    thread or process calls. With `model_copies` every SDK process of a worker calls the
    one model in Beam's MultiProcessShared server; unguarded, each would run its own
    forward (up to a token budget each) at once and a GPU could run out of memory on good
    rows. Memory is released here, in the process that holds the model, before the error
    goes back to the caller that splits the batch."""

    def __init__(self, runner):
        self.runner = runner
        self._lock = threading.Lock()

    def score(self, records: list[dict]) -> list[dict]:
        with self._lock:
            try:
                return list(self.runner.score(records))
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                # keep only the text: leaving this block drops the traceback, and with it
                # the batch's tensors, so the allocator can hand them back
                error = f"{type(exc).__name__}: {exc}"
            _free_accelerator_memory()
            raise BatchOutOfMemory(error)


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
        return GuardedRunner(self._load())

    def run_inference(self, batch: Sequence[dict], model, inference_args: Optional[dict] = None
                      ) -> Iterable[dict]:
        # a batch whose every row fails goes to the dead letter like any other: whether
        # that is too many is the run's `max_failed_fraction` to say, over all rows
        # (curate.pipeline.run.check_failures), not one batch's
        return self._score_or_split(list(batch), model)

    def _score_or_split(self, records: list[dict], model) -> list[dict]:
        try:
            return list(model.score(records))
        except Exception as exc:
            # keep only the text: leaving the handler drops the traceback, and with it the
            # failed batch's tensors, before the halves run
            # a BatchOutOfMemory's text already names the original error
            error = str(exc) if isinstance(exc, BatchOutOfMemory) else f"{type(exc).__name__}: {exc}"
            out_of_memory = is_out_of_memory(exc)
        if len(records) == 1:
            Metrics.counter(self.get_metrics_namespace(), "rows_failed").inc()
            record = records[0]
            self._log("%s: row %s (%s) failed, sent to the dead letter: %s", self._name,
                      record.get("id"), record.get("origin"), error)
            return [{**record, SCORE_ERROR: f"scorer {self._name} failed: {error}"[:2000]}]
        half = len(records) // 2
        Metrics.counter(self.get_metrics_namespace(), "batches_split").inc()
        self._log("%s: a batch of %d rows %s; retrying as %d + %d rows", self._name, len(records),
                  "ran out of memory" if out_of_memory else f"failed ({error[:200]})",
                  half, len(records) - half)
        return self._score_or_split(records[:half], model) + self._score_or_split(records[half:], model)

    def _log(self, *args) -> None:
        """A warning for the first MAX_WARNINGS failures of this process, then silence: a
        scorer failing on most rows must not write a line for each (the manifest and the
        dead letter count them all)."""
        self._warned = getattr(self, "_warned", 0) + 1
        if self._warned <= MAX_WARNINGS:
            log.warning(*args)
        if self._warned == MAX_WARNINGS:
            log.warning("%s: further failures are counted in the dead letter, not logged", self._name)

    def get_metrics_namespace(self) -> str:
        return f"curate.{self._name}"

