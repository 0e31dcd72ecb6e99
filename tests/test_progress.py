"""Progress lines: worker counts in files, summed and shown by the driver; Beam counters."""

import io
import json
import logging
import os

import pytest

from curate.config import parse_job
from curate.pipeline.run import run_job
from curate.progress import ProgressDisplay, StageProgress, format_stage, read_stages


def test_counts_from_several_workers_are_summed_with_the_total(tmp_path, monkeypatch):
    clock = iter([100.0, 101.0, 102.0, 103.0, 110.0])
    monkeypatch.setattr("curate.progress.time.time", lambda: next(clock))
    a, b = StageProgress("score:likelihood", str(tmp_path)), StageProgress("score:likelihood", str(tmp_path))
    a.add(10, 1000)   # t=100: first write
    b.add(5, 400)     # t=101
    a.add(15, 1500)   # t=102: a wrote at 100, so this one writes too (>= 1 s)
    b.add(5, 600)     # t=103
    (tmp_path / "score_likelihood.total").write_text(json.dumps({"stage": "score:likelihood", "total": 100}))
    s = read_stages(str(tmp_path))["score:likelihood"]
    assert (s["rows"], s["tokens"], s["started"], s["total"]) == (35, 3500, 100.0, 100)
    # 35 rows in 10 s since the first: 3.5 rows/s, 350 tokens/s, 65 rows left: 18.6 s
    assert format_stage("score:likelihood", s, now=110.0) == (
        "score:likelihood      35/100 rows   35%  3.5 rows/s  350 tokens/s  ETA 18s")


def test_a_terminal_gets_one_line_per_stage_redrawn_in_place(tmp_path):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    StageProgress("read", str(tmp_path)).add(7)
    stream = Tty()
    display = ProgressDisplay(str(tmp_path), stream=stream)
    display._render()
    StageProgress("score:embedding", str(tmp_path)).add(3)
    display._render()
    out = stream.getvalue()
    first, second = out.split("\x1b[1F")  # the second draw moves up over the first's one line
    assert first.startswith("\x1b[2Kread") and first.count("\n") == 1
    assert second.count("\x1b[2K") == 2 and "score:embedding       3 rows" in second


def test_a_local_run_shows_progress_and_leaves_no_trace(tmp_path, tiny_lm_dir, caplog):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "answer": f"{2 * i}"}) + "\n"
                           for i in range(40)) + "not json\n")
    job = parse_job({"inputs": [{"path": str(src)}], "output": str(tmp_path / "out"),
                     "filters": [{"type": "length", "min": 18}],  # drops i < 10
                     "scorers": [{"type": "likelihood", "model": str(tiny_lm_dir), "dtype": "float32"}],
                     "selectors": [{"type": "random", "budget": 5}]})
    with caplog.at_level(logging.INFO, logger="curate.progress"):
        manifest = run_job(job)
    done = [r.getMessage() for r in caplog.records if r.getMessage().startswith("done:")]
    c = manifest["counts"]
    scored = c["examples"] - c["filtered"]["filter:length"]
    assert scored == 30  # the scorer's total counts what it saw, not what was read
    assert any(line.startswith(f"done: read                  {c['read']} rows") for line in done), done
    assert any(line.startswith(f"done: score:likelihood      {scored}/{scored} rows  100%") for line in done), done
    # the same numbers as Beam counters (what Dataflow shows)
    assert manifest["metrics"]["curate.progress/score:likelihood.rows"] == scored
    assert manifest["metrics"]["curate.progress/read.rows"] == c["read"]
    assert "_progress" not in os.listdir(tmp_path / "out")


def test_quiet_shows_nothing(tmp_path, capsys):
    from curate.cli import main

    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"question": f"Q{i}", "answer": "A"}) + "\n" for i in range(10)))
    job = tmp_path / "job.yaml"
    job.write_text(f"inputs: [{{path: {src}}}]\noutput: {tmp_path / 'out'}\n")
    assert main(["run", str(job), "-q"]) == 0
    err = capsys.readouterr().err
    assert "rows" not in err and "INFO" not in err
