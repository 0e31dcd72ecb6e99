"""Reliability: never destroy data, never reuse stale scores, never exceed a budget,
one-line errors before the work, clean exits on signals, reproducible shards."""

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import apache_beam as beam
import datasets
import numpy as np
import pytest

from curate import cli
from curate.config import ConfigError, parse_job, resolve_budget
from curate.pipeline.run import pipeline_options, run_job, scores_key
from curate.inputs.files import plan_inputs
from curate.pipeline.output import check_output


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def qa_rows(n, start=0):
    return [{"question": f"Question number {i}?", "answer": f"Answer {i} " + "x" * (i % 7)}
            for i in range(start, start + n)]


def random_job(tmp_path, inputs, out, budget=5, **extra):
    return parse_job({"inputs": inputs, "output": str(out),
                      "selectors": [{"type": "random", "budget": budget, "seed": 0}], **extra})


def tree(path):
    """{relative path: sha256} of every file under path."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, path)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def cli_run(argv, capsys):
    rc = cli.main(argv)
    err = capsys.readouterr().err
    return rc, [line for line in err.splitlines() if line.startswith("curate: ")], err


# ---------------------------------------------------------------- 1. never destroy data

def test_a_directory_holding_a_users_file_is_refused_before_any_work(tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "in.jsonl", qa_rows(10))
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")

    def no_pipeline(*a, **k):
        raise AssertionError("the pipeline ran before the output was checked")

    monkeypatch.setattr(beam.Pipeline, "run", no_pipeline)
    with pytest.raises(ConfigError, match="not a curate output.*thesis.tex.*--overwrite"):
        run_job(random_job(tmp_path, [src], out))
    assert (out / "thesis.tex").read_text() == "years of work"
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []  # no staging made


def test_overwrite_replaces_a_foreign_directory_and_an_empty_one_needs_nothing(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", qa_rows(10))
    out = tmp_path / "mine"
    out.mkdir()
    (out / "old.txt").write_text("x")
    run_job(random_job(tmp_path, [src], out), overwrite=True)
    assert not (out / "old.txt").exists() and (out / "manifest.json").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_job(random_job(tmp_path, [src], empty))["counts"]["kept"] == 5


@pytest.mark.parametrize("layout", ["glob_inside_output", "output_is_input_file", "output_inside_input_dir",
                                    "output_is_parent_of_input"])
def test_an_output_that_is_contains_or_lies_inside_an_input_is_always_refused(tmp_path, layout):
    data = tmp_path / "data"
    src = write_jsonl(data / "in.jsonl", qa_rows(10))
    inputs, out = {
        "glob_inside_output": ([str(data / "*.jsonl")], data),
        "output_is_input_file": ([src], data / "in.jsonl"),
        "output_inside_input_dir": ([str(data)], data / "sub"),  # save_to_disk dir below
        "output_is_parent_of_input": ([src], tmp_path),
    }[layout]
    if layout == "output_inside_input_dir":
        datasets.Dataset.from_list(qa_rows(4)).save_to_disk(str(data))
    before = tree(tmp_path)
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match="the input"):
            run_job(random_job(tmp_path, inputs, out), overwrite=overwrite)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("output", [".", "..", "~", "/"])
def test_the_working_home_and_root_directories_are_refused(tmp_path, monkeypatch, output):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ConfigError, match="contains (the working|your home|the root)"):
        check_output(os.path.expanduser(output), [], overwrite=True)


def test_an_existing_file_is_refused_unless_overwrite(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", qa_rows(10))
    target = tmp_path / "results.csv"
    target.write_text("a,b\n")
    with pytest.raises(ConfigError, match="existing file"):
        run_job(random_job(tmp_path, [src], target))
    assert target.read_text() == "a,b\n"
    run_job(random_job(tmp_path, [src], target), overwrite=True)
    assert (target / "manifest.json").exists()


def test_a_previous_output_is_replaced_but_not_with_a_users_file_inside(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", qa_rows(10))
    out = tmp_path / "runs" / "r"
    run_job(random_job(tmp_path, [src], out, budget=3))
    assert run_job(random_job(tmp_path, [src], out, budget=4))["counts"]["kept"] == 4
    (out / "notes.md").write_text("my notes")
    with pytest.raises(ConfigError, match="files curate did not write.*notes.md"):
        run_job(random_job(tmp_path, [src], out, budget=5))
    assert (out / "notes.md").exists() and len(datasets.load_from_disk(str(out))) == 4
    assert [p.name for p in out.parent.iterdir()] == ["r"]  # nothing left beside it


def test_scores_and_output_must_differ(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", qa_rows(10))
    spec = {"inputs": [src], "output": str(tmp_path / "o"), "scores": str(tmp_path / "o"),
            "scorers": [{"type": "likelihood", "model": "/nonexistent"}],
            "selectors": [{"type": "random", "budget": 2}]}
    with pytest.raises(ConfigError, match="is the input"):
        run_job(parse_job(spec))


def test_cli_refusal_is_one_line_with_status_2(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", qa_rows(10))
    job_file = tmp_path / "job.yaml"
    job_file.write_text(json.dumps({"inputs": [src], "output": str(tmp_path),
                                    "selectors": [{"type": "random", "budget": 2}]}))
    rc, lines, err = cli_run(["run", str(job_file)], capsys)
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err and "the input" in lines[0]


def test_prune_refuses_a_directory_it_did_not_make(tmp_path):
    from curate.prune import check_prune_output

    out = tmp_path / "model"
    out.mkdir()
    check_prune_output(str(out))  # empty: fine
    (out / "weights.bin").write_text("x")
    with pytest.raises(ConfigError, match="not a pruned copy"):
        check_prune_output(str(out))
    (out / "prune.json").write_text("{}")
    check_prune_output(str(out))


# ---------------------------------------------------------------- 2. stale scores

BASE_INPUT = {"source": "s", "format": "jsonl", "adapter": "qa", "fields": {}, "limit": 12}
CHANGES = [("limit", 3), ("source", "other"), ("adapter", "prompt_response"),
           ("fields", {"question": "answer", "answer": "question"})]


@pytest.mark.parametrize("key,value", CHANGES)
def test_every_input_setting_that_changes_rows_changes_the_scores_key(tmp_path, key, value):
    path = write_jsonl(tmp_path / "in.jsonl", [{**r, "prompt": r["question"], "response": r["answer"]}
                                              for r in qa_rows(20)])
    spec = {"output": str(tmp_path / "o"), "scorers": [{"type": "likelihood"}]}
    base = parse_job({**spec, "inputs": [{"path": path, **BASE_INPUT}]})
    changed = parse_job({**spec, "inputs": [{"path": path, **BASE_INPUT, key: value}]})
    assert scores_key(base, plan_inputs(base.inputs, 32000)) != scores_key(changed, plan_inputs(changed.inputs, 32000))
    again = parse_job({**spec, "inputs": [{"path": path, **BASE_INPUT}]})
    assert scores_key(base, plan_inputs(base.inputs, 32000)) == scores_key(again, plan_inputs(again.inputs, 32000))


def test_a_smaller_limit_rescores_and_the_manifest_names_the_real_inputs(tmp_path, tiny_lm_dir):
    src = write_jsonl(tmp_path / "in.jsonl", qa_rows(20))
    spec = {"output": str(tmp_path / "o"), "scores": str(tmp_path / "scores"),
            "scorers": [{"type": "likelihood", "model": str(tiny_lm_dir), "dtype": "float32"}],
            "selectors": [{"type": "random", "budget": 1.0}]}
    first = run_job(parse_job({**spec, "inputs": [{"path": src, "limit": 12}]}))
    assert first["counts"]["kept"] == 12
    second = run_job(parse_job({**spec, "inputs": [{"path": src, "limit": 3}]}))
    assert second["scores_key"] != first["scores_key"] and second["counts"]["kept"] == 3
    assert len(datasets.load_from_disk(str(tmp_path / "o"))) == 3
    assert [i["path"] for i in second["inputs"]] == [src] and second["inputs"][0]["limit"] == 3


# ---------------------------------------------------------------- 3. budgets are exact

def test_same_rows_from_two_folders_and_a_file_listed_twice_keep_the_budget(tmp_path):
    rows = qa_rows(100)
    a = write_jsonl(tmp_path / "a" / "pool.jsonl", rows)
    b = write_jsonl(tmp_path / "b" / "pool.jsonl", rows)
    m = run_job(random_job(tmp_path, [a, b, a], tmp_path / "out", budget=51))
    assert m["counts"]["examples"] == 200 and m["counts"]["kept"] == 51
    ds = datasets.load_from_disk(str(tmp_path / "out"))
    assert len(ds) == 51 and len(set(zip(ds["id"], ds["origin"]))) == 51


def _pool(rng, n, dup_share):
    """Rows with every score column a selector reads; a share of them repeat an earlier
    row's content (same id, prompt and scores) from another origin."""
    rows = []
    for i in range(n):
        if rows and rng.random() < dup_share:
            rows.append({**rng.choice(rows), "origin": f"copy/{i}.jsonl:1"})
            continue
        emb = np.asarray([rng.gauss(0, 1) for _ in range(8)], dtype=np.float32)
        rows.append({
            "id": f"r{i:04d}", "prompt_id": f"p{rng.randrange(max(1, n // 3))}", "origin": f"pool.jsonl:{i + 1}",
            "source": rng.choice(["a", "b"]), "prompt": f"prompt {i}", "response": f"response {i} {i * 7}",
            "messages": [{"role": "user", "content": f"prompt {i}"}, {"role": "assistant", "content": f"r {i}"}],
            "logprob_mean": rng.choice([-1.0, -2.0, rng.uniform(-3, 0)]),  # ties on purpose
            "don": rng.choice([0.5, rng.uniform(-1, 1)]), "nod": rng.choice([1.0, rng.uniform(0, 2)]),
            "embedding": (emb / np.linalg.norm(emb)).tolist(),
            "trajectory": [rng.choice([1.0, rng.uniform(0, 3)]) for _ in range(4)],
            "jsd": rng.choice([0.1, rng.uniform(0, 1)]), "jsd_total_tokens": rng.randrange(5, 50),
        })
    return rows


def _expected_grape(rows, k):
    per_prompt = {}
    for r in rows:
        per_prompt[r["prompt_id"]] = per_prompt.get(r["prompt_id"], 0) + 1
    return sum(min(k, n) for n in per_prompt.values())


def test_every_selector_keeps_exactly_its_budget_on_pools_with_duplicates(tmp_path):
    """Property test: random pools, budgets and duplicate shares; one pipeline."""
    from curate import steps

    rng = random.Random(7)
    cases = []
    for trial in range(4):
        rows = _pool(rng, rng.randrange(30, 90), dup_share=rng.choice([0.2, 0.5]))
        budget = rng.choice([rng.randrange(0, len(rows) + 5), round(rng.uniform(0.05, 1.0), 2)])
        want = resolve_budget(budget, len(rows))
        specs = [{"type": "random", "budget": budget, "seed": trial},
                 {"type": "donod", "budget": budget},
                 {"type": "diversity", "budget": budget, "k": 3, "seed": trial},
                 {"type": "s2l", "budget": budget, "k": 3, "seed": trial},
                 {"type": "paser", "budget": budget, "n_clusters": 2, "k_neighbors": 5, "seed": trial}]
        cases += [(f"{trial}-{s['type']}", rows, s, want) for s in specs]
        k = rng.choice([1, 2])
        cases.append((f"{trial}-grape", rows, {"type": "grape", "k": k}, _expected_grape(rows, k)))

    with beam.Pipeline(options=pipeline_options([])) as p:
        for name, rows, spec, _ in cases:
            out = p | f"Create{name}" >> beam.Create(rows) | f"Select{name}" >> steps.build("selector", spec, name)
            for part in ("kept", "rejected"):
                (out[part] | f"Count{name}{part}" >> beam.combiners.Count.Globally()
                 | f"Write{name}{part}" >> beam.Map(
                     lambda n, path: open(path, "w").write(str(n)), str(tmp_path / f"{name}.{part}")))
    for name, rows, spec, want in cases:
        kept = int((tmp_path / f"{name}.kept").read_text())
        rejected = int((tmp_path / f"{name}.rejected").read_text())
        assert kept + rejected == len(rows), name
        if spec["type"] == "paser":  # PASER's concept filter may leave budget unspent, never exceed it
            assert kept <= want, (name, spec, kept, want)
        else:
            assert kept == want, (name, spec, kept, want)


# ---------------------------------------------------------------- 7-9. errors a person reads

def _job_file(tmp_path, **spec):
    src = write_jsonl(tmp_path / "in.jsonl", qa_rows(10))
    spec = {"inputs": [{"path": src}], "output": str(tmp_path / "out"),
            "selectors": [{"type": "random", "budget": 3}], **spec}
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(spec))
    return str(path)


BAD_VALUES = [
    ({"selectors": [{"type": "random", "budget": 3, "seed": "abc"}]}, "seed"),
    ({"inputs": [{"path": "IN", "limit": "ten"}]}, "limit"),
    ({"inputs": [{"path": "IN", "limit": 0}]}, "limit"),
    ({"inputs": [{"path": "IN", "limit": -1}]}, "limit"),
    ({"inputs": [{"path": "IN", "fields": "question"}]}, "fields"),
    ({"inputs": [{"path": 5}]}, "path"),
    ({"filters": [{"type": "length", "min": "abc"}]}, "min"),
    ({"validate": {"max_chars": "big"}}, "max_chars"),
    ({"validate": {"max_chars": 0}}, "max_chars"),
    ({"shard_rows": "many"}, "shard_rows"),
    ({"name": ["a"]}, "name"),
    ({"output": 7}, "output"),
    ({"selectors": [{"type": "grape", "k": "two"}]}, " k "),
    ({"scorers": [{"type": "likelihood", "max_length": "big"}]}, "max_length"),
    ({"selectors": [{"type": "diversity", "budget": 3, "temperature": "warm"}]}, "temperature"),
    # unknown, missing and refused values: the key and what is allowed, before any work
    ({"selectors": [{"type": "random", "budgt": 3}]}, "budgt; known: budget, seed"),
    ({"selectors": [{"type": "diversity"}]}, "budget is required"),
    ({"filters": [{"type": "length", "mn": 3}]}, "mn; known: field, max, min"),
    ({"scorers": [{"type": "likelihood", "template": "chatt"}]}, "expected one of plain, chat"),
    ({"scorers": [{"type": "likelihood", "turns": "first"}]}, "turns must be one of 'all', 'last'"),
    ({"scorers": [{"type": "likelihood", "dtype": "fp64"}]}, "dtype must be auto or one of"),
    ({"scorers": [{"type": "likelihood", "device": "tpu"}]}, "device must be auto, cpu, cuda"),
    ({"scorers": [{"type": "embedding", "field": "foo"}]}, "expected one of prompt, response"),
    ({"train": {"epochs": "two"}}, "train: epochs must be an integer"),
    ({"train": {"template": "foo"}}, "train: template"),
    ({"inputs": [{"path": "IN", "limit_prompts": 0}]}, "limit_prompts"),
]


@pytest.mark.parametrize("spec,key", BAD_VALUES)
def test_a_config_value_of_the_wrong_type_is_one_line_naming_the_key(tmp_path, capsys, spec, key):
    src = write_jsonl(tmp_path / "in.jsonl", qa_rows(10))
    if "inputs" in spec:
        spec = {**spec, "inputs": [{**i, "path": src if i["path"] == "IN" else i["path"]} for i in spec["inputs"]]}
    rc, lines, err = cli_run(["run", _job_file(tmp_path, **spec)], capsys)
    assert rc == 2 and "Traceback" not in err, err
    assert len(lines) == 1 and key.strip() in lines[0], lines


@pytest.mark.parametrize("where", ["before", "after"])
def test_options_before_or_after_the_job_and_beam_flags_after_dashes(tmp_path, capsys, where):
    job = _job_file(tmp_path)
    out = str(tmp_path / "elsewhere")
    opts = ["--output", out]
    argv = ["run", *opts, job] if where == "before" else ["run", job, *opts]
    rc, _, err = cli_run(argv + ["--", "--direct_running_mode=in_memory"], capsys)
    assert rc == 0, err
    assert json.load(open(os.path.join(out, "manifest.json")))["counts"]["kept"] == 3


def test_beam_flags_to_a_command_without_a_pipeline_are_refused(tmp_path, capsys):
    rc, lines, _ = cli_run(["inspect", str(tmp_path), "--", "--runner=X"], capsys)
    assert rc == 2 and "takes no Beam options" in lines[0]


@pytest.mark.parametrize("output", ["/proc/curate-out", "FILE/sub"])
def test_an_unwritable_output_fails_at_once_in_one_line(tmp_path, capsys, monkeypatch, output):
    (tmp_path / "FILE").write_text("a file, not a directory")
    output = output.replace("FILE", str(tmp_path / "FILE"))

    def no_pipeline(*a, **k):
        raise AssertionError("the pipeline ran although the output cannot be written")

    monkeypatch.setattr(beam.Pipeline, "run", no_pipeline)
    rc, lines, err = cli_run(["run", _job_file(tmp_path), "--output", output], capsys)
    assert rc in (1, 2) and len(lines) == 1 and "Traceback" not in err, err


def test_a_late_system_error_is_one_line_and_publishes_nothing(tmp_path, capsys, monkeypatch):
    import errno

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("curate.pipeline.run.publish", disk_full)
    rc, lines, err = cli_run(["run", _job_file(tmp_path)], capsys)
    assert rc == 1 and len(lines) == 1 and "No space left" in lines[0] and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "job.yaml"]


# ---------------------------------------------------------------- 10. signals and leftovers

HANG = """
import sys, time, apache_beam as beam
def hang(self, *a, **k):
    print("PIPELINE STARTED", flush=True)
    time.sleep(120)
beam.Pipeline.run = hang
from curate.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _start_hanging_run(tmp_path, job):
    # SIGINT as a terminal delivers it, even when these tests run in a background job
    # (which starts with SIGINT ignored, and a child would inherit that)
    proc = subprocess.Popen([sys.executable, "-c", HANG, "run", job], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    line = proc.stdout.readline()
    assert "PIPELINE STARTED" in line, proc.stderr.read()
    return proc


def _staging(tmp_path):
    return [p for p in tmp_path.iterdir() if ".out.tmp-" in p.name]


@pytest.mark.parametrize("sig,rc", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigint_and_sigterm_remove_the_staging_directory(tmp_path, sig, rc):
    proc = _start_hanging_run(tmp_path, _job_file(tmp_path))
    assert len(_staging(tmp_path)) == 1
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    lines = [line for line in err.splitlines() if line.startswith("curate: ")]
    assert proc.returncode == rc and lines[-1].startswith("curate: ") and "published" in lines[-1], err
    assert "Traceback" not in err and _staging(tmp_path) == [] and not (tmp_path / "out").exists()


def test_a_killed_runs_leftovers_are_removed_by_the_rerun_and_inspect_refuses_them(tmp_path, capsys):
    job = _job_file(tmp_path)
    proc = _start_hanging_run(tmp_path, job)
    proc.kill()
    proc.wait(timeout=30)
    (left,) = _staging(tmp_path)
    rc, lines, _ = cli_run(["inspect", str(left)], capsys)
    assert rc == 2 and "not a published curate output" in lines[0]
    assert cli.main(["run", job]) == 0
    assert _staging(tmp_path) == [] and (tmp_path / "out" / "manifest.json").exists()


# a run killed (SIGKILL) at one point of staging or publishing: argv[1] the job, argv[2] the point
KILL_AT = """
import os, shutil, signal, sys
from curate.pipeline import output, run
point = sys.argv[2]
def die():
    os.kill(os.getpid(), signal.SIGKILL)
real_mkdir, real_rename, real_publish, real_remove = os.mkdir, os.rename, run.publish, output._remove_local
def mkdir(path, *a, **k):
    real_mkdir(path, *a, **k)
    if point == "mkdir" and ".tmp-" in str(path):
        die()  # the staging directory exists, nothing in it
def rename(src, dst):
    if point == "committed" and ".old-" in str(dst):
        die()  # staging committed in place (orphans and commit records gone), the old output in place
    real_rename(src, dst)
    if point == "aside" and ".old-" in str(dst):
        die()  # the old output set aside, the output path empty
def publish(*a, **k):
    if point == "manifest":
        die()  # staging complete with its manifest, publish not begun
    real_publish(*a, **k)
def remove(path):
    if point == "remove_old":
        die()  # the new output in place, the old one still aside
    real_remove(path)
os.mkdir, os.rename, run.publish, output._remove_local = mkdir, rename, publish, remove
from curate.cli import main
sys.exit(main(["run", sys.argv[1], "-q"]))
"""


@pytest.mark.parametrize("point", ["mkdir", "manifest", "committed", "aside", "remove_old"])
def test_every_state_a_killed_publish_leaves_is_cleaned_by_the_next_run(tmp_path, point):
    job = _job_file(tmp_path)
    assert cli.main(["run", job, "-q"]) == 0
    old = tree(tmp_path / "out")
    proc = subprocess.run([sys.executable, "-c", KILL_AT, job, point], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".out.")], "the kill left nothing to clean"
    if point != "remove_old":  # the old output is whole again, or still in place
        from curate.pipeline.output import remove_stale_staging

        remove_stale_staging(str(tmp_path / "out"))
        assert tree(tmp_path / "out") == old
    assert cli.main(["run", job, "-q"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "job.yaml", "out"]


def test_a_live_runs_staging_directory_is_left_alone(tmp_path):
    from curate.pipeline.output import remove_stale_staging, staging_dir

    live = staging_dir(str(tmp_path / "out"))  # owned by this (live) process
    assert remove_stale_staging(str(tmp_path / "out")) == [] and os.path.isdir(live)


# ---------------------------------------------------------------- 11. reproducible shards

def test_two_runs_write_byte_identical_shards_on_different_runner_modes(tmp_path):
    rows = qa_rows(60) + [{"question": "no answer"}] + qa_rows(5)  # duplicates and a dead letter
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    spec = {"inputs": [src], "shard_rows": 7, "filters": [{"type": "dedup"}],
            "selectors": [{"type": "random", "budget": 40, "seed": 1}]}
    run_job(parse_job({**spec, "output": str(tmp_path / "a")}), ["--direct_running_mode=in_memory"])
    run_job(parse_job({**spec, "output": str(tmp_path / "b")}),
            ["--direct_running_mode=multi_threading", "--direct_num_workers=2"])
    a, b = tree(tmp_path / "a"), tree(tmp_path / "b")
    for name in ("manifest.json", "report.html"):  # timings and dates differ by design
        a.pop(name, None), b.pop(name, None)
    assert a == b
    shards = sorted(n for n in a if n.startswith("data-"))
    assert len(shards) == 6 and shards[0] == "data-00000-of-00006.arrow"
    ds = datasets.load_from_disk(str(tmp_path / "a"))
    assert len(ds) == 40 and len(datasets.load_from_disk(str(tmp_path / "a" / "rejected"))) == 25
