"""An in-memory Beam filesystem under the ``memfs://`` scheme (not the local one), for tests.

Defining the class registers it with ``FileSystems`` (Beam finds FileSystem subclasses by
scheme), so pipelines on the in-process DirectRunner read and write ``memfs://`` paths as
they would ``gs://`` ones. ``FAULTS`` injects failures into writes: see :func:`fail_writes`.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable

from apache_beam.io.filesystem import BeamIOError, FileMetadata, FileSystem

FILES: dict[str, bytes] = {}
_LOCK = threading.Lock()
#: (predicate on path, failures left): a write to a matching path raises while failures are left.
FAULTS: list[list] = []
#: Paths whose write failed half-way (in order).
FAULTED: list[str] = []


def reset() -> None:
    with _LOCK:
        FILES.clear()
        FAULTS.clear()
        FAULTED.clear()


def fail_writes(pred: Callable[[str], bool], times: int) -> list:
    """Make the next ``times`` files whose path matches ``pred`` fail half-way through their write
    (a partial file is left behind, as a crash would leave it). Returns the counter ``[pred, left]``."""
    f = [pred, times]
    FAULTS.append(f)
    return f


class _Writer(io.BytesIO):
    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.fault = None
        with _LOCK:
            for f in FAULTS:
                if f[1] > 0 and f[0](path):
                    f[1] -= 1
                    self.fault = f
                    break

    def write(self, b) -> int:
        n = super().write(b)
        if self.fault is not None and self.tell() > 8:
            with _LOCK:
                FILES[self.path] = self.getvalue()  # what a crash leaves: a partial file
                FAULTED.append(self.path)
                self.fault = None
            raise OSError(f"memfs: injected write failure for {self.path}")
        return n

    def close(self) -> None:
        if not self.closed:
            with _LOCK:
                FILES[self.path] = self.getvalue()
        super().close()


class MemFileSystem(FileSystem):
    @classmethod
    def scheme(cls) -> str:
        return "memfs"

    def join(self, basepath: str, *paths: str) -> str:
        return "/".join([basepath.rstrip("/"), *(p.strip("/") for p in paths)])

    def split(self, path: str) -> tuple[str, str]:
        head, _, tail = path.rstrip("/").rpartition("/")
        return head, tail

    def mkdirs(self, path: str) -> None:
        pass

    def has_dirs(self) -> bool:
        return False

    def _list(self, dir_or_prefix: str):
        with _LOCK:
            items = [(p, len(b)) for p, b in FILES.items() if p.startswith(dir_or_prefix)]
        for p, n in items:
            yield FileMetadata(p, n, time.time())

    def create(self, path, mime_type="application/octet-stream", compression_type=None):
        return _Writer(path)

    def open(self, path, mime_type="application/octet-stream", compression_type=None):
        with _LOCK:
            if path not in FILES:
                raise BeamIOError(f"memfs: no such file {path}")
            return io.BytesIO(FILES[path])

    def copy(self, source_file_names, destination_file_names) -> None:
        with _LOCK:
            for s, d in zip(source_file_names, destination_file_names, strict=True):
                FILES[d] = FILES[s]

    def rename(self, source_file_names, destination_file_names) -> None:
        errors = {}
        with _LOCK:
            for s, d in zip(source_file_names, destination_file_names, strict=True):
                if s in FILES:
                    FILES[d] = FILES.pop(s)
                else:
                    errors[(s, d)] = FileNotFoundError(s)
        if errors:
            raise BeamIOError("memfs: rename failed", errors)

    def _under(self, path: str) -> list[str]:
        return [p for p in FILES if p == path or p.startswith(path.rstrip("/") + "/")]

    def exists(self, path: str) -> bool:
        with _LOCK:
            return bool(self._under(path))

    def size(self, path: str) -> int:
        with _LOCK:
            return len(FILES[path])

    def last_updated(self, path: str) -> float:
        return time.time()

    def checksum(self, path: str) -> str:
        with _LOCK:
            return str(hash(FILES[path]))

    def metadata(self, path: str) -> FileMetadata:
        with _LOCK:
            if path not in FILES:
                raise BeamIOError(f"memfs: no such file {path}")
            return FileMetadata(path, len(FILES[path]), time.time())

    def delete(self, paths) -> None:
        with _LOCK:
            for path in paths:
                for p in self._under(path):
                    del FILES[p]

    def report_lineage(self, path, unused_lineage) -> None:
        pass
