"""ONNX Runtime sessions with deliberate execution-provider selection.

``providers="auto"`` uses the CUDA execution provider only when it really
loads (ONNX Runtime silently falls back to the CPU otherwise, after printing
its own errors), and logs exactly one line saying which provider runs and why.
An explicit list is passed through unchanged, and an error is raised if ONNX
Runtime drops a provider from it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import onnxruntime as ort

from .errors import ModelLoadError

log = logging.getLogger("streamrnn")

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
ProviderArg = str | Sequence[str | tuple[str, dict]]


@dataclass(frozen=True)
class SessionConfig:
    """Threading and logging settings for an ``InferenceSession``.

    ``intra_op_threads=0`` lets ONNX Runtime choose (one per physical core).
    """

    intra_op_threads: int = 0
    inter_op_threads: int = 0
    log_severity: int = 3  # ORT: 0 verbose .. 4 fatal; 3 keeps only errors

    def options(self) -> ort.SessionOptions:
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.intra_op_threads
        so.inter_op_num_threads = self.inter_op_threads
        so.log_severity_level = self.log_severity
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return so


def _provider_name(p: str | tuple[str, dict]) -> str:
    return p if isinstance(p, str) else p[0]


def create_session(source: str | bytes | os.PathLike, providers: ProviderArg = "auto",
                   config: SessionConfig | None = None, *, what: str = "model") -> ort.InferenceSession:
    """Create an ``InferenceSession`` on the chosen providers.

    ``source`` is a path or the serialized model bytes. Raises :class:`ModelLoadError`
    for a missing or corrupt file, and for an explicit provider that does not load.
    """
    config = config or SessionConfig()
    if isinstance(source, (str, os.PathLike)) and not os.path.isfile(source):
        raise ModelLoadError(f"{what}: expected an ONNX file at {os.fspath(source)!r}, got no such file")
    src = os.fspath(source) if isinstance(source, os.PathLike) else source
    if providers == "auto":
        return _auto_session(src, config, what)
    if isinstance(providers, str):
        providers = [providers]
    requested = [_provider_name(p) for p in providers]
    sess = _open(src, list(providers), config, what)
    missing = [p for p in requested if p not in sess.get_providers()]
    if missing:
        raise ModelLoadError(f"{what}: providers: expected {requested} to load, got {sess.get_providers()} "
                             f"({', '.join(missing)} failed to load; see ONNX Runtime's log)")
    log.info("streamrnn: %s runs on %s (requested explicitly)", what, sess.get_providers()[0])
    return sess


def _open(src: str | bytes, providers: list, config: SessionConfig, what: str) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(src, sess_options=config.options(), providers=providers)
    except Exception as e:  # ORT raises its own exception types (InvalidProtobuf, Fail, ...)
        raise ModelLoadError(f"{what}: expected a valid ONNX model, got an unreadable one: {e}") from e


_auto_choice: tuple[bool, str] | None = None


def cuda_usable() -> tuple[bool, str]:
    """Whether the CUDA provider really loads in this process, and why (probed once, quietly)."""
    global _auto_choice
    if _auto_choice is not None:
        return _auto_choice
    if CUDA not in ort.get_available_providers():
        _auto_choice = (False, f"this onnxruntime build has no {CUDA}")
        return _auto_choice
    # A tiny probe model: creating a session loads the provider library. ORT reports a
    # failed load on its default logger, which we silence for the probe only.
    from . import _probe

    ort.set_default_logger_severity(4)
    try:
        sess = ort.InferenceSession(_probe.identity_model(), providers=[CUDA, CPU])
        ok = CUDA in sess.get_providers()
        reason = ("CUDA provider loaded" if ok
                  else "CUDA provider failed to load (no usable CUDA/cuDNN libraries or GPU)")
    except Exception as e:  # pragma: no cover - depends on the machine
        ok, reason = False, f"CUDA provider failed to load: {str(e).splitlines()[0]}"
    finally:
        ort.set_default_logger_severity(2)
    _auto_choice = (ok, reason)
    return _auto_choice


def _auto_session(src: str | bytes, config: SessionConfig, what: str) -> ort.InferenceSession:
    ok, reason = cuda_usable()
    chosen = [CUDA, CPU] if ok else [CPU]
    sess = _open(src, chosen, config, what)
    log.info("streamrnn: %s runs on %s (%s)", what, sess.get_providers()[0], reason)
    return sess
