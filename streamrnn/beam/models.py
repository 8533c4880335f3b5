"""Models for the Beam layer: loaded from any Beam filesystem (gs://, s3://, hdfs://, local).

A non-local model is copied once per process into a temporary file, then loaded with
ONNX Runtime like a local one.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from typing import Any

from ..errors import InputError
from ..model import Model, load
from ..spec import ModelSpec

_LOCAL: dict[str, str] = {}
_LOCK = threading.Lock()


def model_version(spec: ModelSpec) -> str:
    """``name-version+fingerprint8``: unambiguous even when two exports share a version string."""
    return f"{spec.name}-{spec.version}+{spec.fingerprint[:8]}"


def local_path(path: str) -> str:
    """A local file for ``path``: itself if it is local, else a per-process copy."""
    if os.path.exists(path) or "://" not in path:
        return path
    with _LOCK:
        got = _LOCAL.get(path)
        if got is not None and os.path.exists(got):
            return got
        from apache_beam.io.filesystems import FileSystems

        try:
            with FileSystems.open(path) as f:
                data = f.read()
        except Exception as ex:
            raise InputError(f"model: expected a readable ONNX file, got {path!r} ({type(ex).__name__}: {ex})") from ex
        name = hashlib.sha256(path.encode()).hexdigest()[:16] + ".onnx"
        dst = os.path.join(tempfile.gettempdir(), f"streamrnn-{os.getpid()}-{name}")
        with open(dst, "wb") as f:
            f.write(data)
        _LOCAL[path] = dst
        return dst


def load_model(path: str, providers: Any = "auto") -> Model:
    return load(local_path(path), providers=providers)
