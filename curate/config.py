"""Job config: YAML -> typed objects. The one place for defaults.

A job file looks like (see jobs/ for real ones):

    name: gsm8k-random
    inputs:
      - path: ${CURATE_DATA:-../shared/data}/gsm8k_train.jsonl.gz
        source: gsm8k            # default: the file name without extensions
        format: auto             # jsonl | json | parquet | arrow | hf  (auto: by suffix)
        adapter: auto            # alpaca | qa | messages | sharegpt | pool_list | prompt_response
        fields: {}               # adapter field -> input field, e.g. {output: answer}
        limit: null              # read only the first N rows of each file
        limit_prompts: null      # keep only rows answering the first N distinct prompts of
                                 # each file, every response to them (a slice of a pool)
    validate: {max_chars: 32000}
    filters:   [{type: length, unit: chars, min: 1, max: 20000}, {type: dedup}]
    scorers:   [{type: likelihood, model: default}]
    scores: runs/gsm8k-scores      # optional: keep scores here, re-use them when inputs,
                                   # filters and scorers are unchanged (score once, select many)
    selectors: [{type: random, budget: 1000, seed: 0}]
    output: runs/gsm8k-random
    beam_args: []                  # Beam pipeline options for this job, `--flag=value`
                                   # (runner, project, workers: see jobs/dataflow/);
                                   # options after `--` on the command line come later and win
    select_beam_args: null         # options for the selection from `scores:` (no model:
                                   # CPU workers on Dataflow); null: beam_args

Paths and beam_args expand `${VAR}` and `${VAR:-default}` from the environment; relative
paths are relative to the working directory (run jobs from the repository root).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import os
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import yaml

from curate.errors import ConfigError

FORMATS = ("auto", "jsonl", "json", "parquet", "arrow", "hf")


class TooManyFailures(RuntimeError):
    """More of a scorer's rows failed than the job's `max_failed_fraction` allows."""


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_vars(text: str) -> str:
    def sub(m: re.Match) -> str:
        value = os.environ.get(m.group(1))
        if value is None:
            if m.group(2) is None:
                raise ConfigError(f"environment variable {m.group(1)} is not set (used in {text!r})")
            return m.group(2)
        return value

    return _VAR.sub(sub, text)


@dataclass
class InputConfig:
    path: str
    source: str | None = None
    format: str = "auto"
    adapter: str = "auto"
    fields: dict[str, str] = field(default_factory=dict)
    limit: int | None = None
    limit_prompts: int | None = None


@dataclass
class ValidateConfig:
    max_chars: int = 32_000  # longer examples go to the dead-letter output


@dataclass
class JobConfig:
    inputs: list[InputConfig]
    output: str
    name: str = "curate-job"
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    filters: list[dict] = field(default_factory=list)
    scorers: list[dict] = field(default_factory=list)
    selectors: list[dict] = field(default_factory=list)
    train: dict | None = None
    scores: str | None = None  # score once, select many: where scored rows are kept and re-used
    shard_rows: int = 50_000  # rows per output shard, about (rows are spread by a hash)
    beam_args: list[str] = field(default_factory=list)
    # Beam options for the selection from stored scores (`scores:`), which loads no model:
    # on Dataflow, CPU workers and the CPU image instead of the scoring job's GPUs. None: beam_args
    select_beam_args: list[str] | None = None
    # scorers' results are saved here as they come, so a rerun after a crash scores only
    # what is missing (curate.pipeline.saved_work); None: `.<output name>.saved` beside the output
    saved_work: str | None = None
    # above this share of a scorer's rows failing, the run fails (below, they go to the dead letter)
    max_failed_fraction: float = 0.01
    source_file: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- option types

def _matches(value: Any, hint: Any) -> bool:
    """Whether a YAML value fits a type annotation (unions, Optional, list/tuple/dict of,
    Literal; an int is a valid float, a bool is not a number). Unknown hints pass."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is typing.Callable or origin is collections.abc.Callable:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is typing.Literal:
        return value in args
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        item = args[0] if args else Any
        return all(_matches(v, item) for v in value)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            return False
        k, v = args if len(args) == 2 else (Any, Any)
        return all(_matches(a, k) and _matches(b, v) for a, b in value.items())
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(_describe(a) for a in args))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    names = {int: "an integer", float: "a number", str: "text", bool: "true or false", type(None): "null",
             dict: "a mapping"}
    if hint in names:
        return names[hint]
    if origin in (list, tuple, collections.abc.Sequence):
        return f"a list of {_describe(args[0])}" if args else "a list"
    if origin is dict:
        return f"a mapping of {_describe(args[0])} to {_describe(args[1])}" if args else "a mapping"
    return getattr(hint, "__name__", str(hint))


def check_option_types(target: Any, options: dict, where: str) -> None:
    """A ConfigError naming the key when a value does not fit `target`'s annotation
    (`target`: a dataclass or a function such as a step's __init__), so `seed: abc` is one
    clear line instead of a traceback from deep inside a step."""
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # an annotation that cannot be resolved here: nothing to check against
        return
    for key, value in options.items():
        if key in hints and key != "return" and not _matches(value, hints[key]):
            raise ConfigError(f"{where}: {key} must be {_describe(hints[key])}, got {value!r}")


def make_step(cls, options: dict, where: str):
    """`cls(**options)` for a step read from a job (filter, scorer, selector, train), with
    every mistake one ConfigError naming the step and the key: an unknown key (and the
    known ones), a missing required key, a value of the wrong type, or a value the step
    itself refuses."""
    import inspect

    params = {name: p for name, p in inspect.signature(cls).parameters.items()
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(cls).parameters.values())
    unknown = sorted(set(options) - set(params))
    if unknown and not takes_any:
        raise ConfigError(f"{where}: unknown option(s) {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(params))}")
    missing = [n for n, p in params.items() if p.default is p.empty and n not in options]
    if missing:
        raise ConfigError(f"{where}: {', '.join(missing)} is required")
    check_option_types(cls if dataclasses.is_dataclass(cls) else cls.__init__, options, where)
    try:
        return cls(**options)
    except ConfigError:
        raise  # it names the step already
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _build(cls, data: Any, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    check_option_types(cls, data, where)
    return cls(**data)


def _steps(raw: Any, where: str) -> list[dict]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ConfigError(f"{where}: expected a list of steps")
    steps = []
    for i, step in enumerate(raw):
        if not isinstance(step, dict) or "type" not in step:
            raise ConfigError(f"{where}[{i}]: each step needs a 'type'")
        steps.append(dict(step))
    return steps


def _beam_args(raw: Any, where: str) -> list[str]:
    """Beam pipeline options as `--flag=value` strings; a malformed one is an error here,
    because Beam would drop it with only a log line."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ConfigError(f"{where}: beam_args must be a list of '--flag=value' strings, "
                          f"got {type(raw).__name__}")
    out = []
    for i, arg in enumerate(raw):
        if not isinstance(arg, str) or not arg.startswith("--") or " " in arg.split("=", 1)[0]:
            raise ConfigError(f"{where}: beam_args[{i}] {arg!r}: expected one '--flag=value' string, "
                              f"e.g. '--runner=DataflowRunner'")
        out.append(expand_vars(arg))
    return out


def parse_job(data: dict, source_file: str | None = None) -> JobConfig:
    where = source_file or "job"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the job must be a mapping")
    data = dict(data)
    raw_inputs = data.pop("inputs", None)
    if not raw_inputs:
        raise ConfigError(f"{where}: 'inputs' is required (a list of {{path: ...}})")
    if isinstance(raw_inputs, (str, dict)):
        raw_inputs = [raw_inputs]
    inputs = []
    for i, item in enumerate(raw_inputs):
        item = {"path": item} if isinstance(item, str) else item
        if isinstance(item, dict) and not isinstance(item.get("path"), str):
            raise ConfigError(f"{where}: inputs[{i}].path must be text (a file, glob or directory), "
                              f"got {item.get('path')!r}")
        cfg = _build(InputConfig, item, f"{where}: inputs[{i}]")
        cfg.path = expand_vars(str(cfg.path))
        if cfg.format not in FORMATS:
            raise ConfigError(f"{where}: inputs[{i}].format {cfg.format!r} is not one of {FORMATS}")
        inputs.append(cfg)
    if not isinstance(data.get("output"), str) or not data["output"].strip():
        raise ConfigError(f"{where}: 'output' is required: the output directory, as text")
    data["output"] = expand_vars(str(data["output"]))
    if data.get("scores"):
        data["scores"] = expand_vars(str(data["scores"]))
    validate = _build(ValidateConfig, data.pop("validate", None) or {}, f"{where}: validate")
    for key in ("filters", "scorers", "selectors"):
        data[key] = _steps(data.get(key), f"{where}: {key}")
    data["beam_args"] = _beam_args(data.get("beam_args"), where)
    if data.get("select_beam_args") is not None:
        data["select_beam_args"] = _beam_args(data["select_beam_args"], f"{where}: select_beam_args")
    job = _build(JobConfig, {**data, "inputs": inputs, "validate": validate}, where)
    job.source_file = source_file
    if job.shard_rows < 1:
        raise ConfigError(f"{where}: shard_rows must be positive, got {job.shard_rows}")
    if not 0.0 <= job.max_failed_fraction <= 1.0:
        raise ConfigError(f"{where}: max_failed_fraction must be between 0 and 1, got {job.max_failed_fraction}")
    if job.saved_work:
        job.saved_work = expand_vars(str(job.saved_work))
    if job.validate.max_chars < 1:
        raise ConfigError(f"{where}: validate.max_chars must be positive, got {job.validate.max_chars}")
    for i, cfg in enumerate(job.inputs):
        if cfg.limit is not None and cfg.limit < 1:
            raise ConfigError(f"{where}: inputs[{i}].limit must be a positive number of rows "
                              f"(or absent for all), got {cfg.limit}")
        if cfg.limit_prompts is not None and cfg.limit_prompts < 1:
            raise ConfigError(f"{where}: inputs[{i}].limit_prompts must be a positive number of prompts "
                              f"(or absent for all), got {cfg.limit_prompts}")
    return job


def read_yaml(path: str, what: str):
    """A YAML file's data; a missing file or broken YAML is a ConfigError naming it."""
    try:
        with open(path, encoding="utf-8") as fh:
            return yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None


def load_job(path: str) -> JobConfig:
    return parse_job(read_yaml(path, "job file"), source_file=path)


def parse_budget(value: Any, where: str) -> int | float:
    """A budget is a count (int >= 0) or a fraction (0 < float <= 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: budget must be a count or a fraction, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{where}: budget must be >= 0")
        return value
    if not 0.0 < value <= 1.0:
        raise ConfigError(f"{where}: a fractional budget must be in (0, 1], got {value}")
    return float(value)


def resolve_budget(budget: int | float, n: int) -> int:
    """The exact number of rows a budget asks for out of n (fractions round half up)."""
    if isinstance(budget, float):
        return min(n, int(budget * n + 0.5))
    return min(n, budget)
