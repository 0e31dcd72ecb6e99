"""Contracts for per-example steps.

A `Scorer` is a model-backed step used through Beam's `RunInference`: it owns how to
load the model, how to run one batch and which columns it adds; the pipeline composes
scorers and knows nothing about torch. Its handler's `run_inference` takes a batch of
record dicts and returns the same records (same order) with its columns added.
"""

from __future__ import annotations

import pyarrow as pa


class Scorer:
    type: str = ""
    # set by the pipeline before `model_handler()`: the stage name shown in progress lines,
    # and on local runs the directory the workers write their counts to
    stage: str = ""
    progress_dir: str | None = None

    def progress(self):
        """The worker's progress counter for this scorer (rows, tokens)."""
        from curate.progress import StageProgress

        return StageProgress(self.stage or f"score:{self.type}", self.progress_dir)

    def output_columns(self) -> dict[str, pa.DataType]:
        """Columns this scorer adds to every record, with their Arrow types."""
        raise NotImplementedError

    def model_handler(self):
        """An `apache_beam.ml.inference.base.ModelHandler` over record dicts."""
        raise NotImplementedError

    def describe(self) -> dict:
        """What to record in the manifest (model, template, dtype, ...)."""
        return {"type": self.type}
