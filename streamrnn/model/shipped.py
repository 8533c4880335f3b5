"""Models shipped inside the package, named so that every machine finds its own copy.

An absolute path to a shipped model differs from one install to the next: the launcher's venv,
a worker's ``/opt/venv``, a wheel that Beam's boot installed. A job that passes such a path to a
cluster makes every worker look for the launcher's file. ``shipped:NAME`` names the model
instead; each process resolves it in its own installed ``streamrnn/exported/`` folder. The
Beam workers then check that what they loaded has the fingerprint the launcher read, so two
installs with different weights fail loudly instead of serving a different model.

>>> resolve("shipped:charlm").endswith("charlm.onnx")
True
>>> resolve("/models/lm.onnx")  # anything else is a path (or a Beam filesystem URL), unchanged
'/models/lm.onnx'
>>> "charlm" in names() and "market" in names()
True
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ModelLoadError

PREFIX = "shipped:"
FOLDER = Path(__file__).resolve().parents[1] / "exported"


def names() -> list[str]:
    """The shipped models, by the NAME of ``shipped:NAME``."""
    return sorted(p.stem for p in FOLDER.glob("*.onnx"))


def is_shipped(path: str | bytes | os.PathLike) -> bool:
    source = os.fspath(path)
    return isinstance(source, str) and source.startswith(PREFIX)


def resolve(path: str | bytes | os.PathLike) -> str | bytes:
    """The local file for ``shipped:NAME`` in this process's install; any other path unchanged.

    Raises :class:`~streamrnn.errors.ModelLoadError` for a NAME that is not shipped.
    """
    source = os.fspath(path)
    if not is_shipped(source):
        return source
    name = source[len(PREFIX):].removesuffix(".onnx")
    known = names()
    if name not in known:  # also refuses separators and "..": only the folder's own files match
        raise ModelLoadError(f"model: expected one of {', '.join(PREFIX + n for n in known)}, got {source!r}")
    return str(FOLDER / f"{name}.onnx")
