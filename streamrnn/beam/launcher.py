"""What a Beam job's launcher does around its pipeline, for every job (next-token, market forecast).

The launcher never opens the input: it lists it (metadata), checks the model exists and the
output folder takes a file, all through Beam's filesystems (local, gs://, s3://, ...). A
user's mistake is a :class:`JobError`: one line on stderr, exit code 2, no traceback, and a
local output folder that this run created is removed again.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import IO

import pyarrow.parquet as pq
from apache_beam.io.filesystem import FileMetadata
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.localfilesystem import LocalFileSystem

from ..errors import InputError
from .io import match_inputs


class JobError(Exception):
    """A user's mistake the launcher reports in one line (exit code 2)."""


def is_local(path: str) -> bool:
    return isinstance(FileSystems.get_filesystem(path), LocalFileSystem)


def input_files(pattern: str) -> list[FileMetadata]:
    """The input's files (listed, not opened); JobError when missing, empty or of an unknown format."""
    try:
        return match_inputs(pattern)
    except InputError as e:
        raise JobError(str(e)) from None


def require_file(path: str, what: str, kind: str = "a file", hint: str = "") -> None:
    """JobError ``what: expected <kind> at <path>, got no such file<hint>`` unless the file exists."""
    if not FileSystems.exists(path):
        raise JobError(f"{what}: expected {kind} at {path!r}, got no such file{hint}")


def _first_line(e: Exception) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:200] if s else type(e).__name__


def _delete(pattern: str) -> None:
    for res in FileSystems.match([pattern]):
        paths = [m.path for m in res.metadata_list]
        if paths:
            FileSystems.delete(paths)


class Output:
    """A job's output folder: Parquet files ``<prefix>-*.parquet`` per prefix, plus named small files."""

    def __init__(self, root: str, prefixes: Sequence[str], files: Sequence[str] = ()):
        self.root, self.prefixes, self.files = root, tuple(prefixes), tuple(files)
        self.made_here = is_local(root) and not os.path.exists(root)
        self.temp = FileSystems.join(root, f".temp-{uuid.uuid4().hex}")

    def check_writable(self) -> None:
        probe = FileSystems.join(self.root, f".write-check-{uuid.uuid4().hex}")
        try:
            with FileSystems.create(probe) as f:
                f.write(b"ok")
            FileSystems.delete([probe])
        except Exception as e:  # any filesystem's error: permissions, a file in the way, no such bucket
            raise JobError(f"output: expected a writable directory at {self.root!r}, got: {_first_line(e)}") from None

    def clear(self) -> None:
        """Remove a previous run's outputs, so old files do not mix in."""
        for p in self.prefixes:
            _delete(FileSystems.join(self.root, f"{p}-*.parquet"))
        for name in self.files:
            _delete(FileSystems.join(self.root, name))

    def remove_temp(self) -> None:
        """Delete the sinks' temporary folder: orphans of failed bundle attempts, then the folder."""
        try:
            _delete(FileSystems.join(self.temp, "*"))
            if FileSystems.exists(self.temp):
                FileSystems.delete([self.temp])
        except Exception:  # nothing there (it is made on the first write)
            pass

    def discard(self) -> None:
        """After a failed run: remove the local folder if this run made it."""
        if self.made_here and os.path.isdir(self.root):
            FileSystems.delete([self.root])

    def _files(self, prefix: str) -> list[str]:
        try:
            return [m.path for r in FileSystems.match([FileSystems.join(self.root, f"{prefix}-*.parquet")])
                    for m in r.metadata_list]
        except Exception:  # nothing written yet, or a filesystem that cannot list now
            return []

    def _watch(self, labels: dict[str, str], stop: threading.Event, out: IO[str]) -> None:
        seen: dict[str, tuple[str, int]] = {}
        t0 = time.monotonic()
        while not stop.wait(1.0):
            for prefix in labels:
                for path in self._files(prefix):
                    if path not in seen:
                        try:
                            with FileSystems.open(path, compression_type="uncompressed") as f:
                                seen[path] = (prefix, pq.read_metadata(f).num_rows)
                        except Exception:  # being renamed into place; next time
                            continue
            counts = ", ".join(f"{sum(n for p, n in seen.values() if p == prefix):,} {label}"
                               for prefix, label in labels.items())
            out.write(f"\r  {counts} written, {time.monotonic() - t0:5.1f} s ")
            out.flush()
        out.write("\n")

    @contextmanager
    def progress(self, labels: dict[str, str], *, quiet: bool = False, out: IO[str] | None = None) -> Iterator[None]:
        """A progress line from the files finalized so far (their Parquet footers give the row counts)."""
        if quiet:
            yield
            return
        stop = threading.Event()
        t = threading.Thread(target=self._watch, args=(labels, stop, out or sys.stderr), daemon=True)
        t.start()
        try:
            yield
        finally:
            stop.set()
            t.join()


def run(prog: str, output: Output, body: Callable[[], int]) -> int:
    """``body()``'s exit code; a JobError from it is one line ``prog: message`` on stderr and exit code 2."""
    try:
        return body()
    except JobError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        output.discard()
        return 2
    finally:
        output.remove_temp()
