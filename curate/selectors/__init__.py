"""Selection methods, one module each. `make_selector` builds one from a job step."""

from __future__ import annotations

import importlib

from curate.config import ConfigError, make_step

# type -> "module:Class", imported on use so a job only loads what it needs
SELECTORS = {
    "random": "curate.selectors.random:RandomSelector",
    "grape": "curate.selectors.grape:GrapeSelector",
    "diversity": "curate.selectors.diversity:DiversitySelector",
    "paser": "curate.selectors.paser:PaserSelector",
    "s2l": "curate.selectors.s2l:S2LSelector",
    "donod": "curate.selectors.donod:DonodSelector",
    "top": "curate.selectors.top:TopSelector",
    "semdedup": "curate.selectors.semdedup:SemDedupSelector",
}


def make_selector(spec: dict):
    spec = dict(spec)
    kind = spec.pop("type")
    if kind not in SELECTORS:
        raise ConfigError(f"unknown selector {kind!r}; known: {', '.join(SELECTORS)}")
    module, name = SELECTORS[kind].split(":")
    cls = getattr(importlib.import_module(module), name)
    return make_step(cls, spec, f"selector {kind!r}")
