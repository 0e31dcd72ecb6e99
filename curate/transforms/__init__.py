"""Per-example steps. Model scorers are registered here by their config `type`."""

from __future__ import annotations

from curate.config import ConfigError, make_step
from curate.models.loading import check_device_dtype

from curate.transforms.base import Scorer
from curate.transforms.degradation import DegradationScorer
from curate.transforms.embedding import EmbeddingScorer
from curate.transforms.ifd import IfdScorer
from curate.transforms.likelihood import LikelihoodScorer
from curate.transforms.trajectory import TrajectoryScorer
from curate.transforms.weight_delta import WeightDeltaScorer

SCORERS: dict[str, type[Scorer]] = {
    "likelihood": LikelihoodScorer,
    "ifd": IfdScorer,
    "embedding": EmbeddingScorer,
    "weight_delta": WeightDeltaScorer,
    "trajectory": TrajectoryScorer,
    "degradation": DegradationScorer,
}


def make_scorer(cfg: dict) -> Scorer:
    """A scorer from its config: {"type": "likelihood", <options>...}."""
    if not isinstance(cfg, dict) or "type" not in cfg:
        raise ConfigError(f"scorer config needs a 'type' (one of {', '.join(SCORERS)}); got {cfg!r}")
    options = {k: v for k, v in cfg.items() if k != "type"}
    kind = cfg["type"]
    if kind not in SCORERS:
        raise ConfigError(f"unknown scorer type {kind!r}; expected one of {', '.join(SCORERS)}")
    scorer = make_step(SCORERS[kind], options, f"scorer {kind!r}")
    check_device_dtype(getattr(scorer, "device", "auto"), getattr(scorer, "dtype", "auto"), f"scorer {kind!r}")
    return scorer


__all__ = ["SCORERS", "DegradationScorer", "EmbeddingScorer", "IfdScorer", "LikelihoodScorer", "TrajectoryScorer",
           "WeightDeltaScorer", "Scorer", "make_scorer"]
