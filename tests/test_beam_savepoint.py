"""Rescaling through snapshots: run A on the first part of a stream and save its state, run B on the rest from
it with another shard count; A's and B's outputs together equal one run over the whole stream."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import ClassVar

import apache_beam as beam
import background
import numpy as np
import pytest
import test_beam_transform as tbt
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_stream import TestStream
from apache_beam.transforms.window import TimestampedValue

from streamrnn.beam import Event, NextTokenPostprocess, StatefulInference
from streamrnn.beam.records import END_OF_INPUT
from streamrnn.errors import InputError
from streamrnn.model.runtime import CPU

beam_models = tbt.beam_models  # the session fixture of tiny models
CUT = 100.0


class _Rec(beam.DoFn):
    """Records outputs and dead letters by run name (a class attribute: the runners here run in this process)."""

    seen: ClassVar[dict] = {}

    def __init__(self, name):
        self.name = name

    def process(self, x):
        _Rec.seen.setdefault(self.name, []).append(x)


def _events():
    """Skewed keys over [0, 200) s with idle gaps (TTL 30 s expiries, some across the cut), a reused seq beyond
    the dedupe horizon, and copies of rows of the first part repeated in the second (duplicates across the cut)."""
    rng = np.random.default_rng(7)
    evs = []
    for k in range(8):
        n = int(rng.integers(3, 25))
        ts = np.sort(rng.uniform(0, 200, n))
        if k == 0:
            ts = np.array([10.0, 20.0, 95.0, 97.0, 99.5, 104.0, 120.0])  # a stream across the cut
        if k == 1:
            ts = np.array([5.0, 80.0, 98.0, 140.0])  # expires across the cut (98 + 30 < 140)
        evs += [Event(f"k{k}", float(t), i, int(rng.integers(0, 256))) for i, t in enumerate(ts)]
    evs.append(Event("k0", 160.0, 0, 7))  # seq 0 again, beyond the 45 s horizon: a new row
    late_first = sorted((e for e in evs if CUT - 40 <= e.ts < CUT), key=lambda e: e.ts)
    dups = late_first[::4][:3]  # copies of rows near the cut arriving again after it (within the horizon)
    return evs, dups


def _run(name, events, *, shards, streaming=False, **kw):
    ti = StatefulInference(num_shards=shards, window_size=10.0, ttl=30.0, dedupe_horizon=45.0, providers=[CPU],
                           postprocess=NextTokenPostprocess(2), next_fields=("logprob",), **kw)
    opts = PipelineOptions(["--streaming"] if streaming else [])
    with beam.Pipeline(options=opts) as p:
        if streaming:
            s = TestStream()
            for t0 in range(0, 220, 10):
                s = s.add_elements([TimestampedValue(e, e.ts) for e in events if t0 <= e.ts < t0 + 10])
                s = s.advance_watermark_to(t0 + 10)
            src = p | s.advance_watermark_to(1e6).advance_watermark_to(END_OF_INPUT).advance_watermark_to_infinity()
        else:
            src = p | beam.Create(events)
        out, dead = src | ti
        _ = out | "RecOut" >> beam.ParDo(_Rec(name + "/out"))
        _ = dead | "RecDead" >> beam.ParDo(_Rec(name + "/dead"))
    return _Rec.seen.pop(name + "/out", []), _Rec.seen.pop(name + "/dead", [])


def _by_event(outs):
    got = {}
    for p in outs:
        assert (p.key, p.seq, p.ts) not in got, p
        got[(p.key, p.seq, p.ts)] = p
    return got


@pytest.fixture(scope="module")
def whole(beam_models):
    """One batch run over the whole stream (3 shards): (outputs, dead letters)."""
    evs, dups = _events()
    return _run("whole", evs + dups, shards=3, model=beam_models["tiny"])


@pytest.fixture(scope="module")
def batch_a(beam_models, tmp_path_factory):
    """Run A in batch on the first part (2 shards), saving its state: (outputs, dead letters, the snapshot).
    Tests that change the snapshot change a copy."""
    evs, _ = _events()
    snap = str(tmp_path_factory.mktemp("batch_a") / "snap")
    a_out, a_dead = _run("A", [e for e in evs if e.ts < CUT], shards=2, model=beam_models["tiny"], save_state=snap)
    return a_out, a_dead, snap


@pytest.mark.parametrize("streaming", [False, True], ids=["batch", "streaming-B"])
def test_a_then_b_from_a_snapshot_equals_one_run(beam_models, whole, batch_a, streaming):
    evs, dups = _events()
    model = beam_models["tiny"]
    whole_out, whole_dead = whole
    a_out, a_dead, snap = batch_a
    manifest = json.loads(open(os.path.join(snap, "manifest.json")).read())
    assert manifest["num_shards"] == 2 and len(manifest["shards"]) == 2 and manifest["keys"] > 0
    b_out, b_dead = _run("B", [e for e in evs if e.ts >= CUT] + dups, shards=5, model=model, initial_state=snap,
                         streaming=streaming)
    whole, parts = _by_event(whole_out), _by_event(a_out + b_out)
    assert parts.keys() == whole.keys()
    for ev, w in whole.items():
        g = parts[ev]
        assert (g.pos, g.fresh, g.reset) == (w.pos, w.fresh, w.reset), ev
        for f in ("logprob", "logprob_next"):
            a, b = g.outputs[f], w.outputs[f]
            assert (a is None) == (b is None), (ev, f)
            if a is not None:
                assert np.allclose(a, b, atol=1e-6, equal_nan=True), (ev, f, a, b)
    assert any(p.reset == "expired" and p.ts >= CUT for p in whole_out)  # the scenario has what it claims
    assert sum(p.key == "k0" and p.seq == 0 for p in whole_out) == 2
    dead = sorted((d.key, d.seq, d.kind) for d in a_dead + b_dead)
    assert dead == sorted((d.key, d.seq, d.kind) for d in whole_dead) and len(dead) == 3
    assert {d[2] for d in dead} == {"duplicate"}


def test_a_snapshot_of_another_model_is_refused_in_one_line(beam_models, batch_a, tmp_path):
    snap = batch_a[2]
    with pytest.raises(InputError, match=r"^initial_state: .*expected state shapes") as e:
        StatefulInference(model=beam_models["wide"], initial_state=snap, providers=[CPU])
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match=r"^initial_state: .*expected the weights of model"):
        StatefulInference(model=beam_models["other"], initial_state=snap, providers=[CPU])
    with pytest.raises(InputError, match=r"^initial_state: expected a state snapshot folder"):
        StatefulInference(model=beam_models["tiny"], initial_state=str(tmp_path / "nothing"), providers=[CPU])


def test_the_stateful_step_is_named_for_its_shard_count(beam_models):
    """Runners that restore state by step name (Dataflow --update, Flink savepoints) then refuse to attach state
    written under another num_shards; the shard's own record refuses it too (test_beam_store)."""
    for n in (2, 4):
        p = beam.Pipeline()
        _ = p | beam.Create([Event("a", 1.0, 0, 1)]) | StatefulInference(model=beam_models["tiny"], num_shards=n,
                                                                         providers=[CPU])
        labels = [t.full_label for t in p.transforms_stack[0].parts[-1].parts]
        assert any(lbl.endswith(f"ShardStep[{n} shards]") for lbl in labels), labels


@background.job("next_token save and restore (test_beam_savepoint)", file=__file__)
def _rescale_runs(folder: Path) -> dict:
    """The three job runs of the test below (the tiny model exported first), one after another in a process of
    their own (tests/run_jobs.py), beside the other tests (tests/background.py): the whole file on 3 shards; its
    first half on 2, saving the state; the rest on 5 from that state."""
    rng = np.random.default_rng(3)
    rows = [{"key": f"u{int(rng.zipf(1.6)) % 6}", "ts": round(float(t), 3), "seq": i,
             "text": "".join(chr(int(c)) for c in rng.integers(97, 123, int(rng.integers(1, 6))))}
            for i, t in enumerate(np.sort(rng.uniform(0, 400, 60)))]
    model = str(folder / "tiny.onnx")

    def job(name, part, *extra):
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in part))
        return ("beam_jobs.next_token", ["--input", str(path), "--output", str(folder / name), "--model", model,
                                         "--window", "20", "--ttl", "60", "--quiet", *extra])

    snap = str(folder / "snap")
    return background.run_jobs(folder, {
        "model": ("conftest:export_tiny_lm", [model]),
        "whole": job("whole", rows, "--shards", "3"),
        "a": job("a", [r for r in rows if r["ts"] < 200], "--shards", "2", "--save-state", snap),
        "b": job("b", [r for r in rows if r["ts"] >= 200], "--shards", "5", "--initial-state", snap)}) | {
            "folder": folder}


def test_the_next_token_job_rescales_through_save_and_initial_state():
    """next_token --save-state on the first half with 2 shards, --initial-state on the rest with 5: the
    predictions of both runs are those of one run over the whole file (per byte, <= 1e-6)."""
    import pyarrow.parquet as pq

    runs = background.result("next_token save and restore (test_beam_savepoint)")

    def predictions(name):
        assert runs[name]["rc"] == 0, runs[name]["stderr"][-3000:]
        t = pq.read_table([str(f) for f in (runs["folder"] / name).glob("predictions-*.parquet")])
        return {(r["key"], r["seq"], r["offset"]): (r["logprob"], r["logprob_next"], r["reset"])
                for r in t.to_pylist()}

    assert runs["model"]["rc"] == 0, runs["model"]["stderr"][-3000:]
    whole, a, b = predictions("whole"), predictions("a"), predictions("b")
    assert not a.keys() & b.keys() and {**a, **b}.keys() == whole.keys()
    for k, (lp, nxt, reset) in whole.items():
        glp, gnxt, greset = {**a, **b}[k]
        assert greset == reset, k
        for x, y in ((glp, lp), (gnxt, nxt)):
            assert (x is None) == (y is None) and (x is None or abs(x - y) <= 1e-6), (k, x, y)


def test_a_streaming_run_saves_at_its_drain_and_b_continues_it(beam_models, whole, tmp_path):
    evs, dups = _events()
    model = beam_models["tiny"]
    whole_out, _ = whole
    snap = str(tmp_path / "snap")
    a_out, _ = _run("A", [e for e in evs if e.ts < CUT], shards=2, model=model, save_state=snap, streaming=True)
    b_out, _ = _run("B", [e for e in evs if e.ts >= CUT] + dups, shards=4, model=model, initial_state=snap)
    whole, parts = _by_event(whole_out), _by_event(a_out + b_out)
    assert parts.keys() == whole.keys()
    assert all((parts[e].pos, parts[e].reset) == (w.pos, w.reset) for e, w in whole.items())


def test_a_batch_save_stamps_outputs_as_a_run_without_it(beam_models, tmp_path):
    evs, _ = _events()
    first = [e for e in evs if e.ts < CUT]

    class Stamps(beam.DoFn):
        seen: ClassVar[dict] = {}

        def __init__(self, name):
            self.name = name

        def process(self, p, ts=beam.DoFn.TimestampParam):
            Stamps.seen.setdefault(self.name, {})[(p.key, p.seq)] = ts.micros

    for name, kw in (("plain", {}), ("save", {"save_state": str(tmp_path / "s")})):
        with beam.Pipeline() as p:
            out, _ = p | beam.Create(first) | StatefulInference(model=beam_models["tiny"], num_shards=2,
                                                                window_size=10.0, providers=[CPU], **kw)
            _ = out | beam.ParDo(Stamps(name))
    assert Stamps.seen["save"] == Stamps.seen["plain"]


def test_events_of_windows_the_saved_run_released_are_late_in_the_next(beam_models, tmp_path):
    """B gets k@50 after A applied k up to 90: in one streaming run it would have been late, so it is here."""
    snap = str(tmp_path / "snap")
    a = [Event("k", float(t), i, 3) for i, t in enumerate([10, 30, 90])]
    _run("A", a, shards=1, model=beam_models["tiny"], save_state=snap)
    b_out, b_dead = _run("B", [Event("k", 50.0, 7, 4), Event("k", 90.0, 2, 3), Event("k", 120.0, 8, 5)], shards=2,
                         model=beam_models["tiny"], initial_state=snap)
    assert sorted((d.seq, d.kind) for d in b_dead) == [(2, "duplicate"), (7, "late")]
    assert [(p.seq, p.pos) for p in b_out if p.seq == 8] == [(8, 1)]  # its stream restarted at 90 (TTL 30)


def test_bad_snapshots_and_folders_are_refused_in_one_line(beam_models, batch_a, tmp_path):
    snap = tmp_path / "snap"
    shutil.copytree(batch_a[2], snap)  # (a copy: this test damages it)
    tiny = beam_models["tiny"]

    def refused(match, **kw):
        with pytest.raises(InputError, match=match) as e:
            StatefulInference(model=tiny, providers=[CPU], **kw)
        assert "\n" not in str(e.value)

    refused(r"^StatefulInference: save_state: expected a folder apart from initial_state", initial_state=str(snap),
            save_state=str(snap / "next"))
    refused(r"^StatefulInference: save_state: expected a folder path", save_state="")
    refused(r"^StatefulInference: initial_state: expected a folder path", initial_state="")
    refused(r"^initial_state: .*next_fields: expected \['logprob'\]", initial_state=str(snap))
    ok = {"initial_state": str(snap), "next_fields": ("logprob",), "postprocess": NextTokenPostprocess(2)}
    StatefulInference(model=tiny, providers=[CPU], **ok)
    victim = next(snap.glob("shard-*/ids.arrow"))
    data = victim.read_bytes()
    victim.write_bytes(data[:-3] + b"xyz")  # a save that failed part-way, or a tampered file
    refused(r"^initial_state: .*ids.arrow: expected sha256", **ok)
    victim.unlink()
    refused(r"^initial_state: .*expected .*ids.arrow, got", **ok)


def test_a_snapshot_saved_under_an_updated_model_is_refused_for_the_base_model(beam_models, tmp_path):
    from streamrnn.beam import ModelUpdate

    snap = str(tmp_path / "snap")
    evs = [Event("a", float(t), i, 1) for i, t in enumerate([5, 15, 25, 35])]
    with beam.Pipeline() as p:
        upd = p | "U" >> beam.Create([ModelUpdate(beam_models["wide"], 20.0)])
        _ = p | beam.Create(evs) | StatefulInference(model=beam_models["tiny"], num_shards=1, window_size=10.0,
                                                     providers=[CPU], model_updates=upd, save_state=snap)
    with pytest.raises(InputError, match=r"^initial_state: .*shard 0: expected state under model fingerprint"):
        StatefulInference(model=beam_models["tiny"], providers=[CPU], initial_state=snap)
