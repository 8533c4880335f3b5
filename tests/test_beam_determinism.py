"""Warm == rebuilt: the same outputs, dead letters and stores whether a worker's shard cache is warm, dropped
on every flush, or a flush failed after any state write and was retried on this worker or another.

The harness (``shard_harness.py``) drives ``ShardStep`` with fake Beam state that rolls a failed bundle
back; after every flush of a warm run it also checks the cached store against ``ShardStore.from_log``
of the shard's log, field by field.
"""

from __future__ import annotations

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pytest
import test_beam_transform as tbt
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_stream import TestStream
from apache_beam.transforms.window import TimestampedValue
from beam_gather import Gather
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from shard_harness import Scenario, runs_in_every_mode

from streamrnn.beam import Event, StatefulInference
from streamrnn.beam.records import END_OF_INPUT
from streamrnn.model.runtime import CPU

beam_models = tbt.beam_models  # the session fixture of tiny models


def _runs(model: str, sc: Scenario, fail_every: int = 3) -> dict[str, dict]:
    """The scenario's results in every mode (:func:`shard_harness.runs_in_every_mode`)."""
    return {m: h.result() for m, h in runs_in_every_mode(model, sc, fail_every=fail_every).items()}


def _assert_same(runs: dict[str, dict]) -> None:
    base = runs["warm"]
    for mode, r in runs.items():
        for part in ("outputs", "dead", "stores", "dropped"):
            assert r[part] == base[part], f"{mode}: {part} differ from the warm run"


def _applied(result, key, seq):
    return [dict(o[:-1]) for o in result["outputs"] if dict(o)["key"] == key and dict(o)["seq"] == seq]


# ---------------------------------------------------------------------------- defect 1: a pruned id
def test_a_seq_reused_after_the_horizon_is_applied_warm_cold_and_retried(lstm_path):
    """Window 10 s, horizon 20 s: (a, 0) at ts 1 is forgotten once other keys move event time past it;
    a's seq 0 again at ts 75 is a new row, applied (pos 1) in every run: not a duplicate after a rebuild."""
    sc = Scenario(steps=[("add", [Event("a", 1.0, 0, 5)]), ("wm", 12.0),
                         ("add", [Event("b", 31.0, 0, 6), Event("c", 45.0, 0, 7)]), ("wm", 50.0),
                         ("add", [Event("b", 61.0, 1, 8)]), ("wm", 70.0),
                         ("add", [Event("a", 75.0, 0, 9)]), ("wm", 90.0)],
                  window=10.0, horizon=20.0, num_shards=1)
    runs = _runs(str(lstm_path), sc, fail_every=2)
    _assert_same(runs)
    got = _applied(runs["warm"], "a", 0)
    assert sorted(r["pos"] for r in got) == [0, 1]
    assert not [d for d in runs["warm"]["dead"] if d[4] == "duplicate"]


def test_the_tombstone_sweep_mark_survives_a_rebuild(lstm_path):
    """ttl 30 s, horizon 25 s: a key that expired comes back; its reset says "expired" whether or not the
    store was rebuilt in between (the sweep that forgets tombstones runs at the same event times)."""
    evs = [("add", [Event("a", 1.0, 0, 1)]), ("wm", 12.0)]
    for i, t in enumerate(range(20, 120, 9)):
        evs += [("add", [Event("b", float(t), i, 2)]), ("wm", float(t + 11))]
    evs += [("add", [Event("a", 60.0, 1, 3)]), ("wm", 200.0)]
    sc = Scenario(steps=evs, window=10.0, ttl=30.0, horizon=25.0, num_shards=1)
    runs = _runs(str(lstm_path), sc, fail_every=2)
    _assert_same(runs)


# ---------------------------------------------------------------------------- defect 7: keys ended by a switch
def test_keys_ended_by_a_model_switch_are_released_once(beam_models):
    """A model update to other state shapes ends a and b; their next rows pair with their next events in
    later windows, never released again (null) by a later flush of a warm worker."""
    steps = [("add", [Event("a", 1.0, 0, 1), Event("b", 2.0, 0, 2)]), ("wm", 11.0),
             ("update", (beam_models["wide"], 15.0)),
             ("add", [Event("a", 16.0, 1, 3), Event("b", 17.0, 1, 4)]), ("wm", 21.0),
             ("add", [Event("a", 26.0, 2, 5), Event("b", 27.0, 2, 6)]), ("wm", 31.0),
             ("add", [Event("a", 36.0, 3, 7)]), ("wm", 41.0),
             ("add", [Event("a", 46.0, 4, 8), Event("b", 47.0, 3, 9)]), ("wm", 51.0)]
    sc = Scenario(steps=steps, window=10.0, num_shards=1, next_fields=("logprob",))
    runs = _runs(beam_models["tiny"], sc)
    _assert_same(runs)
    rows = {(dict(o)["key"], dict(o)["seq"]): dict(o) for o in runs["warm"]["outputs"]}
    assert rows[("a", 0)]["logprob_next"] is None and rows[("a", 1)]["reset"] == "model_update"
    for k, seqs in (("a", [1, 2, 3]), ("b", [1, 2])):  # every row after the switch pairs with its next event
        for s in seqs:
            assert rows[(k, s)]["logprob_next"] is not None, (k, s)


# ---------------------------------------------------------------------------- the property
_KEYS = ["a", "a", "a", "b", "b", "c", "d"]  # skewed


@st.composite
def scenarios(draw):
    window = 10.0
    lateness = draw(st.sampled_from([0.0, 5.0]))
    horizon = draw(st.sampled_from([window + lateness, 25.0, 60.0]))
    ttl = draw(st.sampled_from([None, 12.0, 30.0]))
    steps, wm = [], 0.0
    for _ in range(draw(st.integers(3, 9))):
        evs = []
        for _ in range(draw(st.integers(0, 6))):
            t = round(max(0.0, wm - 15.0) + draw(st.floats(0.0, 40.0)), 6)  # some late, some sub-ms apart
            evs.append(Event(draw(st.sampled_from(_KEYS)), t, draw(st.integers(0, 5)), draw(st.integers(0, 255)),
                             draw(st.integers(0, 1))))
        steps.append(("add", evs))
        if draw(st.integers(0, 9)) == 0:
            steps.append(("update", (draw(st.sampled_from(["other", "wide"])), wm + draw(st.floats(0.0, 30.0)))))
        wm += draw(st.floats(1.0, 25.0))
        steps.append(("wm", wm))
    return Scenario(steps=steps, window=window, lateness=lateness, ttl=ttl, horizon=horizon,
                    num_shards=draw(st.sampled_from([1, 2])),
                    next_fields=draw(st.sampled_from([(), ("logprob",)])))


@given(sc=scenarios(), fail_every=st.integers(1, 5))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
def test_warm_cold_and_retried_runs_agree(beam_models, sc, fail_every):
    sc.steps = [(k, (beam_models[a[0]], a[1]) if k == "update" else a) for k, a in sc.steps]
    _assert_same(_runs(beam_models["tiny"], sc, fail_every))


# ---------------------------------------------------------------------------- defect 2: whole copies
def _block(key, seq, ts, text, event):
    data = text.encode()
    n = len(data)
    return pa.RecordBatch.from_pydict({"key": [key] * n, "ts": [ts] * n, "seq": [seq] * n, "sub": list(range(n)),
                                       "x": list(data), "event": [event] * n})


@pytest.mark.parametrize("order", [0, 1])
def test_two_copies_of_a_row_never_mix(beam_models, order, tmp_path):
    """Copies (a, 0, ts 1.0) "xbc" and "ayz": one whole copy wins ("ayz": its payloads compare smaller), in
    either arrival order; a longer copy adds nothing; the other copy's events are duplicates."""
    copies = [_block("a", 0, 1.0, "xbc", '{"text": "xbc"}'), _block("a", 0, 1.0, "ayzw", '{"text": "ayzw"}')]
    if order:
        copies.reverse()
    g = Gather(tmp_path)
    with beam.Pipeline() as p:
        out, dead = p | beam.Create(copies) | StatefulInference(
            model=beam_models["tiny"], num_shards=1, window_size=10.0, providers=[CPU], output="arrow")
        g(out, "applied")
        g(dead, "dead")
    _expect(sorted(t for b in g["applied"] for t in zip(b.column("sub").to_pylist(), b.column("pos").to_pylist(),
                                                         strict=True)), [(0, 0), (1, 1), (2, 2), (3, 3)])
    _expect(sorted((d.kind, d.sub) for d in g["dead"]), [("duplicate", 0), ("duplicate", 1), ("duplicate", 2)])


def test_the_winning_copy_is_whole(beam_models):
    from streamrnn.beam.step.apply import duplicates
    from streamrnn.beam.step.store import ShardStore
    from streamrnn.model.loaded import load

    store = ShardStore.new(load(beam_models["tiny"], providers=[CPU]), "m", keep_last_output=False)
    t = pa.Table.from_batches([_block("a", 0, 1.0, "xbc", "r1")]).select(["key", "ts", "seq", "sub", "x", "event"])
    u = pa.Table.from_batches([_block("a", 0, 1.0, "ayz", "r2")]).select(t.column_names)
    due = pa.concat_tables([t, u])
    due = due.append_column("_tsu", pa.array([1_000_000] * due.num_rows, pa.int64()))
    dup = duplicates(due, store, horizon=10_000_000)
    kept = bytes(due.filter(pa.array(~dup)).column("x").to_pylist())
    assert kept == b"ayz"


def _expect(got, want):
    assert got == want, (got, want)


# ---------------------------------------------------------------------------- runners agree (defect 1 end to end)
def _reuse_events():
    evs = [Event("a", 1.0, 0, 5)] + [Event("b", 10.0 * i + 1, i, 6) for i in range(1, 9)] + [Event("a", 75.0, 0, 9)]
    return evs


def test_batch_and_streaming_apply_a_reused_seq_alike(beam_models, tmp_path):
    evs = _reuse_events()
    kw = dict(model=beam_models["tiny"], num_shards=1, window_size=10.0, dedupe_horizon=20.0, providers=[CPU])

    def check(got):
        a = sorted((p.seq, p.pos, p.ts) for p in got if p.key == "a")
        assert a == [(0, 0, 1.0), (0, 1, 75.0)], a

    g = Gather(tmp_path)
    with beam.Pipeline() as p:
        out, _ = p | beam.Create(evs) | StatefulInference(**kw)
        g(out, "batch")
    check(g["batch"])
    ts = TestStream()
    for e in sorted(evs, key=lambda e: e.ts):
        ts = ts.add_elements([TimestampedValue(e, e.ts)]).advance_watermark_to(e.ts)
    ts = ts.advance_watermark_to(1e6).advance_watermark_to(END_OF_INPUT).advance_watermark_to_infinity()
    with beam.Pipeline(options=PipelineOptions(["--streaming"])) as p:
        out, _ = p | ts | StatefulInference(**kw)
        g(out, "streaming")
    check(g["streaming"])


def test_output_timestamps_are_the_same_in_batch_and_streaming(beam_models, tmp_path):
    """One rule on every runner: an output is stamped at its window's release rounded up to a whole millisecond
    (1010.0 for window [1000, 1010)), or, held for its next event, when that is known; a key's last row when its
    stream ends (TTL expiry, else the end of the input)."""
    from streamrnn.beam import NextTokenPostprocess

    rng = np.random.default_rng(3)
    evs = [Event(k, float(t), i, int(rng.integers(0, 256))) for k, ts in (("a", [1001, 1004, 1013, 1027]),
                                                                         ("b", [1002, 1055]), ("c", [1003]))
           for i, t in enumerate(ts)]
    configs = {"plain": ((), None), "next": (("logprob",), None), "next-ttl": (("logprob",), 20.0)}
    g = Gather(tmp_path)
    for mode in ("batch", "streaming"):  # one pipeline per runner, a branch per configuration
        with beam.Pipeline(options=PipelineOptions(["--streaming"] if mode == "streaming" else [])) as p:
            if mode == "batch":
                src = p | beam.Create(evs)
            else:
                s = TestStream()
                for t0 in range(1000, 1070, 10):
                    s = s.add_elements([TimestampedValue(e, e.ts) for e in evs if t0 <= e.ts < t0 + 10])
                    s = s.advance_watermark_to(t0 + 10)
                src = p | s.advance_watermark_to(1e6).advance_watermark_to(END_OF_INPUT).advance_watermark_to_infinity()
            for name, (nf, ttl) in configs.items():
                out, _ = src | f"SI[{name}]" >> StatefulInference(
                    model=beam_models["tiny"], num_shards=2, window_size=10.0, providers=[CPU], ttl=ttl,
                    postprocess=NextTokenPostprocess(2) if nf else None, next_fields=nf)
                g(out, f"{name}/{mode}", stamps=True)
    stamps = {(name, mode): sorted(((pr.key, pr.seq), t) for pr, t in g[f"{name}/{mode}"])
              for name in configs for mode in ("batch", "streaming")}
    for name in configs:
        assert stamps[(name, "batch")] == stamps[(name, "streaming")], name
    plain = dict(stamps[("plain", "batch")])
    assert plain[("a", 0)] == 1010_000_000  # the event's window [1000, 1010) releases at 1010.0
    nxt = dict(stamps[("next-ttl", "batch")])
    assert nxt[("a", 3)] == 1050_000_000  # a's last row: its TTL expiry (1027 + 20 is in [1040, 1050))
    assert nxt[("b", 0)] == 1030_000_000  # b's stream ended by TTL before its next event
    assert dict(stamps[("next", "batch")])[("c", 0)] == END_OF_INPUT.micros  # no TTL: the end of the input


@pytest.mark.parametrize("order", [0, 1])
def test_two_copies_of_a_file_row_never_mix(beam_models, tmp_path, order):
    """Through the jobs' reader (no ``event`` column in the file): rows (a, 0, ts 1.0) "xbc" and "ayz" are two
    copies of one row name; one whole copy wins ("ayz") in either order, and the other's three events are
    duplicates whose dead letters give their fields (not the copy id)."""
    import json

    from streamrnn.beam.job.event_files import parse_events

    rows = [{"key": "a", "ts": 1.0, "seq": 0, "text": "xbc"}, {"key": "a", "ts": 1.0, "seq": 0, "text": "ayz"},
            {"key": "a", "ts": 1.0, "seq": 0, "text": "ayz"}]  # and an identical copy
    if order:
        rows.reverse()
    table, dead = parse_events("".join(json.dumps(r) + "\n" for r in rows).encode(), "e.jsonl")
    assert not dead
    g = Gather(tmp_path / "gathered")
    with beam.Pipeline() as p:
        out, dl = p | beam.Create(table.to_batches(max_chunksize=2)) | StatefulInference(
            model=beam_models["tiny"], num_shards=1, window_size=10.0, providers=[CPU], output="arrow")
        g(out, "applied")
        g(dl, "dead")
    _expect(sorted(t for b in g["applied"] for t in zip(b.column("sub").to_pylist(), b.column("pos").to_pylist(),
                                                         strict=True)), [(0, 0), (1, 1), (2, 2)])
    _expect(sorted((d.kind, d.sub, json.loads(d.event)["x"]) for d in g["dead"]),
            sorted(("duplicate", i, b) for i, b in [*enumerate(b"xbc"), *enumerate(b"ayz")]))
