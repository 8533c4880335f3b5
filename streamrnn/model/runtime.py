"""ONNX Runtime sessions with deliberate execution-provider selection.

``providers="auto"`` uses the CUDA execution provider only when it really
loads (ONNX Runtime silently falls back to the CPU otherwise, after printing
its own errors), and logs exactly one line saying which provider runs and why.
An explicit list is passed through unchanged, and an error is raised if ONNX
Runtime drops a provider from it. When the CUDA provider fails to load, the reason
ONNX Runtime gives (e.g. a missing ``libcublasLt.so.13``) is captured from its log and
reported; ONNX Runtime's global log severity is never changed.

One spelling of providers everywhere (:func:`resolve_providers`): ``"auto"``,
``"cpu"``, ``"cuda"``, ``"cuda:N"`` (device N), ORT names such as
``"CUDAExecutionProvider"``, or a comma-separated / list combination of these.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import onnxruntime as ort

from ..errors import InputError, ModelLoadError

log = logging.getLogger("streamrnn")

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
ProviderArg = str | Sequence[str | tuple[str, dict]]


@dataclass(frozen=True)
class SessionConfig:
    """Threading and logging settings for an ``InferenceSession``.

    ``intra_op_threads=0`` lets ONNX Runtime choose (one per physical core).
    ``allow_spinning=False`` sets ``session.intra_op.allow_spinning=0``: the intra-op threads
    sleep between calls instead of spinning. Best where calls are short and interleaved with
    other Python work on the same cores (the Beam layer's flushes); ONNX Runtime's default
    (spinning) is faster for back-to-back calls.
    """

    intra_op_threads: int = 0
    inter_op_threads: int = 0
    log_severity: int = 3  # ORT: 0 verbose .. 4 fatal; 3 keeps only errors
    device_id: int = 0  # the GPU used by "auto" and "cuda" (an explicit "cuda:N" wins)
    allow_spinning: bool = True  # ORT's default; False: idle intra-op threads sleep instead of spinning

    def options(self) -> ort.SessionOptions:
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.intra_op_threads
        so.inter_op_num_threads = self.inter_op_threads
        so.log_severity_level = self.log_severity
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if not self.allow_spinning:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return so


def _provider_name(p: str | tuple[str, dict]) -> str:
    return p if isinstance(p, str) else p[0]


_ALIASES = {"cpu": CPU, "cuda": CUDA}


def resolve_providers(providers: ProviderArg, device_id: int = 0) -> str | list:
    """Normalise any accepted spelling to ``"auto"`` or an ORT provider list.

    >>> resolve_providers("cuda:1,cpu")
    [('CUDAExecutionProvider', {'device_id': 1}), 'CPUExecutionProvider']
    >>> resolve_providers(["CPUExecutionProvider"])
    ['CPUExecutionProvider']
    """
    if isinstance(providers, str):
        if providers.strip().lower() == "auto":
            return "auto"
        providers = [p.strip() for p in providers.split(",")]
    if isinstance(providers, (bytes, bytearray)) or not isinstance(providers, Sequence) or not providers:
        raise InputError(f"providers: expected 'auto', 'cpu', 'cuda', 'cuda:N' or ORT provider names, "
                         f"got {providers!r}")
    known = set(ort.get_available_providers()) | {CPU, CUDA}
    out: list = []
    for p in providers:
        if isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], dict):
            out.append(p)
            continue
        if not isinstance(p, str):
            raise InputError(f"providers: expected provider names, got {p!r}")
        name, _, dev = p.partition(":")
        name = _ALIASES.get(name.lower(), name)
        if name not in known:
            raise InputError(f"providers: expected 'auto', 'cpu', 'cuda', 'cuda:N' or one of {sorted(known)}, "
                             f"got {p!r}")
        if name == CUDA:
            if dev and not dev.isdigit():
                raise InputError(f"providers: expected a device number after 'cuda:', got {p!r}")
            out.append((CUDA, {"device_id": int(dev) if dev else device_id}))
        elif dev:
            raise InputError(f"providers: expected a device number only after 'cuda', got {p!r}")
        else:
            out.append(name)
    return out


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
    providers = resolve_providers(providers, config.device_id)
    if providers == "auto":
        return _auto_session(src, config, what)
    requested = [_provider_name(p) for p in providers]
    with capture_ort_log() as log_text:
        sess = _open(src, list(providers), config, what)
    missing = [p for p in requested if p not in sess.get_providers()]
    if missing:
        why = cuda_failure_reason(log_text()) if CUDA in missing else "see ONNX Runtime's log"
        raise ModelLoadError(f"{what}: providers: expected {requested} to load, got {sess.get_providers()} "
                             f"({', '.join(missing)} failed to load: {why})")
    log.debug("streamrnn: %s runs on %s (requested explicitly)", what, sess.get_providers()[0])  # no surprise
    return sess


_OOM = re.compile(r"out of memory|cudaErrorMemoryAllocation|CUDA failure 2\b|Failed to allocate memory", re.I)


def _open(src: str | bytes, providers: list, config: SessionConfig, what: str) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(src, sess_options=config.options(), providers=providers)
    except Exception as e:  # ORT raises its own exception types (InvalidProtobuf, Fail, ...)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if _OOM.search(str(e)):
            dev = [p[1].get("device_id") for p in providers if isinstance(p, tuple) and p[0] == CUDA]
            raise ModelLoadError(f"{what}: expected enough free GPU memory on device {dev[0] if dev else '?'} "
                                 f"to create the session, got out of memory: {first}") from e
        raise ModelLoadError(f"{what}: expected a valid ONNX model, got an unreadable one: {e}") from e


@contextlib.contextmanager
def capture_ort_log() -> Iterator:
    """Capture what ONNX Runtime writes to stderr (fd 2) meanwhile; yields a function returning it.

    Used around provider loading so its failure reason can be reported in one line
    instead of ORT's multi-line colour log; ORT's log severity is left alone.
    """
    text = [""]
    try:
        saved = os.dup(2)
    except OSError:  # pragma: no cover - no usable fd 2
        yield lambda: text[0]
        return
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        try:
            os.dup2(tmp.fileno(), 2)
            yield lambda: text[0]
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text[0] = tmp.read().decode("utf-8", "replace")


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def cuda_failure_reason(log_text: str) -> str:
    """The reason in ONNX Runtime's log for a CUDA provider that did not load, in one line.

    >>> cuda_failure_reason("[E:onnxruntime:Default, x.cc:1] Failed to load library libonnxruntime_providers_cuda.so"
    ...     " with error: libcublasLt.so.13: cannot open shared object file: No such file or directory\\n"
    ...     "[W:onnxruntime:Default, y.cc:2] Failed to create CUDAExecutionProvider. Require cuDNN 9.* and CUDA 13.*."
    ...     " Please install")  # doctest: +ELLIPSIS
    'libcublasLt.so.13: cannot open shared object file: No such file...: onnxruntime... needs CUDA 13 and cuDNN 9'
    """
    text = _ANSI.sub("", log_text)
    parts = []
    m = re.search(r"with error: ([^\n\[]+)", text)
    if m:
        parts.append(m.group(1).strip())
    m = re.search(r"Require cuDNN ([0-9]+)\S* and CUDA ([0-9]+)", text)
    if m:
        parts.append(f"onnxruntime-gpu {ort.__version__} needs CUDA {m.group(2)} and cuDNN {m.group(1)}")
    if not parts:
        errs = [ln.split("] ", 1)[-1].strip() for ln in text.splitlines() if "[E:" in ln or "[W:" in ln]
        parts = errs[:2] or ["no usable CUDA/cuDNN libraries or GPU (ONNX Runtime logged no reason)"]
    return ": ".join(parts)


_auto_choice: dict[int, tuple[bool, str]] = {}


def cuda_usable(device_id: int = 0) -> tuple[bool, str]:
    """Whether the CUDA provider really loads on ``device_id`` in this process, and why (probed once)."""
    if device_id in _auto_choice:
        return _auto_choice[device_id]
    if CUDA not in ort.get_available_providers():
        _auto_choice[device_id] = (False, f"this onnxruntime build has no {CUDA}")
        return _auto_choice[device_id]
    # A tiny probe model: creating a session loads the provider library. ORT reports a failed
    # load on stderr; it is captured (not printed) and its reason goes into the one log line.
    from . import _probe

    so = ort.SessionOptions()
    so.log_severity_level = 3
    with capture_ort_log() as log_text:
        try:
            sess = ort.InferenceSession(_probe.identity_model(), so,
                                        providers=[(CUDA, {"device_id": device_id}), CPU])
            ok, err = CUDA in sess.get_providers(), None
        except Exception as e:  # pragma: no cover - depends on the machine
            ok, err = False, str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if ok:
        reason = f"CUDA provider loaded on device {device_id}"
    else:
        reason = f"CUDA provider failed to load on device {device_id}: {err or cuda_failure_reason(log_text())}"
    _auto_choice[device_id] = (ok, reason)
    return ok, reason


def _auto_session(src: str | bytes, config: SessionConfig, what: str) -> ort.InferenceSession:
    ok, reason = cuda_usable(config.device_id)
    chosen = [(CUDA, {"device_id": config.device_id}), CPU] if ok else [CPU]
    sess = _open(src, chosen, config, what)
    log.info("streamrnn: %s runs on %s (%s)", what, sess.get_providers()[0], reason)
    return sess
