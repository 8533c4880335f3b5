"""Models for the Beam layer: loaded from any Beam filesystem (gs://, s3://, hdfs://, local).

A non-local model is copied once per machine into a temporary file (``io.local_copy``),
then loaded with ONNX Runtime like a local one, on the launcher and on every worker.
``shipped:NAME`` is resolved by each machine in its own install (:mod:`streamrnn.shipped`).
"""

from __future__ import annotations

from typing import Any

from .. import shipped
from ..errors import InputError
from ..model import Model, load
from ..spec import ModelSpec


def model_version(spec: ModelSpec) -> str:
    """``name-version+fingerprint8``: unambiguous even when two exports share a version string."""
    return f"{spec.name}-{spec.version}+{spec.fingerprint[:8]}"


def local_path(path: str) -> str:
    """A local file for ``path`` on any Beam filesystem (a per-machine copy when it is remote)."""
    from .io import local_copy

    try:
        return shipped.resolve(path) if shipped.is_shipped(path) else local_copy(path)
    except Exception as ex:  # any filesystem's error, in one line
        raise InputError(f"model: expected a readable ONNX file, got {path!r} ({type(ex).__name__}: {ex})") from ex


def load_model(path: str, providers: Any = "auto") -> Model:
    return load(local_path(path), providers=providers)
