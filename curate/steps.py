"""The one registry of a job's steps: filters, scorers and selectors.

A step class says what it is with two class attributes: `kind` ("filter", "scorer" or
"selector", set by its base class) and `type` (the name a job's `type:` uses).
Defining the class registers it (`Step.__init_subclass__`): no other file lists the
step names, and a new method is one new module. A job finds its steps here among:

- curate's own: every module under `curate.scorers` and `curate.selectors` is
  imported once, on the first lookup;
- those of any installed package that declares an entry point in the group
  `curate.steps`, whose value is the module (or an object in it) defining the steps:

      [project.entry-points."curate.steps"]
      my_steps = "my_package.my_steps"

For report.html a selector also declares `title` (its heading; default the type),
`report_section` ("module:function", the function from a `SelectorRun` to HTML or None
when the output lacks its columns) and `draws_clusters` (its section draws the
clusters, so the page's generic cluster plot is left out).
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from importlib import metadata
from typing import Any, ClassVar

import pyarrow as pa

from curate.config import ConfigError, make_step

KINDS = ("filter", "scorer", "selector")
ENTRY_POINT_GROUP = "curate.steps"
BUILT_IN_PACKAGES = ("curate.filters", "curate.scorers", "curate.selectors")

_registry: dict[tuple[str, str], type] = {}
_built_ins_loaded = False
_entry_points_loaded: set[str] = set()


@dataclasses.dataclass(frozen=True)
class ModelStage:
    """Model work a step needs besides its rows, declared by `Step.model_stage()` and run
    by the plan (curate.pipeline.model_stages), never by the step itself:

    "proxy"   before the pipeline, on this machine: train a proxy model on the job's pool
              after its validation and filters (`settings`: curate.train.proxy.train_proxy's
              options, with `output_dir` and optional `data`, other inputs to read); the
              step gets the training report.
    "refine"  a train / generate / score function (curate.train.refine) built from
              `settings` when the plan is made; the step gets it and calls it on a worker
              between its rounds.
    """

    kind: str
    settings: dict


class Step:
    """What every filter, scorer and selector declares (see the module docstring)."""

    kind: ClassVar[str] = ""
    type: ClassVar[str] = ""
    # True: sees one row at a time (a filter's `reason_to_drop`); False: the whole pool
    per_example: ClassVar[bool] = False
    # columns it reads that an earlier step writes (the plan checks an earlier step does)
    requires: ClassVar[tuple[str, ...]] = ()
    # A streamed step (curate.pipeline.streamed) decides from a small projection of each
    # row, so the pipeline streams the rows instead of holding them: `project(record)` ->
    # the few fields read (id and origin included), `decide(rows_again)` -> a PTransform
    # from batches of projections, by column ({field: [values]}: a row per element would
    # cost Beam microseconds a step), to one state element (a set of duplicates, a
    # cut-off; a call to `rows_again()` reads the rows once more), `route(row, state)` ->
    # (reject reason or None, the step's columns), reading only the fields both the record
    # and its projection carry. None: whole rows needed.
    project: ClassVar[Any] = None
    title: ClassVar[str] = ""
    report_section: ClassVar[str | None] = None
    draws_clusters: ClassVar[bool] = False

    def output_columns(self) -> dict[str, pa.DataType]:
        """The columns this step adds to every row it passes on (and rejects), typed."""
        return {}

    def resources(self) -> dict:
        """What a worker needs to run it: `device` ("cpu", "auto", "cuda", ...) and
        `model` (a name or path, or None). Dataflow jobs are checked against it."""
        return {"device": "cpu", "model": None}

    def describe(self) -> dict:
        """What the manifest records of it."""
        return {"type": self.type}

    def model_stage(self) -> ModelStage | None:
        """The model work this step needs besides its rows (None: none)."""
        return None

    def use_model_stage(self, result) -> None:
        """Receive what its model stage gave: the proxy's training report, or the refine
        function."""
        raise NotImplementedError(f"{self.kind} {self.type!r} declares no model stage")

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("type"):  # a concrete step; its bases declare no type
            _register(cls)


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _register(cls: type) -> None:
    if cls.kind not in KINDS:
        raise TypeError(f"{_qualified(cls)}: kind must be one of {', '.join(KINDS)}, not {cls.kind!r}")
    key = (cls.kind, cls.type)
    old = _registry.get(key)
    # the same class defined again (a module reloaded) replaces itself; another is a clash
    if old is not None and _qualified(old) != _qualified(cls):
        raise TypeError(f"two {cls.kind}s of type {cls.type!r}: {_qualified(old)} and {_qualified(cls)}")
    _registry[key] = cls


def _load() -> None:
    global _built_ins_loaded
    if not _built_ins_loaded:
        for package in BUILT_IN_PACKAGES:
            for info in pkgutil.walk_packages(importlib.import_module(package).__path__, package + "."):
                importlib.import_module(info.name)
        _built_ins_loaded = True
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.value in _entry_points_loaded:
            continue
        try:
            ep.load()
        except Exception as exc:
            dist = f" of {ep.dist.name}" if getattr(ep, "dist", None) else ""
            raise ConfigError(f"the {ENTRY_POINT_GROUP} entry point {ep.name} = {ep.value!r}{dist} "
                              f"failed to load: {type(exc).__name__}: {exc}") from exc
        _entry_points_loaded.add(ep.value)


def known(kind: str) -> list[str]:
    """The types of every step of this kind."""
    _load()
    return sorted(t for k, t in _registry if k == kind)


def find(kind: str, type_: str) -> type | None:
    """The step class of this kind and type, or None."""
    _load()
    return _registry.get((kind, type_))


def build(kind: str, spec: Any, where: str):
    """The step a job's spec ({"type": ..., <options>}) asks for; a ConfigError naming
    `where` for an unknown type or a bad option."""
    if not isinstance(spec, dict) or "type" not in spec:
        raise ConfigError(f"{where}: a {kind} needs a 'type' (one of {', '.join(known(kind))}); got {spec!r}")
    options = {k: v for k, v in spec.items() if k != "type"}
    cls = find(kind, spec["type"])
    if cls is None:
        raise ConfigError(f"{where}: unknown {kind} {spec['type']!r}; known: {', '.join(known(kind))}")
    return make_step(cls, options, f"{where} ({spec['type']})")
