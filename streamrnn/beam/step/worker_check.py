"""What a Beam worker checks before it runs: that it has what the launcher built the pipeline with.

A launcher and its workers are separate installs (a laptop and a worker image, say). When
they differ, Beam may still unpickle the pipeline and run it, with another Beam's semantics,
with code pickled by another Python minor version (a 3.12 launcher's functions on 3.11
workers), or against another file at the same model path. Both are caught in ``setup()`` and fail the
step with a :class:`~streamrnn.errors.DeployError` that names both sides, never a silent
difference in outputs. Retrying cannot fix either: a batch runner's retries end in that error
(one line on the launcher); a streaming runner (Dataflow streaming retries forever) shows it
in the worker logs while the job makes no progress.

streamrnn's version string alone would miss a changed but unreleased checkout, so the check also
compares a digest of the package's source files.
"""

from __future__ import annotations

import hashlib
import socket
import sys
from collections.abc import Mapping
from functools import cache
from pathlib import Path

from ...errors import DeployError
from ...model.spec import ModelSpec
from ..models import model_version


@cache
def code_digest() -> str:
    """sha256 (12 hex digits) of this install's streamrnn/**/*.py, by relative path and content."""
    root = Path(__file__).resolve().parents[2]  # streamrnn/
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def environment() -> dict[str, str]:
    """The versions a pipeline's launcher and workers must share."""
    import apache_beam

    import streamrnn

    return {"python": f"{sys.version_info[0]}.{sys.version_info[1]}", "apache-beam": apache_beam.__version__,
            "streamrnn": streamrnn.__version__, "streamrnn code": code_digest()}


#: what to do about each difference
_FIX = {"python": "run the launcher on the workers' Python, or build the worker image with the launcher's "
                  "(docker build --build-arg PYTHON_VERSION=...)"}


def require_environment(launcher: Mapping[str, str], step: str) -> None:
    """DeployError unless this process runs the launcher's Python minor version, Beam and streamrnn."""
    here = environment()
    for name, want in launcher.items():
        if here.get(name) != want:
            fix = _FIX.get(name, "install the same version on both (deploy/versions.env pins Beam)")
            raise DeployError(
                f"{step}: {name}: expected {want} (the launcher's), got {here.get(name, 'none (an older streamrnn)')} "
                f"on worker {socket.gethostname()}; {fix}")


def require_model(launcher: ModelSpec, worker: ModelSpec, path: str, step: str) -> None:
    """DeployError unless the worker's file at ``path`` is the model the launcher read there."""
    if worker.to_json() != launcher.to_json():  # the whole spec, weights fingerprint included
        raise DeployError(
            f"{step}: model {path!r}: expected {model_version(launcher)} (what the launcher read), got "
            f"{model_version(worker)} on worker {socket.gethostname()}; the launcher and the workers must read "
            "the same file (a shared filesystem, the same image, or shipped:NAME from the same streamrnn)")
