"""Event-level contract of StatefulInference: termination on float times, ids, keys, which copy wins, huge events.

Regression tests for the defects of issue 6 (each failed on the previous transform).
"""

from __future__ import annotations

import itertools

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pytest
import test_beam_transform as tbt
from beam_gather import Gather
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_beam_transform import check_dead, check_outputs, counters, offline

from streamrnn.beam import Event, StatefulInference
from streamrnn.model.loaded import load
from streamrnn.model.runtime import CPU

beam_models = tbt.beam_models


def ttl_segments(ttl):
    """Cut a key's (ts-sorted) events where the gap to the previous event exceeds ``ttl``."""
    def seg(_k, es):
        parts, cur = [], [es[0]]
        for a, b in itertools.pairwise(es):
            if ttl is not None and b.ts - a.ts > ttl:
                parts.append(cur)
                cur = []
            cur.append(b)
        return [*parts, cur]
    return seg


def _run(events, model, tmp, **kw):
    """StatefulInference over ``events`` on the batch runner: (outputs, dead letters, the pipeline's result)."""
    g = Gather(tmp)
    p = beam.Pipeline()
    out, dead = p | beam.Create(events) | StatefulInference(model=model, providers=[CPU], **kw)
    g(out, "outputs")
    g(dead, "dead")
    result = p.run()
    result.wait_until_finish()
    return g["outputs"], g["dead"], result


# ---------------------------------------------------------------------------- 1: timers on float times terminate
def test_one_event_at_a_sub_millisecond_time_with_a_ttl_ends(beam_models, tmp_path):
    """ts 12.3456 with ttl=60 in batch: the expiry timer fired ~3,000 times and never ended before."""
    ev = Event("a", 12.3456, 0, 7)
    out, _dead, result = _run([ev], beam_models["tiny"], tmp_path, num_shards=1, window_size=60.0, ttl=60.0)
    check_outputs(offline(load(beam_models["tiny"], providers=[CPU]), [ev]))(out)
    assert counters(result)["expired"] == 1


@given(seed=st.integers(0, 2**16), base=st.sampled_from([0.0, 12.3456, 1.7e9 + 0.000123]),
       window=st.sampled_from([0.001, 0.1, 0.25, 1.0, 7.3]), lateness=st.sampled_from([0.0, 0.0004, 0.3, 5.0]),
       ttl=st.sampled_from([None, 0.05, 1.0, 60.0]), at_once=st.booleans(), n_windows=st.integers(1, 12))
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_random_float_times_windows_lateness_ttls_terminate_and_match_offline(
        beam_models, tmp_path_factory, seed, base, window, lateness, ttl, at_once, n_windows):
    rng = np.random.default_rng(seed)
    evs = []
    for k in range(int(rng.integers(1, 4))):
        ts = np.sort(base + rng.uniform(0, window * n_windows, int(rng.integers(1, 12))))
        ts += rng.uniform(0, 1e-4, len(ts))  # sub-millisecond parts
        ts = np.sort(ts)
        evs += [Event(f"k{k}", float(t), i, int(rng.integers(0, 256))) for i, t in enumerate(ts)]
    model = load(beam_models["tiny"], providers=[CPU])
    want = offline(model, evs, segments=ttl_segments(ttl))
    out, dead, _ = _run([evs[i] for i in rng.permutation(len(evs))], beam_models["tiny"],
                        tmp_path_factory.mktemp("example"), num_shards=int(rng.integers(1, 4)), window_size=window,
                        allowed_lateness=lateness, ttl=ttl, flush_bounded_at_once=at_once)
    check_outputs(want)(out)
    check_dead({})(dead)


# ---------------------------------------------------------------------------- 5: Arrow ids
def _block(keys, ts, xs, seq=None):
    cols = {"key": pa.array(keys, pa.string()), "ts": pa.array(ts, pa.float64()), "x": pa.array(xs, pa.int64())}
    if seq is not None:
        cols["seq"] = pa.array(seq, pa.int64())
    return pa.RecordBatch.from_pydict(cols)


def test_arrow_blocks_without_seq_are_dead_letters_not_collisions(beam_models, tmp_path):
    """Two blocks without seq used to collide on the row index (3 of 6 events 'duplicate')."""
    b1 = _block(["a", "a", "b"], [1.0, 2.0, 3.0], [1, 2, 3])
    b2 = _block(["a", "a", "b"], [4.0, 5.0, 6.0], [4, 5, 6])
    out, dead, _ = _run([b1, b2], beam_models["tiny"], tmp_path, num_shards=2)
    _equal(len(out), 0, "outputs")
    _equal(sorted((d.kind, d.reason.split(",")[0]) for d in dead),
           [("invalid", "seq: expected an integer column (a unique id per input row of a key)")] * 6, "dead letters")


def test_arrow_blocks_with_seq_all_apply(beam_models, tmp_path):
    b1 = _block(["a", "a", "b"], [1.0, 2.0, 3.0], [1, 2, 3], seq=[0, 1, 0])
    b2 = _block(["a", "a", "b"], [4.0, 5.0, 6.0], [4, 5, 6], seq=[2, 3, 1])
    evs = [Event(k, t, s, x) for b in (b1, b2) for k, t, s, x in zip(
        *(b.column(c).to_pylist() for c in ("key", "ts", "seq", "x")), strict=True)]
    out, dead, _ = _run([b1, b2], beam_models["tiny"], tmp_path, num_shards=2)
    check_outputs(offline(load(beam_models["tiny"], providers=[CPU]), evs))(out)
    check_dead({})(dead)


def _equal(got, want, what):
    if got != want:
        raise AssertionError(f"{what}: expected {want}, got {got}")


# ---------------------------------------------------------------------------- 8: keys are strings
def test_int_keys_never_merge_with_string_keys(beam_models, tmp_path):
    evs = [Event("123", 1.0, 0, 5), Event(123, 2.0, 1, 6), Event("123", 3.0, 2, 7)]
    arrow_int = pa.RecordBatch.from_pydict({"key": pa.array([123], pa.int64()), "ts": pa.array([4.0]),
                                            "seq": pa.array([3], pa.int64()), "x": pa.array([8], pa.int64())})
    model = load(beam_models["tiny"], providers=[CPU])
    out, dead, _ = _run([*evs, arrow_int], beam_models["tiny"], tmp_path, num_shards=3)
    check_outputs(offline(model, [evs[0], evs[2]]))(out)
    _equal(sorted((d.seq, d.reason) for d in dead), [
        (1, "key: expected a non-empty string, got int 123"),
        (3, "key: expected a string column, got a int64 column")], "dead letters")


# ---------------------------------------------------------------------------- 6: which copy wins
@pytest.mark.parametrize("order", [0, 1])
@pytest.mark.parametrize("at_once", [True, False])
def test_the_copy_with_the_smallest_ts_wins_whatever_arrives_first(beam_models, order, at_once, tmp_path):
    """Two copies of (a, 1) with different ts and payload, in one window: the earlier ts is applied, the other is
    a duplicate, whatever their arrival order. A copy in a later window is a duplicate of the applied one."""
    base = [Event("a", 1.0, 0, 10), Event("a", 30.0, 2, 12)]
    early, late_copy, next_window = Event("a", 2.0, 1, 11), Event("a", 5.0, 1, 99), Event("a", 25.0, 1, 77)
    arrived = [*base, *((early, late_copy) if order == 0 else (late_copy, early)), next_window]
    model = load(beam_models["tiny"], providers=[CPU])
    out, dead, _ = _run(arrived, beam_models["tiny"], tmp_path, num_shards=1, window_size=10.0,
                        flush_bounded_at_once=at_once)
    check_outputs(offline(model, [*base, early]))(out)
    _equal(sorted((d.ts, d.kind) for d in dead), [(5.0, "duplicate"), (25.0, "duplicate")], "dead letters")


# ---------------------------------------------------------------------------- huge and skewed events
def test_a_huge_event_is_long_calls_not_a_step_per_call(beam_models, tmp_path):
    """One key with 3,000 events plus 40 one-event keys: few calls of T <= 256, the same numbers as offline."""
    rng = np.random.default_rng(0)
    evs = [Event("big", 100.0, 0, int(x), i) for i, x in enumerate(rng.integers(0, 256, 3000))]
    evs += [Event(f"s{i}", 100.0 + i, 0, int(rng.integers(0, 256))) for i in range(40)]
    model = load(beam_models["tiny"], providers=[CPU])
    out, _dead, result = _run(evs, beam_models["tiny"], tmp_path, num_shards=1, window_size=60.0,
                              max_steps_per_call=256)
    check_outputs(offline(model, evs))(out)
    c = counters(result)
    assert c["events_applied"] == 3040
    assert c["batches"] <= 3000 // 256 + 2, c["batches"]  # 12 long calls (+1 for the short keys)


# ---------------------------------------------------------------------------- bad rows never fail good ones
def test_rows_that_do_not_fit_are_dead_letters_and_good_rows_still_apply(beam_models, tmp_path):
    block = pa.RecordBatch.from_pydict({
        "key": pa.array(["a", "a"]), "ts": pa.array([1.0, 2.0]), "seq": pa.array([1, 2**63 + 5], pa.uint64()),
        "x": pa.array([3, 2**64 - 1], pa.uint64()), "event": pa.array([b"ok", b"\xff\xfe"], pa.binary())})
    good = [Event("k", 2.0, 1, 5)]
    evs = [block, Event("\ud800", 1.0, 0, 1), Event("k", 1.0, 2**70, 1), *good]
    model = load(beam_models["tiny"], providers=[CPU])
    want = offline(model, [Event("a", 1.0, 1, 3), *good])
    out, dead, _ = _run(evs, beam_models["tiny"], tmp_path, num_shards=2)
    check_outputs(want)(out)
    _equal(sorted(d.reason.split(",")[0] for d in dead), [
        "key: expected valid UTF-8 text", "seq: expected a 64-bit int", "seq: expected a 64-bit int"], "reasons")


@pytest.mark.parametrize("which", ["missing", "features", "ts"])
def test_a_bad_model_update_is_a_dead_letter_and_the_model_stays(beam_models, which, tmp_path):
    from streamrnn.beam import ModelUpdate

    update = {"missing": ModelUpdate(str(tmp_path / "nope.onnx"), 5.0),
              "features": ModelUpdate(beam_models["feat"], 5.0),
              "ts": ModelUpdate(beam_models["other"], 1e13)}[which]
    evs = [Event("a", float(t), i, int(x)) for i, (t, x) in enumerate([(1, 3), (10, 4), (20, 5)])]
    g = Gather(tmp_path / "gathered")
    p = beam.Pipeline()
    updates = p | "Updates" >> beam.Create([update])
    out, dead = p | beam.Create(evs) | StatefulInference(model=beam_models["tiny"], providers=[CPU],
                                                        model_updates=updates, window_size=10.0)
    g(out, "outputs")
    g(dead, "dead")
    p.run().wait_until_finish()
    check_outputs(offline(load(beam_models["tiny"], providers=[CPU]), evs))(g["outputs"])
    want = {"missing": "path: expected a loadable streamrnn model", "features": "model: expected input and outputs",
            "ts": "effective_ts: expected seconds"}[which]
    _equal([(d.kind, d.reason.startswith(want)) for d in g["dead"]], [("invalid", True)], "dead letters")


def test_dedupe_horizon_must_cover_a_window_and_its_lateness(beam_models):
    from streamrnn import InputError

    with pytest.raises(InputError, match="dedupe_horizon: expected seconds >= window_size"):
        StatefulInference(model=beam_models["tiny"], window_size=60, allowed_lateness=30, dedupe_horizon=0)
