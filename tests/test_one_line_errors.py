"""Errors a user can act on are one line, wherever they are raised: in the driver or
inside a Beam step (Beam re-raises those wrapped; `curate.cli.raised_in_step` unwraps
them in one place). A traceback means a bug in curate."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from curate import cli
from curate.config import ConfigError

from test_resume import likelihood_job


def write_job(tmp_path, spec) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(spec))
    return str(path)


def qa_file(path, n=40, words=60):
    path.write_text("".join(json.dumps({"question": f"Question {i}?", "answer": " ".join(["word"] * words)}) + "\n"
                            for i in range(n)))
    return str(path)


def one_line(capsys, rc, expected_rc):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("curate: ")]
    assert rc == expected_rc and "Traceback" not in err, err
    assert lines and lines[-1].startswith("curate: error: "), err
    return lines[-1]


def test_a_file_size_limit_inside_a_beam_step_is_one_line_naming_the_file(tmp_path):
    job = write_job(tmp_path, {"inputs": [qa_file(tmp_path / "in.jsonl", n=400)], "output": str(tmp_path / "out")})
    script = textwrap.dedent("""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
        from curate.cli import main
        sys.exit(main(["run", sys.argv[1], "-q"]))
    """)
    proc = subprocess.run([sys.executable, "-c", script, job], capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 2 and lines[0].startswith("curate run:"), proc.stderr  # the banner and the error
    # the first file written is the keys pass's spill (`_Keys`), or a shard's run
    assert "File too large" in lines[1] and ".arrow'" in lines[1] and "(in the step " in lines[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "job.yaml"]  # staging removed


def test_a_file_name_that_is_not_utf8_is_one_line(tmp_path, capsys):
    folder = os.fsencode(str(tmp_path / "in"))
    os.makedirs(folder)
    with open(os.path.join(folder, b"caf\xe9.jsonl"), "w") as fh:
        fh.write(json.dumps({"question": "What is two plus two?", "answer": "Four."}) + "\n")
    job = write_job(tmp_path, {"inputs": [str(tmp_path / "in" / "*.jsonl")], "output": str(tmp_path / "out")})
    line = one_line(capsys, cli.main(["run", job]), 2)
    assert "caf\\xe9.jsonl" in line and "not valid UTF-8" in line


@pytest.mark.parametrize("value", ["!!python/object/apply:os.system ['true']", "[unclosed"])
def test_a_yaml_tag_or_broken_yaml_in_a_cli_value_is_one_line(tmp_path, capsys, value):
    line = one_line(capsys, cli.main(["select", "--scores", str(tmp_path), "--method", "random",
                                      "--set", f"seed={value}"]), 2)
    assert "--set seed=" in line and "not a plain YAML value" in line


def test_a_model_that_asks_for_remote_code_is_one_line(tmp_path, tiny_lm_dir, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_lm_dir, model)
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="my_custom", auto_map={"AutoConfig": "configuration_my.MyConfig",
                                                    "AutoModelForCausalLM": "modeling_my.MyModel"})
    (model / "config.json").write_text(json.dumps(config))
    job = write_job(tmp_path, likelihood_job(tmp_path, model, "out", n=8))
    line = one_line(capsys, cli.main(["run", job, "-q"]), 2)
    assert "needs to run code shipped in its own files" in line and "trust_remote_code: true" in line


def test_an_unwritable_saved_work_location_fails_before_scoring(tmp_path, tiny_lm_dir, capsys, monkeypatch):
    from curate.scorers.likelihood import LikelihoodScorer

    def never(*a, **k):
        raise AssertionError("scored before the saved-work location was checked")

    monkeypatch.setattr(LikelihoodScorer, "score_batch", never)
    (tmp_path / "afile").write_text("x")
    job = write_job(tmp_path, {**likelihood_job(tmp_path, tiny_lm_dir, "out", n=8),
                               "saved_work": str(tmp_path / "afile" / "saved")})
    line = one_line(capsys, cli.main(["run", job, "-q"]), 2)
    assert "saved work" in line and "cannot write there" in line and "saved_work:" in line


def test_sigterm_while_a_model_scores_is_one_line(tmp_path, tiny_lm_dir):
    job = write_job(tmp_path, likelihood_job(tmp_path, tiny_lm_dir, "out", n=60))
    script = textwrap.dedent("""
        import sys, time
        from curate.scorers.likelihood import LikelihoodScorer
        score = LikelihoodScorer.score_batch
        def slow(self, loaded, records):
            print("SCORING", flush=True)
            time.sleep(0.2 * len(records))
            return score(self, loaded, records)
        LikelihoodScorer.score_batch = slow
        from curate.cli import main
        sys.exit(main(["run", sys.argv[1], "-q"]))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script, job], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "SCORING", proc.stderr.read()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.startswith("curate")]
    assert proc.returncode == 143 and "Traceback" not in err, err
    assert lines[-1] == "curate: terminated; no output was published"
    assert not [p for p in tmp_path.iterdir() if ".out.tmp-" in p.name] and not (tmp_path / "out").exists()


def test_a_bug_inside_a_step_still_shows_its_traceback():
    class Bug(Exception):
        pass

    with pytest.raises(Bug):
        cli._exit_status(Bug("not ours to hide"))
    wrapped = RuntimeError("OSError: [Errno 28] No space left on device [while running 'WriteKept/WriteShard']")
    wrapped._tagged_with_step = True
    wrapped.__context__ = OSError(28, "No space left on device")
    assert cli.raised_in_step(wrapped) is wrapped.__context__
    assert cli._exit_status(ConfigError("x")) == 2
