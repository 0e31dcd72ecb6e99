"""Paths as the safety rules compare them: local or remote, canonical, one inside another,
and the directories no output may contain (curate.pipeline.output, export, the trainer)."""

from __future__ import annotations

import os

from curate.errors import ConfigError


def is_remote(path: str) -> bool:
    return "://" in path


def check_client(path: str, what: str) -> None:
    """A ConfigError for a gs:// path when Beam's Cloud Storage client is not installed
    (the `dataflow` extra): without it Beam fails only at the first read or write, with a
    traceback."""
    if path.startswith("gs://"):
        from apache_beam.io.gcp import gcsio

        if getattr(gcsio, "storage", None) is None:
            raise ConfigError(f"{what} {path}: gs:// paths need the Google Cloud Storage client, which is not "
                              f"installed here: pip install -e '.[dataflow]' (jobs/dataflow/README.md)")


def canonical_path(path: str) -> str:
    """An absolute, symlink-free local path; a remote one without its trailing slash."""
    return path.rstrip("/") if is_remote(path) else os.path.realpath(os.path.abspath(path))


def is_inside(path: str, parent: str) -> bool:
    """path is parent or lies inside it (both canonical)."""
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def overlap(path: str, other: str) -> str | None:
    """How `path` stands to `other` (both canonical): "is", "lies inside", "contains", or None."""
    if path == other:
        return "is"
    if is_inside(path, other):
        return "lies inside"
    return "contains" if is_inside(other, path) else None


def guarded_inside(path: str) -> str | None:
    """The directory that replacing or deleting the canonical local `path` would take
    along, when it contains one: the working, home or root directory; else None."""
    for name, guarded in (("the working directory", os.getcwd()), ("your home directory", "~"),
                          ("the root directory", "/")):
        if is_inside(os.path.realpath(os.path.expanduser(guarded)), path):
            return name
    return None
