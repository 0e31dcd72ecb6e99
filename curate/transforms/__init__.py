"""Per-example steps. Model scorers are registered here by their config `type`."""

from __future__ import annotations

import dataclasses

from curate.transforms.base import Scorer
from curate.transforms.embedding import EmbeddingScorer
from curate.transforms.likelihood import LikelihoodScorer

SCORERS: dict[str, type[Scorer]] = {
    "likelihood": LikelihoodScorer,
    "embedding": EmbeddingScorer,
}


def scorer_options(cls: type[Scorer]) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.init)


def make_scorer(cfg: dict) -> Scorer:
    """A scorer from its config: {"type": "likelihood", <options>...}."""
    if not isinstance(cfg, dict) or "type" not in cfg:
        raise ValueError(f"scorer config needs a 'type' (one of {', '.join(SCORERS)}); got {cfg!r}")
    options = {k: v for k, v in cfg.items() if k != "type"}
    kind = cfg["type"]
    if kind not in SCORERS:
        raise ValueError(f"unknown scorer type {kind!r}; expected one of {', '.join(SCORERS)}")
    cls = SCORERS[kind]
    allowed = scorer_options(cls)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"scorer {kind!r}: unknown option(s) {', '.join(unknown)}; "
                         f"allowed: {', '.join(allowed)}")
    return cls(**options)


__all__ = ["SCORERS", "EmbeddingScorer", "LikelihoodScorer", "Scorer", "make_scorer",
           "scorer_options"]
