"""The user's windowing × every runner, downstream windowing, and lateness that ignores the shard count.

Every cell is checked against the offline reference (each key's events in (ts, seq, sub)
order through ``Model.step`` from the initial state), so state must carry across the
user's windows on every runner.
"""

from __future__ import annotations

from pathlib import Path

import apache_beam as beam
import background
import numpy as np
import pytest
import test_beam_transform as tbt
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_stream import TestStream
from apache_beam.transforms import window as W
from beam_gather import Gather
from conftest import export_tiny_lm
from test_beam_transform import RUNNERS, check_dead, check_outputs, offline, worker_path

from streamrnn.beam import Event, NextTokenPostprocess, StatefulInference
from streamrnn.beam.records import END_OF_INPUT
from streamrnn.model.loaded import load
from streamrnn.model.runtime import CPU

beam_models = tbt.beam_models  # the session fixture of tiny models

WINDOWINGS = {
    "global": None,
    "fixed": W.FixedWindows(10),
    "sliding": W.SlidingWindows(30, 10),
    "sessions": W.Sessions(5),
}


def _events(seed=3, n_keys=3, per_key=12, span=60.0):
    rng = np.random.default_rng(seed)
    return tbt.make_events(rng, n_keys=n_keys, per_key=per_key, span=span, t0=1_000.0)


def _teststream(events, step=10.0, tail=3):
    """Events in ts order, the watermark stepped behind them (nothing is late), then ``tail`` more steps.

    The tail matters only on the legacy DirectRunner, which holds no watermark for user timers
    (apache_beam/runners/direct/direct_userstate.py): a jump far past a window's release time there
    can make a downstream window close before the timer's outputs reach it. Runners with timer holds
    (FnApiRunner, Flink, Dataflow) keep outputs on time whatever the jump.
    """
    ts = TestStream()
    evs = sorted(events, key=lambda e: e.ts)
    t = float(np.floor(evs[0].ts))  # TestStream watermarks are whole milliseconds
    while evs:
        now = [e for e in evs if e.ts < t + step]
        evs = evs[len(now):]
        ts = ts.add_elements([W.TimestampedValue(e, e.ts) for e in now]).advance_watermark_to(t + step)
        t += step
    for _ in range(tail):
        t += step
        ts = ts.advance_watermark_to(t)
    return ts.advance_watermark_to(END_OF_INPUT).advance_watermark_to_infinity()


def _source(p, events, runner):
    if runner.startswith("streaming"):
        return p | _teststream(events)
    return p | beam.Create(events) | "Stamp" >> beam.Map(lambda e: W.TimestampedValue(e, e.ts))


def _options(runner):
    return PipelineOptions(["--streaming"] if runner.startswith("streaming") else RUNNERS[runner])


def _each_in_windows(check, copies):
    """Each output once per window of the user's windowing (as a ParDo's outputs would be), then ``check``."""
    def _check(preds):
        seen: dict = {}
        for pr in preds:
            seen.setdefault((pr.key, pr.seq, pr.sub), []).append(pr)
        wrong = {k: len(v) for k, v in seen.items() if len(v) != copies}
        if wrong:
            raise AssertionError(f"outputs: expected each in {copies} window(s), got {list(wrong.items())[:5]}")
        check([v[0] for v in seen.values()])
    return _check


def _count_is(n):
    def _check(counts):
        if sum(counts) != n:
            raise AssertionError(f"downstream windowed count: expected {n} outputs in all, got {sum(counts)}")
    return _check


RUNNER_CELLS = ["batch", "streaming", "streaming-cold", "multi_processing", "portable"]


def _run_cell(runner: str, model: str, g: Gather) -> None:
    """One pipeline on ``runner``; every windowing of WINDOWINGS is its own branch (its own StatefulInference,
    its own gathered outputs) on the same input. "streaming-cold": no shard cache, every flush rebuilds its shard
    from Beam state."""
    with beam.Pipeline(options=_options(runner)) as p:
        src = _source(p, _events(), runner)
        for name, windowing in WINDOWINGS.items():
            s = src if windowing is None else src | f"UserWindows[{name}]" >> beam.WindowInto(windowing)
            out, dead = s | f"SI[{name}]" >> StatefulInference(
                model=model, num_shards=2, window_size=10.0, providers=[CPU],
                shard_cache_bytes=0 if runner == "streaming-cold" else None)
            g(out, f"{name}/outputs")
            g(dead, f"{name}/dead")
            if windowing is None and runner.startswith("streaming"):  # a global unbounded GBK never fires
                out = out | f"Windowed[{name}]" >> beam.WindowInto(W.FixedWindows(10_000))
            counts = (out | f"Key1[{name}]" >> beam.Map(lambda pr: ("all", 1))
                      | f"Sum[{name}]" >> beam.CombinePerKey(sum) | f"Counts[{name}]" >> beam.Values())
            g(counts, f"{name}/in_user_windows")


def _run_cells(argv: list[str]) -> int:
    """tests/run_jobs.py's entry, in a process of its own: the tiny model exported into the folder ``argv[0]``,
    then every runner's pipeline, gathered under ``argv[0]/RUNNER``."""
    folder = Path(argv[0])
    export_tiny_lm([str(folder / "tiny.onnx")])
    with pytest.MonkeyPatch.context() as mp:
        worker_path(mp)
        for runner in RUNNER_CELLS:
            _run_cell(runner, str(folder / "tiny.onnx"), Gather(folder / runner))
    return 0


@background.job("windowing x runner matrix", file=__file__)
def _matrix(folder: Path) -> dict:
    """The runner x windowing pipelines, in a process of their own beside the other tests (tests/background.py)."""
    return {**background.run_jobs(folder, {"cells": ("test_beam_windowing:_run_cells", [str(folder)])})["cells"],
            "folder": folder}


@pytest.fixture(scope="module", params=RUNNER_CELLS)
def windowed_run(request):
    """The runner's pipeline (every windowing a branch of it): the model it ran, its gathered outputs."""
    got = background.result("windowing x runner matrix")
    assert got["rc"] == 0, got["stderr"][-4000:]
    return str(got["folder"] / "tiny.onnx"), Gather(got["folder"] / request.param)


@pytest.mark.parametrize("windowing", list(WINDOWINGS))
def test_windowed_input_on_every_runner_equals_offline(windowed_run, windowing):
    model, g = windowed_run
    events = _events()
    want = offline(load(model, providers=[CPU]), events)
    copies = 3 if windowing == "sliding" else 1  # outputs return to the user's windows: 30 / 10 per output
    _each_in_windows(check_outputs(want), copies)(g[f"{windowing}/outputs"])
    # a sliding-window element is one event: applied once, never a duplicate dead letter
    check_dead({})(g[f"{windowing}/dead"])
    _count_is(len(events) * copies)(g[f"{windowing}/in_user_windows"])


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("next_fields", [(), ("logprob",)])
def test_downstream_event_time_windows_receive_every_output(beam_models, streaming, next_fields, tmp_path):
    """Outputs are timestamped when final (window end + lateness, or later), so a downstream window keeps them all."""
    events = _events(seed=7, n_keys=3, per_key=10, span=50.0)
    runner = "streaming" if streaming else "batch"
    g = Gather(tmp_path)
    with beam.Pipeline(options=_options(runner)) as p:
        out, _ = _source(p, events, runner) | StatefulInference(
            model=beam_models["tiny"], num_shards=2, window_size=10.0, allowed_lateness=5.0, providers=[CPU],
            postprocess=NextTokenPostprocess(k=2), next_fields=next_fields, flush_bounded_at_once=False,
            ttl=15.0)  # each key's last held row is released by its TTL, inside the stepped watermark tail
        counts = (out | "Fixed10" >> beam.WindowInto(W.FixedWindows(10))
                  | beam.Map(lambda pr: ("all", 1)) | beam.CombinePerKey(sum) | beam.Values())
        g(counts, "counts")
    _count_is(len(events))(g["counts"])


# ---------------------------------------------------------------------------- lateness is Beam's, not the shard's
def _lateness_steps(rng):
    """a, b and c in windows of 10 s (lateness 0). After the watermark passes 20, b's and c's events of
    [10, 20) are late by Beam's definition, whether or not another key of their shard flushed."""
    def ev(k, t, s):
        return Event(k, float(t), s, int(rng.integers(0, 256)))

    on_time = [ev("a", 1, 0), ev("a", 12, 1), ev("b", 2, 0), ev("c", 5, 0), ev("a", 25, 2), ev("c", 33, 1)]
    late = [ev("b", 15, 1), ev("c", 11, 2), ev("a", 3, 3)]
    steps = TestStream().add_elements([W.TimestampedValue(e, e.ts) for e in on_time[:4]])
    steps = steps.advance_watermark_to(20.5).add_elements([W.TimestampedValue(e, e.ts) for e in late])
    steps = steps.add_elements([W.TimestampedValue(e, e.ts) for e in on_time[4:]])
    steps = steps.advance_watermark_to(END_OF_INPUT).advance_watermark_to_infinity()
    return steps, on_time, late


@pytest.mark.parametrize("shards", [1, 2, 7])
def test_lateness_does_not_depend_on_the_shard_count(beam_models, shards, tmp_path):
    steps, on_time, late = _lateness_steps(np.random.default_rng(2))
    want = offline(load(beam_models["tiny"], providers=[CPU]), on_time)
    g = Gather(tmp_path)
    with beam.Pipeline(options=PipelineOptions(["--streaming"])) as p:
        out, dead = p | steps | StatefulInference(model=beam_models["tiny"], num_shards=shards, window_size=10.0,
                                                  ttl=30.0, providers=[CPU])
        g(out, "outputs")
        g(dead, "dead")
    check_outputs(want)(g["outputs"])
    check_dead({(e.key, e.seq, "late"): 1 for e in late})(g["dead"])


def test_ttl_never_applies_a_late_event_fresh(beam_models, tmp_path):
    """ttl=30: a's event at 21 arrives after the watermark passed 100. It is late, not a fresh stream."""
    rng = np.random.default_rng(8)
    first = Event("a", 1.0, 0, int(rng.integers(0, 256)))
    late = Event("a", 21.0, 1, int(rng.integers(0, 256)))
    later = Event("a", 200.0, 2, int(rng.integers(0, 256)))
    steps = (TestStream().add_elements([W.TimestampedValue(first, 1.0)]).advance_watermark_to(100.0)
             .add_elements([W.TimestampedValue(late, 21.0), W.TimestampedValue(later, 200.0)])
             .advance_watermark_to(END_OF_INPUT).advance_watermark_to_infinity())
    model = load(beam_models["tiny"], providers=[CPU])
    want = offline(model, [first, later], segments=lambda k, es: [[e] for e in es])
    g = Gather(tmp_path)
    with beam.Pipeline(options=PipelineOptions(["--streaming"])) as p:
        out, dead = p | steps | StatefulInference(model=beam_models["tiny"], num_shards=3, window_size=10.0,
                                                  ttl=30.0, providers=[CPU])
        g(out, "outputs")
        g(dead, "dead")
    check_outputs(want, fresh_reason=lambda pr: "new" if pr.seq == 0 else "expired")(g["outputs"])
    check_dead({("a", 1, "late"): 1})(g["dead"])


@pytest.mark.parametrize("shards", [1, 2, 5])
def test_a_late_update_never_overrides_a_newer_one(beam_models, shards, tmp_path):
    """U1 (eff 20) on time, then a late U0 (eff 5): events at 50 use U1 (the newest at or before 50) on every
    shard count, though a's shard had applied up to 30 and the others only up to 1."""
    from streamrnn.beam import ModelUpdate

    rng = np.random.default_rng(4)
    early = [Event(k, t, 0, int(rng.integers(0, 256))) for k, t in (("a", 30.0), ("b", 1.0), ("c", 1.0))]
    later = [Event(k, 50.0, 1, int(rng.integers(0, 256))) for k in ("a", "b", "c")]
    stream = (TestStream(output_tags={"events", "updates"})
              .add_elements([W.TimestampedValue(e, e.ts) for e in early], tag="events")
              .add_elements([W.TimestampedValue(ModelUpdate(beam_models["other"], 20.0), 20.0)], tag="updates")
              .advance_watermark_to(46.0, tag="events").advance_watermark_to(46.0, tag="updates")
              .add_elements([W.TimestampedValue(ModelUpdate(beam_models["tiny"], 5.0), 5.0)], tag="updates")
              .add_elements([W.TimestampedValue(e, e.ts) for e in later], tag="events"))
    for tag in ("events", "updates"):
        stream = stream.advance_watermark_to(END_OF_INPUT, tag=tag)
    for tag in ("events", "updates"):
        stream = stream.advance_watermark_to_infinity(tag=tag)
    g = Gather(tmp_path)
    with beam.Pipeline(options=PipelineOptions(["--streaming"])) as p:
        streams = p | stream
        out, _ = streams["events"] | StatefulInference(
            model=beam_models["tiny"], num_shards=shards, window_size=10.0, providers=[CPU],
            model_updates=streams["updates"])
        g(out, "outputs")
    _versions_are([(pr.ts, pr.model_version.split("+")[0]) for pr in g["outputs"]],
                  {1.0: "tiny-1.0.0", 30.0: "tiny-other-2", 50.0: "tiny-other-2"})


def _versions_are(vs, want):
    got = {}
    for ts, v in vs:
        got.setdefault(ts, set()).add(v)
    if got != {t: {v} for t, v in want.items()}:
        raise AssertionError(f"model versions by ts: expected {want}, got {got}")
