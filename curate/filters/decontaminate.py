"""Decontamination: reject training rows that share a word n-gram with an evaluation set
(default 13 words, as OLMo and Tulu 3 do).

    filters:
      - type: decontaminate
        eval: [{path: ../shared/data/gsm8k_test.jsonl.gz}]   # any inputs the readers take
        n: 13

Normalisation, the same on both sides: lower case; every character that is not a letter
or a digit becomes a space (punctuation, symbols, markup); whitespace collapsed. Words are
what is left between spaces, so "Natalia sold 48 clips," and "natalia SOLD 48 clips" are
the same four words.

Evaluation side: every n-gram of each evaluation row's prompt and, separately, of its
answer (an n-gram across the boundary is not text anyone wrote), hashed to 64 bits and
mapped to the first row holding it (its origin, "file:line"). The table is a side input,
one dict built once, its size logged. A text shorter than n words has no n-gram and
cannot match anything: lower `n` for short evaluation items. Evaluation rows are read
leniently: a number or bool where text is expected (an answer of 72) is read as its text
(training inputs stay strict: such a row goes to the dead letter).

Before the pipeline runs, the driver reads the evaluation sets (`read_eval`) and
records the rows read, the rows that cannot be read and the n-grams in the step's
description (the manifest's plan). Unreadable rows are one WARNING naming the first few;
an evaluation file that yields no n-gram at all (no readable row, or every text shorter
than n words) is a ConfigError naming it, since decontaminating against it would remove
nothing.

Training side: the n-grams of each message of a row, in order; the first one in the
table rejects the row with the reason naming the evaluation row and the shared n-gram.
A 64-bit collision would reject a clean row: with a million training n-grams against a
million evaluation ones, the chance is about 1e12 / 2^64 = 5e-8 per run.
"""

from __future__ import annotations

import hashlib
import logging

import apache_beam as beam
from apache_beam.metrics import Metrics

from curate.config import ConfigError, InputConfig, expand_vars
from curate.inputs.files import plan_inputs, task_records
from curate.filters.base import REJECTED
from curate.filters.text import words
from curate.steps import Step

log = logging.getLogger(__name__)
SHOWN = 3  # unreadable evaluation rows named in the warning


def ngram_hash(gram: list[str] | tuple[str, ...]) -> int:
    return int.from_bytes(hashlib.blake2b(" ".join(gram).encode(), digest_size=8).digest(), "little")


def ngrams(ws: list[str], n: int):
    """(position, hash) of every n-gram of a word list, in order."""
    for i in range(len(ws) - n + 1):
        yield i, ngram_hash(ws[i:i + n])


def eval_ngrams(record: dict, n: int):
    """(hash, origin) of every n-gram of an evaluation row's prompt and of its answer."""
    for text in (record["prompt"], record["response"]):
        for _, h in ngrams(words(text), n):
            yield h, record["origin"]


def eval_records(task):
    """An evaluation file's rows as `task_records` gives them, read leniently (numbers as
    text); none is too long to count."""
    return task_records(task, validate=False, lenient=True)


def read_eval(plan, n: int) -> tuple[int, int, int]:
    """Read the planned evaluation files in this process, as the pipeline will: (rows read,
    rows that cannot be read, distinct n-grams). A WARNING names the first rows
    that cannot be read; a file yielding no n-gram is a ConfigError naming it and why."""
    hashes: set[int] = set()
    rows = unreadable = 0
    first_bad: list[str] = []  # "origin: reason" of the first unreadable rows of all files
    problems = [f"eval {path}: the file holds no rows" for path in plan.empty_files]
    for task in plan:
        file_rows, file_bad, file_hashes, longest = 0, [], set(), 0
        for record, dead in eval_records(task):
            if dead is not None:
                file_bad.append(f"{dead['origin']}: {dead['reason']}")
                continue
            file_rows += 1
            longest = max(longest, len(words(record["prompt"])), len(words(record["response"])))
            file_hashes.update(h for h, _ in eval_ngrams(record, n))
        if not file_rows:
            problems.append(f"eval {task.path}: 0 of {len(file_bad)} rows readable"
                            + (f" (first: {file_bad[0]})" if file_bad else ""))
        elif not file_hashes:
            problems.append(f"eval {task.path}: no {n}-word n-gram: every text is shorter than {n} "
                            f"words (the longest has {longest}); lower n")
        rows += file_rows
        unreadable += len(file_bad)
        first_bad += file_bad[:SHOWN - len(first_bad)]
        hashes |= file_hashes
    if problems:
        raise ConfigError("decontaminate: " + "; ".join(problems))
    if unreadable:
        log.warning("decontaminate: %d of %d evaluation rows cannot be read, so training rows sharing "
                    "their n-grams are not caught (first: %s)", unreadable, rows + unreadable,
                    "; ".join(first_bad))
    return rows, unreadable, len(hashes)


def first_hit(record: dict, table: dict, n: int) -> str | None:
    """The reject reason for a training row sharing an n-gram with the table, or None."""
    for message in record["messages"]:
        ws = words(message["content"])
        for i, h in ngrams(ws, n):
            origin = table.get(h)
            if origin is not None:
                return f'shares the {n}-gram "{" ".join(ws[i:i + n])}" with evaluation row {origin}'
    return None


def _table_size(table: dict, n: int) -> dict:
    log.info("decontaminate: %d evaluation %d-grams in the side input (~%.1f MB)", len(table), n,
             len(table) * 120 / 1e6)  # a dict entry with an int key and a short str value
    Metrics.distribution("filters", "decontaminate_eval_ngrams").update(len(table))
    return table


class Decontaminate(Step, beam.PTransform):
    """A whole-pool filter step (see the module docstring): kept rows, and `rejected` rows
    with the reason (the pipeline adds their reject_stage)."""

    kind = "filter"
    type = "decontaminate"

    def __init__(self, eval: list | dict | str, n: int = 13):
        super().__init__()
        items = eval if isinstance(eval, list) else [eval]
        if not items:
            raise ConfigError("decontaminate: 'eval' needs at least one input (a path or {path: ...})")
        if not (isinstance(n, int) and n >= 1):
            raise ConfigError(f"decontaminate: n must be a positive number of words, got {n!r}")
        specs = []
        for i, item in enumerate(items):
            item = {"path": item} if isinstance(item, str) else dict(item)
            try:
                spec = InputConfig(**item)
            except TypeError as exc:
                raise ConfigError(f"decontaminate: eval[{i}]: {exc}") from None
            spec.path = expand_vars(str(spec.path))
            specs.append(spec)
        self.n = n
        plan = plan_inputs(specs, max_chars=10**9)  # max_chars unused: eval_records does not validate
        self.tasks = list(plan)
        # what was read, in the step's description (the manifest's plan)
        self.eval_rows, self.eval_rows_unreadable, self.eval_ngrams = read_eval(plan, n)

    def expand(self, pcoll):
        n = self.n
        table = (pcoll.pipeline
                 | "EvalFiles" >> beam.Create(self.tasks)
                 # the rows read_eval counted and warned about are left out here
                 | "EvalRows" >> beam.FlatMap(lambda t: (r for r, bad in eval_records(t) if bad is None))
                 | "EvalNgrams" >> beam.FlatMap(eval_ngrams, n)
                 | "FirstRow" >> beam.CombinePerKey(min)  # the same row whatever the order
                 | "Table" >> beam.combiners.ToDict()
                 | "Size" >> beam.Map(_table_size, n))

        def check(record, table):
            reason = first_hit(record, table, n)
            if reason is None:
                yield record
            else:
                Metrics.counter("filters", "dropped_decontaminate").inc()
                yield beam.pvalue.TaggedOutput(REJECTED, {**record, "reject_reason": reason})

        return pcoll | "Check" >> beam.FlatMap(check, beam.pvalue.AsSingleton(table)).with_outputs(
            REJECTED, main="kept")
