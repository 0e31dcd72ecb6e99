"""The output directory's life: checked before any work, staged, published, read back.

Everything is written into a staging directory beside the output, which becomes the
output only when the whole run has succeeded (`publish`): a failed run never leaves an
output that looks complete, a failed publish leaves the previous output in place, and
`check_output` refuses, before any work, to publish over anything that is not a previous
curate output or that holds the inputs. Only the files the shard writers committed
(`curate.pipeline.sink`: commit records) and the driver's manifest.json and report.html
are published; anything else in staging is an orphan of a failed attempt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid

from apache_beam.io.filesystem import BeamIOError
from apache_beam.io.filesystems import FileSystems

from curate.config import ConfigError
from curate.paths import canonical_path, guarded_inside, is_remote, overlap
from curate.pipeline.sink import COMMITTED, _read_json, _write_json

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- publishing

# what a curate output holds; anything else in the output path is someone's data
_CURATE_FILE = re.compile(r"(data-\d{5}-of-\d{5}\.arrow|dataset_info\.json|state\.json|manifest\.json"
                          r"|report\.html|dead_letter\.jsonl|rejected/.+)")
# the owner file of staging directories made before the owner went into their name
_OWNER = "_curate_staging.json"
# a staging directory's name: .NAME.tmp-<time>-<host hash>-<pid>-<random>, and the old
# output set aside while publishing: .NAME.old-<the same>. The owner is in the name, so
# every state a kill can leave (even mid-mkdir, or with the directory's files half
# committed) tells whether its process is gone.
_STAGING_SUFFIX = re.compile(r"\.(tmp|old)-\d{8}-\d{6}-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{6}")
# the final names of a curate output's files: what a staging directory without commit
# records (one an earlier publish call already committed) publishes
_FINAL_FILE = re.compile(r"(rejected/)?(data-\d{5}-of-\d{5}\.arrow|dataset_info\.json|state\.json)"
                         r"|manifest\.json|report\.html|dead_letter\.jsonl")
_DRIVER_FILES = ("manifest.json", "report.html")  # written by the driver after the pipeline, not by it
# the manifest counts (curate.pipeline.run) that say what each commit record's writer wrote
_COUNTED = {f"{COMMITTED}shards.json": {"rows": "kept", "shards": "shards"},
            f"rejected/{COMMITTED}shards.json": {"rows": "rejected_rows_written"},
            f"{COMMITTED}dead_letter.jsonl.json": {"rows": "dead_letter_rows_written"}}
_PUBLISHED = "_published.json"  # in a remote staging directory: the output is in place and verified
_JOURNAL = "_journal.json"  # in a remote backup directory: what was saved; written once all of it is


def check_output(output: str, inputs: list[str], overwrite: bool = False) -> None:
    """Refuse, before any work, an output whose publishing could destroy data.

    Always refused: an output that is, contains or lies inside an input, or that contains
    the working directory or the home directory. Without `overwrite`: an existing output
    path that is not a previous curate output (a file; a directory without manifest.json,
    or with files curate does not write). An empty directory is fine.
    """
    if not output or not output.strip():
        raise ConfigError("output: empty path")
    out = canonical_path(output)
    for path in inputs:
        how = overlap(out, canonical_path(path))
        if how:
            raise ConfigError(f"output {output} {how} the input {path}: publishing would replace the "
                              f"input; choose another output (--overwrite never allows this)")
    if not is_remote(output):
        name = guarded_inside(out)
        if name:
            raise ConfigError(f"output {output} contains {name}: publishing replaces the output "
                              f"directory as a whole; name a new directory (e.g. runs/NAME)")
        if os.path.exists(out) and not os.path.isdir(out):
            if not overwrite:
                raise ConfigError(f"output {output} is an existing file, not a curate output; "
                                  f"refusing to replace it (--overwrite replaces it)")
            return
    found = [f[len(out) + 1:] for f in list_tree(out)]
    if not found or overwrite:
        return
    if "manifest.json" not in found:
        raise ConfigError(f"output {output} exists and is not a curate output (no manifest.json; it holds "
                          f"{_some(found)}); refusing to replace it (--overwrite replaces it)")
    foreign = [f for f in found if not _CURATE_FILE.fullmatch(f)]
    if foreign:
        raise ConfigError(f"output {output} is a curate output that also holds files curate did not write "
                          f"({_some(foreign)}); refusing to replace them (--overwrite replaces them)")


def _some(names: list[str], k: int = 3) -> str:
    return ", ".join(names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


def _staging_prefix(output: str) -> tuple[str, str]:
    parent, name = FileSystems.split(canonical_path(output) if not is_remote(output) else output.rstrip("/"))
    return parent, f".{name}.tmp-"


def _host() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def staging_dir(output: str) -> str:
    """A fresh staging directory beside the output, created now (so an unwritable
    output fails before any work), named with the process that owns it."""
    parent, prefix = _staging_prefix(output)
    staging = FileSystems.join(parent, f"{prefix}{time.strftime('%Y%m%d-%H%M%S')}-{_host()}-{os.getpid()}-"
                                       f"{uuid.uuid4().hex[:6]}")
    if not is_remote(output):
        os.makedirs(parent, exist_ok=True)
        os.mkdir(staging)
    return staging


def _owner_gone(path: str) -> bool:
    """The process that made this staging (or set-aside) directory is gone: it ran on this
    machine and its pid is not alive. False when that cannot be told (another machine)."""
    found = _STAGING_SUFFIX.search(os.path.basename(path))
    if found:
        return found["host"] == _host() and not pid_alive(found["pid"])
    try:  # made by an older curate: the owner is in a file
        with open(os.path.join(path, _OWNER)) as fh:
            owner = json.load(fh)
    except (OSError, ValueError):
        return ".old-" in os.path.basename(path)  # an old output set aside, not a run's work
    return owner.get("host") == socket.gethostname() and not pid_alive(owner.get("pid"))


def remove_stale_staging(output: str) -> list[str]:
    """Put back or remove what killed runs left beside this output, before a new run:
    - a previous output a killed publish had set aside (`.old-`) while the output path is
      empty (killed between its two renames) goes back in place;
    - a remote output a killed publish left half-replaced gets its old files back from
      the backup the publish made (`_recover_remote`);
    - staging and set-aside directories whose process is gone (see `_owner_gone`) are
      removed, whatever state the kill left them in. Those of a live run, or of another
      machine, are left alone."""
    if is_remote(output):
        return _recover_remote(output)
    parent, prefix = _staging_prefix(output)
    if not os.path.isdir(parent):
        return []
    removed, target = [], canonical_path(output)
    for name in sorted(os.listdir(parent)):
        path = os.path.join(parent, name)
        if not (name.startswith(prefix) or name.startswith(prefix.replace(".tmp-", ".old-"))):
            continue
        if not _owner_gone(path):
            continue
        if (".old-" in name and not os.path.lexists(target)
                and os.path.isfile(os.path.join(path, "manifest.json"))):
            os.rename(path, target)
            log.warning("put back %s: a killed run had set it aside while publishing", output)
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    if removed:
        log.info("removed %d leftover(s) of killed runs: %s", len(removed), ", ".join(removed))
    return removed


def _recover_remote(output: str) -> list[str]:
    """A remote output without manifest.json beside a backup with a whole journal: a
    publish was killed while it replaced the files (`_publish_remote`); the old output's
    files go back from the backup (the newest, if several) and the backup is removed."""
    output = output.rstrip("/")
    if read_manifest(output) is not None:
        return []
    parent, prefix = _staging_prefix(output)
    pattern = FileSystems.join(parent, prefix.replace(".tmp-", ".old-") + "*", _JOURNAL)
    try:
        journals = sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
    except BeamIOError:  # nothing there
        return []
    if not journals:
        return []
    backup = journals[-1][:-len(_JOURNAL) - 1]
    journal = _read_json(journals[-1])
    if not isinstance(journal, dict) or journal.get("output") != output:
        return []
    _roll_back(output, backup, journal)
    return [backup]


def pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, TypeError, ValueError):
        return False
    return True


def _listing(path: str) -> dict[str, int]:
    """{file: size} of every file under `path` (a directory, or a prefix on an object store), sorted."""
    if not is_remote(path):
        if not os.path.isdir(path):
            return {}
        found = sorted(os.path.join(root, f) for root, _, files in os.walk(path) for f in files)
        return {f: os.path.getsize(f) if os.path.exists(f) else -1 for f in found}
    try:
        found = FileSystems.match([FileSystems.join(path.rstrip("/"), "**")])[0].metadata_list
    except BeamIOError:  # nothing there
        return {}
    return {m.path: m.size_in_bytes for m in sorted(found, key=lambda m: m.path)}


def list_tree(path: str) -> list[str]:
    """Every file under `path` (a directory, or a prefix on an object store), sorted."""
    return list(_listing(path))


def remove_tree(path: str) -> None:
    if not is_remote(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    files = list_tree(path)
    if files:
        FileSystems.delete(files)


def _delete(paths) -> None:
    """Delete these files; one already gone is fine (a retried call)."""
    paths = list(paths)
    if paths and is_remote(paths[0]):
        FileSystems.delete(paths)
        return
    for path in paths:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def _aside(staging: str) -> str:
    """Beside the staging directory: where the previous output goes while it is replaced
    (local: the whole directory; remote: the files the new output replaces)."""
    parent, name = FileSystems.split(staging.rstrip("/"))
    return FileSystems.join(parent, name.replace(".tmp-", ".old-", 1) if ".tmp-" in name else name + ".old")


@dataclasses.dataclass
class _Staged:
    """A finished staging directory: `files` {final relative name: path in staging}, what
    is published (the files the commit records name, and the driver's own); `sizes`
    {path: bytes}; `records` {relative name: commit record}; `orphans`, everything else
    (files of failed or duplicate attempts, the owner file): deleted, never published."""
    files: dict[str, str]
    sizes: dict[str, int]
    records: dict[str, dict]
    orphans: list[str]


def _read_staged(staging: str, listing: dict[str, int]) -> _Staged:
    prefix = staging.rstrip("/") + "/"
    rel = {path[len(prefix):]: path for path in listing}
    records = {}
    for name, path in rel.items():
        base = name.rpartition("/")[2]
        if base.startswith(COMMITTED) and base.endswith(".json"):
            records[name] = _read_json(path)
            if not isinstance(records[name], dict) or not isinstance(records[name].get("files"), list):
                raise RuntimeError(f"{path}: unreadable commit record; refusing to publish")
    if records:
        files = {}
        for name, record in records.items():
            folder = name.rpartition("/")[0]
            for final in record["files"]:
                final = f"{folder}/{final}" if folder else final
                if final not in rel:
                    raise RuntimeError(f"{staging}: {final} was committed but is not there; refusing to publish")
                files[final] = rel[final]
        files.update({name: rel[name] for name in _DRIVER_FILES if name in rel})
    else:  # committed by an earlier publish call (it removed the records last): the final names
        files = {name: path for name, path in rel.items() if _FINAL_FILE.fullmatch(name)}
    if "manifest.json" not in files:
        raise RuntimeError(f"{staging}: no manifest.json; refusing to publish an incomplete run")
    orphans = [path for name, path in rel.items() if name not in files and name not in records]
    return _Staged(files, {path: listing[path] for path in files.values()}, records, orphans)


def _verify(root: str, staged: _Staged) -> None:
    """The manifest under `root` (the staging directory, or the output once the files are
    in) exists, parses and agrees with what is published: its counts are the rows and
    shards the commit records name, and every state.json lists only published shards."""
    where = FileSystems.join(root, "manifest.json")
    manifest = _read_json(where)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("counts"), dict):
        raise RuntimeError(f"{where}: missing, unreadable or without counts; refusing to publish")
    counts = manifest["counts"]
    for name, record in staged.records.items():
        for field, key in _COUNTED.get(name, {}).items():
            if key in counts and counts[key] != record.get(field):
                raise RuntimeError(f"{where}: counts say {key}={counts[key]} but {name} says {field}="
                                   f"{record.get(field)}; refusing to publish")
    for name in staged.files:
        folder, _, base = name.rpartition("/")
        if base != "state.json":
            continue
        state = _read_json(FileSystems.join(root, name))
        listed = [f"{folder}/{f['filename']}" if folder else f["filename"]
                  for f in (state or {}).get("_data_files", [])]
        missing = [f for f in listed if f not in staged.files]
        if not listed or missing:
            raise RuntimeError(f"{FileSystems.join(root, name)}: unreadable or names shards that are not "
                               f"published ({_some(missing)}); refusing to publish")


def publish(staging: str, output: str, overwrite: bool = False, inputs: list[str] = ()) -> None:
    """Make the finished staging directory the output, replacing a previous curate output.

    The output is checked again first (something may have appeared there while the job
    ran), and the staged manifest is verified against the commit records before the
    output is touched. Only committed files and the driver's manifest.json and
    report.html are published; anything else in staging is an orphan and is deleted.
    Either way a publish that fails leaves the previous output in place, and a call that
    repeats one that completed or was cut short finishes the job (see `_publish_local`
    and `_publish_remote` for how).
    """
    if is_remote(output):
        _publish_remote(staging.rstrip("/"), output.rstrip("/"), overwrite, inputs)
    else:
        _publish_local(staging, output, overwrite, inputs)


def _publish_local(staging: str, output: str, overwrite: bool, inputs) -> None:
    """Local paths: commit the staging directory in place (orphans, commit records and the
    owner file deleted: what is left is exactly the output), then two renames: the old
    output aside, the staging directory in; then the old output removed.

    A rename of a directory is atomic, so the output path holds the whole old output or
    the whole new one, never a mix, and the new one has been verified before the first
    rename. If renaming the new one in fails, the old one is renamed back. A repeated call
    finishes what an earlier one left: the old output's place aside is named after the
    staging directory, so it is found again; a staging directory already renamed in is
    gone, and the call only removes what is still aside. A run killed between the two
    renames leaves the old output aside and the output path empty; the next run of that
    output puts it back (`remove_stale_staging`).
    """
    output = canonical_path(output)
    aside = _aside(staging)
    if not os.path.isdir(staging):  # an earlier call renamed it in
        if read_manifest(output) is None:
            raise RuntimeError(f"{staging}: nothing to publish, and {output} holds no manifest.json")
        _remove_local(aside)
        return
    check_output(output, list(inputs), overwrite)
    staged = _read_staged(staging, _listing(staging))
    _verify(staging, staged)  # before the output is touched
    _delete(staged.orphans)
    _delete(os.path.join(staging, name) for name in staged.records)  # last: they say what was committed
    for root, dirs, files in os.walk(staging, topdown=False):  # folders the orphans leave empty
        if root != staging and not os.listdir(root):
            os.rmdir(root)
    if os.path.lexists(output) and not os.path.lexists(aside):
        os.rename(output, aside)
    try:
        os.rename(staging, output)
    except BaseException:
        if os.path.lexists(aside) and not os.path.lexists(output):
            os.rename(aside, output)
        raise
    _remove_local(aside)


def _remove_local(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def _publish_remote(staging: str, output: str, overwrite: bool, inputs) -> None:
    """Object stores (gs://) cannot rename a directory. The files the new output replaces
    (same names) are first copied aside (`_aside`, with a journal written last that says
    the copy is whole); then the old manifest.json is deleted, so that a half-replaced
    output never looks complete, the staged files are copied to their final names,
    `manifest.json` last, and the new output is verified (every file there, at its size;
    its manifest parses and agrees with the commit records). Only then are the old
    output's other files, the saved copies and the staging directory deleted.

    A publish that fails before the new output is verified puts the old one back (the
    saved copies return, the new files the old output lacked go) and leaves the staging
    directory whole. Safe to call again, as Beam's finalize_write: a call after one that
    was cut short uses its journal (the output already half-replaced is not saved again,
    nor refused by `check_output`), skips files already copied (same size and checksum),
    and deletes what is left; a call after one that completed finds the staging directory
    gone and does nothing.
    """
    listing = _listing(staging)
    marker = FileSystems.join(staging, _PUBLISHED)
    if marker in listing:  # published and verified; an earlier call's cleanup was cut short
        _delete(p for p in listing if p != marker)
        _delete([marker])
        return
    if not listing:  # an earlier call finished
        if read_manifest(output) is None:
            raise RuntimeError(f"{staging}: nothing to publish, and {output} holds no manifest.json")
        log.info("%s is published already", output)
        return
    backup = _aside(staging)
    journal = _read_json(FileSystems.join(backup, _JOURNAL))
    if journal is None:  # the first call; a later one finds the output half-replaced by it
        check_output(output, list(inputs), overwrite)
    staged = _read_staged(staging, listing)
    _verify(staging, staged)  # before the output is touched
    try:
        if journal is None:
            journal = _save_replaced(output, backup, staged)
        _copy_in(staged, output)
        there = _listing(output)
        wrong = [name for name, src in staged.files.items()
                 if there.get(FileSystems.join(output, name)) != staged.sizes[src]]
        if wrong:
            raise RuntimeError(f"{output}: {_some(wrong)} missing or of the wrong size after copying")
        _verify(output, staged)
    except BaseException:
        _roll_back(output, backup, journal)
        raise
    # the new output is whole and verified: only now do the old output's other files go
    prefix = output + "/"
    _delete(path for path in _listing(output) if path[len(prefix):] not in staged.files)
    remove_tree(backup)
    _write_json(marker, {"output": output})
    _delete(path for path in _listing(staging) if path != marker)
    _delete([marker])


def _save_replaced(output: str, backup: str, staged: _Staged) -> dict:
    """Copy the old output's files that the new output replaces to `backup`, then write
    the journal: every old file's name and the names saved."""
    prefix = output + "/"
    old = [path[len(prefix):] for path in _listing(output)]
    saved = [name for name in old if name in staged.files]
    remove_tree(backup)  # an earlier try cut short before its journal: never used
    if saved:
        FileSystems.copy([FileSystems.join(output, n) for n in saved], [FileSystems.join(backup, n) for n in saved])
    journal = {"output": output, "old": old, "saved": saved}
    _write_json(FileSystems.join(backup, _JOURNAL), journal)
    return journal


def _same(a: str, b: str) -> bool:
    try:
        return FileSystems.checksum(a) == FileSystems.checksum(b)
    except Exception:  # no checksum: copy again
        return False


def _copy_in(staged: _Staged, output: str) -> None:
    there = _listing(output)
    manifest = FileSystems.join(output, "manifest.json")
    if manifest in there:
        FileSystems.delete([manifest])
    srcs, dsts = [], []
    for name, src in sorted(staged.files.items()):
        dst = FileSystems.join(output, name)
        if name == "manifest.json" or (there.get(dst) == staged.sizes[src] and _same(src, dst)):
            continue  # the manifest goes last; an equal file is in place (an earlier try, an identical shard)
        srcs.append(src)
        dsts.append(dst)
    if srcs:
        FileSystems.copy(srcs, dsts)
    FileSystems.copy([staged.files["manifest.json"]], [manifest])  # alone, after the rest: a batch has no order


def _roll_back(output: str, backup: str, journal: dict | None) -> None:
    """After a publish failed before the new output was verified: the saved files go back
    and the files the old output did not have are deleted. Never raises: if putting back
    fails too, the saved files stay in `backup` and the log says so."""
    try:
        if journal is not None:
            saved = journal["saved"]
            if saved:
                FileSystems.copy([FileSystems.join(backup, n) for n in saved],
                                 [FileSystems.join(output, n) for n in saved])
            old, prefix = set(journal["old"]), output + "/"
            _delete(path for path in _listing(output) if path[len(prefix):] not in old)
            log.warning("publishing to %s failed; its previous contents are back in place", output)
        remove_tree(backup)
    except Exception as exc:
        log.error("publishing to %s failed and its previous contents could not be put back (%s); the "
                  "files the new output replaced are kept in %s (%s lists every old file)",
                  output, exc, backup, _JOURNAL)


def read_manifest(path: str) -> dict | None:
    """The manifest of a published curate output, or None (absent or unreadable)."""
    manifest = _read_json(FileSystems.join(path, "manifest.json"))
    return manifest if isinstance(manifest, dict) else None
