"""Malformed input never crashes a reader and never disappears: every non-blank line
becomes exactly one record or one dead-letter row."""

import gzip
import json
import random

import pytest

from curate.config import InputConfig
from curate.inputs import formats
from curate.inputs.files import plan_inputs, task_records

GOOD = {"instruction": "Write a haiku about rain", "input": "", "output": "Soft rain on the roof"}


def mutate(rng: random.Random, line: bytes) -> bytes:
    op = rng.randrange(7)
    if op == 0:
        return line[: rng.randrange(1, len(line))]                      # truncated JSON
    if op == 1:
        i = rng.randrange(len(line))
        return line[:i] + bytes([rng.choice([0x80, 0xC3, 0xFF, 0xFE])]) + line[i:]  # invalid UTF-8
    if op == 2:
        row = dict(GOOD, output=rng.choice([None, 3, 2.5, [], {}, True, ""]))  # wrong types
        return json.dumps(row).encode()
    if op == 3:
        row = {k: v for k, v in GOOD.items() if rng.random() < 0.5}          # missing fields
        return json.dumps(row).encode()
    if op == 4:
        return json.dumps(rng.choice([[], 1, "text", None])).encode()        # not an object
    if op == 5:
        return json.dumps(dict(GOOD, output="x" * 5000)).encode()           # huge field
    return line                                                              # duplicate


@pytest.mark.parametrize("seed", range(5))
def test_fuzzed_jsonl_every_line_accounted_for(tmp_path, seed):
    rng = random.Random(seed)
    good = json.dumps(GOOD).encode()
    lines = [good] + [mutate(rng, good) for _ in range(300)]
    path = tmp_path / f"fuzz{seed}.jsonl.gz"
    path.write_bytes(gzip.compress(b"\n".join(lines) + b"\n"))
    (task,) = plan_inputs([InputConfig(path=str(path))], max_chars=1000)
    recs = dead = 0
    for rec, bad in task_records(task):
        if bad is not None:
            dead += 1
            assert bad["reason"] and bad["origin"].startswith(path.name + ":")
        else:
            recs += 1
    assert recs + dead == len(lines)
    assert recs >= 1 and dead >= 1


def test_line_over_the_byte_limit_is_dead_letter(tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "MAX_LINE_BYTES", 100)
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(dict(GOOD, output="y" * 500)) + "\n" + json.dumps(GOOD) + "\n")
    (task,) = plan_inputs([InputConfig(path=str(path), adapter="alpaca")], max_chars=10_000)
    out = list(task_records(task))
    assert [bad["reason"] for _, bad in out if bad is not None] == ["line longer than 100 bytes"]
    assert sum(1 for _, bad in out if bad is None) == 2
