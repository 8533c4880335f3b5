"""Exporting the catalogue: a worker's HTTP ``/metrics``, multiprocess mode, a Pushgateway push.

**Worker exporter.** :func:`start_exporter` serves ``/metrics`` from a daemon thread, once
per process (a second call returns the first exporter). Port ``0`` disables it; the bind
address defaults to ``127.0.0.1``. Beam workers start it from ``DoFn.setup()`` with the
settings in the environment (:func:`exporter_from_env`; the job CLI sets them from its
``--metrics-*`` flags): ``STREAMRNN_METRICS_PORT``, ``STREAMRNN_METRICS_BIND``,
``STREAMRNN_METRICS_JOB``.

**Port rule.** Without ``PROMETHEUS_MULTIPROC_DIR`` every process serves its own metrics:
when the port is taken, the next of ``port+1 .. port+15`` that is free is used and the
port is logged (a multi-process runner's workers are then at consecutive ports). With
``PROMETHEUS_MULTIPROC_DIR`` every process writes its values to files in that directory
and one exporter serves them all, summed: the process that binds the port serves it and the
others, finding the port taken, serve nothing (no double counting). No free port: an
error is logged and the job goes on without an exporter.

**Gauges in multiprocess mode.** Counters and histograms add up over processes. Gauge modes
are set per metric in the catalogue: ``livesum`` for active keys and state bytes (each key's
state is in one live process; a dead process's shards move elsewhere), ``livemax`` for the
info gauges (1 per model and provider, whatever the number of processes).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, push_to_gateway, start_http_server

from .errors import InputError

log = logging.getLogger("streamrnn.metrics")

ENV_PORT, ENV_BIND, ENV_JOB = "STREAMRNN_METRICS_PORT", "STREAMRNN_METRICS_BIND", "STREAMRNN_METRICS_JOB"
#: ``STREAMRNN_METRICS=off``: Beam workers record no Prometheus metrics (Beam's own counters still count).
ENV_SWITCH = "STREAMRNN_METRICS"
MULTIPROC = "PROMETHEUS_MULTIPROC_DIR"
DEFAULT_BIND = "127.0.0.1"
PORT_TRIES = 16


def multiproc_dir() -> str | None:
    return os.environ.get(MULTIPROC) or None


def check_multiproc_dir(path: str) -> None:
    """InputError naming the variable unless ``path`` is a writable directory."""
    if not os.path.isdir(path):
        raise InputError(f"{MULTIPROC}: expected a writable directory, got {path!r} (no such directory)")
    if not os.access(path, os.W_OK | os.X_OK):
        raise InputError(f"{MULTIPROC}: expected a writable directory, got {path!r} (not writable)")


def multiprocess_ready() -> bool:
    """Whether multiprocess mode is on; makes prometheus_client's values follow the environment.

    prometheus_client decides at import time; a variable set later (by the job CLI) is taken
    up here, before the catalogue's metrics are created.
    """
    path = multiproc_dir()
    if path is None:
        return False
    check_multiproc_dir(path)
    from prometheus_client import values

    if values.ValueClass is values.MutexValue:
        values.ValueClass = values.get_value_class()
    global _MARKED_PID
    if _MARKED_PID != os.getpid():  # each process: its live gauges leave the directory when it exits
        import atexit

        _MARKED_PID = os.getpid()
        atexit.register(_mark_dead, os.getpid(), path)
    return True


_MARKED_PID: int | None = None


def serving_registry() -> CollectorRegistry:
    """What ``/metrics`` serves: the global registry, or in multiprocess mode all processes' files."""
    if not multiprocess_ready():
        return REGISTRY
    from prometheus_client import multiprocess

    reg = CollectorRegistry()
    multiprocess.MultiProcessCollector(reg)
    return reg


@dataclass
class Exporter:
    port: int
    bind: str
    server: Any
    pid: int

    @property
    def url(self) -> str:
        return f"http://{self.bind}:{self.port}/metrics"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


_EXPORTER: Exporter | None = None
_STARTED_PID: int | None = None
_LOCK = threading.Lock()


def port_free(port: int, bind: str) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in bind else socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((bind, port))
        except OSError:
            return False
        return True


def _serve(port: int, bind: str, registry: CollectorRegistry) -> Any | None:
    try:
        server, _thread = start_http_server(port, addr=bind, registry=registry)
        return server
    except OSError:
        return None


def start_exporter(port: int, bind: str = DEFAULT_BIND, *, registry: CollectorRegistry | None = None,
                   fallback: bool = True) -> Exporter | None:
    """Serve ``/metrics`` on ``bind:port`` (see the module's port rule); None if disabled or not started.

    ``registry`` defaults to what :func:`serving_registry` gives. With ``fallback=False`` a
    taken port is an InputError naming it. Each call starts a server; Beam workers go through
    :func:`exporter_from_env`, which starts one per process.
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise InputError(f"metrics port: expected an int in [0, 65535] (0 disables), got {port!r}")
    if port == 0:
        return None
    reg = registry if registry is not None else serving_registry()
    shared = registry is None and multiproc_dir() is not None
    tries = [port] if (shared or not fallback) else list(range(port, min(port + PORT_TRIES, 65536)))
    for p in tries:
        server = _serve(p, bind, reg)
        if server is not None:
            if p != port:
                log.warning("streamrnn metrics: port %d in use; serving http://%s:%d/metrics", port, bind, p)
            else:
                log.info("streamrnn metrics: serving http://%s:%d/metrics", bind, p)
            return Exporter(p, bind, server, os.getpid())
    if shared:
        log.info("streamrnn metrics: port %d taken; another process serves %s", port, multiproc_dir())
        return None
    if not fallback:
        raise InputError(f"metrics port: expected a free port on {bind}, got {port} (in use)")
    log.error("streamrnn metrics: no free port in %d..%d on %s; no /metrics for this process", port, tries[-1], bind)
    return None


def _mark_dead(pid: int, path: str | None) -> None:
    """At exit: this process's live gauges leave the multiprocess directory (if it is still there)."""
    from prometheus_client import multiprocess

    if path and os.path.isdir(path):
        multiprocess.mark_process_dead(pid, path)


def exporter_settings(env: Mapping[str, str] | None = None) -> tuple[int, str, str]:
    """(port, bind, job) from the environment; port 0 (disabled) when unset."""
    env = os.environ if env is None else env
    raw = env.get(ENV_PORT, "0").strip() or "0"
    try:
        port = int(raw)
    except ValueError:
        raise InputError(f"{ENV_PORT}: expected a port number (0 disables), got {raw!r}") from None
    return port, env.get(ENV_BIND, DEFAULT_BIND) or DEFAULT_BIND, env.get(ENV_JOB, "streamrnn") or "streamrnn"


def prometheus_on(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return env.get(ENV_SWITCH, "on").strip().lower() not in ("off", "0", "false", "no")


def exporter_from_env() -> Exporter | None:
    """What ``DoFn.setup()`` calls: the exporter the environment asks for, started once per process; never raises."""
    global _EXPORTER, _STARTED_PID
    with _LOCK:
        if _STARTED_PID == os.getpid():
            return _EXPORTER
        _STARTED_PID = os.getpid()
        try:
            port, bind, _job = exporter_settings()
            _EXPORTER = start_exporter(port, bind)
        except Exception as e:  # metrics must never crash a pipeline
            log.error("streamrnn metrics: exporter not started (%s)", e)
            _EXPORTER = None
        return _EXPORTER


def stop_exporter() -> None:
    """Close this process's exporter (from :func:`exporter_from_env`), so scrapes end cleanly before exit."""
    global _EXPORTER, _STARTED_PID
    with _LOCK:
        _STARTED_PID = None  # a later run in this process starts one again
        if _EXPORTER is not None and _EXPORTER.pid == os.getpid():
            try:
                _EXPORTER.close()
            except Exception as e:  # already closing: nothing more to do
                log.info("streamrnn metrics: exporter close: %s", e)
            _EXPORTER = None


def configure_env(port: int, bind: str, job: str, env: dict[str, str] | None = None) -> None:
    """Set the exporter settings for this process and the worker processes it starts."""
    env = os.environ if env is None else env
    env[ENV_PORT], env[ENV_BIND], env[ENV_JOB] = str(port), bind, job


def push(gateway: str, job: str, *, registry: CollectorRegistry | None = None, timeout: float = 10.0) -> str | None:
    """Push the metrics to a Pushgateway (``host:port`` or URL) under ``job``; the error text, or None if pushed."""
    try:
        push_to_gateway(gateway, job=job, registry=registry if registry is not None else serving_registry(),
                        timeout=timeout)
        return None
    except Exception as e:  # an unreachable gateway must not fail a finished job
        return f"{type(e).__name__}: {e}"


def totals(registry: CollectorRegistry | None = None) -> dict[str, float]:
    """Each sample name summed over its label sets (``name{reason=r}`` kept per reason for dead letters)."""
    reg = registry if registry is not None else serving_registry()
    out: dict[str, float] = {}
    for fam in reg.collect():
        if not fam.name.startswith("streamrnn_"):
            continue
        for s in fam.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
            if "reason" in s.labels:
                k = f"{s.name}{{reason={s.labels['reason']}}}"
                out[k] = out.get(k, 0.0) + s.value
    return out
