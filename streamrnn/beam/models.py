"""Models for the Beam layer: loaded from any Beam filesystem (gs://, s3://, hdfs://, local).

A non-local model is copied once per machine into a temporary file (``io.local_copy``),
then loaded with ONNX Runtime like a local one, on the launcher and on every worker.
``shipped:NAME`` is resolved by each machine in its own install (:mod:`streamrnn.model.shipped`).
"""

from __future__ import annotations

from typing import Any

from ..errors import InputError
from ..model import shipped
from ..model.loaded import Model, load
from ..model.runtime import SessionConfig
from ..model.spec import ModelSpec


def model_version(spec: ModelSpec) -> str:
    """``name-version+fingerprint8``: unambiguous even when two exports share a version string."""
    return f"{spec.name}-{spec.version}+{spec.fingerprint[:8]}"


def local_path(path: str) -> str:
    """A local file for ``path`` on any Beam filesystem (a per-machine copy when it is remote)."""
    from .job.io import local_copy

    try:
        return shipped.resolve(path) if shipped.is_shipped(path) else local_copy(path)
    except Exception as ex:  # any filesystem's error, in one line
        raise InputError(f"model: expected a readable ONNX file, got {path!r} ({type(ex).__name__}: {ex})") from ex


#: The Beam layer's sessions: ORT's intra-op threads sleep between calls instead of spinning. A flush
#: makes short ORT calls between Python work (intake, dedupe, pairing, the state delta) on the same
#: cores, which spinning threads would take from it (docs/bench.md: the streaming replay took 14.0 s
#: instead of 23.1 s, the batch pipeline 10.9 s instead of 12.2 s).
BEAM_SESSION = SessionConfig(allow_spinning=False)


def load_model(path: str, providers: Any = "auto") -> Model:
    return load(local_path(path), providers=providers, session_config=BEAM_SESSION)
