"""A long driver's stages (`curate compare`, benchmarks/selection_quality.py): each
printed with the elapsed time and an ETA, its duration recorded; and the small JSON
files their caches are made of (written atomically, read as None when absent or torn)."""

from __future__ import annotations

import collections
import datetime
import hashlib
import json
import os
import pathlib
import statistics
import time

def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600:d}:{s // 60 % 60:02d}:{s % 60:02d}"


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_json(path: pathlib.Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def read_json(path: pathlib.Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class Clock:
    """Prints each stage with the elapsed time of the whole run and an ETA, and records
    its duration.

    A stage found in the cache takes ~0 s in this run; the seconds it took when it was
    computed are kept in `times_file`, so a report shows both. The ETA is the stages
    still expected (`expect`) times the mean computed duration of their kind: this run's
    first, then the times file's, then a rough default."""

    DEFAULT_S = {"data": 30, "prune": 60, "eval": 60, "score": 400, "select": 20, "train": 180}

    def __init__(self, times_file: pathlib.Path | None = None, quiet: bool = False):
        self.start = time.perf_counter()
        self.stages: list[dict] = []
        self.times_file = times_file
        self.quiet = quiet
        self.computed: dict = (read_json(times_file) or {}) if times_file else {}
        self.expected: collections.Counter = collections.Counter()
        self.done: collections.Counter = collections.Counter()
        self.durations: dict[str, list[float]] = collections.defaultdict(list)

    def expect(self, kind: str, n: int = 1) -> None:
        self.expected[kind] += n

    def mean_seconds(self, kind: str) -> float:
        if self.durations[kind]:
            return statistics.fmean(self.durations[kind])
        past = [v["seconds"] for v in self.computed.values() if v.get("kind") == kind]
        return statistics.fmean(past) if past else self.DEFAULT_S.get(kind, 60)

    def eta(self) -> float:
        return sum(max(n - self.done[k], 0) * self.mean_seconds(k) for k, n in self.expected.items())

    def say(self, msg: str) -> None:
        if not self.quiet:
            print(f"[{_hms(time.perf_counter() - self.start)}] {msg}", flush=True)

    def stage(self, name: str, kind: str):
        clock = self

        class _Stage:
            def __enter__(self):
                self.t0 = time.perf_counter()
                self.note = ""
                self.cached = False
                total, done = sum(clock.expected.values()), sum(clock.done.values())
                where = f" (stage {done + 1} of ~{total}, ETA {_hms(clock.eta())})" if total else ""
                clock.say(f"{name} ...{where}")
                return self

            def __exit__(self, exc_type, exc, tb):
                dt = time.perf_counter() - self.t0
                if exc_type is None:
                    clock.done[kind] += 1
                    if not self.cached:
                        clock.durations[kind].append(dt)
                        clock.computed[name] = {"seconds": round(dt, 1), "note": self.note, "kind": kind,
                                                "at": datetime.datetime.now().isoformat(timespec="seconds")}
                        if clock.times_file:
                            write_json(clock.times_file, clock.computed)
                    first = clock.computed.get(name, {})
                    clock.stages.append({"stage": name, "kind": kind, "seconds": round(dt, 1),
                                         "cached": self.cached, "computed_seconds": first.get("seconds"),
                                         "note": self.note if not self.cached else first.get("note", self.note)})
                    clock.say(f"{name}: done in {dt:.1f} s{' (' + self.note + ')' if self.note else ''}")
                return False

        return _Stage()
