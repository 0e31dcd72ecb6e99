"""Progress of a running job: rows done / total, rows/s, tokens/s and an ETA per stage.

Workers count (`StageProgress.add`, called by the read step and every scorer's runner),
and the counts reach the user two ways:
- Beam counters `curate.progress/<stage>.rows` and `.tokens` everywhere; on Dataflow
  they are the job's progress in the console and in `metrics` of the manifest.
- On a local run, each worker process also writes its counts to a small JSON file in
  `<staging>/_progress/` (at most once a second, atomically), because Beam's local
  runner reports metrics only at the end and its workers may be separate processes.
  The driver's `ProgressDisplay` thread sums the files: one line per stage, rewritten in
  place on a terminal; off a terminal (CI, a log file) one log line a minute.

A stage's total is known when the driver counted it: a scorer's input is counted by a
side input just before it (`note_total`), so its line has a percentage and an ETA.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import uuid

import apache_beam as beam
from apache_beam.metrics import Metrics

log = logging.getLogger(__name__)

PROGRESS_DIR = "_progress"
NAMESPACE = "curate.progress"
_WRITE_EVERY_S = 1.0


def _write_json(path: str, data: dict) -> None:
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh)
    os.replace(tmp, path)


def _file_stem(stage: str) -> str:
    """A stage name ("score:likelihood") as a file name part."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in stage)


class StageProgress:
    """One worker's counts for one stage. `directory` None: Beam counters only."""

    def __init__(self, stage: str, directory: str | None = None):
        self.stage = stage
        self.directory = directory
        self.rows = self.tokens = 0
        self.started = None
        self._written = 0.0
        self._file = None
        if directory:
            self._file = os.path.join(directory, f"{_file_stem(stage)}.{os.getpid()}.{uuid.uuid4().hex[:6]}.json")
        self._rows_counter = Metrics.counter(NAMESPACE, f"{stage}.rows")
        self._tokens_counter = Metrics.counter(NAMESPACE, f"{stage}.tokens")

    def add(self, rows: int, tokens: int = 0) -> None:
        now = time.time()
        if self.started is None:
            self.started = now
        self.rows += rows
        self.tokens += tokens
        self._rows_counter.inc(rows)
        if tokens:
            self._tokens_counter.inc(tokens)
        if self._file and now - self._written >= _WRITE_EVERY_S:
            self.flush(now)

    def flush(self, now: float | None = None) -> None:
        if not self._file or self.started is None:
            return
        self._written = now or time.time()
        try:
            _write_json(self._file, {"stage": self.stage, "rows": self.rows, "tokens": self.tokens,
                                     "started": self.started, "updated": self._written})
        except OSError:  # progress must never fail a run (the staging dir may be gone)
            self._file = None


class _NoteTotal(beam.DoFn):
    """Passes rows through; writes the stage's total (a side input) once per process."""

    def __init__(self, directory: str, stage: str):
        self.directory, self.stage = directory, stage
        self._done = False

    def process(self, record, total):
        if not self._done:
            self._done = True
            try:
                _write_json(os.path.join(self.directory, f"{_file_stem(self.stage)}.total"),
                            {"stage": self.stage, "total": total})
            except OSError:
                pass
        yield record


def note_total(pcoll, directory: str, stage: str, label: str):
    """`pcoll` unchanged, after its size has been written as `stage`'s total. The count is
    a side input, so the rows wait for it: a barrier, used on local runs only."""
    total = pcoll | f"{label}Count" >> beam.combiners.Count.Globally()
    return pcoll | f"{label}Total" >> beam.ParDo(_NoteTotal(directory, stage), beam.pvalue.AsSingleton(total))


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def read_stages(directory: str) -> dict[str, dict]:
    """{stage: {rows, tokens, started, updated, total?}} summed over the worker files."""
    stages: dict[str, dict] = {}
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return stages
    for name in names:
        if name.endswith(".tmp"):
            continue
        try:
            with open(os.path.join(directory, name), encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, ValueError):
            continue  # replaced or removed while we read: the next poll sees it
        s = stages.setdefault(data["stage"], {"rows": 0, "tokens": 0, "started": None, "updated": 0.0})
        if "total" in data:
            s["total"] = data["total"]
            continue
        s["rows"] += data["rows"]
        s["tokens"] += data["tokens"]
        s["started"] = data["started"] if s["started"] is None else min(s["started"], data["started"])
        s["updated"] = max(s["updated"], data["updated"])
    return stages


def format_stage(stage: str, s: dict, now: float, done: bool = False) -> str:
    """`score:likelihood   412/998 rows  41%  2.1 rows/s  714 tokens/s  ETA 4m35s`."""
    total = s.get("total")
    rows = total if done and total is not None else s["rows"]
    elapsed = max((s["updated"] if done else now) - (s["started"] or now), 1e-9)
    parts = [f"{stage:<20}", f"{rows:,}/{total:,} rows" if total is not None else f"{rows:,} rows"]
    if total:
        parts.append(f"{100 * rows / total:3.0f}%")
    if s["started"] is not None and elapsed >= 0.5:
        parts.append(f"{s['rows'] / elapsed:,.1f} rows/s")
        if s["tokens"]:
            parts.append(f"{s['tokens'] / elapsed:,.0f} tokens/s")
        if done:
            parts.append(f"in {_duration(elapsed)}")
        elif total and s["rows"]:
            parts.append(f"ETA {_duration((total - s['rows']) * elapsed / s['rows'])}")
    return "  ".join(parts)


class ProgressDisplay:
    """Driver side: polls the progress files while the pipeline runs.

    On a terminal, one line per stage is redrawn in place every half second; otherwise
    one log line per active stage every `log_every_s`. `stop()` prints the last state."""

    def __init__(self, directory: str, stream=None, log_every_s: float = 60.0):
        self.directory = directory
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every_s = 0.5 if self.tty else log_every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="curate-progress", daemon=True)
        self._drawn = 0  # lines of the block drawn last, to redraw in place
        self._lock = threading.Lock()
        self._handlers: list[logging.Handler] = []

    def start(self) -> "ProgressDisplay":
        if self.tty:  # a log line takes the block's place; the next tick redraws it below
            self._handlers = [h for h in logging.getLogger().handlers
                              if getattr(h, "stream", None) is self.stream]
            for h in self._handlers:
                h.addFilter(self._clear_before_log)
        self._thread.start()
        return self

    def stop(self, succeeded: bool = True) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for h in self._handlers:
            h.removeFilter(self._clear_before_log)
        self._render(final=succeeded)

    def _clear_before_log(self, record) -> bool:
        with self._lock:
            if self._drawn:
                self.stream.write(f"\x1b[{self._drawn}F\x1b[J")
                self._drawn = 0
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self._render()

    def _render(self, final: bool = False) -> None:
        stages = read_stages(self.directory)
        if not stages:
            return
        now = time.time()
        # local stages run one after the other: one that a later stage followed is finished
        order = sorted(stages, key=lambda n: stages[n]["started"] or now)
        followed = set(order[:-1])
        lines = [format_stage(name, stages[name], now, done=final or name in followed) for name in order]
        if self.tty:
            with self._lock:
                up = f"\x1b[{self._drawn}F" if self._drawn else ""
                self.stream.write(up + "".join(f"\x1b[2K{line}\n" for line in lines))
                self.stream.flush()
                self._drawn = len(lines)
        elif final:
            for line in lines:
                log.info("done: %s", line)
        else:
            for name in order:
                s = stages[name]
                if name not in followed and s["updated"] >= now - self.every_s:  # active since the last line
                    log.info("progress: %s", format_stage(name, s, now))
