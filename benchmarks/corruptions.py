"""Corrupted responses for noise benchmarks (benchmarks/donod_bench.py and
benchmarks/selection_quality.py): each kind maps (records, indices to corrupt, rng) to
{index: the record with a corrupted response}.

    swapped       each corrupted row gets another corrupted row's response (a derangement)
    truncated     the response cut to its first 30% of characters, at a word boundary
    wrong_answer  GSM8K only: the final '#### N' changed, and N in the last line stating it
"""

from __future__ import annotations

import random
import re

_NUMBER = r"(?<![\d.]){}(?![\d.])"


def _with_response(r: dict, response: str) -> dict:
    return {**r, "response": response, "messages": r["messages"][:-1] + [{"role": "assistant", "content": response}]}


def corrupt_swapped(records: list[dict], bad: list[int], rng: random.Random) -> dict[int, dict]:
    """Each corrupted row gets another corrupted row's response (a derangement)."""
    answers = [records[i]["response"] for i in bad]
    shifted = answers[1:] + answers[:1]
    return {i: _with_response(records[i], a) for i, a in zip(bad, shifted)}


def corrupt_truncated(records: list[dict], bad: list[int], rng: random.Random) -> dict[int, dict]:
    """The response cut to its first 30% of characters (at a word boundary)."""
    out = {}
    for i in bad:
        text = records[i]["response"]
        cut = text[: max(1, int(0.3 * len(text)))]
        cut = cut.rsplit(" ", 1)[0] if " " in cut else cut
        out[i] = _with_response(records[i], cut)
    return out


def wrong_final_answer(response: str, rng: random.Random) -> str | None:
    """GSM8K: the final number after '####' changed, and the same number in the last
    reasoning line that states it (the last computation, '<<a*b=X>>X'). None when the
    answer has no '####' number."""
    body, sep, final = response.rpartition("####")
    value = final.strip().replace(",", "")
    if not sep or not re.fullmatch(r"-?\d+", value):
        return None
    old = int(value)
    delta = 0
    while delta == 0:
        delta = rng.randint(-max(2, abs(old) // 2), max(2, abs(old) // 2))
    new = str(old + delta)
    pattern = re.compile(_NUMBER.format(re.escape(final.strip())))
    lines = body.rstrip("\n").split("\n")
    for k in range(len(lines) - 1, -1, -1):
        if pattern.search(lines[k]):
            lines[k] = pattern.sub(new, lines[k])
            break
    return "\n".join(lines) + "\n" + sep + " " + new


def corrupt_wrong_answer(records: list[dict], bad: list[int], rng: random.Random) -> dict[int, dict]:
    out = {}
    for i in bad:
        changed = wrong_final_answer(records[i]["response"], rng)
        if changed is None:
            raise SystemExit(f"row {records[i].get('id')}: no '####' answer to change")
        out[i] = _with_response(records[i], changed)
    return out


CORRUPTIONS = {"swapped": corrupt_swapped, "truncated": corrupt_truncated, "wrong_answer": corrupt_wrong_answer}
