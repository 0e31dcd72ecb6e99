"""Resume after a crash: scorers save their results as they go (curate.pipeline.saved_work);
a rerun after `kill -9` scores only the missing rows and publishes the same rows, byte for
byte, as an uninterrupted run. Also: the failure threshold (`max_failed_fraction`)."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pyarrow as pa
import pytest

from curate import records as curate_records
from curate.scorers import make_scorer
from curate.config import TooManyFailures, parse_job
from curate.pipeline import saved_work
from curate.pipeline.run import run_job
from curate.report.inspect import inspect_output
from curate.scorers.likelihood import LikelihoodScorer

from memfs import listing, store  # noqa: F401 (store: a fixture)
from test_faults import FakeScorer, pool_rows, write_pool

ROOT = pathlib.Path(__file__).resolve().parents[1]


def write_questions(path: pathlib.Path, n: int) -> str:
    path.write_text("".join(json.dumps({"question": f"What is {i} plus {i + 1}?",
                                        "answer": f"{i} plus {i + 1} is {2 * i + 1}."}) + "\n"
                            for i in range(n)))
    return str(path)


def likelihood_job(tmp_path, model, out, n=60):
    return {"inputs": [write_questions(tmp_path / "pool.jsonl", n)], "output": str(tmp_path / out),
            "scorers": [{"type": "likelihood", "model": str(model), "dtype": "float32",
                         "min_batch_size": 4, "max_batch_size": 4}],
            "selectors": [{"type": "random", "budget": 10, "seed": 0}]}


def saved_ids(directory: str) -> list[str]:
    return [i for shard in saved_work.saved_shards(directory) for i, _ in saved_work.read_shard(shard)]


def files(out: pathlib.Path) -> dict[str, bytes]:
    """The kept and rejected shards of an output, by name."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("data-*.arrow"))}


# the first run, killed: a row takes 100 ms and shards are written every 4 rows
KILLED_RUN = textwrap.dedent("""
    import sys, time
    from curate.pipeline import saved_work
    from curate.scorers.likelihood import LikelihoodScorer
    saved_work.SAVE_EVERY_ROWS = 4
    score = LikelihoodScorer.score_batch
    def slow(self, loaded, records):
        time.sleep(0.1 * len(records))
        return score(self, loaded, records)
    LikelihoodScorer.score_batch = slow
    from curate.cli import main
    sys.exit(main(["run", sys.argv[1], "-q"]))
""")


def test_a_run_killed_part_way_resumes_where_it_stopped(tmp_path, tiny_lm_dir, monkeypatch):
    spec = likelihood_job(tmp_path, tiny_lm_dir, "out")
    (tmp_path / "job.yaml").write_text(json.dumps(spec))
    (tmp_path / "killed.py").write_text(KILLED_RUN)
    plan_dir = saved_work.default_dir(spec["output"])
    scorer = make_scorer(dict(spec["scorers"][0]))
    directory = saved_work.scorer_dir(plan_dir, scorer)

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(tmp_path / "killed.py"), str(tmp_path / "job.yaml")],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while len(saved_ids(directory)) < 12:  # at least 3 shards saved
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.time() < deadline, "no scores saved in 120 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "out").exists()  # nothing published
    before = saved_ids(directory)
    assert 12 <= len(before) < 60  # killed part-way

    scored = []
    score = LikelihoodScorer.score_batch

    def counting(self, loaded, recs):
        scored.extend(r["id"] for r in recs)
        return score(self, loaded, recs)

    monkeypatch.setattr(LikelihoodScorer, "score_batch", counting)
    manifest = run_job(parse_job(spec), progress=False)
    assert manifest["counts"]["from_saved"] == {"score:likelihood": len(set(before))}
    assert not set(scored) & set(before)  # only the rest was scored
    assert len(scored) == 60 - len(set(before))
    assert not os.path.exists(plan_dir)  # the output holds the scores now; saved work removed
    assert f"scores from saved work {{'score:likelihood': {len(set(before))}}}" in inspect_output(spec["output"])

    scored.clear()
    reference = run_job(parse_job({**spec, "output": str(tmp_path / "reference")}), progress=False)
    assert len(scored) == 60 and reference["counts"]["from_saved"] == {"score:likelihood": 0}
    assert files(tmp_path / "out") == files(tmp_path / "reference")  # byte for byte
    assert len(files(tmp_path / "out")) == 2


def fake_job(tmp_path, out, fail_id, **extra):
    return parse_job({"inputs": [write_pool(tmp_path)], "output": out,
                      "scorers": [{"type": "fake", "fail_id": fail_id}],
                      "selectors": [{"type": "random", "budget": 5, "seed": 0}], **extra})


def bad_id():
    return curate_records.adapt(pool_rows()[7], curate_records.ADAPTERS["alpaca"], {}, "pool")[0]["id"]


@pytest.mark.parametrize("remote", [False, True])
def test_too_many_failures_fail_the_run_and_the_rest_is_saved(tmp_path, monkeypatch, store, remote):  # noqa: F811
    out = "memgs://bucket/runs/out" if remote else str(tmp_path / "out")
    with pytest.raises(TooManyFailures) as err:  # 1 of 12 rows is more than the default 1%
        run_job(fake_job(tmp_path, out, bad_id()), progress=False)
    assert str(err.value).startswith("score:fake failed on 1 of 12 rows (8.3%), more than max_failed_fraction 0.01")
    assert f"{bad_id()} (pool.jsonl:8): scorer fake failed: ValueError: cannot encode record" in str(err.value)
    if remote:
        assert not listing(out + "/") and listing("memgs://bucket/runs/.out.saved/")
    else:
        assert not os.path.exists(out)
    directory = saved_work.scorer_dir(saved_work.default_dir(out), FakeScorer(fail_id=bad_id()))
    assert sorted(saved_ids(directory)) == sorted(
        r["id"] for r in (curate_records.adapt(row, curate_records.ADAPTERS["alpaca"], {}, "pool")[0]
                          for row in pool_rows()) if r["id"] != bad_id())

    # raised threshold: the eleven saved rows are not scored again, the bad one goes to the dead letter
    manifest = run_job(fake_job(tmp_path, out, bad_id(), max_failed_fraction=0.1), progress=False)
    c = manifest["counts"]
    assert c["from_saved"] == {"score:fake": 11} and c["score_failed"] == {"score:fake": 1} and c["kept"] == 5
    if remote:
        assert not listing("memgs://bucket/runs/.out.saved/")


def test_fresh_scores_everything_again(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    with pytest.raises(TooManyFailures):
        run_job(fake_job(tmp_path, out, bad_id()), progress=False)
    manifest = run_job(fake_job(tmp_path, out, bad_id(), max_failed_fraction=0.5), progress=False, fresh=True)
    assert manifest["counts"]["from_saved"] == {"score:fake": 0}


def test_the_key_follows_what_the_numbers_depend_on(tmp_path, tiny_lm_dir):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_lm_dir, model)

    def key(**options):
        return saved_work.scorer_key(make_scorer({"type": "likelihood", "model": str(model), **options}))

    base = key()
    assert key(min_batch_size=2, max_batch_size=8, max_tokens_per_batch=99) == base  # batching only
    assert key(dtype="float32") != base and key(template="chat") != base
    weights = next(model.glob("*.safetensors"))
    os.utime(weights, ns=(time.time_ns(), time.time_ns() + 10**9))  # the model was retrained in place
    assert key() != base


def test_a_shard_round_trips_the_columns(tmp_path):
    import numpy as np

    schema = pa.schema([(saved_work.KEY, pa.string()), ("loss", pa.float64()), ("vec", pa.list_(pa.float32()))])
    saved_work.write_shard(str(tmp_path), pa.Table.from_pylist(
        [{saved_work.KEY: "a", "loss": 0.1 + 0.2, "vec": np.array([1.5, -2.0], np.float32)}], schema=schema))
    assert [p.name.startswith("part-") for p in tmp_path.iterdir()] == [True]  # no temporary left
    (row_id, columns), = saved_work.read_shard(saved_work.saved_shards(str(tmp_path))[0])
    assert row_id == "a" and columns["loss"] == 0.1 + 0.2
    assert columns["vec"].dtype == np.float32 and columns["vec"].tolist() == [1.5, -2.0]
