"""Input specs -> canonical records, or dead-letter rows naming file, line, reason.

Files are opened through Beam's `FileSystems`, so gs:// (with the `dataflow` extra)
works wherever a local path does, and `.gz` is decompressed by suffix; one reader per
format is in `curate.inputs.formats`.

The driver plans the inputs first (`plan_inputs`): it expands globs, picks each file's
format, and detects the adapter from the first row, so an input of an unknown shape
fails at once with a clear error instead of sending every row to the dead letter.
Each planned file is then read row by row (`task_records`: in the pipeline's DoFn, or
in-process by `read_records`), keeping the line number of every row; line numbers are
what make a dead-letter row findable.

A row's origin is "name:line", where name is the file's path relative to the common
parent directory of all planned inputs, so two inputs never share an origin (see
`curate.records`). Damage never ends a run: rows before it are read, and one
dead-letter row says how much of the file was lost. Only at plan time does a file
that cannot be read at all stop the job, with a one-line `ConfigError`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Iterator

from apache_beam.io.filesystems import FileSystems

from curate import records
from curate.config import ConfigError, InputConfig, ValidateConfig
from curate.paths import check_client
from curate.inputs.formats import HF_PREFIX, FileDamaged, basename, describe_error, format_rows

log = logging.getLogger(__name__)

_SUFFIX_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet",
                   ".arrow": "arrow"}


@dataclass(frozen=True)
class FileTask:
    path: str
    source: str
    format: str
    adapter: str
    fields: dict = field(default_factory=dict)
    limit: int | None = None
    limit_prompts: int | None = None
    max_chars: int = 32_000
    name: str = ""  # the file part of origins; the basename when empty
    prefix_origin: bool = False  # a curate row's stored origin gets "name:" in front


class InputPlan(list):
    """The planned `FileTask`s, and the matched files skipped because they hold no rows."""

    def __init__(self, tasks=(), empty_files=()):
        super().__init__(tasks)
        self.empty_files = list(empty_files)


def dead_letter(origin: str, reason: str, raw: object = None) -> dict:
    text = raw if isinstance(raw, str) else (None if raw is None else repr(raw))
    return {"origin": origin, "reason": _valid_unicode(reason),
            "raw": None if text is None else _valid_unicode(text[:2000])}


def _valid_unicode(text: str) -> str:
    """`text` with any lone surrogate written as "\\udXXX", so it can be encoded (by Beam's
    coders, and in dead_letter.jsonl)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _stem(path: str) -> str:
    name = basename(path)
    for suffix in (".gz", ".jsonl", ".ndjson", ".json", ".parquet", ".arrow"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name


def detect_format(path: str) -> str:
    if path.startswith(HF_PREFIX):
        return "hf"
    name = path[:-3] if path.endswith(".gz") else path
    for suffix, fmt in _SUFFIX_FORMATS.items():
        if name.endswith(suffix):
            return fmt
    if FileSystems.exists(path.rstrip("/") + "/state.json"):
        return "arrow"
    raise ConfigError(f"{path}: cannot tell the format from the name; set 'format:' "
                      f"(jsonl, json, parquet, arrow, hf)")


def _expand(spec: InputConfig) -> list[str]:
    if spec.path.startswith(HF_PREFIX):
        return [spec.path]
    if FileSystems.exists(spec.path.rstrip("/") + "/state.json"):
        return [spec.path.rstrip("/")]  # a save_to_disk directory
    try:
        matches = FileSystems.match([spec.path])[0].metadata_list
    except Exception as exc:  # Beam raises BeamIOError for an unmatched pattern
        raise ConfigError(f"input {spec.path}: {exc}") from None
    paths = sorted(m.path for m in matches)
    if not paths:
        raise ConfigError(f"input {spec.path}: no file matches")
    return paths


def plan_inputs(specs: list[InputConfig], max_chars: int) -> InputPlan:
    planned: dict[str, tuple[InputConfig, str]] = {}  # file -> (first spec naming it, path)
    for spec in specs:
        check_client(spec.path, "input")
        for path in _expand(spec):
            if any("\udc80" <= c <= "\udcff" for c in path):
                # a name the file system holds as bytes that are not UTF-8 (Python keeps them as
                # lone surrogates): it could not be written as any row's origin
                raise ConfigError(f"input {os.fsencode(path)!r}: the file name is not valid UTF-8 text; "
                                  f"rename the file")
            key = path if "://" in path else os.path.abspath(path)
            if key in planned:
                log.warning("%s is listed more than once in the inputs; reading it once", path)
            else:
                planned[key] = (spec, path)
    names = _origin_names(list(planned))
    found, empty = [], []
    for (spec, path), name in zip(planned.values(), names):
        fmt = detect_format(path) if spec.format == "auto" else spec.format
        if spec.adapter != "auto" and spec.adapter not in records.ADAPTERS:
            raise ConfigError(f"input {spec.path}: unknown adapter {spec.adapter!r}; "
                              f"known: {', '.join(records.ADAPTERS)}")
        adapter = _probe(path, fmt, name, spec)
        if adapter is None:
            log.warning("skipping %s: the file holds no rows", path)
            empty.append(path)
        else:
            found.append((spec, path, name, fmt, adapter))
    if not found and empty:
        raise ConfigError(f"every input file is empty: {', '.join(empty)}")
    # a curate output keeps its stored origins only when nothing else is read beside it
    prefix = len(found) > 1
    return InputPlan([FileTask(path=path, source=spec.source or _stem(path), format=fmt, adapter=adapter,
                               fields=dict(spec.fields), limit=spec.limit, limit_prompts=spec.limit_prompts,
                               max_chars=max_chars,
                               name=name, prefix_origin=prefix and adapter == "curate")
                      for spec, path, name, fmt, adapter in found], empty)


def _origin_names(keys: list[str]) -> list[str]:
    """Each file's path relative to the common parent directory of all of them (string
    paths split on '/', so gs:// works too); a hub dataset is named by its hf:// path."""
    files = [k.split("/") for k in keys if not k.startswith(HF_PREFIX)]
    common = len(os.path.commonprefix([parts[:-1] for parts in files])) if files else 0
    return [k if k.startswith(HF_PREFIX) else "/".join(k.split("/")[common:]) for k in keys]


def _probe(path: str, fmt: str, name: str, spec: InputConfig) -> str | None:
    """The file's adapter (detected from its first rows when 'auto'), or None when the file
    holds no rows. A file that cannot be read is a ConfigError naming it."""
    if fmt == "hf" and spec.adapter != "auto":
        return spec.adapter  # no hub round trip when there is nothing to detect
    seen = []  # (origin, row, error) of the first rows
    try:
        for item in format_rows(path, fmt, name):
            seen.append(item)
            if len(seen) == (1 if spec.adapter != "auto" else 50) or (
                    item[2] is None and isinstance(item[1], dict)):
                break
    except FileDamaged as exc:
        if not seen:
            raise ConfigError(f"{path}: {exc}") from None
    except ConfigError:
        raise
    except Exception as exc:  # whatever a reader did not foresee: still one line, naming the file
        raise ConfigError(f"{path}: cannot read the file ({describe_error(exc)})") from None
    if not seen:
        return None
    first_origin, first_row, first_error = seen[0]
    # a JSON array parses as one list row, or (pretty-printed) starts with a "[" line
    if fmt == "jsonl" and (isinstance(first_row, list) or first_error is not None and
                           isinstance(first_row, str) and first_row.lstrip().startswith("[")):
        raise ConfigError(f"{path}: holds a JSON array, not JSON Lines (one object per line); "
                          f"set 'format: json' for this input")
    if spec.adapter != "auto":
        return spec.adapter
    origin, row, error = seen[-1]
    if error is None and isinstance(row, dict):
        adapter = records.detect_adapter(row, spec.fields)
        if adapter is None:
            raise ConfigError(
                f"{origin}: unknown row shape; found fields {sorted(row)[:20]}, expected one of: "
                f"{records.describe_shapes()}. Map fields with 'fields:' or set 'adapter:'.")
        return adapter.name
    reason = first_error or f"row is {type(first_row).__name__}, expected a JSON object"
    hint = " (is the file UTF-8 text?)" if reason.startswith("invalid UTF-8") else ""
    raise ConfigError(f"{path}: none of the first {len(seen)} rows can be read, so the shape cannot be "
                      f"detected; the first, {first_origin}: {reason}{hint}")


# ---------------------------------------------------------------- raw rows

def iter_rows(path: str, fmt: str, limit: int | None = None,
              name: str | None = None) -> Iterator[tuple[str, object, str | None]]:
    """(origin, row, error) for each row, origins named `name` (default: the basename).
    With an error (the dead-letter reason), row is None or, for a line that is not JSON,
    its raw text. Damage that loses the rest of the file is one last error row."""
    n = 0
    try:
        for item in format_rows(path, fmt, name or _origin_names([path])[0]):
            yield item
            n += 1
            if limit is not None and n >= limit:
                return
    except FileDamaged as exc:
        yield exc.origin, None, str(exc)


# ---------------------------------------------------------------- Beam

def validate_record(record: dict, max_chars: int) -> str | None:
    """The dead-letter reason for an adapted record, or None when it is fine."""
    total = sum(len(m["content"]) for m in record["messages"])
    if total > max_chars:
        return f"over-long example: {total} characters > max_chars {max_chars}"
    return None


def invalid_dead_letter(record: dict, max_chars: int) -> dict | None:
    """The dead-letter row of a record that fails validation, or None when it passes."""
    reason = validate_record(record, max_chars)
    return dead_letter(record["origin"], reason, record["prompt"][:200]) if reason else None


def task_records(task: FileTask, outside_limit=None, validate: bool = True, lenient: bool = False):
    """The rows of one planned file as (record, None) or (None, dead-letter row): reading,
    adapting and (unless `validate` is False: evaluation sets) validation, the one path
    every reader takes (the pipeline's `ReadFile`, and `read_records` for the trainer,
    pruning calibration and model stages). `lenient`:
    a number or bool where text is expected is read as its text (`records.adapt`; the
    evaluation sets of `decontaminate`).

    With `limit_prompts` the whole file is read, and only the records answering its first
    N distinct prompts are kept (every candidate response of a multi-response pool, however
    the file is sorted); rows that cannot be read are dead letters wherever they stand,
    because their prompt is unknown. `outside_limit`: a counter of the records left out."""
    adapter = records.ADAPTERS[task.adapter]
    prompts: set[str] = set()
    for origin, row, error in iter_rows(task.path, task.format, task.limit, task.name):
        if error is not None:  # `row` is then None, or the raw text that failed to parse
            yield None, dead_letter(origin, error, row)
            continue
        try:
            recs = records.adapt(row, adapter, task.fields, task.source, lenient)
        except records.RowError as exc:
            yield None, dead_letter(origin, str(exc), _raw(row))
            continue
        for k, rec in enumerate(recs):
            if task.limit_prompts is not None and rec["prompt_id"] not in prompts:
                if len(prompts) >= task.limit_prompts:
                    if outside_limit is not None:
                        outside_limit.inc()
                    continue
                prompts.add(rec["prompt_id"])
            if task.adapter != "curate":
                rec["origin"] = origin if len(recs) == 1 else f"{origin}:{k}"
            elif task.prefix_origin:  # a curate row keeps its first origin, made unique
                rec["origin"] = f"{task.name}:{rec['origin']}"
            dead = invalid_dead_letter(rec, task.max_chars) if validate else None
            yield (rec, None) if dead is None else (None, dead)


def read_records(specs: list[InputConfig], max_chars: int | None = None) -> tuple[list[dict], list[dict]]:
    """(records, dead-letter rows) of `specs` in read order, in this process: the
    pipeline's readers, adapters and validation for small reads that need no Beam."""

    good, dead = [], []
    for task in plan_inputs(specs, max_chars or ValidateConfig().max_chars):
        for rec, bad in task_records(task):
            (good.append(rec) if bad is None else dead.append(bad))
    return good, dead


def _raw(row) -> str:
    try:
        return json.dumps(row, ensure_ascii=False, default=str)[:2000]
    except (TypeError, ValueError):
        return repr(row)[:2000]
    except RecursionError:  # repr would recurse as deep
        return "(not shown: nested too deeply)"
