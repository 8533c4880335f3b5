"""Live input for the jobs: a watched folder or bucket, a Pub/Sub subscription, a Kafka topic.

``--input`` names the source:

* a glob (or folder) on any Beam filesystem with ``--watch``: files that appear are read once
  each, through ``FileSystems`` (``gs://``, ``s3://``, local, ...);
* ``projects/P/subscriptions/S``: JSON rows, one per message, pulled from Pub/Sub;
* ``kafka://BROKER[,BROKER]/TOPIC``: JSON rows, one per record, through Beam's cross-language
  ``ReadFromKafka`` (a Java expansion service; see docs/beam-io.md).

Every row goes through the same parsing as the files of a batch run
(:mod:`streamrnn.beam.job.event_files` for events, :func:`streamrnn.forecast.beam.parse_bar_file`
for bars), so a row that cannot be used is the same dead letter with the same reason, never
an error that stops the job. A message's row may leave out ``ts`` (the message's publish or
record time is used) and ``seq`` (its Pub/Sub message id, or Kafka ``partition * 2**40 + offset``).

**Watermark.** Event time comes from the rows. A watched folder and a subscription are polled
in rounds (every ``interval`` seconds); after a round the source's watermark moves to the
newest row time taken so far, capped at the wall clock (a row stamped in the future cannot
make the rest late) and never moving back. The rows of one round are all emitted before the
watermark moves, so they are never late to one another; a row of a later round is on time
while its window's end plus ``--allowed-lateness`` is still ahead of that watermark, else a
``late`` dead letter. Windows thus close as newer rows arrive, not at the stop. An idle
source holds the watermark where it is. With ``stop_after`` the source takes one last round
at that time and ends: the watermark then passes the end of the input, and every held row
is released (as a batch run's end does). Kafka's watermark is Kafka's own (the records'
create time).

**Runners.** On the DirectRunner (``--streaming``), the rounds feed a ``TestStream`` through
Beam's TestStreamService (gRPC, in the launching process), whose watermark events advance
the pipeline's watermark as rounds complete: Beam's ``MatchContinuously`` and
``PeriodicImpulse`` run there too, but that runner holds the watermark of a splittable DoFn
until it ends, so windows would close only at the stop. On every other runner (Dataflow,
Flink, Spark, Prism) the same rounds run in a splittable DoFn (:class:`PollSource`) with a
manual watermark estimator; its restriction carries the files already taken and the
watermark, so a restarted worker takes no file twice. Pub/Sub messages are acknowledged
once their round is committed (the SDF's bundle finalizer; on the DirectRunner, which keeps no
checkpoint, once queued for the pipeline).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import logging
import math
import os
import queue
import re
import shutil
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.coders import BytesCoder, Coder, StrUtf8Coder, TupleCoder
from apache_beam.io.filesystem import BeamIOError
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.iobase import RestrictionProgress, RestrictionTracker
from apache_beam.io.localfilesystem import LocalFileSystem
from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow, TimestampedValue
from apache_beam.utils.timestamp import MIN_TIMESTAMP, Duration, Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from ...errors import InputError
from ..records import DEAD, TS, DeadLetter, event_json, from_ipc, to_ipc
from ..step.clock import END_OF_INPUT_MICROS, to_micros
from .event_files import format_of, parse_events, utf8_error

log = logging.getLogger("streamrnn.live")

#: Output tag of the rows that cannot be used (dead letters), as in :mod:`streamrnn.beam.job.io`.
FILES, PUBSUB, KAFKA = "files", "pubsub", "kafka"
_SUBSCRIPTION = re.compile(r"projects/([^/\s]+)/subscriptions/([^/\s]+)")
#: Default seconds between rounds: a folder is listed every 10 s; a subscription is pulled every second.
DEFAULT_INTERVAL = {FILES: 10.0, PUBSUB: 1.0, KAFKA: 1.0}
#: Kafka's default seq for a row without one: ``partition * KAFKA_PARTITION + offset``.
KAFKA_PARTITION = 2**40
_HEARTBEAT = 5.0  # seconds: the DirectRunner's TestStream gives up after 30 s without an event

__all__ = ["DEAD", "EventClock", "EventParser", "FilePoller", "LiveParser", "LiveRun", "LiveSource", "Message",
           "Parsed", "PollSource", "ReadLive", "SubscriptionPoller", "add_live_args", "duration", "input_kind",
           "kafka_address", "kafka_messages", "live_source", "message_rows"]


# -- what --input names ------------------------------------------------------------------------------
def input_kind(spec: str) -> str:
    """``"pubsub"`` for ``projects/P/subscriptions/S``, ``"kafka"`` for ``kafka://...``, else ``"files"``."""
    if _SUBSCRIPTION.fullmatch(spec.strip()):
        return PUBSUB
    if spec.strip().lower().startswith("kafka://"):
        return KAFKA
    return FILES


def kafka_address(spec: str) -> tuple[str, str]:
    """``kafka://b1:9092,b2:9092/topic`` -> ``("b1:9092,b2:9092", "topic")``; InputError naming what is missing."""
    rest = spec.strip()[len("kafka://"):]
    brokers, _, topic = rest.partition("/")
    if not brokers or not topic or "/" in topic:
        raise InputError(f"--input: expected kafka://BROKER[:PORT][,BROKER...]/TOPIC, got {spec!r}")
    return brokers, topic


_UNITS = {"ms": 1e-3, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


def duration(text: str) -> float:
    """An argparse ``type``: seconds (> 0) from ``"10s"``, ``"250ms"``, ``"5m"``, ``"1h"``, ``"2d"`` or a number."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(ms|s|min|m|h|d)?\s*", text)
    v = float(m.group(1)) * _UNITS[m.group(2) or "s"] if m else math.nan
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"expected a duration > 0 such as 10s, 500ms, 5m, 1h (or seconds), "
                                         f"got {text!r}")
    return v


def _seconds(s: float) -> str:
    for unit, size in (("h", 3600.0), ("min", 60.0)):
        if s >= size and s % size == 0:
            return f"{s / size:g} {unit}"
    return f"{s:g} s" if s >= 1 else f"{s * 1000:g} ms"


# -- the watermark rule -----------------------------------------------------------------------------
@dataclass
class EventClock:
    """The live sources' watermark: the newest row time taken, capped at the wall clock, never going back.

    ``watermark`` is in whole milliseconds (what a TestStream takes), rounded down; None
    before any row was taken.
    """

    newest: float | None = None
    watermark: int | None = None  # micros, a whole millisecond

    def advance(self, times: Sequence[float], now: float | None = None) -> int | None:
        """Take a round's row times (seconds; non-finite ones are ignored); returns the new watermark."""
        finite = [t for t in times if math.isfinite(t)]
        if finite:
            self.newest = max(finite) if self.newest is None else max(self.newest, *finite)
        if self.newest is not None:
            cap = time.time() if now is None else now
            wm = (to_micros(min(self.newest, cap)) // 1000) * 1000
            self.watermark = wm if self.watermark is None else max(self.watermark, wm)
        return self.watermark

    def seconds(self) -> float | None:
        return None if self.watermark is None else self.watermark / 1e6

    def to_json(self) -> dict:
        return {"newest": self.newest, "watermark": self.watermark}

    @classmethod
    def from_json(cls, d: dict | None) -> EventClock:
        return cls(**d) if d else cls()


def _utc(seconds: float | None) -> str:
    if seconds is None:
        return "none yet"
    try:
        return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, OSError, ValueError):
        return f"{seconds:.0f} s"


# -- messages -----------------------------------------------------------------------------------------
class Message(NamedTuple):
    """One message of a subscription or topic: its bytes (a JSON row), and what stands in for a missing field.

    ``seq`` is the row's seq when it has none (Pub/Sub: the message id; Kafka: ``partition *
    2**40 + offset``); ``time`` (seconds) its ts when it has none (publish or record time);
    ``ack`` what acknowledges it (a Pub/Sub ack id); ``name`` names it in dead letters.
    """

    data: bytes
    seq: int
    time: float | None
    ack: Any = None
    name: str = ""


def message_rows(messages: Sequence[Message], *, fallbacks: bool = True
                 ) -> tuple[list[dict], list[int], list[DeadLetter]]:
    """The JSON object of each message and its position in ``messages``; with ``fallbacks``, ``ts``/``seq`` from
    the message where the row has none (absent or null). A message that is not a UTF-8 JSON object is a dead
    letter."""
    rows: list[dict] = []
    pos: list[int] = []
    dead: list[DeadLetter] = []
    for i, m in enumerate(messages):
        name = f"message {m.name or m.seq}"
        try:
            r = json.loads(m.data.decode("utf-8"))
        except UnicodeDecodeError as e:
            why = utf8_error(name, e)
        except json.JSONDecodeError as e:
            why = f"{name}: expected a JSON object, got invalid JSON ({e.msg})"
        else:
            why = None if isinstance(r, dict) else f"{name}: expected a JSON object, got {type(r).__name__}"
        if why is not None:
            raw = m.data.decode("utf-8", "backslashreplace")
            dead.append(DeadLetter(None, m.time, None, None, "invalid", why,
                                   event_json({"message": m.name or str(m.seq), "raw": raw})))
            continue
        if fallbacks and r.get("ts") is None and m.time is not None:
            r["ts"] = m.time
        if fallbacks and r.get("seq") is None:
            r["seq"] = m.seq
        rows.append(r)
        pos.append(i)
    return rows, pos, dead


def pubsub_seq(message_id: str) -> int:
    """A Pub/Sub message id (decimal) as an int; another id is hashed to 63 bits."""
    s = str(message_id)
    if s.isdigit() and len(s) < 19:
        return int(s)
    return int.from_bytes(hashlib.sha1(s.encode()).digest()[:8], "big") >> 1


def kafka_messages(records: Sequence[Any]) -> list[Message]:
    """Kafka records (``ReadFromKafka(with_metadata=True)`` rows: ``topic, partition, offset, timestamp`` in
    ms, ``value``) as messages; ``seq`` stands in as ``partition * 2**40 + offset``."""
    out = []
    for r in records:
        value = r.value if isinstance(r.value, bytes) else bytes(r.value or b"")
        ts = getattr(r, "timestamp", None)
        t = float(ts) / 1000.0 if isinstance(ts, (int, float)) and ts >= 0 else None
        part, off = int(r.partition), int(r.offset)
        out.append(Message(value, part * KAFKA_PARTITION + off, t, None, f"{r.topic}/{part}@{off}"))
    return out


# -- what a job makes of it ---------------------------------------------------------------------------
class Parsed(NamedTuple):
    """What one file or one round of messages gives: elements with their earliest event time, dead letters,
    and the newest event time of its rows (None: no row with a time)."""

    items: list[tuple[Any, float]]
    dead: list[DeadLetter]
    newest: float | None


class LiveParser(ABC):
    """How a job turns its input into pipeline elements (event blocks, bars): the files of a batch run
    (:class:`~streamrnn.beam.job.io.ParseFiles`) and what a live source takes alike."""

    @abstractmethod
    def accepts(self, path: str) -> bool:
        """Whether a file that appears in the watched folder is read (others, like ``.tmp`` uploads, are not)."""

    @abstractmethod
    def file(self, path: str, data: bytes, index: int) -> Parsed:
        """One file's elements; ``index`` counts the files taken before it."""

    @abstractmethod
    def messages(self, messages: Sequence[Message], source: str) -> Parsed:
        """One round of messages' elements."""

    @abstractmethod
    def encode(self, item: Any) -> bytes:
        """An element as bytes (the DirectRunner's TestStream carries bytes)."""

    @abstractmethod
    def decode(self, data: bytes) -> Any:
        """The inverse of :meth:`encode`."""


def _blocks(table: pa.Table, dead: list[DeadLetter], rows: int) -> Parsed:
    if not table.num_rows:
        return Parsed([], dead, None)
    blocks = [(b, float(pc.min(b.column(TS)).as_py())) for b in table.combine_chunks().to_batches(max_chunksize=rows)]
    return Parsed(blocks, dead, float(pc.max(table.column(TS)).as_py()))


class EventParser(LiveParser):
    """Events (the next-token job's rows) as Arrow blocks, by :func:`~streamrnn.beam.job.event_files.parse_events`."""

    def __init__(self, block_rows: int = 4096, vocab_size: int = 256):
        self.block_rows, self.vocab_size = block_rows, vocab_size

    def accepts(self, path: str) -> bool:
        try:
            format_of(path)
            return True
        except InputError:
            return False

    def file(self, path: str, data: bytes, index: int) -> Parsed:
        table, dead = parse_events(data, path, vocab_size=self.vocab_size)
        return _blocks(table, dead, self.block_rows)

    def messages(self, messages: Sequence[Message], source: str) -> Parsed:
        rows, _, dead = message_rows(messages)
        # each message is its own row: every row names key, ts and a payload, so a missing one is that
        # row's dead letter (named by its field), never a verdict on the round's columns
        blob = "".join(json.dumps({"key": None, "ts": None, "text": None, **r}) + "\n" for r in rows).encode()
        table, bad = parse_events(blob, f"{source}.jsonl", vocab_size=self.vocab_size)
        return _blocks(table, dead + bad, self.block_rows)

    def encode(self, item: pa.RecordBatch) -> bytes:
        return to_ipc(item)

    def decode(self, data: bytes) -> pa.RecordBatch:
        return from_ipc(data).combine_chunks().to_batches()[0]


# -- pollers: what a round takes -------------------------------------------------------------------------
class Taken(NamedTuple):
    """What one round took: files ``(path, bytes or the error that kept them unread)`` and messages."""

    files: list[tuple[str, bytes | Exception]]
    messages: list[Message]


class FilePoller:
    """The files of a glob not taken before, each read once, in path order within a round.

    Files the parser does not accept (another extension) and empty files (a file still being
    created) are left for later rounds. ``state()`` is what a restarted source resumes from.
    """

    def __init__(self, pattern: str, parser: LiveParser, state: dict | None = None):
        self.pattern, self.parser = pattern, parser
        self.seen: set[str] = set((state or {}).get("seen", ()))
        self.failing = 0

    def poll(self) -> Taken:
        try:
            found = [m for r in FileSystems.match([self.pattern]) for m in r.metadata_list]
            self.failing = 0
        except Exception as e:  # a listing that fails now (a bucket that is briefly unavailable): the next round
            self.failing += 1
            if self.failing & (self.failing - 1) == 0:
                log.warning("listing %s failed (%d time(s) in a row; retried every round): %s", self.pattern,
                            self.failing, str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
            return Taken([], [])
        new = sorted(m.path for m in found if m.path not in self.seen and m.size_in_bytes > 0
                     and not m.path.endswith("/") and self.parser.accepts(m.path))
        files: list[tuple[str, bytes | Exception]] = []
        for path in new:
            try:
                with FileSystems.open(path, compression_type="uncompressed") as f:
                    files.append((path, f.read()))
            except Exception as e:  # unreadable (permissions, removed between listing and reading): a dead letter
                if not FileSystems.exists(path):
                    continue  # gone: nothing to read, and a file that comes back under the name is taken then
                files.append((path, e))
            self.seen.add(path)
        return Taken(files, [])

    def ack(self, acks: Sequence[Any]) -> None:
        pass

    def state(self) -> dict:
        return {"seen": sorted(self.seen)}

    def close(self) -> None:
        pass


def default_subscriber() -> Any:
    """A ``google.cloud.pubsub_v1.SubscriberClient`` (Beam's gcp extra); with ``PUBSUB_EMULATOR_HOST`` set, the
    client talks to the Pub/Sub emulator."""
    from google.cloud import pubsub_v1

    return pubsub_v1.SubscriberClient()


#: Errors of a subscription that no retry mends: the job stops with the error.
_FATAL = ("NotFound", "PermissionDenied", "Unauthenticated", "InvalidArgument", "Forbidden")


class SubscriptionPoller:
    """Messages pulled from a Pub/Sub subscription: a round pulls until the subscription has none (at most
    ``max_pulls`` pulls of ``max_messages``).

    ``client`` is anything with ``SubscriberClient``'s ``pull(request=..., timeout=...)`` and
    ``acknowledge(request=...)`` (google-cloud-pubsub's client, the emulator behind it, or a fake).
    """

    def __init__(self, subscription: str, client: Any, *, max_messages: int = 1000, max_pulls: int = 10,
                 timeout: float = 5.0):
        self.subscription, self.client = subscription, client
        self.max_messages, self.max_pulls, self.timeout = max_messages, max_pulls, timeout
        self.failing = 0

    def poll(self) -> Taken:
        out: list[Message] = []
        for _ in range(self.max_pulls):
            try:
                resp = self.client.pull(request={"subscription": self.subscription,
                                                 "max_messages": self.max_messages}, timeout=self.timeout)
                self.failing = 0
            except Exception as e:
                name = type(e).__name__
                if name in _FATAL:
                    raise InputError(f"--input: expected a Pub/Sub subscription this job can pull, got "
                                     f"{self.subscription!r} ({name}: {str(e).splitlines()[0][:200]})") from None
                if name != "DeadlineExceeded":  # nothing to pull within the timeout is not an error
                    self.failing += 1
                    if self.failing & (self.failing - 1) == 0:
                        log.warning("pulling %s failed (%d time(s) in a row; retried every round): %s: %s",
                                    self.subscription, self.failing, name, str(e).splitlines()[0][:200])
                break
            got = list(resp.received_messages)
            for rm in got:
                m = rm.message
                pt = getattr(m, "publish_time", None)
                t = pt.timestamp() if hasattr(pt, "timestamp") else None
                out.append(Message(bytes(m.data), pubsub_seq(m.message_id), t, rm.ack_id, str(m.message_id)))
            if not got:
                break
        return Taken([], out)

    def ack(self, acks: Sequence[Any]) -> None:
        acks = [a for a in acks if a is not None]
        for i in range(0, len(acks), 1000):
            self.client.acknowledge(request={"subscription": self.subscription, "ack_ids": acks[i:i + 1000]})

    def state(self) -> dict:
        return {}

    def close(self) -> None:
        close = getattr(self.client, "close", None)
        if callable(close):
            close()


# -- the source's settings -------------------------------------------------------------------------------
@dataclass(frozen=True)
class LiveSource:
    """A live ``--input`` and how to read it.

    ``subscriber`` makes the Pub/Sub client (default: google-cloud-pubsub's); it must be
    picklable for runners other than the DirectRunner. ``token`` names this run's progress
    figures in the launching process.
    """

    input: str
    interval: float | None = None
    stop_after: float | None = None
    expansion_service: str | None = None
    kafka_config: tuple[tuple[str, str], ...] = ()
    subscriber: Callable[[], Any] | None = None
    token: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def kind(self) -> str:
        return input_kind(self.input)

    @property
    def every(self) -> float:
        return self.interval if self.interval is not None else DEFAULT_INTERVAL[self.kind]

    def pattern(self) -> str:
        """The glob a watched input lists (a folder means every file in it)."""
        p = self.input
        try:
            is_dir = isinstance(FileSystems.get_filesystem(p), LocalFileSystem) and os.path.isdir(p)
        except ValueError:
            is_dir = False
        return FileSystems.join(p, "*") if is_dir or p.endswith("/") else p

    def poller(self, parser: LiveParser, state: dict | None) -> FilePoller | SubscriptionPoller:
        if self.kind == FILES:
            return FilePoller(self.pattern(), parser, state)
        if self.kind == PUBSUB:
            return SubscriptionPoller(self.input.strip(), (self.subscriber or default_subscriber)(),
                                      timeout=min(5.0, self.every))
        raise InputError(f"--input: expected a polled source (files or Pub/Sub), got {self.input!r}")

    def describe(self) -> str:
        stop = f", stopping after {_seconds(self.stop_after)}" if self.stop_after else ", until stopped"
        if self.kind == FILES:
            return f"{self.pattern()} (watched every {_seconds(self.every)}{stop})"
        if self.kind == PUBSUB:
            return f"Pub/Sub {self.input} (pulled every {_seconds(self.every)}{stop})"
        brokers, topic = kafka_address(self.input)
        return f"Kafka topic {topic} at {brokers}{stop}"


# -- progress, in the launching process ------------------------------------------------------------------
class LiveProgress:
    """Files or messages taken and the watermark, for the job's progress line (thread-safe)."""

    def __init__(self, kind: str):
        self.kind = kind
        self.lock = threading.Lock()
        self.files = self.messages = self.nbytes = self.rounds = 0
        self.watermark: float | None = None
        self.error: BaseException | None = None
        self.ended = False

    def took(self, taken: Taken, watermark: float | None) -> None:
        with self.lock:
            self.rounds += 1
            self.files += len(taken.files)
            self.messages += len(taken.messages)
            self.nbytes += sum(len(d) for _, d in taken.files if isinstance(d, bytes)) + sum(
                len(m.data) for m in taken.messages)
            self.watermark = watermark

    def line(self) -> str:
        if self.kind == KAFKA:  # read by the runner's workers: their counter live_messages_taken
            return ""
        with self.lock:
            what = (f"{self.files:,} file(s)" if self.kind == FILES else f"{self.messages:,} message(s)")
            end = ", input ended" if self.ended else ""
            return f"{what} taken ({self.nbytes:,} bytes), watermark {_utc(self.watermark)}{end}"


_PROGRESS: dict[str, LiveProgress] = {}


def progress_of(source: LiveSource) -> LiveProgress:
    """The progress figures of a source in this process (the launcher's, where the DirectRunner reads it)."""
    return _PROGRESS.setdefault(source.token, LiveProgress(source.kind))


# -- one round ---------------------------------------------------------------------------------------------
class Round(NamedTuple):
    items: list[tuple[Any, float]]
    dead: list[tuple[DeadLetter, float]]
    acks: list[Any]


def take_round(taken: Taken, parser: LiveParser, clock: EventClock, *, files_before: int, source: str) -> Round:
    """Parse what a round took, then advance ``clock`` (the watermark rule) over the rows' times."""
    items: list[tuple[Any, float]] = []
    dead: list[DeadLetter] = []
    newest: list[float] = []
    parts: list[Parsed] = []
    for i, (path, data) in enumerate(taken.files):
        if isinstance(data, Exception):
            why = str(data).splitlines()[0][:200] if str(data) else type(data).__name__
            dead.append(DeadLetter(None, None, None, None, "invalid",
                                   f"file: expected a readable file, got {path!r} ({why})", event_json({"file": path})))
            continue
        parts.append(parser.file(path, data, files_before + i))
    if taken.messages:
        parts.append(parser.messages(taken.messages, source))
    for p in parts:
        items += p.items
        dead += p.dead
        newest += [] if p.newest is None else [p.newest]
    before = clock.seconds()
    finite = [t for _, t in items if math.isfinite(t)]
    t0 = min(finite) if finite else (before if before is not None else 0.0)
    clock.advance(newest)
    stamped = [(it, t if math.isfinite(t) else t0) for it, t in items]
    return Round(stamped, [(d, t0) for d in dead], [m.ack for m in taken.messages])


# -- the DirectRunner's driver: rounds as TestStream events ---------------------------------------------------
_CODER = TupleCoder([StrUtf8Coder(), BytesCoder()])


#: Bytes of TestStream elements per gRPC message: Beam's TestStream client takes messages up to gRPC's default 4 MiB.
_EVENT_BYTES = 2 << 20


def _dead_bytes(d: DeadLetter) -> bytes:
    data = json.dumps(list(d)).encode()
    if len(data) > _EVENT_BYTES:  # an enormous unusable row: its first MiB is kept in the dead letter
        cut = len(d.event) - (1 << 20)
        d = d._replace(event=d.event[:1 << 20] + f"... ({cut:,} characters cut: too large for the DirectRunner's "
                                                  "TestStream)")
        data = json.dumps(list(d)).encode()
    return data


def _element_events(elements: list[tuple[tuple[str, bytes], float]]) -> Iterator[Any]:
    """TestStream element events of at most about :data:`_EVENT_BYTES` each."""
    from apache_beam.portability.api import beam_runner_api_pb2

    p = beam_runner_api_pb2.TestStreamPayload
    part: list[Any] = []
    size = 0
    for enc, t in elements:
        data = _CODER.encode(enc)
        if part and size + len(data) > _EVENT_BYTES:
            yield p.Event(element_event=p.Event.AddElements(elements=part))
            part, size = [], 0
        part.append(p.TimestampedElement(encoded_element=data, timestamp=to_micros(t)))
        size += len(data)
    if part:
        yield p.Event(element_event=p.Event.AddElements(elements=part))


def watermark_steps(prev: int | None, target: int, earliest: float | None, step: float | None) -> list[int]:
    """The watermarks (micros, whole ms) that take the DirectRunner from ``prev`` to ``target``: at most ``step``
    seconds apart (at most 10,000 of them), the first round's starting at its ``earliest`` row.

    That runner holds no watermark for a stateful step's timers, so a jump far past a window's end
    can make what the timer then emits late downstream (docs/beam.md); a replay steps the same way.
    """
    if prev is not None and target <= prev:
        return []
    if step is None or step <= 0:
        return [target]
    start = prev if prev is not None else (to_micros(earliest) // 1000) * 1000 if earliest is not None else target
    size = max(to_micros(step), (target - start) // 10_000)
    size = max(1000, (size // 1000) * 1000)
    out = [start] if prev is None and start < target else []
    out += list(range(start + size, target, size))
    return [*out, target]


class _Rounds:
    """The polling loop of the DirectRunner's driver: TestStream events (as protos) for Beam's TestStreamService."""

    def __init__(self, source: LiveSource, parser: LiveParser, progress: LiveProgress, step: float | None,
                 drain: float):
        self.source, self.parser, self.progress, self.step, self.drain = source, parser, progress, step, drain
        self.closed = threading.Event()

    def events(self) -> Iterator[Any]:
        from apache_beam.portability.api import beam_runner_api_pb2

        ev = beam_runner_api_pb2.TestStreamPayload.Event
        poller = self.source.poller(self.parser, None)
        clock = EventClock()
        started = time.monotonic()
        stop = self.source.stop_after
        files = 0
        sent: int | None = None  # the last watermark sent
        try:
            while True:
                final = stop is not None and time.monotonic() - started >= stop
                taken = poller.poll()
                rnd = take_round(taken, self.parser, clock, files_before=files, source=self.source.input)
                files += len(taken.files)
                yield from _element_events(
                    [(("item", self.parser.encode(it)), t) for it, t in rnd.items]
                    + [(("dead", _dead_bytes(d)), t) for d, t in rnd.dead])
                if clock.watermark is not None:
                    earliest = min((t for _, t in rnd.items), default=None)
                    for wm in watermark_steps(sent, clock.watermark, earliest, self.step):
                        yield ev(watermark_event=ev.AdvanceWatermark(new_watermark=wm))
                    sent = clock.watermark
                poller.ack(rnd.acks)  # queued for the pipeline (the DirectRunner keeps no checkpoint)
                self.progress.took(taken, clock.seconds())
                if final:
                    break
                left = self.source.every if stop is None else min(self.source.every,
                                                                  started + stop - time.monotonic())
                if left > 0 and self.closed.wait(left):
                    return
            # the end of the input: in steps through the drain after the newest row (what stateful steps still
            # hold fires on time), then, as a replay's end, past every event time, then the end itself
            if sent is not None and clock.newest is not None and self.drain > 0:
                for wm in watermark_steps(sent, to_micros(clock.newest + self.drain) // 1000 * 1000, None, self.step):
                    yield ev(watermark_event=ev.AdvanceWatermark(new_watermark=wm))
            yield ev(watermark_event=ev.AdvanceWatermark(new_watermark=10**18))
            yield ev(watermark_event=ev.AdvanceWatermark(new_watermark=END_OF_INPUT_MICROS))
            with self.progress.lock:
                self.progress.ended = True
        finally:
            poller.close()


class _Service:
    """Beam's TestStreamService (gRPC, in this process) streaming one source's rounds to the DirectRunner.

    The rounds run in their own thread; the stream sends a heartbeat (the same watermark) while a
    round takes long or the source waits, since the runner stops a TestStream that is silent for 30 s.
    A source's error ends the stream and is kept in ``progress.error`` for the launcher to report.
    """

    def __init__(self, rounds: _Rounds):
        import grpc
        from apache_beam.portability.api import beam_interactive_api_pb2_grpc, beam_runner_api_pb2

        self.rounds = rounds
        self.queue: queue.Queue = queue.Queue()
        self.thread: threading.Thread | None = None
        self.last = beam_runner_api_pb2.TestStreamPayload.Event(
            watermark_event=beam_runner_api_pb2.TestStreamPayload.Event.AdvanceWatermark(
                new_watermark=MIN_TIMESTAMP.micros))
        service = self

        class Servicer(beam_interactive_api_pb2_grpc.TestStreamServiceServicer):
            def Events(self, request, context):
                yield from service.stream(context.is_active)

        from concurrent.futures import ThreadPoolExecutor

        self.server = grpc.server(ThreadPoolExecutor(max_workers=2))
        beam_interactive_api_pb2_grpc.add_TestStreamServiceServicer_to_server(Servicer(), self.server)
        self.endpoint = f"localhost:{self.server.add_insecure_port('localhost:0')}"
        self.server.start()

    def _produce(self) -> None:
        try:
            for e in self.rounds.events():
                self.queue.put(e)
        except BaseException as e:  # the job reports it when the pipeline ends
            self.rounds.progress.error = e
        finally:
            self.queue.put(None)

    def stream(self, active: Callable[[], bool]) -> Iterator[Any]:
        if self.thread is None:
            self.thread = threading.Thread(target=self._produce, name="streamrnn-live", daemon=True)
            self.thread.start()
        while active():
            try:
                e = self.queue.get(timeout=_HEARTBEAT)
            except queue.Empty:
                yield self.last
                continue
            if e is None:
                return
            if e.HasField("watermark_event"):
                self.last = e
            yield e

    def close(self) -> None:
        self.rounds.closed.set()
        self.server.stop(0)


class _Decode(beam.DoFn):
    def __init__(self, parser: LiveParser):
        self.parser = parser

    def process(self, element: tuple[str, bytes]) -> Iterator:
        kind, data = element
        if kind == "dead":
            yield beam.pvalue.TaggedOutput(DEAD, DeadLetter(*json.loads(data)))
        else:
            yield self.parser.decode(data)


# -- every other runner's driver: a splittable DoFn --------------------------------------------------------------
class _Polls(NamedTuple):
    """The SDF's restriction: rounds done, the state to resume from (JSON), and whether nothing remains."""

    rounds: int
    state: str
    done: bool


class _PollsCoder(Coder):
    def encode(self, value: _Polls) -> bytes:
        return json.dumps([value.rounds, value.state, value.done]).encode()

    def decode(self, encoded: bytes) -> _Polls:
        return _Polls(*json.loads(encoded))

    def is_deterministic(self) -> bool:
        return True


class _PollsTracker(RestrictionTracker):
    """One round per ``process()``: the claim carries the state after it; a checkpoint makes that state the
    residual (the next rounds) and the claimed round the primary (done)."""

    def __init__(self, restriction: _Polls):
        self.r = restriction
        self.claimed: tuple[str, bool] | None = None
        self.stopped = False

    def current_restriction(self) -> _Polls:
        return self.r

    def try_claim(self, position: tuple[str, bool]) -> bool:
        if self.stopped or self.r.done:
            return False
        self.claimed, self.stopped = position, True
        return True

    def try_split(self, fraction_of_remainder: float):
        if self.r.done or fraction_of_remainder > 0:
            return None
        if self.claimed is None:  # nothing claimed yet: every round is the residual
            residual = self.r
        elif self.claimed[1]:  # the last round was claimed: nothing remains
            return None
        else:
            residual = _Polls(self.r.rounds + 1, self.claimed[0], False)
        primary = _Polls(self.r.rounds, self.r.state, True)
        self.r, self.stopped = primary, True
        return primary, residual

    def check_done(self) -> bool:
        if self.r.done or (self.claimed is not None and self.claimed[1]):
            return True
        raise ValueError(f"live source: a round neither ended the input nor checkpointed: {self.r!r}")

    def current_progress(self) -> RestrictionProgress:
        return RestrictionProgress(completed=float(self.r.rounds), remaining=0.0 if self.r.done else 1.0)

    def is_bounded(self) -> bool:
        return self.r.done


class PollSource(beam.DoFn, beam.transforms.core.RestrictionProvider):
    """The live source's rounds as an unbounded splittable DoFn with a manual watermark (runners other than
    the DirectRunner). Input: one element (an ``Impulse``); outputs: elements timestamped by event time,
    and dead letters (tag :data:`DEAD`)."""

    def __init__(self, source: LiveSource, parser: LiveParser):
        self.source, self.parser = source, parser

    def initial_restriction(self, element: Any) -> _Polls:
        return _Polls(0, "", False)

    def create_tracker(self, restriction: _Polls) -> _PollsTracker:
        return _PollsTracker(restriction)

    def restriction_size(self, element: Any, restriction: _Polls) -> int:
        return 1

    def restriction_coder(self) -> Coder:
        return _PollsCoder()

    def setup(self) -> None:
        self.taken_files = Metrics.counter("streamrnn", "live_files_taken")
        self.taken_messages = Metrics.counter("streamrnn", "live_messages_taken")
        self.wm_gauge = Metrics.gauge("streamrnn", "live_watermark_ms")
        self.pollers: dict[str, FilePoller | SubscriptionPoller] = {}

    def teardown(self) -> None:
        for p in getattr(self, "pollers", {}).values():
            p.close()

    @beam.DoFn.unbounded_per_element()
    def process(self, element: Any, finalizer=beam.DoFn.BundleFinalizerParam,  # Beam passes the last two by name
                tracker=beam.DoFn.RestrictionParam(),
                watermark=beam.DoFn.WatermarkEstimatorParam(ManualWatermarkEstimator.default_provider())) -> Iterator:
        r: _Polls = tracker.current_restriction()
        if r.done:
            return
        st = json.loads(r.state) if r.state else {}
        started = st.get("started") or time.time()
        clock = EventClock.from_json(st.get("clock"))
        if self.source.kind == FILES:  # a file poller is rebuilt from the restriction's state each round
            poller: FilePoller | SubscriptionPoller = self.source.poller(self.parser, st.get("poller"))
        else:  # a subscriber client is kept by the worker
            poller = self.pollers.get("sub") or self.pollers.setdefault("sub", self.source.poller(self.parser, None))
        stop = self.source.stop_after
        final = stop is not None and time.time() - started >= stop
        taken = poller.poll()
        files = int(st.get("files", 0))
        rnd = take_round(taken, self.parser, clock, files_before=files, source=self.source.input)
        after = json.dumps({"started": started, "clock": clock.to_json(), "poller": poller.state(),
                            "files": files + len(taken.files)})
        if not tracker.try_claim((after, final)):
            # a checkpoint came first: this round is taken again (messages unacked come back)
            return
        for it, t in rnd.items:
            yield TimestampedValue(it, t)
        for d, t in rnd.dead:
            yield beam.pvalue.TaggedOutput(DEAD, TimestampedValue(d, t))
        if rnd.acks:
            acks = list(rnd.acks)
            finalizer.register(lambda: poller.ack(acks))
        self.taken_files.inc(len(taken.files))
        self.taken_messages.inc(len(taken.messages))
        if clock.watermark is not None:
            self.wm_gauge.set(clock.watermark // 1000)
        progress = _PROGRESS.get(self.source.token)
        if progress is not None:  # the launcher's process (a local runner)
            progress.took(taken, clock.seconds())
        if final:
            if progress is not None:
                with progress.lock:
                    progress.ended = True
            return
        if watermark.current_watermark() is None:
            watermark.set_watermark(MIN_TIMESTAMP)
        if clock.watermark is not None and Timestamp(micros=clock.watermark) > watermark.current_watermark():
            watermark.set_watermark(Timestamp(micros=clock.watermark))
        wait = self.source.every if stop is None else max(0.0, min(self.source.every, started + stop - time.time()))
        tracker.defer_remainder(Duration.of(wait))


# -- Kafka ---------------------------------------------------------------------------------------------------
class ParseRecords(beam.DoFn):
    """Kafka records (``ReadFromKafka(with_metadata=True)``) -> the parser's elements and dead letters.

    A bundle's records are parsed together (one Arrow block per bundle, not per record), at the
    earliest record time of the bundle.
    """

    def __init__(self, parser: LiveParser, source: str):
        self.parser, self.source = parser, source

    def setup(self) -> None:
        self.taken = Metrics.counter("streamrnn", "live_messages_taken")

    def start_bundle(self) -> None:
        self.records: list[Any] = []
        self.first: Timestamp | None = None

    def process(self, record: Any, ts=beam.DoFn.TimestampParam) -> None:
        self.records.append(record)
        self.first = ts if self.first is None else min(self.first, ts)

    def finish_bundle(self) -> Iterator:
        if not self.records:
            return
        msgs = kafka_messages(self.records)
        self.taken.inc(len(msgs))
        p = self.parser.messages(msgs, self.source)
        at = self.first if self.first is not None else MIN_TIMESTAMP
        for it, _ in p.items:
            yield WindowedValue(it, at, [GlobalWindow()])
        for d in p.dead:
            yield beam.pvalue.TaggedOutput(DEAD, WindowedValue(d, at, [GlobalWindow()]))
        self.records = []


def kafka_read(source: LiveSource) -> beam.PTransform:
    """Beam's cross-language ``ReadFromKafka`` for a ``kafka://BROKERS/TOPIC`` source: records with metadata,
    timestamped and watermarked by their create time, offsets committed when a bundle is finalized, and
    ``max_read_time`` from ``stop_after``."""
    from apache_beam.io.kafka import ReadFromKafka

    brokers, topic = kafka_address(source.input)
    config = {"bootstrap.servers": brokers, "group.id": "streamrnn", "auto.offset.reset": "earliest",
              **dict(source.kafka_config)}
    return ReadFromKafka(consumer_config=config, topics=[topic], with_metadata=True,
                         timestamp_policy=ReadFromKafka.create_time_policy, commit_offset_in_finalize=True,
                         max_read_time=math.ceil(source.stop_after) if source.stop_after else None,
                         expansion_service=source.expansion_service)


# -- the transform -------------------------------------------------------------------------------------------------
def _direct(pipeline: beam.Pipeline) -> bool:
    from apache_beam.runners.direct.direct_runner import BundleBasedDirectRunner, SwitchingDirectRunner

    return isinstance(pipeline.runner, (SwitchingDirectRunner, BundleBasedDirectRunner))


class ReadLive(beam.PTransform):
    """A live source -> ``(elements, dead_letters)``: the parser's elements, timestamped by event time, on an
    unbounded PCollection whose watermark follows the rule in this module's docstring.

    ``driver``: ``"service"`` (the DirectRunner's TestStream), ``"sdf"`` (:class:`PollSource`) or None (by
    the pipeline's runner). Kafka always reads through ``ReadFromKafka``. ``watermark_step`` (seconds; the
    DirectRunner only): the largest watermark advance at once (:func:`watermark_steps`), also at the end of the
    input through ``drain`` event-time seconds after the newest row (how long the job's stateful steps hold
    a row); the jobs pass their window and lateness, as their replays step.
    """

    def __init__(self, source: LiveSource, parser: LiveParser, *, driver: str | None = None,
                 watermark_step: float | None = None, drain: float = 0.0, label: str | None = None):
        super().__init__(label)
        self.source, self.parser, self.driver = source, parser, driver
        self.step, self.drain = watermark_step, drain

    def expand(self, pbegin):
        if self.source.kind == KAFKA:
            parse = beam.ParDo(ParseRecords(self.parser, self.source.input)).with_outputs(DEAD, main="items")
            res = pbegin | "ReadFromKafka" >> kafka_read(self.source) | "Parse" >> parse
            return res.items, res[DEAD]
        driver = self.driver or ("service" if _direct(pbegin.pipeline) else "sdf")
        if driver == "service":
            from apache_beam.testing.test_stream import TestStream

            service = _Service(_Rounds(self.source, self.parser, progress_of(self.source), self.step, self.drain))
            _SERVICES.setdefault(self.source.token, []).append(service)  # LiveRun stops it
            stream = pbegin | "Rounds" >> TestStream(coder=_CODER, endpoint=service.endpoint)
            res = stream | "Decode" >> beam.ParDo(_Decode(self.parser)).with_outputs(DEAD, main="items")
        else:
            res = (pbegin | "Impulse" >> beam.Impulse()
                   | "Rounds" >> beam.ParDo(PollSource(self.source, self.parser)).with_outputs(DEAD, main="items"))
        return res.items, res[DEAD]


_SERVICES: dict[str, list[_Service]] = {}


class LiveRun:
    """A job's run of its input: ``with LiveRun(source) as run:`` ... ``run.status`` is the live part of the
    progress line (None for a batch or replay input). Leaving stops the DirectRunner's service and raises
    the source's error (a JobError, one line) if it had one."""

    def __init__(self, source: LiveSource | None):
        self.source = source
        self.progress = progress_of(source) if source is not None else None
        self.status: Callable[[], str] | None = self.progress.line if self.progress is not None else None

    def __enter__(self) -> LiveRun:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if self.source is None or self.progress is None:
            return
        for s in _SERVICES.pop(self.source.token, []):
            s.close()
        _PROGRESS.pop(self.source.token, None)
        err = self.progress.error
        if exc is None and err is not None:
            from .launcher import JobError

            raise JobError(str(err).splitlines()[0] if str(err) else type(err).__name__) from err


# -- the jobs' flags -----------------------------------------------------------------------------------------------
def add_live_args(ap: argparse.ArgumentParser) -> None:
    """``--watch``, ``--watch-interval``, ``--watch-stop-after``, ``--expansion-service``, ``--kafka-config``."""
    g = ap.add_argument_group("live input (a watched folder or bucket, Pub/Sub, Kafka; see docs/beam-io.md)")
    g.add_argument("--watch", action="store_true",
                   help="read files of --input GLOB as they appear (each once), streaming, until stopped")
    g.add_argument("--watch-interval", type=duration, default=None, metavar="DURATION",
                   help="time between rounds: listing the glob (default 10s) or pulling Pub/Sub (default 1s)")
    g.add_argument("--watch-stop-after", type=duration, default=None, metavar="DURATION",
                   help="end the input after this long (a last round is taken then), e.g. 90s, 30m, 8h "
                        "(default: run until cancelled)")
    g.add_argument("--expansion-service", metavar="HOST:PORT", default=None,
                   help="Kafka: a running Beam Java expansion service (default: Beam starts its own jar; needs java)")
    g.add_argument("--kafka-config", metavar="KEY=VALUE", action="append", default=[],
                   help="Kafka consumer setting (repeatable), e.g. security.protocol=SASL_SSL")


def _runner_is_direct(beam_args: Sequence[str]) -> bool:
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
    from apache_beam.runners.direct.direct_runner import BundleBasedDirectRunner, SwitchingDirectRunner
    from apache_beam.runners.runner import create_runner

    name = PipelineOptions(list(beam_args)).view_as(StandardOptions).runner or "DirectRunner"
    try:
        return isinstance(create_runner(name), (SwitchingDirectRunner, BundleBasedDirectRunner))
    except Exception:  # launcher.beam_flags has already refused a runner that cannot start
        return False


def _pubsub_installed() -> bool:
    try:
        return importlib.util.find_spec("google.cloud.pubsub_v1") is not None
    except (ImportError, ValueError):
        return False


def live_source(args: argparse.Namespace, beam_args: Sequence[str]) -> LiveSource | None:
    """The live source the job's flags name (None for a batch or replay input); JobError (one line) for a
    flag mistake: ``--watch`` without a glob, a watch flag without a live input, Pub/Sub without Beam's gcp
    extra, Kafka on the DirectRunner or without Java, ``--replay`` of a live source."""
    from .launcher import JobError

    kind = input_kind(args.input) if args.input else None
    watched = bool(args.watch)
    given = [f for f, v in (("--watch-interval", args.watch_interval), ("--watch-stop-after", args.watch_stop_after))
             if v is not None]
    if watched and kind is None:
        raise JobError("--watch: expected --input GLOB (the folder or bucket to watch), got no --input"
                       + (" (--demo makes its own file; replay it, or watch a folder)" if args.demo else ""))
    if watched and kind != FILES:
        raise JobError(f"--watch: expected --input GLOB of files, got {args.input!r} (a Pub/Sub subscription or "
                       "Kafka topic is read live without --watch)")
    if kind in (PUBSUB, KAFKA) and args.replay:
        raise JobError(f"--replay: expected files to replay, got {args.input!r} (a live source; drop --replay)")
    if watched and args.replay:
        raise JobError("--watch: expected either --watch (new files, live) or --replay (a recorded file), got both")
    if kind == FILES and not watched:
        if given:
            raise JobError(f"{given[0]}: expected --watch (or a Pub/Sub or Kafka --input), got a batch input")
        if args.expansion_service or args.kafka_config:
            raise JobError(f"{'--expansion-service' if args.expansion_service else '--kafka-config'}: expected "
                           f"--input kafka://BROKERS/TOPIC, got {args.input!r}")
        return None
    if kind is None:
        return None
    config: list[tuple[str, str]] = []
    for kv in args.kafka_config:
        k, sep, v = kv.partition("=")
        if not sep or not k.strip():
            raise JobError(f"--kafka-config: expected KEY=VALUE, got {kv!r}")
        config.append((k.strip(), v.strip()))
    src = LiveSource(args.input.strip(), interval=args.watch_interval, stop_after=args.watch_stop_after,
                     expansion_service=args.expansion_service, kafka_config=tuple(config))
    if kind != KAFKA and (args.expansion_service or config):
        raise JobError(f"{'--expansion-service' if args.expansion_service else '--kafka-config'}: expected "
                       f"--input kafka://BROKERS/TOPIC, got {args.input!r}")
    if kind == FILES:
        if "," in args.input:
            raise JobError(f"--watch: expected one glob or folder to watch, got a list: {args.input!r}")
        _check_watched(src)
    elif kind == PUBSUB:
        if default_subscriber is _DEFAULT_SUBSCRIBER and not _pubsub_installed():
            import apache_beam

            raise JobError(f"--input {args.input}: expected Beam's gcp extra for Pub/Sub, got no google-cloud-pubsub "
                           f"here: pip install \"apache-beam[gcp]=={apache_beam.__version__}\"")
        src = dataclasses.replace(src, subscriber=default_subscriber)
    else:
        try:
            kafka_address(args.input)
        except InputError as e:
            raise JobError(str(e)) from None
        if args.watch_interval is not None:
            raise JobError(f"--watch-interval: expected a watched folder or a Pub/Sub subscription, got {args.input!r} "
                           "(ReadFromKafka polls by itself)")
        if _runner_is_direct(beam_args):
            raise JobError(f"--input {args.input}: expected a portable runner (--runner FlinkRunner, DataflowRunner, "
                           "PrismRunner or PortableRunner): ReadFromKafka is a Java transform, which the DirectRunner "
                           "cannot run")
        if not args.expansion_service and shutil.which("java") is None:
            raise JobError(f"--input {args.input}: expected Java 11+ on PATH for Beam's Kafka expansion service "
                           "(beam-sdks-java-io-expansion-service), got no java; install a JRE or pass "
                           "--expansion-service HOST:PORT of a running one (docs/beam-io.md)")
    return src


_DEFAULT_SUBSCRIBER = default_subscriber


def _check_watched(src: LiveSource) -> None:
    from .launcher import JobError, require_filesystem

    pattern = src.pattern()
    require_filesystem("--input", pattern)  # gs:// without Beam's gcp extra: one line naming it
    if isinstance(FileSystems.get_filesystem(pattern), LocalFileSystem):
        literal = re.split(r"[*?\[]", pattern, maxsplit=1)[0]
        folder = literal if literal.endswith(os.sep) else os.path.dirname(literal) or "."
        if not os.path.isdir(folder):
            raise JobError(f"--input: expected a folder to watch, got {pattern!r} (no folder {folder!r})")
    try:  # listed once here (no file needs to be there yet): a bucket or client that cannot list is one line now
        FileSystems.match([pattern])
    except (BeamIOError, OSError, ValueError) as e:
        why = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise JobError(f"--input: expected a glob Beam can list, got {pattern!r} ({why})") from None
