"""``StatefulInference``: per-key recurrent state carried across windows, batched across keys.

Event flow (docs/beam.md has the semantics)::

  events -> OneCopy -> GlobalWindow -> Intake -> ReleaseWindows -> GroupByKey -> Panes (to the global window)
         -> ShardStep -> outputs

* OneCopy: an element that sliding windows put in several windows is one event.
* GlobalWindow: state is never reset at a window edge of the user's windowing.
* Intake: validation, shard, columnar blocks, release time (window end + lateness, micros).
* ReleaseWindows + GroupByKey: Beam itself decides, against the watermark, what is late.
* ShardStep: buffers on-time panes until their release time, then applies them in
  event-time order; late panes become dead letters. Outputs return to the user's windowing.

Stateful DoFns see one key at a time, so the Beam key is a *shard* (crc32(key) mod
``num_shards``): a flush advances all due keys of a shard in few ONNX Runtime calls.
Lateness is Beam's own: an event is late when it reaches the ``GroupByKey`` after the
watermark passed its window's end plus the allowed lateness, whatever the shard count.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any, Literal, NamedTuple

import apache_beam as beam
from apache_beam.transforms import trigger
from apache_beam.transforms.core import Windowing
from apache_beam.transforms.window import FixedWindows, GlobalWindow, GlobalWindows, TimestampCombiner
from apache_beam.utils.timestamp import Duration, Timestamp
from apache_beam.utils.windowed_value import PaneInfoTiming, WindowedValue

from ..errors import InputError
from ..keyed.health import HealthConfig, default_policy
from ..keyed.health import resolve as resolve_health
from ..model.runtime import CPU, resolve_providers
from .models import load_model, model_version
from .postprocess import Postprocess
from .step.apply import Config
from .step.clock import to_micros
from .step.counters import NAMESPACE
from .step.intake import DEAD, Intake, OneCopy, UpdateIntake
from .step.savepoint import WriteSnapshot, read_manifest, seed_kicks
from .step.stateful import SNAPSHOT, ShardStep

__all__ = ["NAMESPACE", "StatefulInference", "StatefulResult", "model_version"]


class StatefulResult(NamedTuple):
    """What :class:`StatefulInference` returns: ``(outputs, dead_letters)``."""

    outputs: beam.PCollection
    dead_letters: beam.PCollection


class _Panes(beam.DoFn):
    """(shard, payloads) per pane -> (shard, (late, release micros, payloads)), in the global window."""

    def process(self, element, pane=beam.DoFn.PaneInfoParam, ts=beam.DoFn.TimestampParam):
        shard, payloads = element
        yield WindowedValue((shard, (pane.timing == PaneInfoTiming.LATE, ts.micros, list(payloads))), ts,
                            [GlobalWindow()])


class _PanesGlobal(beam.ParDo):
    """:class:`_Panes` and ``WindowInto(GlobalWindows())`` in one step: its output PCollection is declared
    in the global window (as ``WindowInto`` declares its own) and every element is put there. One step
    less for each pane: the legacy DirectRunner runs a bundle, and introspects the step's DoFn, for every
    bundle upstream."""

    def __init__(self):
        super().__init__(_Panes())
        self.with_output_types(beam.typehints.Tuple[int, beam.typehints.Any])  # the shard: a deterministic key

    def get_windowing(self, unused_inputs):
        return Windowing(GlobalWindows())


def _check(ok: bool, field: str, expected: str, got: Any) -> None:
    if not ok:
        raise InputError(f"StatefulInference: {field}: expected {expected}, got {got!r}")


class StatefulInference(beam.PTransform):
    """Online recurrent inference with per-key (h, c) carried across windows.

    Input: a PCollection, in any windowing, of :class:`~streamrnn.beam.Event` or of
    ``pyarrow.RecordBatch`` blocks with columns ``key`` (string), ``ts`` (seconds),
    ``seq`` (int: an id per input row of a key), ``x`` (+ ``sub``, ``event``). Returns
    :class:`StatefulResult` ``(outputs, dead_letters)``: typed
    :class:`~streamrnn.beam.Prediction` records (or Arrow blocks with ``output="arrow"``)
    in the input's windowing, and :class:`~streamrnn.beam.DeadLetter` records in the
    global window.

    Semantics: each key's events apply once, in ``(ts, seq, sub)`` order, with state carried
    across windows. Events are released per fixed event-time window of ``window_size``
    once the watermark passes the window's end plus ``allowed_lateness``; later arrivals
    are ``late`` dead letters (Beam drops arrivals later than ``dedupe_horizon`` on its own,
    counted in its lateness counter). Outputs are timestamped at that release time (or
    later for rows held for ``next_fields``), so they are on time downstream.

    Keyword-only configuration:
      model: path of the streamrnn ONNX model (any Beam filesystem).
      num_shards: state shards; keys of a shard advance together. Fixed for a pipeline's life.
      window_size: seconds; the flush cadence in event time.
      allowed_lateness: seconds after a window's end that its events still wait.
      ttl: event-time seconds a key may idle before its stream ends and its state is dropped (None: never).
      dedupe_horizon: event-time seconds that applied ids are remembered and late events still reported
        (default: 1 h, at least a window plus its lateness).
      model_updates: PCollection of :class:`~streamrnn.beam.ModelUpdate`, applied at their effective time.
      postprocess: reduces raw outputs to columns inside the worker (e.g. ``NextTokenPostprocess``).
      keep_last_output: carry each key's last output (needed to score the next event).
      output: ``"records"`` (one Prediction per event) or ``"arrow"`` (also spelt ``"blocks"``: one Arrow
        RecordBatch per flush and output timestamp; ``outputs.explode`` turns one into its records).
      providers: ONNX Runtime providers (``"auto"``: CUDA when it loads).
      max_steps_per_call / max_batch: caps on T and B of one ORT call.
      flush_bounded_at_once: bounded input (batch): one flush per shard (same results, bigger batches).
      next_fields: output columns to pair with each key's next event as ``<name>_next`` (null where the
        stream ended: TTL, a model-update reset, the end of the input); a key's latest row waits for it.
      fault_injector: testing hook ``f(shard, keys)`` called after a flush's state writes.
      save_state: a folder (any Beam filesystem) where each shard writes its state when the input ends
        (bounded input, or a drain), with a manifest: a snapshot set that ``initial_state`` can seed a new
        pipeline from, with any ``num_shards`` (see :mod:`streamrnn.beam.step.savepoint`). Streams are kept as
        they are (held rows stay held, and a key expires only once its shard applied events past its
        expiry), so the next run continues them.
      initial_state: a snapshot set written by ``save_state``: every shard takes its keys from it on its
        first flush. Another model or state signature is refused here, in one line.
      shard_cache_bytes: bytes of decoded shard state a worker process keeps between flushes (default
        1 GiB, or ``STREAMRNN_SHARD_CACHE_BYTES``); 0 rebuilds each flush from Beam state (same results).
      health: carried-state health, as ``KeyedOperator(health=...)`` (:mod:`streamrnn.keyed.health`): ``"off"``,
        ``"flag"`` (outputs gain ``state_health``; the ``streamrnn_health_bad_keys`` gauge) or
        ``"heal"`` (also a fresh shadow per watched key, and a key whose shadow does better for long enough takes
        its state: ``reset="health"``, counted in ``streamrnn_health_resets_total``), or a ``HealthConfig``.
        Default (None): ``flag`` for a next-token model with a reference loss (the shipped ``charlm``), else
        ``off`` (:func:`streamrnn.keyed.health.default_policy`); ``self.health`` is the policy taken.
        Next-token models and forecasters (the loss per task: :func:`streamrnn.keyed.health.task_loss`). The
        health columns (and shadows) are part of each key's state in the shard store, so warm, rebuilt and retried
        flushes give the same results.
    """

    def __init__(self, *, model: str | os.PathLike, num_shards: int = 16, window_size: float = 60.0,
                 allowed_lateness: float = 0.0, ttl: float | None = None, dedupe_horizon: float | None = None,
                 model_updates: beam.PCollection | None = None, postprocess: Postprocess | None = None,
                 keep_last_output: bool = False, output: Literal["records", "arrow", "blocks"] = "records",
                 providers: Any = "auto", max_steps_per_call: int = 256, max_batch: int = 4096,
                 flush_bounded_at_once: bool = True, next_fields: Sequence[str] = (),
                 fault_injector: Callable[[int, list[str]], None] | None = None,
                 shard_cache_bytes: int | None = None, save_state: str | os.PathLike | None = None,
                 initial_state: str | os.PathLike | None = None, health: str | HealthConfig | None = None,
                 label: str | None = None):
        super().__init__(label)

        def num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        _check(isinstance(num_shards, int) and not isinstance(num_shards, bool) and num_shards >= 1,
               "num_shards", "an int >= 1", num_shards)
        _check(num(window_size) and to_micros(window_size) >= 1000 and window_size < 1e9, "window_size",
               "seconds in [0.001, 1e9)", window_size)
        _check(num(allowed_lateness) and 0 <= allowed_lateness < 1e9, "allowed_lateness", "seconds >= 0",
               allowed_lateness)
        _check(ttl is None or (num(ttl) and 0 < ttl < 1e11), "ttl", "seconds > 0 or None", ttl)
        if dedupe_horizon is None and num(window_size) and num(allowed_lateness):
            dedupe_horizon = max(3600.0, float(window_size) + float(allowed_lateness))
        _check(num(dedupe_horizon) and num(window_size) and num(allowed_lateness)
               and window_size + allowed_lateness <= dedupe_horizon < 1e11, "dedupe_horizon",
               "seconds >= window_size + allowed_lateness (late events are reported for that long)", dedupe_horizon)
        _check(output in ("records", "arrow", "blocks"), "output", "'records' or 'arrow' (or 'blocks', the same)",
               output)
        _check(isinstance(max_steps_per_call, int) and max_steps_per_call >= 1, "max_steps_per_call", ">= 1",
               max_steps_per_call)
        _check(isinstance(max_batch, int) and max_batch >= 1, "max_batch", ">= 1", max_batch)
        _check(shard_cache_bytes is None or (isinstance(shard_cache_bytes, int) and shard_cache_bytes >= 0),
               "shard_cache_bytes", "an int >= 0 (0: rebuild every flush from Beam state) or None", shard_cache_bytes)
        self.next_fields = tuple(next_fields) if not isinstance(next_fields, str) else (next_fields,)
        _check(all(isinstance(f, str) and f for f in self.next_fields), "next_fields", "output column names",
               next_fields)
        resolve_providers(providers)  # a misspelt provider fails here, in one line, not on the workers
        self.model = os.fspath(model)
        self.spec = load_model(self.model, [CPU]).spec  # fails fast at construction on a bad model
        self.save_state = None if save_state is None else os.fspath(save_state)
        self.initial_state = None if initial_state is None else os.fspath(initial_state)
        for name, v in (("save_state", self.save_state), ("initial_state", self.initial_state)):
            _check(v is None or (isinstance(v, str) and v.strip() != ""), name, "a folder path", v)
        if self.save_state is not None and self.initial_state is not None:
            a, b = (p.rstrip("/") + "/" for p in (self.save_state, self.initial_state))
            _check(not (a.startswith(b) or b.startswith(a)), "save_state",
                   f"a folder apart from initial_state {self.initial_state!r} (a save would overwrite the files "
                   "the shards still seed from)", self.save_state)
        self.manifest = None if self.initial_state is None else read_manifest(
            self.initial_state, self.spec, next_fields=self.next_fields)
        self.num_shards = num_shards
        self.window_size = float(window_size)
        self.allowed_lateness = float(allowed_lateness)
        self.ttl = None if ttl is None else float(ttl)
        self.dedupe_horizon = float(dedupe_horizon)
        self.model_updates = model_updates
        self.postprocess = postprocess
        self.keep_last_output = keep_last_output or bool(postprocess is not None and postprocess.needs_prev)
        self.output = "arrow" if output == "blocks" else output
        self.providers = providers
        self.max_steps_per_call = max_steps_per_call
        self.max_batch = max_batch
        self.flush_bounded_at_once = flush_bounded_at_once
        self.fault_injector = fault_injector
        self.shard_cache_bytes = shard_cache_bytes
        try:  # the operator's own checks, here at construction rather than on the workers
            resolve_health(health, SimpleNamespace(spec=self.spec), 1)
        except InputError as e:
            raise InputError(str(e).replace("KeyedOperator:", "StatefulInference:", 1)) from None
        self.health = default_policy(self.spec) if health is None else health
        self._id = uuid.uuid4().hex  # names this transform's shard caches in worker processes

    def expand(self, events: beam.PCollection) -> StatefulResult:
        spec = self.spec
        size, late = to_micros(self.window_size), to_micros(self.allowed_lateness)
        horizon = to_micros(self.dedupe_horizon)
        user = events.windowing
        if not isinstance(user.windowfn, GlobalWindows):
            events = events | "OneCopy" >> beam.ParDo(OneCopy(user.windowfn))
        intake = (events | "GlobalWindow" >> beam.WindowInto(GlobalWindows())
                  | "Intake" >> beam.ParDo(Intake(
                      tokens=spec.input.kind == "tokens", vocab=spec.input.vocab_size or 0,
                      n_features=spec.input.n_features or 0, num_shards=self.num_shards, size_micros=size,
                      lateness_micros=late)).with_outputs(DEAD, main="blocks"))
        keyed = intake.blocks
        bad_updates = []
        if self.model_updates is not None:
            updates = (self.model_updates | "UpdatesGlobal" >> beam.WindowInto(GlobalWindows())
                       | "UpdateIntake" >> beam.ParDo(UpdateIntake(
                           spec_json=spec.to_json(), num_shards=self.num_shards, size_micros=size,
                           lateness_micros=late)).with_outputs(DEAD, main="updates"))
            bad_updates.append(updates[DEAD])
            keyed = (keyed, updates.updates) | "WithUpdates" >> beam.Flatten()
        if self.initial_state is not None:  # every shard takes its keys at once, traffic or not
            keyed = (keyed, seed_kicks(events.pipeline, self.manifest, self.num_shards, size, late)) \
                | "WithSeeds" >> beam.Flatten()
        keyed.element_type = beam.typehints.Tuple[int, beam.typehints.Tuple[int, bytes]]
        panes = (keyed
                 | "ReleaseWindows" >> beam.WindowInto(
                     FixedWindows(Duration(micros=size), Timestamp(micros=late % size)),
                     trigger=trigger.AfterWatermark(late=trigger.AfterCount(1)),
                     accumulation_mode=trigger.AccumulationMode.DISCARDING,
                     timestamp_combiner=TimestampCombiner.OUTPUT_AT_EOW,
                     allowed_lateness=Duration(micros=horizon))
                 | "ByShardAndRelease" >> beam.GroupByKey()
                 | "Panes" >> _PanesGlobal())
        cfg = Config(ttl=self.ttl, size=size, lateness=late, max_steps=self.max_steps_per_call,
                     max_batch=self.max_batch, tokens=spec.input.kind == "tokens",
                     n_features=spec.input.n_features or 0, postprocess=self.postprocess)
        flush_all = self.flush_bounded_at_once and bool(getattr(events, "is_bounded", True))
        # The step's name carries num_shards: a runner that restores state by step name (Dataflow --update,
        # a Flink savepoint) refuses to attach state written under another shard count to it.
        applied = (panes | f"ShardStep[{self.num_shards} shards]" >> beam.ParDo(ShardStep(
            transform_id=self._id, model_path=self.model, spec_json=spec.to_json(), num_shards=self.num_shards,
            cfg=cfg, dedupe_horizon=horizon, keep_last_output=self.keep_last_output, output=self.output,
            providers=self.providers, flush_all=flush_all, next_fields=self.next_fields,
            fault_injector=self.fault_injector, cache_bytes=self.shard_cache_bytes,
            save_state=self.save_state is not None, initial_state=self.initial_state, manifest=self.manifest,
            health=self.health))
            .with_outputs(DEAD, SNAPSHOT, main="outputs"))
        if self.save_state is not None:
            _ = applied[SNAPSHOT] | "SaveState" >> WriteSnapshot(self.save_state, spec, {
                "num_shards": self.num_shards, "window_size": self.window_size,
                "allowed_lateness": self.allowed_lateness, "ttl": self.ttl, "dedupe_horizon": self.dedupe_horizon,
                "next_fields": list(self.next_fields)})
        outputs = applied.outputs
        if not isinstance(user.windowfn, GlobalWindows):
            outputs = outputs | "UserWindows" >> beam.WindowInto(
                user.windowfn, trigger=user.triggerfn, accumulation_mode=user.accumulation_mode,
                timestamp_combiner=user.timestamp_combiner, allowed_lateness=user.allowed_lateness)
        parts = (intake[DEAD], applied[DEAD], *bad_updates)
        dead = parts | "DeadLetters" >> beam.Flatten()
        # Every part comes from a step in the global window already (Intake, ShardStep, UpdateIntake), so
        # no WindowInto here: on the legacy DirectRunner it would cost a bundle (and a DoFn introspection)
        # for every bundle upstream. Should a part ever be windowed otherwise, it is re-windowed.
        if not all(_global(p) for p in parts):
            dead = dead | "DeadLettersGlobal" >> beam.WindowInto(GlobalWindows())
        return StatefulResult(outputs, dead)


def _global(pcoll: beam.PCollection) -> bool:
    """The PCollection is in the global window under the default trigger (what a WindowInto(GlobalWindows())
    would give it)."""
    w = pcoll.windowing
    return isinstance(w.windowfn, GlobalWindows) and isinstance(w.triggerfn, trigger.DefaultTrigger)
