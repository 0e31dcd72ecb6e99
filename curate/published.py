"""Reading a published curate output while another run may republish it.

Every publish writes a new manifest.json, so the manifest's hash (`manifest_token`)
names one published set of files: a reader notes it first and checks it again after
reading (`reading`, `check_unchanged`) and fails rather than return rows of two runs.
"""

from __future__ import annotations

import contextlib
import hashlib

from apache_beam.io.filesystem import BeamIOError, CompressionTypes
from apache_beam.io.filesystems import FileSystems

from curate.config import ConfigError


class OutputReplaced(ConfigError):
    """A curate output was republished while it was being read."""


def manifest_token(path: str) -> str | None:
    """A hash of an output's manifest.json (None without one): every publish writes a new
    manifest, so an unchanged token means the same published files."""
    try:
        with FileSystems.open(FileSystems.join(path, "manifest.json"),
                              compression_type=CompressionTypes.UNCOMPRESSED) as fh:
            return hashlib.sha256(fh.read()).hexdigest()
    except (OSError, BeamIOError):
        return None


def check_unchanged(path: str, token: str | None, cause: BaseException | None = None) -> None:
    """Raise OutputReplaced when the output at `path` is no longer the one whose manifest
    had `token`: what was read may mix two runs' files."""
    if manifest_token(path) != token:
        raise OutputReplaced(f"{path} was replaced by another run while it was being read, so what was read "
                             f"may mix two runs' files; nothing was written from it: run the command again"
                             ) from cause


@contextlib.contextmanager
def reading(path: str):
    """Read a published output inside this block: if a run republishes it meanwhile, the
    block fails with OutputReplaced (also when the reading broke on a file the publish
    removed), rather than return rows of two runs."""
    token = manifest_token(path)
    try:
        yield
    except Exception as exc:
        check_unchanged(path, token, exc)
        raise
    check_unchanged(path, token)
