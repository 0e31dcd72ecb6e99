"""Per-example steps. Model scorers are registered here by their config `type`."""

from __future__ import annotations

import dataclasses

from curate.config import ConfigError, check_option_types

from curate.transforms.base import Scorer
from curate.transforms.degradation import DegradationScorer
from curate.transforms.embedding import EmbeddingScorer
from curate.transforms.likelihood import LikelihoodScorer
from curate.transforms.trajectory import TrajectoryScorer
from curate.transforms.weight_delta import WeightDeltaScorer

SCORERS: dict[str, type[Scorer]] = {
    "likelihood": LikelihoodScorer,
    "embedding": EmbeddingScorer,
    "weight_delta": WeightDeltaScorer,
    "trajectory": TrajectoryScorer,
    "degradation": DegradationScorer,
}


def scorer_options(cls: type[Scorer]) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.init)


def make_scorer(cfg: dict) -> Scorer:
    """A scorer from its config: {"type": "likelihood", <options>...}."""
    if not isinstance(cfg, dict) or "type" not in cfg:
        raise ConfigError(f"scorer config needs a 'type' (one of {', '.join(SCORERS)}); got {cfg!r}")
    options = {k: v for k, v in cfg.items() if k != "type"}
    kind = cfg["type"]
    if kind not in SCORERS:
        raise ConfigError(f"unknown scorer type {kind!r}; expected one of {', '.join(SCORERS)}")
    cls = SCORERS[kind]
    allowed = scorer_options(cls)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(f"scorer {kind!r}: unknown option(s) {', '.join(unknown)}; "
                         f"allowed: {', '.join(allowed)}")
    check_option_types(cls, options, f"scorer {kind!r}")
    return cls(**options)


__all__ = ["SCORERS", "DegradationScorer", "EmbeddingScorer", "LikelihoodScorer", "TrajectoryScorer",
           "WeightDeltaScorer", "Scorer", "make_scorer",
           "scorer_options"]
