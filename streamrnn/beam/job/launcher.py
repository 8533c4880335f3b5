"""What a Beam job's launcher does around its pipeline, for every job (next-token, market forecast).

The launcher never opens the input: it lists it (metadata), checks the model exists and the
output folder takes a file, all through Beam's filesystems (local, gs://, s3://, ...), and
checks the flags: the job's own (:class:`JobParser`) and Beam's (:func:`beam_flags`). A
user's mistake is a :class:`JobError`: one line on stderr, exit code 2, no traceback, and a
local output folder that this run created is removed again.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import IO, NoReturn

import pyarrow.parquet as pq
from apache_beam.io.filesystem import FileMetadata
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.localfilesystem import LocalFileSystem
from apache_beam.options import pipeline_options as beam_options

from ...cli.args import at_least
from ...cli.logs import quiet_worker_processes
from ...errors import DeployError, InputError, ModelLoadError
from ...metrics import export as metrics_export
from ...model import shipped
from ...model.spec import ModelSpec
from .io import match_inputs, missing_filesystem
from .summary import live_line


class JobError(Exception):
    """A user's mistake the launcher reports in one line (exit code 2)."""


def refuse(prog: str, e: JobError) -> int:
    """Print ``prog: message`` on stderr; the exit code 2."""
    print(f"{prog}: {e}", file=sys.stderr)
    return 2


class JobParser(argparse.ArgumentParser):
    """A job's flags. A usage error is a :class:`JobError` naming the flag (``--step: expected a number > 0.0,
    got '-5'``), so the job prints it as its one line with exit code 2, as every other user's mistake."""

    def __init__(self, job: str, **kwargs):
        super().__init__(prog=f"python -m beam_jobs.{job}", **kwargs)

    def error(self, message: str) -> NoReturn:
        raise JobError(re.sub(r"^argument ([^:]+): ", r"\1: ", message))


class _BeamFlags(getattr(beam_options, "_BeamArgumentParser", argparse.ArgumentParser)):  # type: ignore[misc]
    """Beam's own parser of its pipeline options (it adds value-provider flags); a usage error is a JobError."""

    def error(self, message: str) -> NoReturn:
        raise JobError(re.sub(r"^argument ([^:]+): ", r"\1: ", message))


def _beam_parser() -> argparse.ArgumentParser:
    """Every registered PipelineOptions subclass's flags, as ``PipelineOptions.get_all_options`` gathers them."""
    parser = _BeamFlags(allow_abbrev=False, add_help=False)
    classes: dict[str, type] = {}
    for cls in beam_options.PipelineOptions.__subclasses__():
        classes.setdefault(str(cls), cls)
    for cls in classes.values():
        cls._add_argparse_args(parser)
    return parser


def beam_flags(job: argparse.ArgumentParser, flags: Sequence[str], *, replay: str | None = None) -> list[str]:
    """``flags`` (what the job's parser did not take), checked as Beam's pipeline options; JobError for:

    * a flag neither the job nor any registered Beam ``PipelineOptions`` knows (Beam would only warn and
      run with the default), with the nearest known flag as a hint;
    * a bad value of a Beam flag, a ``--runner`` Beam cannot make;
    * ``replay`` (the job flag that makes the run a replay, or None) on a runner other than the DirectRunner.
    """
    from apache_beam.runners.direct.direct_runner import BundleBasedDirectRunner, SwitchingDirectRunner
    from apache_beam.runners.runner import create_runner

    flags = list(flags)
    name = _beam_parser().parse_known_args(flags)[0].runner or "DirectRunner"
    try:
        runner = create_runner(name)  # imports the runner's module: its own options register
    except ValueError:
        raise JobError(f"--runner: expected one of {', '.join(beam_options.StandardOptions.KNOWN_RUNNER_NAMES)} or a "
                       f"PipelineRunner's full class name, got {name!r}") from None
    except Exception as e:  # ImportError: a runner of an extra not installed; its own error
        raise JobError(f"--runner: expected a runner that can start here, got {name!r} ({_first_line(e)})") from None
    parser = _beam_parser()
    unknown = parser.parse_known_args(flags)[1]
    if unknown:
        known = [o for p in (job, parser) for a in p._actions for o in a.option_strings if o.startswith("--")]
        near = [m for u in unknown if u.startswith("--")
                for m in difflib.get_close_matches(u.split("=", 1)[0], known, n=1)]
        raise JobError(f"unrecognized arguments: {' '.join(unknown)}" + (f" (did you mean {near[0]}?)" if near else ""))
    if replay and not isinstance(runner, (SwitchingDirectRunner, BundleBasedDirectRunner)):
        raise JobError(f"{replay}: expected the DirectRunner (a replay needs its TestStream support), "
                       f"got --runner={name}")
    return flags


def join(root: str, name: str) -> str:
    """``root/name`` for messages, without a doubled separator (``out/`` + ``x`` is ``out/x``)."""
    return f"{root.rstrip('/')}/{name}" if root.rstrip("/") else f"{root}{name}"


def is_local(path: str) -> bool:
    """Whether ``path`` is on the local filesystem (False for a scheme Beam has no filesystem for here)."""
    try:
        return isinstance(FileSystems.get_filesystem(path), LocalFileSystem)
    except ValueError:
        return False


def require_filesystem(what: str, path: str) -> None:
    """JobError naming ``what`` and the missing Beam extra when no filesystem here can open ``path``
    (``gs://`` without ``apache-beam[gcp]``)."""
    why = missing_filesystem(path)
    if why is not None:
        raise JobError(f"{what}: expected a path on a filesystem Beam can open here, got {path!r} ({why})")


def input_files(pattern: str) -> list[FileMetadata]:
    """The input's files (listed, not opened); JobError when missing, empty or of an unknown format."""
    try:
        return match_inputs(pattern)
    except InputError as e:
        raise JobError(str(e)) from None


def require_file(path: str, what: str, kind: str = "a file", hint: str = "") -> None:
    """JobError ``what: expected <kind> at <path>, got no such file<hint>`` unless the file exists."""
    require_filesystem(what, path)
    if not FileSystems.exists(path):
        raise JobError(f"{what}: expected {kind} at {path!r}, got no such file{hint}")


def require_model(path: str, kind: str, hint: str = "") -> None:
    """``require_file`` for ``--model``: a ``shipped:NAME`` must name a model this install ships
    (each worker then resolves it in its own install); any other path must exist."""
    if shipped.is_shipped(path):
        try:
            shipped.resolve(path)
        except ModelLoadError as e:
            raise JobError(str(e)) from None
        return
    require_file(path, "model", kind, hint)


def require_task(model: str, spec: ModelSpec, task: str, what: str) -> None:
    """JobError ``--model: expected <what> (task 'lm'), got task 'forecast' in 'shipped:market'`` unless the
    model's ``spec.task`` is ``task``."""
    global _TASK
    if spec.task != task:
        raise JobError(f"--model: expected {what} (task {task!r}), got task {spec.task!r} in {model!r}")
    _TASK = task


#: the task :func:`require_task` last confirmed: the unit of the progress line's online loss
_TASK: str | None = None


def require_writable_file(flag: str, path: str) -> None:
    """JobError naming ``flag`` unless a local file can be written at ``path`` (its folders made as needed):
    checked before the pipeline runs, not when it ends."""
    if "://" in path:
        raise JobError(f"{flag}: expected a local file path, got {path!r}")
    full = os.path.abspath(path)
    if os.path.isdir(full):
        raise JobError(f"{flag}: expected a file path, got the directory {path!r}")
    folder = full
    try:
        if os.path.exists(full):
            with open(full, "ab"):  # neither truncated nor changed
                pass
            return
        folder = os.path.dirname(full)  # the nearest folder that exists: the file's missing folders are made there
        while not os.path.exists(folder):
            folder = os.path.dirname(folder)
        if not os.path.isdir(folder):
            raise JobError(f"{flag}: expected a writable file path, got {path!r} ({folder!r} is a file)")
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        where = f"cannot write in {folder!r}: " if folder != full else ""
        raise JobError(f"{flag}: expected a writable file path, got {path!r} ({where}{e.strerror or e})") from None


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
        name = f".temp-{uuid.uuid4().hex}"
        # a scheme with no filesystem here is check_writable's one-line error, not this constructor's traceback
        self.temp = join(root, name) if missing_filesystem(root) else FileSystems.join(root, name)

    def check_writable(self) -> None:
        require_filesystem("output", self.root)
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

    def _written(self, labels: dict[str, str], seen: dict[str, tuple[str, int]]) -> str:
        for prefix in labels:
            for path in self._files(prefix):
                if path not in seen:
                    try:
                        with FileSystems.open(path, compression_type="uncompressed") as f:
                            seen[path] = (prefix, pq.read_metadata(f).num_rows)
                    except Exception:  # being renamed into place; next time
                        continue
        counts = {prefix: sum(n for p, n in seen.values() if p == prefix) for prefix in labels}
        # labels are plural ("dead letters"): one row is "1 dead letter"
        return ", ".join(f"{counts[prefix]:,} {label[:-1] if counts[prefix] == 1 and label.endswith('s') else label}"
                         for prefix, label in labels.items())

    def _watch(self, labels: dict[str, str], stop: threading.Event, out: IO[str], status: Callable[[], str] | None,
               every: float, tty: bool) -> None:
        seen: dict[str, tuple[str, int]] = {}
        t0 = time.monotonic()
        last = t0
        while not stop.wait(1.0):
            counts = self._written(labels, seen)
            now = time.monotonic()
            if tty:  # one line rewritten in place, plus a kept line every ``every`` seconds
                out.write(f"\r  {counts} written, {now - t0:5.1f} s ")
            if every > 0 and now - last >= every:
                last = now
                extra = _status(status)
                out.write(("\r" if tty else "") + f"  [{now - t0:6.1f} s] {counts} written"
                          + (f"; {extra}" if extra else "") + "\n")
            out.flush()
        if tty:
            out.write("\n")

    @contextmanager
    def progress(self, labels: dict[str, str], *, quiet: bool = False, out: IO[str] | None = None,
                 status: Callable[[], str] | None = None, every: float = 10.0,
                 tty: bool | None = None) -> Iterator[None]:
        """Progress from the files finalized so far (their Parquet footers give the row counts).

        On a terminal: a line rewritten in place each second. Every ``every`` seconds (0: never),
        also a plain line with ``status()`` (the running job's figures); off a terminal (CI, a
        container or Dataflow log) only those plain lines, never ``\\r``.
        """
        if quiet:
            yield
            return
        out = out or sys.stderr
        if tty is None:
            tty = bool(getattr(out, "isatty", lambda: False)())
        stop = threading.Event()
        t = threading.Thread(target=self._watch, args=(labels, stop, out, status, every, tty), daemon=True)
        t.start()
        try:
            yield
        finally:
            stop.set()
            t.join()


def _status(status: Callable[[], str] | None) -> str:
    if status is None:
        return ""
    try:
        return status()
    except Exception as e:  # the figures are a courtesy: never fail the job for them
        return f"(figures unavailable: {type(e).__name__})"


# the exception line of a traceback, or a DeployError's own text; Beam appends " [while running 'STEP']"
_DEPLOY_ERROR = re.compile(r"^(?:[\w.]+\.)?DeployError: (.+?)\r?$", re.M)
_WHILE_RUNNING = re.compile(r"(?: \[while running '.*'\])+$")


def deploy_error(e: BaseException) -> str | None:
    """The message of a worker's DeployError, however the runner wrapped it (type kept, or as traceback text)."""
    if isinstance(e, DeployError):
        msg = str(e).strip()
    else:
        m = _DEPLOY_ERROR.search(str(e))
        if m is None:
            return None
        msg = m.group(1)
    return _WHILE_RUNNING.sub("", msg) or None


_BEAM_NO_FILESYSTEM = re.compile(r"^Unable to get filesystem from specified path.*Path specified: (\S+)\s*$", re.S)


def _no_filesystem(e: BaseException) -> str | None:
    """Beam's own error for a path no filesystem here opens (``gs://`` without its extra), where a job passed
    it to Beam unchecked: one line naming the path and the missing extra."""
    m = _BEAM_NO_FILESYSTEM.match(str(e)) if isinstance(e, ValueError) else None
    why = missing_filesystem(m.group(1)) if m else None
    return None if why is None else f"expected a path on a filesystem Beam can open here, got {m.group(1)!r} ({why})"


def run(prog: str, output: Output, body: Callable[[], int]) -> int:
    """``body()``'s exit code, and one line ``prog: message`` on stderr with exit code 2 for:

    * a JobError (a user's mistake, found before anything is written: a folder this run made is removed), and
      Beam's error for a path no filesystem here opens (``gs://`` without Beam's ``gcp`` extra);
    * a worker's DeployError (launcher and workers disagree; what was written stays).
    """
    try:
        return body()
    except JobError as e:
        output.discard()
        return refuse(prog, e)
    except Exception as e:
        msg = deploy_error(e)
        if msg is None:
            msg = _no_filesystem(e)
            if msg is None:
                raise
            output.discard()  # found before the pipeline ran, as a JobError is
        print(f"{prog}: {msg}", file=sys.stderr)
        return 2
    finally:
        output.remove_temp()


# -- metrics: the same flags and set-up for every job ----------------------------------------------
#: ``--metrics-port`` when not given
METRICS_PORT = 9464


def add_metrics_args(ap: argparse.ArgumentParser, job: str) -> None:
    g = ap.add_argument_group("metrics (Prometheus; see docs/metrics.md)")
    g.add_argument("--metrics-port", type=int, default=None,
                   help=f"/metrics is served here (0 disables; default: {METRICS_PORT}). A port given here that "
                        "another process holds stops a DirectRunner job (one line, exit 2); the default port, or "
                        "a worker's on another runner, moves to the next free one, logged")
    g.add_argument("--metrics-bind", default=metrics_export.DEFAULT_BIND,
                   help="address the exporter binds (default: %(default)s; 0.0.0.0 for every interface)")
    g.add_argument("--metrics-job", default=job, help="the 'job' label (default: %(default)s)")
    g.add_argument("--pushgateway", default=None, metavar="HOST:PORT",
                   help="push the final metrics to this Prometheus Pushgateway when the job ends")
    g.add_argument("--metrics-wait", type=at_least(0.0), default=0.0, metavar="SECONDS",
                   help="before anything is counted, wait up to SECONDS until /metrics was scraped with its series "
                        "at 0, so rate() sees the first counts too (batch jobs; default: %(default)s, no wait)")
    g.add_argument("--metrics-linger", type=at_least(0.0), default=0.0, metavar="SECONDS",
                   help="after the input ends, keep /metrics up until a scrape has read the final figures, at "
                        "most SECONDS (default: %(default)s)")
    g.add_argument("--log-every", type=at_least(0.0), default=10.0,
                   help="seconds between the running job's summary lines (0: none; default: %(default)s)")


def runs_here(beam_args: Sequence[str]) -> bool:
    """Whether the runner runs the pipeline on this machine (the DirectRunner, in this process or in worker
    processes it starts), so the launcher's exporter can serve the workers' metrics."""
    name = _beam_parser().parse_known_args(list(beam_args))[0].runner or "DirectRunner"
    name = name.rsplit(".", 1)[-1].lower()
    name = name if name.endswith("runner") else name + "runner"
    return name in ("directrunner", "switchingdirectrunner", "bundlebaseddirectrunner")


def check_metrics_port(args: argparse.Namespace, beam_args: Sequence[str]) -> None:
    """JobError for a ``--metrics-port`` out of range, or taken on a runner whose launcher serves it (the
    DirectRunner) when the flag was given: a scrape target names that port, so the job refuses to start rather
    than serve elsewhere. Not given, it is :data:`METRICS_PORT` (set here), which moves to the next free port
    when taken (jobs side by side on one machine). On other runners each worker process starts its own
    exporter on its own host; see :func:`streamrnn.metrics.export.start_exporter` for a taken port there."""
    if args.metrics_port is None:
        args.metrics_port, args.metrics_port_default = METRICS_PORT, True
    if getattr(args, "metrics_port_default", False):
        return
    if not 0 <= args.metrics_port <= 65535:
        raise JobError(f"--metrics-port: expected a port in [0, 65535] (0 disables), got {args.metrics_port}")
    if args.metrics_port and metrics_export.prometheus_on() and runs_here(beam_args) \
            and not metrics_export.port_free(args.metrics_port, args.metrics_bind):
        raise JobError(f"--metrics-port: expected a free port on {args.metrics_bind}, got {args.metrics_port} "
                       "(in use by another process; pick another port, or 0 for no exporter)")


@contextmanager
def metrics(args: argparse.Namespace, beam_args: Sequence[str]) -> Iterator[Callable[[], str]]:
    """Checks the metrics settings (JobError), sets them for the workers, yields the live summary line.

    A multi_processing DirectRunner with no ``PROMETHEUS_MULTIPROC_DIR`` gets a temporary one
    (removed afterwards), so its workers' metrics add up behind one exporter. On the DirectRunner
    the launcher starts that exporter itself, before the pipeline: it serves the job's series at 0
    from the start (with ``--metrics-wait``, until a first scrape has seen them), the workers' figures
    while it runs, and (``--metrics-linger``) the final figures after the workers have exited.
    """
    check_metrics_port(args, beam_args)
    made = None
    env_dir = metrics_export.multiproc_dir()
    if env_dir is not None:
        try:
            metrics_export.check_multiproc_dir(env_dir)
        except InputError as e:
            raise JobError(str(e)) from None
    elif any("multi_processing" in a for a in beam_args):
        made = tempfile.mkdtemp(prefix="streamrnn-prom-")
        os.environ[metrics_export.MULTIPROC] = made
    site, pythonpath = None, os.environ.get("PYTHONPATH")
    if any("multi_processing" in a for a in beam_args) and not getattr(args, "verbose", False):
        site = quiet_worker_processes()
    here = runs_here(beam_args)
    if args.metrics_port and metrics_export.multiproc_dir() is not None and not here:
        print(f"{args.metrics_job}: worker processes share {metrics_export.multiproc_dir()}; one of them serves "
              f"all on http://{args.metrics_bind}:{args.metrics_port}/metrics", file=sys.stderr)
    wait = getattr(args, "metrics_wait", 0.0) if args.metrics_port else 0.0
    metrics_export.configure_env(args.metrics_port, args.metrics_bind, args.metrics_job, wait=wait)
    try:
        if args.metrics_port and metrics_export.prometheus_on() and here:
            _serve_from_launcher(args, wait)
        yield lambda: live_line(metrics_export.totals(), _TASK)
        if args.metrics_port and args.metrics_linger > 0:
            ended = time.time()
            if metrics_export.await_scrape(ended, args.metrics_linger) is False:
                print(f"{args.metrics_job}: /metrics was not scraped within --metrics-linger {args.metrics_linger:g} s "
                      "of the end; the last scrape missed the final figures", file=sys.stderr)
        if args.pushgateway:
            err = metrics_export.push(args.pushgateway, args.metrics_job)
            print(f"{args.metrics_job}: " + (f"metrics pushed to {args.pushgateway}" if err is None else
                                             f"metrics not pushed to {args.pushgateway} ({err})"), file=sys.stderr)
    finally:
        metrics_export.stop_exporter()
        os.environ.pop(metrics_export.ENV_WAIT, None)
        if made is not None:
            os.environ.pop(metrics_export.MULTIPROC, None)
            shutil.rmtree(made, ignore_errors=True)
        if site is not None:
            if pythonpath is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = pythonpath
            shutil.rmtree(site, ignore_errors=True)


def _serve_from_launcher(args: argparse.Namespace, wait: float) -> None:
    """The DirectRunner's exporter, started here before the workers, serving the job's series at 0 from its
    first scrape on; with ``--metrics-wait``, returns once a scrape has seen them."""
    from ...metrics.catalogue import guarded, recorder

    guarded(lambda: recorder(args.metrics_job, wait=False))  # the series first: no scrape without them
    ex = metrics_export.exporter_from_env(primary=True)
    if ex is None or wait <= 0:
        return
    print(f"{args.metrics_job}: waiting up to {wait:g} s for a first scrape of {ex.url} (--metrics-wait)",
          file=sys.stderr)
    metrics_export.await_first_scrape(f"job {args.metrics_job}")


def execute(job: str, args: argparse.Namespace, beam_args: Sequence[str], out: Output, *, source: str,
            outputs: dict[str, str], build: Callable[..., None], live: Callable[[], str] | None = None) -> float:
    """Run a job's pipeline: check the output, clear old outputs, run with metrics and progress.

    ``build(p)`` adds the job's transforms to the pipeline; ``outputs`` maps file prefixes to
    the names the progress line shows. ``live`` (a live input's figures: files or messages taken,
    the watermark) runs the pipeline streaming and leads the progress line. Returns the run's wall seconds.
    """
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

    from ...cli.logs import worker_log_args

    out.check_writable()
    check_metrics_port(args, beam_args)  # before out.clear(): a job that refuses leaves old outputs as they were
    opts = PipelineOptions(worker_log_args(beam_args, verbose=args.verbose))
    if args.replay or live is not None:
        opts.view_as(StandardOptions).streaming = True
    out.clear()
    mode = "replay (streaming)" if args.replay else "live (streaming)" if live is not None else "batch"
    print(f"{job}: {source} -> {args.output}, {mode}, model {args.model}", file=sys.stderr)
    t0 = time.monotonic()
    with metrics(args, beam_args) as figures:
        status = figures if live is None else (lambda: "; ".join(s for s in (live(), figures()) if s))
        with out.progress(outputs, quiet=args.quiet, status=status, every=args.log_every), \
                beam.Pipeline(options=opts) as p:
            build(p)
        return time.monotonic() - t0
