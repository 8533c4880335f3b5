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

**Gauges in multiprocess mode.** Counters and histograms add up over processes. Active keys
and state bytes are the sum over shards of each shard's most recent report, whichever process
made it (see :mod:`streamrnn.metrics.catalogue`); the info gauges are ``livemax`` (1 per model and
provider, whatever the number of processes).

**Early counts and the last figures.** ``rate()`` and ``increase()`` see only what changes
between two scrapes: a count made before a series' first scrape is invisible to them. So
every series is served at 0 from the moment it exists (job-labelled ones when the job's
recorder is made, model-labelled ones when a model is loaded), and with
``STREAMRNN_METRICS_WAIT=SECONDS`` (the job's ``--metrics-wait``) the process that made new
series waits, up to that long, until ``/metrics`` has been scraped once more before it counts
anything (:func:`await_first_scrape`). At the end, :func:`await_scrape` keeps the exporter up
until one scrape has read the final figures (the job's ``--metrics-linger``). Each exporter
notes when it was last scraped; in multiprocess mode it also writes that time to
``<PROMETHEUS_MULTIPROC_DIR>/streamrnn_last_scrape``, which the processes that do not serve
read.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, push_to_gateway, start_http_server

from ..errors import InputError

log = logging.getLogger("streamrnn.metrics")

ENV_PORT, ENV_BIND, ENV_JOB = "STREAMRNN_METRICS_PORT", "STREAMRNN_METRICS_BIND", "STREAMRNN_METRICS_JOB"
#: seconds a process that made new series waits for the next scrape before it counts (0 or unset: no wait)
ENV_WAIT = "STREAMRNN_METRICS_WAIT"
#: multiprocess mode: the serving process writes the time of each scrape here (in the directory)
SCRAPE_FILE = "streamrnn_last_scrape"
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
    """What ``/metrics`` serves: the global registry, or in multiprocess mode all processes' files (the
    per-shard gauges summed per job, see :class:`_ShardSums`)."""
    if not multiprocess_ready():
        return REGISTRY
    return directory_registry(multiproc_dir())


def directory_registry(path: str) -> CollectorRegistry:
    """The metrics that the processes sharing the multiprocess directory ``path`` wrote, as ``/metrics`` serves
    them (counters and histograms added up, gauges by their mode, the per-shard gauges summed per job)."""
    from prometheus_client import multiprocess

    files = CollectorRegistry()
    multiprocess.MultiProcessCollector(files, path=path)
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_ShardSums(files))
    return reg


class _ShardSums:
    """Multiprocess mode: each internal ``streamrnn_shard_*`` gauge (the most recent report per shard, from
    any process) becomes its catalogued gauge, summed per job; the ``shard`` label is never served."""

    def __init__(self, inner: Any):
        self.inner = inner

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        from .catalogue import BY_NAME, SHARD_GAUGES

        internal = {v: k for k, v in SHARD_GAUGES.items()}
        sums: dict[str, dict[str, float]] = {}
        for fam in self.inner.collect():
            if fam.name not in internal:
                yield fam
                continue
            per_job = sums.setdefault(internal[fam.name], {})
            for s in fam.samples:
                per_job[s.labels.get("job", "")] = per_job.get(s.labels.get("job", ""), 0.0) + s.value
        for name, per_job in sums.items():
            out = GaugeMetricFamily(name, BY_NAME[name].help, labels=["job"])
            for job, v in sorted(per_job.items()):
                out.add_metric([job], v)
            yield out


class _Scraped:
    """Serves ``inner`` and notes the time each scrape starts (see :func:`await_scrape`)."""

    def __init__(self, inner: Any):
        self.inner = inner

    def collect(self) -> Iterator[Any]:
        started = time.time()
        yield from self.inner.collect()
        # noted once the scrape has read everything: a process waiting for a scrape of its zero-valued
        # series must not count before that scrape has read them (it started after they existed)
        _note_scrape(started)


_SCRAPED = threading.Condition()
_LAST_SCRAPE = 0.0
_SERVING = 0  # exporters open in this process


def _note_scrape(at: float) -> None:
    global _LAST_SCRAPE
    with _SCRAPED:
        _LAST_SCRAPE = max(_LAST_SCRAPE, at)
        _SCRAPED.notify_all()
    path = multiproc_dir()
    if path is not None:
        try:
            tmp = os.path.join(path, f".{SCRAPE_FILE}.{os.getpid()}")
            with open(tmp, "w") as f:
                f.write(repr(at))
            os.replace(tmp, os.path.join(path, SCRAPE_FILE))
        except OSError as e:  # the directory went away (the job is ending): nothing waits any more
            log.info("streamrnn metrics: scrape time not written (%s)", e)


def _last_scrape_in_dir(path: str) -> float:
    try:
        with open(os.path.join(path, SCRAPE_FILE)) as f:
            return float(f.read().strip() or 0.0)
    except (OSError, ValueError):
        return 0.0


def await_scrape(since: float, timeout: float) -> bool | None:
    """Wait until ``/metrics`` has been scraped at or after ``since`` (``time.time()``), at most ``timeout`` s.

    True once scraped, False on timeout, None at once when nothing serves this process's metrics
    (no exporter in this process and no multiprocess directory).
    """
    deadline = time.monotonic() + max(0.0, timeout)
    if _SERVING:
        with _SCRAPED:
            return _SCRAPED.wait_for(lambda: _LAST_SCRAPE >= since, timeout=max(0.0, timeout))
    path = multiproc_dir()
    if path is None:
        return None
    while _last_scrape_in_dir(path) < since:  # another process serves: it writes the scrape times
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(0.05, left))
    return True


def wait_seconds(env: Mapping[str, str] | None = None) -> float:
    """``STREAMRNN_METRICS_WAIT`` in seconds (0 when unset or not a number >= 0)."""
    env = os.environ if env is None else env
    try:
        v = float(env.get(ENV_WAIT, "0") or 0)
    except ValueError:
        return 0.0
    return v if v > 0 and v == v else 0.0


def await_first_scrape(what: str) -> None:
    """With ``STREAMRNN_METRICS_WAIT`` set: wait for one scrape of the series just made (at 0), so that what is
    counted next shows in ``rate()``; a warning if none came in time. Never raises."""
    timeout = wait_seconds()
    if timeout <= 0:
        return
    try:
        got = await_scrape(time.time(), timeout)
    except Exception as e:  # metrics must never stop a pipeline
        log.error("streamrnn metrics: waiting for a scrape failed (%s)", e)
        return
    if got is False:
        log.warning("streamrnn metrics: /metrics was not scraped within %g s of %s's series at 0; what is "
                    "counted before the first scrape does not show in rate()", timeout, what)


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
        global _SERVING
        self.server.shutdown()
        self.server.server_close()
        with _SCRAPED:
            _SERVING = max(0, _SERVING - 1)


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
                   fallback: bool = True, primary: bool = False) -> Exporter | None:
    """Serve ``/metrics`` on ``bind:port`` (see the module's port rule); None if disabled or not started.

    ``registry`` defaults to what :func:`serving_registry` gives. With ``fallback=False`` a
    taken port is an InputError naming it. ``primary``: in multiprocess mode, this process serves
    the directory for all (a job's launcher, started before its workers), so a taken port falls
    back to the next free one as without the directory. Each call starts a server; Beam workers go
    through :func:`exporter_from_env`, which starts one per process.
    """
    global _SERVING
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise InputError(f"metrics port: expected an int in [0, 65535] (0 disables), got {port!r}")
    if port == 0:
        return None
    served = registry if registry is not None else serving_registry()
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Scraped(served))
    shared = registry is None and multiproc_dir() is not None and not primary
    tries = [port] if (shared or not fallback) else list(range(port, min(port + PORT_TRIES, 65536)))
    for p in tries:
        server = _serve(p, bind, reg)
        if server is not None:
            with _SCRAPED:
                _SERVING += 1
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


def exporter_from_env(*, primary: bool = False) -> Exporter | None:
    """What ``DoFn.setup()`` calls: the exporter the environment asks for, started once per process; never raises.

    ``primary``: the job's launcher on a DirectRunner, which starts it before its workers (see
    :func:`start_exporter`); the workers in the same process use it, those in other processes find
    its port taken and serve nothing.
    """
    global _EXPORTER, _STARTED_PID
    with _LOCK:
        if _STARTED_PID == os.getpid():
            return _EXPORTER
        _STARTED_PID = os.getpid()
        try:
            port, bind, _job = exporter_settings()
            _EXPORTER = start_exporter(port, bind, primary=primary)
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


def configure_env(port: int, bind: str, job: str, env: dict[str, str] | None = None, *, wait: float = 0.0) -> None:
    """Set the exporter settings for this process and the worker processes it starts."""
    env = os.environ if env is None else env
    env[ENV_PORT], env[ENV_BIND], env[ENV_JOB] = str(port), bind, job
    if wait > 0:
        env[ENV_WAIT] = repr(float(wait))
    else:
        env.pop(ENV_WAIT, None)


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
