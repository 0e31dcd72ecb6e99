"""Scorer fault tolerance: an out-of-memory batch is split and retried; a row that still
fails (or fails for any other reason) goes to the dead letter, and the counts add up."""

import dataclasses
import functools
import json
import logging
from typing import ClassVar, Optional

import datasets
import pyarrow as pa
import pytest
import torch

from curate import records as curate_records
from curate.cli import print_summary
from curate.config import TooManyFailures, parse_job
from curate.pipeline.run import check_counts, run_job
from curate.report.inspect import inspect_output
from curate.scorers.base import Scorer
from curate.scorers.handlers import SCORE_ERROR, RecordModelHandler, is_out_of_memory


def records(n):
    return [{"id": f"r{i}", "origin": f"in.jsonl:{i + 1}", "prompt": f"prompt {i}", "response": "x" * i}
            for i in range(n)]


class FakeRunner:
    """Scores a row by its response length; raises like a model would."""

    batch_sizes: ClassVar[list] = []  # every call's batch size, across instances

    def __init__(self, oom_above: Optional[int] = None, fail_id: Optional[str] = None,
                 oom_error=torch.cuda.OutOfMemoryError):
        self.oom_above, self.fail_id, self.oom_error = oom_above, fail_id, oom_error

    def score(self, recs):
        FakeRunner.batch_sizes.append(len(recs))
        if self.oom_above is not None and len(recs) > self.oom_above:
            raise self.oom_error("CUDA out of memory. Tried to allocate 20.00 GiB")
        if any(r["id"] == self.fail_id for r in recs):
            raise ValueError(f"cannot encode record {self.fail_id!r}")
        return [{**r, "fake_score": float(len(r["response"]))} for r in recs]


@pytest.fixture(autouse=True)
def clear_batch_sizes():
    FakeRunner.batch_sizes.clear()


def run(handler_runner, recs):
    handler = RecordModelHandler(lambda: handler_runner, "fake")
    return list(handler.run_inference(recs, handler.load_model()))


def test_oom_batches_are_split_until_they_fit(caplog):
    recs = records(10)
    unsplit = run(FakeRunner(), recs)
    FakeRunner.batch_sizes.clear()
    with caplog.at_level(logging.WARNING, logger="curate.scorers.handlers"):
        split = run(FakeRunner(oom_above=3), recs)
    assert split == unsplit  # every row, same order, same scores, no error marker
    assert max(FakeRunner.batch_sizes[1:]) <= 5 and FakeRunner.batch_sizes[0] == 10
    assert sum(s for s in FakeRunner.batch_sizes if s <= 3) == 10  # each row scored once
    assert "ran out of memory; retrying as 5 + 5 rows" in caplog.text


@pytest.mark.parametrize("error", [MemoryError, RuntimeError])
def test_other_out_of_memory_errors_split_too(error):
    assert run(FakeRunner(oom_above=1, oom_error=error), records(4)) == run(FakeRunner(), records(4))


def test_is_out_of_memory():
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("[enforce fail] DefaultCPUAllocator: not enough memory: "
                                         "you tried to allocate ... out of memory"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(ValueError("out of memory"))  # only allocator errors
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


def test_a_failing_row_is_isolated_and_marked():
    out = run(FakeRunner(fail_id="r5"), records(8))
    assert [r["id"] for r in out] == [f"r{i}" for i in range(8)]
    bad = [r for r in out if SCORE_ERROR in r]
    assert [r["id"] for r in bad] == ["r5"] and "fake_score" not in bad[0]
    assert bad[0][SCORE_ERROR] == "scorer fake failed: ValueError: cannot encode record 'r5'"
    assert all(r["fake_score"] == float(len(r["response"])) for r in out if r["id"] != "r5")


def test_a_row_that_runs_out_of_memory_alone_is_marked():
    out = run(FakeRunner(oom_above=0), records(1))
    assert out[0][SCORE_ERROR].startswith("scorer fake failed: OutOfMemoryError: CUDA out of memory")


def test_a_batch_where_every_row_fails_is_marked_row_by_row(caplog):
    # too many failures is the run's max_failed_fraction to judge, over all rows (below)
    out = run(FakeRunner(oom_above=0), records(40))
    assert [r["id"] for r in out] == [f"r{i}" for i in range(40)] and all(SCORE_ERROR in r for r in out)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 21 and "not logged" in warnings[-1].getMessage()  # 20, then one note


# ---------------------------------------------------------------- in a pipeline

@dataclasses.dataclass
class FakeScorer(Scorer):
    type: ClassVar[str] = "fake"
    oom_above: Optional[int] = None
    fail_id: Optional[str] = None

    def output_columns(self):
        return {"fake_score": pa.float64()}

    def model_handler(self):
        return RecordModelHandler(functools.partial(FakeRunner, self.oom_above, self.fail_id), self.type,
                                  min_batch_size=64, max_batch_size=64)


def pool_rows(n=12):
    return [{"instruction": f"Say something about topic {i}", "output": f"Answer about {i}" + "!" * i}
            for i in range(n)]


def write_pool(tmp_path, n=12):
    rows = pool_rows(n)
    path = tmp_path / "pool.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def pipeline_job(tmp_path, scorer, out="out"):
    return parse_job({"inputs": [write_pool(tmp_path)], "output": str(tmp_path / out),
                      "scorers": [scorer], "selectors": [{"type": "random", "budget": 5, "seed": 0}],
                      "max_failed_fraction": 0.1})  # 1 of 12 failing is tolerated


def test_a_batch_failing_whole_is_judged_by_max_failed_fraction(tmp_path, monkeypatch):
    """Every row of the pool's one batch fails: under a limit of 1.0 they go to the dead
    letter and the run publishes; under 0.9 the run fails naming the count."""
    job = pipeline_job(tmp_path, {"type": "fake", "oom_above": 0})
    job.max_failed_fraction = 1.0
    c = run_job(job, progress=False)["counts"]
    assert c["score_failed"] == {"score:fake": 12} and c["kept"] == 0 and c["dead_letter_rows_written"] == 12
    job.max_failed_fraction, job.output = 0.9, str(tmp_path / "out2")
    with pytest.raises(TooManyFailures, match=r"score:fake failed on 12 of 12 rows \(100.0%\), more than "
                                              r"max_failed_fraction 0.9"):
        run_job(job, progress=False)


def test_pipeline_sends_the_failing_row_to_the_dead_letter(tmp_path, monkeypatch, capsys):
    # the scorer fails on the row from line 8 of the pool (its id is a content hash)
    bad = curate_records.adapt(pool_rows()[7], curate_records.ADAPTERS["alpaca"], {}, "pool")[0]
    m = run_job(pipeline_job(tmp_path, {"type": "fake", "fail_id": bad["id"]}))
    c = m["counts"]
    assert c["read"] == 12 and c["invalid"] == 0 and c["examples"] == 12
    assert c["score_failed"] == {"score:fake": 1}
    assert c["not_selected"] == {"select:random": 6} and c["kept"] == 5
    assert c["examples"] == sum(c["filtered"].values()) + 1 + 6 + 5
    assert c["dead_letter_rows_written"] == 1
    check_counts(c)
    out = tmp_path / "out"
    assert json.loads((out / "manifest.json").read_text())["counts"] == c
    dead = [json.loads(line) for line in (out / "dead_letter.jsonl").read_text().splitlines()]
    assert len(dead) == 1
    assert dead[0]["origin"] == "pool.jsonl:8" and dead[0]["id"] == bad["id"]
    assert dead[0]["stage"] == "score:fake"
    assert dead[0]["reason"] == f"scorer fake failed: ValueError: cannot encode record {bad['id']!r}"
    kept = datasets.load_from_disk(str(out))
    rejected = datasets.load_from_disk(str(out / "rejected"))
    assert bad["id"] not in set(kept["id"]) | set(rejected["id"])
    assert SCORE_ERROR not in kept.column_names and None not in kept["fake_score"]

    # the summary, inspect and the report show the bucket
    print_summary(m)
    assert "score:fake" in capsys.readouterr().out
    assert "score failed 1 {'score:fake': 1}" in inspect_output(str(out))
    assert "1 failed in a scorer (dead letter)" in (out / "report.html").read_text()


def test_pipeline_likelihood_oom_split_gives_the_unsplit_scores(tmp_path, tiny_lm_dir, monkeypatch, caplog):
    """The real likelihood scorer on the tiny model: an OOM for batches of more than 3 rows
    is split away, and every row gets the score it gets unsplit."""
    from curate.scorers.likelihood import LikelihoodScorer

    scorer = {"type": "likelihood", "model": str(tiny_lm_dir), "dtype": "float32"}
    run_job(pipeline_job(tmp_path, scorer, out="unsplit"))

    seen = []
    score = LikelihoodScorer.score_batch

    def score_or_oom(self, lm, recs):
        seen.append(len(recs))
        if len(recs) > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return score(self, lm, recs)

    monkeypatch.setattr(LikelihoodScorer, "score_batch", score_or_oom)
    with caplog.at_level(logging.WARNING, logger="curate.scorers.handlers"):
        m = run_job(pipeline_job(tmp_path, scorer, out="split"))
    assert max(seen) > 3 and "ran out of memory" in caplog.text  # a split really happened
    assert m["counts"]["score_failed"] == {"score:likelihood": 0} and m["counts"]["kept"] == 5
    assert (tmp_path / "split" / "dead_letter.jsonl").read_text() == ""

    def scores(out):
        rows = (datasets.load_from_disk(str(tmp_path / out)).to_list()
                + datasets.load_from_disk(str(tmp_path / out / "rejected")).to_list())
        return {r["id"]: (r["logprob_sum"], r["logprob_mean"], r["n_response_tokens"]) for r in rows}

    unsplit, split = scores("unsplit"), scores("split")
    assert split.keys() == unsplit.keys() and len(split) == 12
    for key, (total, mean, n) in split.items():
        assert n == unsplit[key][2]
        assert total == pytest.approx(unsplit[key][0], rel=1e-4, abs=1e-4)
        assert mean == pytest.approx(unsplit[key][1], rel=1e-4, abs=1e-4)


def test_one_batch_at_a_time_per_model_and_memory_released_where_it_lives(monkeypatch):
    import threading
    import time

    from curate.scorers import handlers

    class Slow:
        running = most = 0

        def score(self, recs):
            Slow.running += 1
            Slow.most = max(Slow.most, Slow.running)
            time.sleep(0.02)
            Slow.running -= 1
            return recs

    guarded = handlers.GuardedRunner(Slow())
    threads = [threading.Thread(target=guarded.score, args=(records(2),)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert Slow.most == 1  # six callers, never two forwards at once

    freed = []
    monkeypatch.setattr(handlers, "_free_accelerator_memory", lambda: freed.append(True))
    oom = handlers.GuardedRunner(FakeRunner(oom_above=0))
    with pytest.raises(handlers.BatchOutOfMemory, match="out of memory"):
        oom.score(records(2))
    assert freed == [True] and handlers.is_out_of_memory(handlers.BatchOutOfMemory("x"))
    with pytest.raises(ValueError):  # other errors pass through untouched, nothing freed
        handlers.GuardedRunner(FakeRunner(fail_id=records(1)[0]["id"])).score(records(1))
    assert freed == [True]
