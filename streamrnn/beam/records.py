"""Typed records of the Beam layer and their columnar (Arrow) forms.

Events travel through the pipeline as columnar ``pyarrow.RecordBatch`` blocks (one
Beam element carries many events), so per-element Beam overhead is paid per block,
not per event. :class:`Event` is the convenient one-event-per-element input form;
it is converted to columns at the first step. :class:`DeadLetter` (and its Parquet schema) is
:mod:`streamrnn.dead_letters`' one record, re-exported here for the Beam layer.
"""

from __future__ import annotations

import hashlib
import io
import math
import zlib
from typing import Any, NamedTuple

import pyarrow as pa

# the one dead-letter record (Beam-free, so the core makes the same ones): re-exported for the Beam layer
from ..dead_letters import DEAD_LETTER_SCHEMA as DEAD_LETTER_SCHEMA
from ..dead_letters import DeadLetter as DeadLetter
from ..dead_letters import dead_letters_table as dead_letters_table
from ..dead_letters import event_json as event_json

#: Event columns inside the pipeline (payload column ``x`` is added per model input kind).
KEY, TS, SEQ, SUB, X, EVENT = "key", "ts", "seq", "sub", "x", "event"


def _end_of_input():
    from apache_beam.utils.timestamp import Timestamp

    from .step.clock import END_OF_INPUT_MICROS

    return Timestamp(micros=END_OF_INPUT_MICROS)


#: The event time at which the stateful step releases what it still holds back (the end of
#: the input). A finite time just before the end of the global window: runners advance the
#: watermark there when a bounded input ends. A TestStream should advance the watermark to it
#: before ``advance_watermark_to_infinity()``.
END_OF_INPUT = _end_of_input()


class Event(NamedTuple):
    """One input event for :class:`~streamrnn.beam.StatefulInference`.

    ``x`` is a token (int) or a feature vector (sequence of floats). ``ts`` is event
    time in seconds since the epoch (None: the element's Beam timestamp). Events of a
    key are applied in ``(ts, seq, sub)`` order; ``(key, seq, sub)`` identifies an
    event for de-duplication (``sub`` orders the bytes of one text record).
    """

    key: str
    ts: float | None
    seq: int
    x: Any
    sub: int = 0


class ModelUpdate(NamedTuple):
    """A model update (side input): ``path`` serves events with ``ts >= effective_ts``.

    An update is applied in event time, so a replay gives the same outputs. An update
    that reaches a shard after it already applied events past ``effective_ts`` takes
    effect at that shard's next flush.
    """

    path: str
    effective_ts: float = -math.inf


class Prediction(NamedTuple):
    """One output per applied event.

    ``pos`` is the event's 0-based position in its key's stream since the state was
    last fresh; ``fresh`` is True where this event started from the initial state and
    ``reset`` says why: ``"new"`` (first time seen), ``"expired"`` (idle past the TTL),
    ``"model_update"`` (the model changed state shapes), else ``""``.
    ``outputs`` maps output names (the model's task outputs, or the columns a
    postprocess made) to this event's values.
    """

    key: str
    ts: float
    seq: int
    sub: int
    pos: int
    fresh: bool
    reset: str
    model_version: str
    outputs: dict[str, Any]


#: The tag of every dead-letter output (one name for the whole Beam layer and both jobs).
DEAD = "dead_letters"


def shard_of(key: str, num_shards: int) -> int:
    """The stable shard of a key (crc32; the same in every process)."""
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) % num_shards


#: Prefix of an ``event`` value that names a copy of an input row by its content, not its text.
COPY_PREFIX = "\x00copy:"


def copy_id(payload: bytes) -> str:
    """The ``event`` value of every event of one input row whose text is not kept: a digest of the row's
    payload. Two copies of a row name (``key, seq, ts``) with other contents then compete as whole rows
    (one wins, all of its ``sub`` events); identical copies share the id and stay one row.

    >>> copy_id(b"abc") == copy_id(b"abc") != copy_id(b"abd")
    True
    """
    return COPY_PREFIX + hashlib.blake2b(payload, digest_size=8).hexdigest()


def original_text(ev: str | None) -> str | None:
    """An ``event`` value as a dead letter's original row: None for a copy id (the caller writes the fields)."""
    return None if ev is None or ev.startswith(COPY_PREFIX) else ev


def to_ipc(batch: pa.RecordBatch | pa.Table) -> bytes:
    """Arrow IPC stream bytes (how state and event blocks are stored; no pickle)."""
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, batch.schema) as w:
        w.write(batch)
    return sink.getvalue()


def from_ipc(blob: bytes) -> pa.Table:
    return pa.ipc.open_stream(blob).read_all()
