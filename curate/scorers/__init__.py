"""Model scorers, one module each; each registers itself by its config `type`
(curate.steps). `make_scorer` builds one from a job's spec."""

from __future__ import annotations

from curate import steps
from curate.models.loading import check_device_dtype
from curate.scorers.base import Scorer


def make_scorer(cfg: dict) -> Scorer:
    """A scorer from its config: {"type": "likelihood", <options>...}."""
    scorer = steps.build("scorer", cfg, "scorer")
    check_device_dtype(getattr(scorer, "device", "auto"), getattr(scorer, "dtype", "auto"), f"scorer {scorer.type!r}")
    return scorer


__all__ = ["Scorer", "make_scorer"]
