"""An in-memory GCS-like object store registered with Beam's FileSystems as `memgs://`:
it stands in for gs://, which Beam cannot fake offline. Shared by the tests that need it
(one module: Beam refuses two FileSystem classes with the same scheme)."""

import hashlib
import io

import pytest
from apache_beam.io.filesystem import BeamIOError, CompressedFile, CompressionTypes, FileMetadata, FileSystem

OBJECTS: dict[str, bytes] = {}  # path -> content, shared by every instance (Beam makes many)


class _Upload(io.BytesIO):
    def __init__(self, path):
        super().__init__()
        self.path = path

    def close(self):
        if not self.closed:
            OBJECTS[self.path] = self.getvalue()  # visible once complete, as on GCS
        super().close()


class MemoryObjectStore(FileSystem):
    """`memgs://bucket/key`: flat keys, no directories, and a rename or open of a key
    that is not there fails, as on GCS. Nothing under it exists on the local disk, so a
    local-only call (os.path, open, glob) on such a path cannot pass for a working one."""

    @classmethod
    def scheme(cls):
        return "memgs"

    def join(self, basepath, *paths):
        for p in paths:
            basepath = basepath.rstrip("/") + "/" + p.lstrip("/")
        return basepath

    def split(self, path):
        head, _, tail = path.rstrip("/").rpartition("/")
        return head, tail

    def mkdirs(self, path):
        pass

    def has_dirs(self):
        return False

    def _list(self, prefix):
        for path, data in sorted(OBJECTS.items()):
            if path.startswith(prefix):
                yield FileMetadata(path, len(data), 0.0)

    def create(self, path, mime_type="application/octet-stream", compression_type=CompressionTypes.AUTO):
        compression_type = FileSystem._get_compression_type(path, compression_type)
        raw = _Upload(path)
        return raw if compression_type == CompressionTypes.UNCOMPRESSED else CompressedFile(raw, compression_type)

    def open(self, path, mime_type="application/octet-stream", compression_type=CompressionTypes.AUTO):
        if path not in OBJECTS:
            raise BeamIOError("Open failed", {path: FileNotFoundError(path)})
        raw = io.BytesIO(OBJECTS[path])
        compression_type = FileSystem._get_compression_type(path, compression_type)
        return raw if compression_type == CompressionTypes.UNCOMPRESSED else CompressedFile(raw, compression_type)

    def copy(self, sources, destinations):
        missing = [s for s in sources if s not in OBJECTS]
        if missing:
            raise BeamIOError("Copy operation failed", {s: FileNotFoundError(s) for s in missing})
        for s, d in zip(sources, destinations):
            OBJECTS[d] = OBJECTS[s]

    def rename(self, sources, destinations):
        self.copy(sources, destinations)
        for s in sources:
            del OBJECTS[s]

    def exists(self, path):
        return path in OBJECTS

    def size(self, path):
        return len(OBJECTS[path])

    def last_updated(self, path):
        return 0.0

    def checksum(self, path):
        return hashlib.md5(OBJECTS[path]).hexdigest()

    def metadata(self, path):
        return FileMetadata(path, len(OBJECTS[path]), 0.0)

    def delete(self, paths):
        for path in paths:
            OBJECTS.pop(path, None)


@pytest.fixture
def store():
    """The in-memory store, empty before and after the test."""
    OBJECTS.clear()
    yield OBJECTS
    OBJECTS.clear()


def listing(prefix: str) -> list[str]:
    """The keys under `prefix`, relative to it."""
    return sorted(p[len(prefix):] for p in OBJECTS if p.startswith(prefix))
