"""The trainer's edge cases, through `curate train` / `curate run`: what a user can get
wrong is one `curate: error:` line (exit 2) naming the cause, found before anything is
written, and nothing is left behind, neither a run directory nor files among the data."""

from __future__ import annotations

import json
import logging
import os
import re

import pytest
import torch
import yaml

from curate.cli import main, make_parser
from curate.config import ConfigError, parse_job
from curate.pipeline.build import run_job
from curate.train import TrainConfig, train
from curate.train import trainer as trainer_module


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _qa_file(path, n=6):
    path.write_text("".join(json.dumps({"question": f"What is {i} plus {i}?", "answer": f"It is {2 * i}."}) + "\n"
                            for i in range(n)))
    return path


def _curate_output(tmp_path, name, budget):
    out = tmp_path / name
    tmp_path.mkdir(parents=True, exist_ok=True)
    run_job(parse_job({"inputs": [str(_qa_file(tmp_path / f"{name}.jsonl"))], "output": str(out),
                       "selectors": [{"type": "random", "budget": budget, "seed": 0}]}))
    return out


def _tree(path):
    return sorted(os.path.relpath(os.path.join(root, f), path) for root, _, files in os.walk(path) for f in files)


def _error_line(capsys) -> str:
    """The one error line on stderr (and no traceback)."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("curate: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def _train(*args) -> int:
    return main(["train", *map(str, args)])


def test_checkpoints_of_another_run_are_one_line_with_real_options(tmp_path, tiny_lm_dir, capsys):
    data = _qa_file(tmp_path / "qa.jsonl")
    run = tmp_path / "run"
    train(str(data), TrainConfig(model=str(tiny_lm_dir), max_length=64, batch_size=2, save_every=1,
                                 max_steps=2, dtype="fp32", lr=1e-3), run, progress=False)
    (run / "metrics.json").unlink()  # a run cut short: its checkpoints only
    before = {p: os.path.getmtime(run / p) for p in _tree(run)}
    assert _train("--data", data, "--model", tiny_lm_dir, "--output", run, "--max-steps", 1) == 2
    line = _error_line(capsys)
    assert "holds checkpoints of a different run" in line and "choose another --output" in line
    assert "delete that directory" in line
    # every option the message names is one `curate train` has
    train_help = make_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for flag in re.findall(r"--[a-z][a-z-]*", line):
        assert flag in train_help, flag
    assert {p: os.path.getmtime(run / p) for p in _tree(run)} == before  # nothing touched
