"""The trainer's edge cases, through `curate train` / `curate run`: what a user can get
wrong is one `curate: error:` line (exit 2) naming the cause, found before anything is
written, and nothing is left behind, neither a run directory nor files among the data."""

from __future__ import annotations

import json
import logging
import os
import re

import pytest
import yaml

from curate.cli import main, make_parser
from curate.config import ConfigError, parse_job
from curate.pipeline.run import run_job
from curate.train import TrainConfig, train
from curate.train import trainer as trainer_module


pytestmark = pytest.mark.usefixtures("torch_one_thread")


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


def test_zero_kept_rows_is_an_error_before_anything_is_created(tmp_path, tiny_lm_dir, capsys):
    data = _curate_output(tmp_path, "none", budget=0)
    before = _tree(data)
    assert _train("--data", data, "--model", tiny_lm_dir, "--output", tmp_path / "run") == 2
    line = _error_line(capsys)
    assert str(data) in line and "kept 0 rows" in line and "no examples" in line
    assert not (tmp_path / "run").exists() and _tree(data) == before


def test_curate_run_with_train_and_an_empty_selection_is_an_error_line(tmp_path, tiny_lm_dir, capsys):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({
        "inputs": [str(_qa_file(tmp_path / "in.jsonl"))], "output": str(tmp_path / "out"),
        "selectors": [{"type": "random", "budget": 0}],
        "train": {"model": str(tiny_lm_dir), "output": str(tmp_path / "sft"), "max_length": 64}}))
    assert main(["run", str(job), "-q"]) == 2
    assert "kept 0 rows" in _error_line(capsys)
    assert (tmp_path / "out" / "manifest.json").is_file()  # the selection itself is published
    assert not (tmp_path / "sft").exists()


def test_every_response_token_cut_off_is_an_error_naming_max_length(tmp_path, tiny_lm_dir, capsys):
    data = _qa_file(tmp_path / "qa.jsonl")
    assert _train("--data", data, "--model", tiny_lm_dir, "--output", tmp_path / "run", "--max-length", 1) == 2
    line = _error_line(capsys)
    assert "every response token is cut off by max_length=1" in line and "none of the 6 examples" in line
    assert not (tmp_path / "run").exists()


def _without_response(first_n):
    """The trainer's tokenize, with the loss spans of the first `first_n` examples emptied:
    with validated records and max_length >= 2 truncation always leaves a response token,
    so this is how an example with none left reaches the trainer here."""
    real = trainer_module.tokenize

    def tokenize(*args, **kwargs):
        tok = real(*args, **kwargs)
        tok.spans = [() if i < first_n else sp for i, sp in enumerate(tok.spans)]
        return tok
    return tokenize


def test_examples_with_no_response_token_are_left_out_and_counted(tmp_path, tiny_lm_dir, monkeypatch, caplog):
    records = [{"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}."} for i in range(6)]
    cfg = TrainConfig(model=str(tiny_lm_dir), max_length=64, batch_size=2, save_every=None,
                      warmup_ratio=0.0, dtype="fp32")
    monkeypatch.setattr(trainer_module, "tokenize", _without_response(2))
    with caplog.at_level(logging.WARNING, logger="curate.train"):
        m = train(records, cfg, tmp_path / "part", progress=False)
    assert m["n_train"] == 4 and m["n_train_no_response"] == 2 and m["steps"] == 2
    assert all(r["loss"] > 0 for r in m["train_curve"])
    assert "2 of 6 examples have no response token left" in caplog.text

    monkeypatch.setattr(trainer_module, "tokenize", _without_response(6))
    with pytest.raises(ConfigError, match="none of the 6 examples has a response token"):
        train(records, cfg, tmp_path / "none", progress=False)
    assert not (tmp_path / "none").exists()


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    """A curate output that kept 4 rows, alone in its folder (read only)."""
    return _curate_output(tmp_path_factory.mktemp("curated"), "out", budget=4)


@pytest.mark.parametrize("case", ["is", "lies inside", "contains", "contains the eval data", "cwd"])
def test_run_directory_overlapping_the_data_is_refused(tmp_path, curated, tiny_lm_dir, capsys, monkeypatch,
                                                       case):
    held_out = _qa_file(tmp_path / "held.jsonl")
    output, expected = {
        "is": (curated, f"is the data {curated}"),
        "lies inside": (curated / "sft", f"lies inside the data {curated}"),
        "contains": (curated.parent, f"contains the data {curated}"),
        "contains the eval data": (tmp_path, f"contains the data {held_out}"),
        "cwd": (".", "contains the working directory"),
    }[case]
    (tmp_path / "w").mkdir()
    monkeypatch.chdir(tmp_path / "w")
    before = _tree(curated.parent), _tree(tmp_path)
    assert _train("--data", curated, "--eval", held_out, "--model", tiny_lm_dir, "--output", output) == 2
    assert expected in _error_line(capsys)
    assert (_tree(curated.parent), _tree(tmp_path)) == before


def test_curate_run_refuses_a_train_output_inside_its_output_before_running(tmp_path, tiny_lm_dir, capsys):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({
        "inputs": [str(_qa_file(tmp_path / "in.jsonl"))], "output": str(tmp_path / "out"),
        "train": {"model": str(tiny_lm_dir), "output": str(tmp_path / "out" / "sft")}}))
    assert main(["run", str(job), "-q"]) == 2
    assert f"lies inside the data {tmp_path / 'out'}" in _error_line(capsys)
    assert not (tmp_path / "out").exists()  # refused before the pipeline ran


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
