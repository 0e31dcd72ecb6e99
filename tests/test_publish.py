"""Publishing behaves like Beam's own file sinks: only the committed attempt's files are
published, a retried or repeated publish finishes the job, and the old output stays whole
and readable until the new one is verified. On `memgs://`, an in-memory store that
behaves like GCS (tests/memfs.py), and on local paths."""

import hashlib
import json
import os

import pyarrow as pa
import pytest
from apache_beam.io.filesystems import FileSystems

from curate.config import parse_job
from curate.pipeline import output
from curate.pipeline.run import run_job
from curate.pipeline.output import publish, read_manifest, remove_stale_staging, staging_dir
from curate.pipeline.sink import (_row_order, commit_jsonl, finalize_shards, shard_count, shard_of, write_jsonl,
                                 write_shard)
from memfs import OBJECTS, MemoryObjectStore, listing, store  # noqa: F401 (store: a fixture)

SCHEMA = pa.schema([("origin", pa.string()), ("id", pa.string()), ("text", pa.string())])
OUT = "memgs://bucket/runs/out"


def rows(n, tag):
    return [{"origin": f"in.jsonl:{i + 1}", "id": f"r{i:03d}", "text": f"{tag} row {i}"} for i in range(n)]


def write_dataset(folder, records, shard_rows, attempts=None):
    """What WriteShards' steps do for `records` in `folder`, without a pipeline: every shard
    written by one attempt, then committed. `attempts(folder, i, rows, writer)` may run extra
    attempts of shard i first (whose output Beam never commits)."""
    n = shard_count(len(records), shard_rows)
    by_shard = {}
    for r in records:
        by_shard.setdefault(shard_of(r, n), []).append(r)

    def writer(i, part):
        return write_shard(folder, i, n, sorted(part, key=_row_order), SCHEMA)

    written = []
    for i, part in sorted(by_shard.items()):
        if attempts:
            attempts(folder, i, part, writer)
        written.append(writer(i, part))
    return finalize_shards(written, n, folder, SCHEMA), written


def stage(output, kept, rejected=(), dead=(), shard_rows=3, attempts=None):
    """A finished staging directory for `output`, as run_pipeline leaves it before `publish`."""
    staging = staging_dir(output)
    info, written = write_dataset(staging, kept, shard_rows, attempts)
    rejected_info, _ = write_dataset(FileSystems.join(staging, "rejected"), list(rejected), shard_rows)
    dead_path = FileSystems.join(staging, "dead_letter.jsonl")
    dead_n = commit_jsonl(dead_path, write_jsonl(dead_path, dead))
    counts = {"kept": info["rows"], "shards": info["shards"], "rejected_rows_written": rejected_info["rows"],
              "dead_letter_rows_written": dead_n}
    with FileSystems.create(FileSystems.join(staging, "manifest.json")) as fh:
        fh.write(json.dumps({"name": "test", "counts": counts}).encode())
    return staging, written


def publish_old(output=OUT):
    """A published previous output: 7 kept rows in 3 shards, 2 rejected, 1 dead letter."""
    staging, _ = stage(output, rows(7, "old"), rows(2, "old rejected"), [{"raw": "old"}])
    publish(staging, output)
    return {p: b for p, b in OBJECTS.items() if p.startswith(output + "/")}


def stage_new(output=OUT):
    """The next run's staging: 4 kept rows in 2 shards, none rejected, no dead letter."""
    staging, _ = stage(output, rows(4, "new"), shard_rows=2)
    return staging


def read_rows(output, folder=""):
    base = f"{output}/{folder}".rstrip("/")
    state = json.loads(OBJECTS[f"{base}/state.json"])
    out = []
    for f in state["_data_files"]:
        out += pa.ipc.open_stream(OBJECTS[f"{base}/{f['filename']}"]).read_all().to_pylist()
    return sorted(out, key=lambda r: r["id"])


NEW_LISTING = ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow", "dataset_info.json",
               "dead_letter.jsonl", "manifest.json", "rejected/data-00000-of-00001.arrow",
               "rejected/dataset_info.json", "rejected/state.json", "state.json"]


def assert_new_output_complete(output=OUT):
    assert listing(output + "/") == NEW_LISTING
    assert read_rows(output) == rows(4, "new") and read_rows(output, "rejected") == []
    assert read_manifest(output)["counts"]["kept"] == 4
    assert OBJECTS[output + "/dead_letter.jsonl"] == b""
    # nothing beside the output: no staging, no saved copies of the old output
    assert listing("memgs://bucket/runs/") == [f"out/{name}" for name in NEW_LISTING]


def fail_copies_to(prefix, after, monkeypatch):
    """The store's copy fails once, after `after` files were copied to `prefix` (copied one
    by one), then works again."""
    real = MemoryObjectStore.copy
    done, failed = [], []

    def copy(self, sources, destinations):
        for s, d in zip(sources, destinations):
            if d.startswith(prefix) and not failed:
                if len(done) >= after:
                    failed.append(d)
                    raise OSError(f"injected: the store went away copying to {d}")
                done.append(d)
            real(self, [s], [d])

    monkeypatch.setattr(MemoryObjectStore, "copy", copy)
    return done


# ---------------------------------------------------------------- the cases

def test_a_stray_file_from_a_failed_attempt_in_staging_is_not_published(store):
    """Shard 0 is attempted three times: a failed attempt leaves half a file, a duplicate
    attempt a whole one; Beam commits the last attempt's output only. The dead-letter
    writer has a failed attempt too. Only the committed files are published; the strays
    are deleted with the staging directory."""
    strays = []

    def failed_attempts(folder, i, part, writer):
        if i == 0:
            for half in (True, False):
                out = writer(i, part)
                path = FileSystems.join(folder, out["file"])
                if half:
                    OBJECTS[path] = OBJECTS[path][: len(OBJECTS[path]) // 2]
                strays.append(path)

    staging, written = stage(OUT, rows(4, "new"), shard_rows=2, attempts=failed_attempts)
    strays.append(FileSystems.join(staging, write_jsonl(FileSystems.join(staging, "dead_letter.jsonl"),
                                                        [{"raw": "a failed attempt"}])[1]))
    assert all(p in OBJECTS for p in strays) and len(strays) == 3

    publish(staging, OUT)
    assert_new_output_complete()
    shard0 = next(w for w in written if w["index"] == 0)  # the committed attempt's bytes, not a stray's
    assert hashlib.sha256(OBJECTS[f"{OUT}/data-00000-of-00002.arrow"]).hexdigest() == shard0["sha256"]
    assert not [p for p in OBJECTS if "_attempt-" in p or "_committed." in p]


def test_finalize_retried_after_it_moved_half_the_files_completes(store, monkeypatch):
    """The first publish dies (no handler runs: no roll-back) after copying half the new
    files over the old output; a second call finishes: complete output, old extras gone."""
    publish_old()
    staging = stage_new()
    copied = fail_copies_to(OUT + "/", after=4, monkeypatch=monkeypatch)
    monkeypatch.setattr(output, "_roll_back", lambda *a: None)  # killed: nothing runs after the failure
    with pytest.raises(OSError, match="injected"):
        publish(staging, OUT)
    assert len(copied) == 4 and read_manifest(OUT) is None  # half-replaced, and it does not look complete
    monkeypatch.undo()

    publish(staging, OUT)
    assert_new_output_complete()


def test_finalize_run_twice_is_a_no_op_the_second_time(store):
    publish_old()
    staging = stage_new()
    publish(staging, OUT)
    after = dict(OBJECTS)
    publish(staging, OUT)
    assert OBJECTS == after
    assert_new_output_complete()


def test_a_second_call_finishes_a_cleanup_that_was_cut_short(store, monkeypatch):
    """Verified and in place, but the staging directory only partly deleted."""
    publish_old()
    staging = stage_new()
    real_delete = output._delete
    calls = []

    def delete(paths):
        paths = list(paths)
        calls.append(paths)
        if any(p.startswith(staging) and not p.endswith(output._PUBLISHED) for p in paths):
            real_delete(paths[: len(paths) // 2])
            raise OSError("injected: killed while removing the staging directory")
        real_delete(paths)

    monkeypatch.setattr(output, "_delete", delete)
    with pytest.raises(OSError, match="injected"):
        publish(staging, OUT)
    monkeypatch.undo()
    assert read_rows(OUT) == rows(4, "new") and listing(staging + "/")  # published; staging half gone
    publish(staging, OUT)
    assert_new_output_complete()


@pytest.mark.parametrize("failure", ["staged manifest disagrees", "copy fails half-way",
                                     "manifest copy fails", "verification fails"])
def test_a_publish_that_fails_before_the_new_manifest_is_verified_leaves_the_old_output(
        store, monkeypatch, failure):
    old = publish_old()
    staging = stage_new()
    if failure == "staged manifest disagrees":  # the counts of another run: refused before any copy
        manifest = json.loads(OBJECTS[staging + "/manifest.json"])
        manifest["counts"]["kept"] = 5
        OBJECTS[staging + "/manifest.json"] = json.dumps(manifest).encode()
    elif failure == "copy fails half-way":
        fail_copies_to(OUT + "/", after=3, monkeypatch=monkeypatch)
    elif failure == "manifest copy fails":
        fail_copies_to(OUT + "/manifest.json", after=0, monkeypatch=monkeypatch)
    else:
        real_verify = output._verify

        def verify(root, staged):
            if root == OUT:
                raise RuntimeError("injected: the new output does not verify")
            real_verify(root, staged)

        monkeypatch.setattr(output, "_verify", verify)
    with pytest.raises((OSError, RuntimeError), match="injected|refusing to publish"):
        publish(staging, OUT)
    monkeypatch.undo()

    # the old output, byte for byte, and readable
    assert {p: b for p, b in OBJECTS.items() if p.startswith(OUT + "/")} == old
    assert read_manifest(OUT)["counts"]["kept"] == 7 and read_rows(OUT) == rows(7, "old")
    assert read_rows(OUT, "rejected") == rows(2, "old rejected")
    assert not [p for p in OBJECTS if ".old-" in p]  # the saved copies went back; none left behind
    if failure != "staged manifest disagrees":  # the staging directory is whole: a retry publishes it
        publish(staging, OUT)
        assert_new_output_complete()


def test_the_old_outputs_extra_files_are_gone_after_a_successful_publish(store):
    """Two real runs into one output: the second has fewer shards, kept and rejected."""
    OBJECTS["memgs://bucket/data/in.jsonl"] = "".join(
        json.dumps({"question": f"Question {i}?", "answer": f"Answer {i}"}) + "\n" for i in range(30)).encode()
    spec = {"inputs": ["memgs://bucket/data/in.jsonl"], "output": OUT,
            "selectors": [{"type": "random", "budget": 12, "seed": 0}]}
    run_job(parse_job({**spec, "shard_rows": 4}), progress=False)
    assert "data-00002-of-00003.arrow" in listing(OUT + "/") and "rejected/data-00004-of-00005.arrow" in \
        listing(OUT + "/")
    manifest = run_job(parse_job({**spec, "shard_rows": 10}), progress=False)
    assert listing(OUT + "/") == ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow", "dataset_info.json",
                                  "dead_letter.jsonl", "manifest.json", "rejected/data-00000-of-00002.arrow",
                                  "rejected/data-00001-of-00002.arrow", "rejected/dataset_info.json",
                                  "rejected/state.json", "state.json"]
    assert manifest["counts"]["kept"] == 12 and len(read_rows(OUT)) == 12 and len(read_rows(OUT, "rejected")) == 18
    assert listing("memgs://bucket/runs/") == [f"out/{n}" for n in listing(OUT + "/")]  # no staging, no copies


# ---------------------------------------------------------------- local paths

def tree(path):
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, path)] = open(p, "rb").read()
    return out


def test_local_publish_drops_strays_and_a_second_call_is_a_no_op(tmp_path):
    out = str(tmp_path / "out")
    staging, _ = stage(out, rows(4, "old"))
    publish(staging, out)
    staging, _ = stage(out, rows(5, "new"), shard_rows=2)
    stray = os.path.join(staging, write_jsonl(os.path.join(staging, "dead_letter.jsonl"), [{"raw": "x"}])[1])
    assert os.path.exists(stray)
    publish(staging, out)
    published = tree(out)
    assert sorted(published) == ["data-00000-of-00003.arrow", "data-00001-of-00003.arrow",
                                 "data-00002-of-00003.arrow", "dataset_info.json", "dead_letter.jsonl",
                                 "manifest.json", "rejected/data-00000-of-00001.arrow",
                                 "rejected/dataset_info.json", "rejected/state.json", "state.json"]
    publish(staging, out)
    assert tree(out) == published and os.listdir(tmp_path) == ["out"]


def test_a_local_publish_cut_short_between_its_renames_is_finished_or_undone(tmp_path):
    out = str(tmp_path / "out")
    staging, _ = stage(out, rows(4, "old"))
    publish(staging, out)
    old = tree(out)
    staging, _ = stage(out, rows(5, "new"), shard_rows=2)
    os.rename(out, output._aside(staging))  # killed right after setting the old output aside
    alive = output.pid_alive
    output.pid_alive = lambda pid: False  # the publishing process is gone
    try:
        assert remove_stale_staging(out) == [staging] and tree(out) == old  # the next run puts it back
    finally:
        output.pid_alive = alive
    staging, _ = stage(out, rows(5, "new"), shard_rows=2)
    os.rename(out, output._aside(staging))
    publish(staging, out)  # or the publish is called again: it finishes
    assert read_manifest(out)["counts"]["kept"] == 5 and os.listdir(tmp_path) == ["out"]


def test_a_remote_publish_killed_half_way_is_put_back_by_the_next_run(store, monkeypatch):
    """A hard kill (no rollback runs) after the old manifest went and half the new files
    came: the next run of that output finds the backup and its journal and puts the old
    output back, byte for byte, before it checks the output."""
    old = publish_old()
    staging = stage_new()
    fail_copies_to(OUT + "/", after=3, monkeypatch=monkeypatch)
    monkeypatch.setattr(output, "_roll_back", lambda *a: None)  # killed: nothing puts it back
    with pytest.raises(OSError, match="injected"):
        publish(staging, OUT)
    monkeypatch.undo()
    assert read_manifest(OUT) is None and [p for p in OBJECTS if ".old-" in p]
    assert remove_stale_staging(OUT) == [output._aside(staging)]
    assert {p: b for p, b in OBJECTS.items() if p.startswith(OUT + "/")} == old
    assert not [p for p in OBJECTS if ".old-" in p]
    assert remove_stale_staging(OUT) == []  # a whole output: nothing to do
    publish(staging, OUT)  # the killed run's staging is whole: publishing it still works
    assert_new_output_complete()
