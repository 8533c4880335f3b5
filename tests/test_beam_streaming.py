"""Streaming semantics: TestStream on the DirectRunner (--streaming), TTL expiry, model updates, retries."""

from __future__ import annotations

import os

import apache_beam as beam
import numpy as np
import pytest
import test_beam_transform as tbt
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_stream import TestStream
from apache_beam.transforms.window import FixedWindows, TimestampedValue
from beam_gather import Gather
from test_beam_transform import check_dead, check_next, check_outputs, counters, offline, offline_next

from streamrnn.beam import Event, ModelUpdate, NextTokenPostprocess, StatefulInference
from streamrnn.beam.records import END_OF_INPUT
from streamrnn.beam.step import store as store_mod
from streamrnn.model.loaded import load
from streamrnn.model.runtime import CPU

STREAMING = PipelineOptions(["--streaming"])
beam_models = tbt.beam_models  # the session fixture of tiny models


@pytest.fixture(autouse=True, params=["warm", "cold"])
def cache(request, monkeypatch):
    """Every test here runs twice: with the shard cache kept (warm), and with none, so that every flush
    rebuilds its shard from Beam state (cold). Both must give the same results."""
    if request.param == "cold":
        monkeypatch.setattr(store_mod, "DEFAULT_CACHE_BYTES", 0)
    rebuilds = []
    real = store_mod.ShardStore.from_log.__func__

    def counted(cls, blobs, *a, **kw):
        rebuilds.append(len(blobs))
        return real(cls, blobs, *a, **kw)

    monkeypatch.setattr(store_mod.ShardStore, "from_log", classmethod(counted))
    return request.param, rebuilds


def _stream(steps):
    """steps: list of ("add", [Event]) / ("wm", t). Elements carry their event time."""
    ts = TestStream()
    for kind, arg in steps:
        if kind == "add":
            ts = ts.add_elements([TimestampedValue(e, e.ts) for e in arg])
        else:
            ts = ts.advance_watermark_to(arg)
    # The legacy DirectRunner does not hold the output watermark for timers that fire on the jump to
    # infinity, so a downstream GroupByKey (a windowed check, assert_that) could drop what they emit: end at a
    # finite time first, the end of the input (where held-back rows are released).
    return ts.advance_watermark_to(1e6).advance_watermark_to(END_OF_INPUT).advance_watermark_to_infinity()


def _scenario(rng):
    """Keys a, b over windows [0,10) .. [50,60); out-of-order arrival, late data, a duplicate, watermark jumps."""
    def ev(k, t, s):
        return Event(k, float(t), s, int(rng.integers(0, 256)))

    a = [ev("a", t, i) for i, t in enumerate([1, 2, 4, 8, 12, 13, 19, 31, 44, 52, 58])]
    b = [ev("b", t, i) for i, t in enumerate([3, 5, 9, 11, 17, 25, 27, 55])]
    late = [ev("a", 3.5, 100), ev("b", 4.5, 101)]       # window [0,10) after its flush
    jump_late = ev("a", 40.0, 102)                       # after the watermark jumped past 60 + lateness
    steps = [
        ("add", [a[3], a[0], b[1], a[2], a[4], b[0], a[1]]),   # out of order, one event of the next window
        ("add", [b[2], b[3]]),
        ("wm", 16.0),                                         # flushes [0,10) (end 10 + lateness 5)
        ("add", [late[0], a[0], a[6], a[5], b[4]]),           # late, duplicate of an applied event, in-order
        ("add", [late[1]]),
        ("wm", 30.0),
        ("add", [a[8], b[6], a[7], b[5], a[10], a[9], b[7]]),
        ("wm", 100.0),                                        # jump: everything flushes
        ("add", [jump_late]),
    ]
    applied = a + b
    dead = {("a", 100, "late"): 1, ("b", 101, "late"): 1, ("a", 0, "duplicate"): 1, ("a", 102, "late"): 1}
    return steps, applied, dead


def test_teststream_out_of_order_late_duplicates_and_watermark_jumps(beam_models, tmp_path):
    rng = np.random.default_rng(11)
    steps, applied, dead_want = _scenario(rng)
    want = offline(load(beam_models["tiny"], providers=[CPU]), applied)
    # (the legacy DirectRunner's metrics miss bundles after a watermark step, so counts are checked on the
    # dead letters here and on the metrics in the FnApiRunner tests)
    g = Gather(tmp_path)
    with beam.Pipeline(options=STREAMING) as p:
        out, dead = p | _stream(steps) | StatefulInference(
            model=beam_models["tiny"], num_shards=1, window_size=10.0, allowed_lateness=5.0, providers=[CPU])
        g(out, "outputs")
        g(dead, "dead")
    check_outputs(want, fresh_reason=lambda _p: "new")(g["outputs"])
    check_dead(dead_want)(g["dead"])


def test_state_carries_across_windows_versus_per_window_reset(beam_models, cache, tmp_path):
    """The trap: per-window state would restart every window. Outputs match the whole-sequence run, not that."""
    rng = np.random.default_rng(5)
    evs = [Event("k", float(t), i, int(rng.integers(0, 256))) for i, t in enumerate(range(0, 100, 3))]
    model = load(beam_models["tiny"], providers=[CPU])
    want = offline(model, evs)
    per_window = offline(model, evs, segments=lambda k, es: [[e for e in es if w * 10 <= e.ts < w * 10 + 10]
                                                             for w in range(10)])
    assert any(np.abs(want[k][1] - per_window[k][1]).max() > 1e-3 for k in want)  # the reference can tell
    steps = [("add", evs[i:i + 4]) for i in range(0, len(evs), 4)]
    steps = [s for pair in zip(steps, [("wm", e.ts + 1) for e in evs[3::4]] + [("wm", 200.0)], strict=False)
             for s in pair]
    g = Gather(tmp_path)
    with beam.Pipeline(options=STREAMING) as p:
        out, _ = p | _stream(steps) | StatefulInference(
            model=beam_models["tiny"], num_shards=2, window_size=10.0, providers=[CPU])
        g(out, "outputs")
    check_outputs(want)(g["outputs"])
    mode, rebuilds = cache
    if mode == "warm":  # a replay without failures never rebuilds a shard (the cache outlives teardown)
        assert rebuilds == []
    else:  # every flush after a shard's first rebuilds it (10 windows over 2 shards)
        assert len(rebuilds) >= 8


# ---------------------------------------------------------------------------- TTL
def test_ttl_expiry_by_timer_in_streaming(beam_models, tmp_path):
    rng = np.random.default_rng(2)
    a1 = [Event("a", float(t), i, int(rng.integers(0, 256))) for i, t in enumerate([1, 2, 3])]
    b = [Event("b", float(t), i, int(rng.integers(0, 256))) for i, t in enumerate([2, 150, 290])]
    a2 = [Event("a", float(t), 10 + i, int(rng.integers(0, 256))) for i, t in enumerate([500, 501])]
    model = load(beam_models["tiny"], providers=[CPU])

    def seg(k, es):  # a restarts after its idle gap; b never idles past the TTL
        return [es[:3], es[3:]] if k == "a" else [es]

    want = offline(model, a1 + b + a2, segments=seg)
    steps = [("add", a1 + b[:1]), ("wm", 20.0), ("add", b[1:2]), ("wm", 200.0), ("add", b[2:]), ("wm", 400.0),
             ("add", a2)]
    g = Gather(tmp_path)
    with beam.Pipeline(options=STREAMING) as p:
        out, _ = p | _stream(steps) | StatefulInference(
            model=beam_models["tiny"], num_shards=1, window_size=10.0, ttl=200.0, providers=[CPU])
        g(out, "outputs")
    # a's state was dropped by the timer at 203 (long before its next event arrived): it restarts "expired"
    check_outputs(want, fresh_reason=lambda pr: "expired" if pr.seq == 10 else "new")(g["outputs"])


def test_ttl_gap_in_one_flush_batch(beam_models, tmp_path):
    rng = np.random.default_rng(4)
    evs = [Event("a", float(t), i, int(rng.integers(0, 256))) for i, t in enumerate([0, 5, 500, 510, 2000])]
    evs += [Event("b", float(t), i, int(rng.integers(0, 256))) for i, t in enumerate([0, 50, 100])]
    model = load(beam_models["tiny"], providers=[CPU])
    want = offline(model, evs, segments=lambda k, es: [es[:2], es[2:4], es[4:]] if k == "a" else [es])
    g = Gather(tmp_path)
    p = beam.Pipeline()
    out, _ = p | beam.Create(evs) | StatefulInference(model=beam_models["tiny"], num_shards=1, ttl=100.0,
                                                      providers=[CPU])
    g(out, "outputs")
    result = p.run()
    result.wait_until_finish()
    check_outputs(want, fresh_reason=lambda pr: "new" if pr.seq == 0 else "expired")(g["outputs"])
    assert counters(result)["expired"] == 2 + 2  # two gaps of a, then both keys idle at the end


# ---------------------------------------------------------------------------- model updates (side input)
@pytest.mark.parametrize("which", ["other", "wide"])
def test_model_update_side_input(beam_models, which, tmp_path):
    rng = np.random.default_rng(9)
    evs = [Event(k, float(t), i, int(rng.integers(0, 256))) for k in ("a", "b") for i, t in enumerate(range(0, 40, 4))]
    evs.append(Event("c", 30.0, 0, 7))  # first seen after the update
    T = 20.0
    old, new = load(beam_models["tiny"], providers=[CPU]), load(beam_models[which], providers=[CPU])
    want = {}
    for k in ("a", "b", "c"):
        es = sorted((e for e in evs if e.key == k), key=lambda e: e.ts)
        before, after = [e for e in es if e.ts < T], [e for e in es if e.ts >= T]
        state = None
        if before:
            o, state = old.step(np.array([[e.x for e in before]]))
            for i, e in enumerate(before):
                want[(k, e.seq, 0)] = (i, o["logprobs"][0, i])
        carry = which == "other" and state is not None
        o, _ = new.step(np.array([[e.x for e in after]]), state if carry else None)
        for i, e in enumerate(after):
            want[(k, e.seq, 0)] = ((len(before) if carry else 0) + i, o["logprobs"][0, i])

    def reason(pr):
        return "model_update" if pr.key in ("a", "b") else "new"

    g = Gather(tmp_path)
    p = beam.Pipeline()
    updates = p | "Updates" >> beam.Create([ModelUpdate(beam_models[which], T)])
    out, _ = p | beam.Create(evs) | StatefulInference(model=beam_models["tiny"], num_shards=1, window_size=10.0,
                                                      model_updates=updates, providers=[CPU])
    g(out, "outputs")
    result = p.run()
    result.wait_until_finish()
    check_outputs(want, fresh_reason=lambda pr: "new" if pr.ts < T or pr.key == "c" else reason(pr))(g["outputs"])
    _versions([(pr.ts >= T, pr.model_version.split("+")[0]) for pr in g["outputs"]], which)
    c = counters(result)
    assert c["model_switches"] == 1
    assert c.get("model_update_resets", 0) == (2 if which == "wide" else 0)


def _versions(vs, which):
    want = {(False, "tiny-1.0.0"), (True, {"other": "tiny-other-2", "wide": "tiny-wide-3"}[which])}
    if set(vs) != want:
        raise AssertionError(f"model versions: expected {want}, got {set(vs)}")


# ---------------------------------------------------------------------------- retries
class FailOncePerKey:
    """Raises the first time a flush touches each key (marker files: survives any process boundary)."""

    def __init__(self, root: str):
        self.root = root

    def __call__(self, shard, keys):
        fresh = [k for k in keys if not os.path.exists(os.path.join(self.root, k))]
        for k in fresh:
            open(os.path.join(self.root, k), "w").close()
        if fresh:
            raise RuntimeError(f"injected failure for keys {fresh} on shard {shard}")


def test_failed_bundles_are_retried_without_double_applying(beam_models, tmp_path):
    rng = np.random.default_rng(11)
    steps, applied, dead_want = _scenario(rng)
    want = offline(load(beam_models["tiny"], providers=[CPU]), applied)
    marks = tmp_path / "failed"
    marks.mkdir()
    g = Gather(tmp_path / "gathered")
    with beam.Pipeline(options=STREAMING) as p:
        out, dead = p | _stream(steps) | StatefulInference(
            model=beam_models["tiny"], num_shards=2, window_size=10.0, allowed_lateness=5.0, providers=[CPU],
            fault_injector=FailOncePerKey(str(marks)))
        g(out, "outputs")
        g(dead, "dead")
    # identical to the clean run of the same scenario (test above), which equals the offline reference
    check_outputs(want, fresh_reason=lambda _p: "new")(g["outputs"])
    check_dead(dead_want)(g["dead"])
    assert sorted(os.listdir(marks)) == ["a", "b"]  # the failures really happened


# ---------------------------------------------------------------------------- logprob_next across flushes
def _next_ti(model_path, **kw):
    return StatefulInference(model=model_path, providers=[CPU], postprocess=NextTokenPostprocess(3),
                             next_fields=("logprob",), **kw)


def test_logprob_next_held_back_across_windows_in_streaming(beam_models, tmp_path):
    """Keys span many windows and flushes: each flush's last row per key waits for the key's next flush."""
    rng = np.random.default_rng(11)
    steps, applied, dead_want = _scenario(rng)
    want = offline_next(load(beam_models["tiny"], providers=[CPU]), applied)
    g = Gather(tmp_path)
    with beam.Pipeline(options=STREAMING) as p:
        out, dead = p | _stream(steps) | _next_ti(beam_models["tiny"], num_shards=1, window_size=10.0,
                                                  allowed_lateness=5.0)
        g(out, "outputs")
        g(dead, "dead")
    check_next(want)(g["outputs"])
    check_dead(dead_want)(g["dead"])


def test_logprob_next_released_on_ttl_expiry_and_fresh_restart(beam_models, tmp_path):
    rng = np.random.default_rng(2)
    a1 = [Event("a", float(t), i, int(rng.integers(0, 256))) for i, t in enumerate([1, 2, 3])]
    b = [Event("b", float(t), i, int(rng.integers(0, 256))) for i, t in enumerate([2, 150])]
    a2 = [Event("a", float(t), 10 + i, int(rng.integers(0, 256))) for i, t in enumerate([1500, 1501, 1502])]
    model = load(beam_models["tiny"], providers=[CPU])
    want = offline_next(model, a1 + b + a2, segments=lambda k, es: [es[:3], es[3:]] if k == "a" else [es])
    assert want[("a", 2, 0)] is None and want[("a", 11, 0)] is not None
    # no flush runs between the expiry timers (a at 203, b at 350) and a's next events
    steps = [("add", a1 + b[:1]), ("wm", 20.0), ("add", b[1:]), ("wm", 200.0), ("wm", 400.0), ("wm", 1200.0),
             ("add", a2), ("wm", 3000.0)]
    g = Gather(tmp_path)
    with beam.Pipeline(options=STREAMING) as p:
        out, _ = p | _stream(steps) | _next_ti(beam_models["tiny"], num_shards=1, window_size=10.0, ttl=200.0)
        g(out, "outputs")
        # a's held row (seq 2) is released by the expire timer at 203 (watermark 400), b's (seq 1) at 350,
        # while window [0, 1000) is still open downstream. Held until a's next event (applied after the
        # watermark passed 1200) or the end of the input, they would be late for that window and dropped.
        early = (out | beam.Filter(lambda pr: pr.ts < 1000) | beam.WindowInto(FixedWindows(1000))
                 | beam.Map(lambda pr: (pr.key, pr.seq)) | beam.GroupByKey()
                 | beam.MapTuple(lambda k, seqs: (k, sorted(seqs))))
        g(early, "released_in_time")
    check_next(want)(g["outputs"])
    _eq_set(g["released_in_time"], [("a", [0, 1, 2]), ("b", [0, 1])])
    _eq_set([(pr.key, pr.seq, pr.reset) for pr in g["outputs"] if pr.fresh],
            [("a", 0, "new"), ("b", 0, "new"), ("a", 10, "expired")])


def _eq_set(got, want):
    if sorted(got) != sorted(want):
        raise AssertionError(f"expected {sorted(want)}, got {sorted(got)}")


@pytest.mark.parametrize("which", ["other", "wide"])
@pytest.mark.parametrize("streaming", [False, True])
def test_logprob_next_across_a_model_update(beam_models, which, streaming, tmp_path):
    """A same-shape update continues each stream (the last old-model row pairs with the first new-model
    byte); an incompatible one resets it: the old stream's last row goes out with no next."""
    rng = np.random.default_rng(9)
    evs = [Event(k, float(t), i, int(rng.integers(0, 256))) for k in ("a", "b") for i, t in enumerate(range(0, 40, 4))]
    T = 20.0
    old, new = load(beam_models["tiny"], providers=[CPU]), load(beam_models[which], providers=[CPU])
    want = {}
    for k in ("a", "b"):
        es = sorted((e for e in evs if e.key == k), key=lambda e: e.ts)
        before, after = [e for e in es if e.ts < T], [e for e in es if e.ts >= T]
        xb, xa = np.array([[e.x for e in before]]), np.array([[e.x for e in after]])
        o, state = old.step(xb)
        carry = which == "other"
        o2, _ = new.step(xa, state if carry else None)
        for i, e in enumerate(before):
            want[(k, e.seq, 0)] = (float(o["logprobs"][0, i, xb[0, i + 1]]) if i + 1 < len(before)
                                   else float(o["logprobs"][0, i, xa[0, 0]]) if carry else None)
        for i, e in enumerate(after):
            want[(k, e.seq, 0)] = float(o2["logprobs"][0, i, xa[0, i + 1]]) if i + 1 < len(after) else None
    assert (want[("a", 4, 0)] is None) == (which == "wide")
    p = beam.Pipeline(options=STREAMING if streaming else None)
    updates = p | "Updates" >> beam.Create([ModelUpdate(beam_models[which], T)])
    src = (p | _stream([("add", evs[:5] + evs[10:15]), ("wm", 25.0), ("add", evs[5:10] + evs[15:])]) if streaming
           else p | beam.Create(evs))
    out, _ = src | _next_ti(beam_models["tiny"], num_shards=1, window_size=10.0, model_updates=updates)
    g = Gather(tmp_path)
    g(out, "outputs")
    p.run().wait_until_finish()
    check_next(want)(g["outputs"])


def test_an_update_takes_effect_at_its_time_without_other_traffic(beam_models, tmp_path):
    """a's shard gets nothing after the incompatible update at 20: its state still resets at 20, so a's held row
    goes out then (null next), not at the end of the input, and a's next event restarts as 'model_update'."""
    rng = np.random.default_rng(3)
    a = [Event("a", float(t), i, int(rng.integers(0, 256))) for i, t in enumerate([1, 2, 3])]
    a_late = Event("a", 200.0, 3, 9)
    steps = (TestStream().add_elements([TimestampedValue(e, e.ts) for e in a]).advance_watermark_to(10)
             .advance_watermark_to(30).advance_watermark_to(50)
             .add_elements([TimestampedValue(a_late, a_late.ts)]).advance_watermark_to(300)
             .advance_watermark_to(END_OF_INPUT).advance_watermark_to_infinity())
    g = Gather(tmp_path)
    with beam.Pipeline(options=STREAMING) as p:
        updates = p | "Updates" >> beam.Create([ModelUpdate(beam_models["wide"], 20.0)])
        out, _ = p | steps | StatefulInference(
            model=beam_models["tiny"], num_shards=1, window_size=10.0, model_updates=updates, providers=[CPU],
            postprocess=NextTokenPostprocess(k=2), next_fields=("logprob",))
        g(out, "outputs", stamps=True)
    _update_rows(sorted((pr.seq, t / 1e6, pr.reset, pr.model_version.split("+")[0],
                         pr.outputs["logprob_next"] is None) for pr, t in g["outputs"]))


def _update_rows(rows):
    (s2, t2, _, v2, none2), (s3, _, r3, v3, _) = rows[2], rows[3]
    if not (s2 == 2 and none2 and 20.0 <= t2 < 50.0 and v2 == "tiny-1.0.0"):
        raise AssertionError(f"a's last row before the update: expected out at [20, 50) with no next, got {rows[2]}")
    if not (s3 == 3 and r3 == "model_update" and v3 == "tiny-wide-3"):
        raise AssertionError(f"a's event after the update: expected a 'model_update' restart on tiny-wide, got "
                             f"{rows[3]}")
