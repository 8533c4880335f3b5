"""Block output: ``output="arrow"`` exploded with ``outputs.explode`` is exactly ``output="records"``.

One conversion rule (``explode``) turns an output block into per-event ``Prediction``
records; records mode uses it. Checked end to end, in batch and in streaming, with
``Event`` and Arrow input: the same records (field by field, value types included), with
the same timestamps and windows, each event once.
"""

from __future__ import annotations

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pytest
import test_beam_transform as tbt
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_stream import TestStream
from apache_beam.transforms.window import FixedWindows, TimestampedValue
from beam_gather import Gather

from streamrnn.beam import Event, NextTokenPostprocess, Prediction, StatefulInference
from streamrnn.beam.records import END_OF_INPUT
from streamrnn.beam.step.outputs import explode
from streamrnn.model.runtime import CPU

beam_models = tbt.beam_models  # the session fixture of tiny models

WINDOW = 10.0


def _events(rng, *, features: bool, n_keys: int = 5, per_key: int = 14, span: float = 80.0) -> list[Event]:
    evs = []
    for k in range(n_keys):
        ts = np.sort(rng.uniform(1_000.0, 1_000.0 + span, per_key))
        for i in range(per_key):
            x = rng.normal(size=3).round(3).tolist() if features else int(rng.integers(0, 256))
            evs.append(Event(f"k{k}", float(ts[i]), i, x))
    return evs


def _window_blocks(evs: list[Event], *, features: bool) -> list[tuple[float, list[Event], pa.RecordBatch]]:
    """The events per event-time window, in window order: (window start, events, the same as one Arrow block)."""
    by: dict[int, list[Event]] = {}
    for e in evs:
        by.setdefault(int(e.ts // WINDOW), []).append(e)
    out = []
    for w in sorted(by):
        es = by[w]
        x = (pa.array([e.x for e in es], pa.list_(pa.float32(), 3)) if features else pa.array([e.x for e in es]))
        out.append((w * WINDOW, es, pa.RecordBatch.from_pydict({
            "key": [e.key for e in es], "ts": [e.ts for e in es], "seq": [e.seq for e in es], "x": x})))
    return out


def _canon(v):
    """A value as (type, dtype, shape, bytes): exact equality, NaN equal to NaN, no float tolerance."""
    if isinstance(v, (np.ndarray, np.generic)):
        return type(v).__name__, str(v.dtype), v.shape, v.tobytes()
    return type(v).__name__, repr(v)


def _record(p: Prediction, ts: int, window) -> tuple:
    assert type(p) is Prediction
    return (*(_canon(getattr(p, f)) for f in Prediction._fields[:-1]),
            tuple((n, _canon(v)) for n, v in p.outputs.items()), ts, window)


def _run(model: str, evs: list[Event], *, arrow_in: bool, streaming: bool, features: bool, tmp) -> tuple[list, list]:
    """One pipeline, the same input into both output modes: (records rows, exploded block rows)."""
    blocks = _window_blocks(evs, features=features)
    if streaming:
        s = TestStream()
        for w0, es, b in blocks:
            items = [TimestampedValue(b, w0)] if arrow_in else [TimestampedValue(e, e.ts) for e in es]
            s = s.add_elements(items).advance_watermark_to(w0 + WINDOW)
        src = s.advance_watermark_to(END_OF_INPUT).advance_watermark_to_infinity()
    else:
        src = beam.Create([TimestampedValue(b, w0) for w0, _, b in blocks] if arrow_in else
                          [TimestampedValue(e, e.ts) for e in evs])
    kw = {} if features else {"postprocess": NextTokenPostprocess(3), "next_fields": ("logprob", "topk_tokens")}
    g = Gather(tmp)
    opts = PipelineOptions(["--streaming"] if streaming else [])
    with beam.Pipeline(options=opts) as p:
        events = p | src | "UserWindows" >> beam.WindowInto(FixedWindows(30))
        for mode in ("records", "arrow"):
            out, _ = events | f"SI-{mode}" >> StatefulInference(
                model=model, num_shards=2, window_size=WINDOW, output=mode, providers=[CPU], **kw)
            if mode == "arrow":
                g(out, "blocks", windows=True)
                out = out | "Explode" >> beam.FlatMap(explode)
            g(out, mode, windows=True)
    blocks_out = g["blocks"]
    assert blocks_out and all(isinstance(b, pa.RecordBatch) for b, _, _ in blocks_out)
    return [_record(*r) for r in g["records"]], [_record(*r) for r in g["arrow"]]


@pytest.mark.parametrize("streaming", [False, True], ids=["batch", "streaming"])
@pytest.mark.parametrize("arrow_in", [False, True], ids=["events", "arrow"])
def test_exploded_blocks_equal_records(beam_models, tmp_path, streaming, arrow_in):
    """Next-token job configuration: vector columns, NaN, and ``*_next`` columns with nulls (vector too)."""
    evs = _events(np.random.default_rng(3), features=False)
    records, exploded = _run(beam_models["tiny"], evs, arrow_in=arrow_in, streaming=streaming, features=False,
                             tmp=tmp_path)
    assert len(records) == len(evs)
    assert sorted(records) == sorted(exploded)
    ends = [r for r in records if dict(r[8])["topk_tokens_next"] == _canon(None)]
    assert len(ends) == 5  # each key's last event has no next: null in a vector column


def test_exploded_blocks_equal_records_features(beam_models, tmp_path):
    evs = _events(np.random.default_rng(4), features=True)
    records, exploded = _run(beam_models["feat"], evs, arrow_in=True, streaming=False, features=True, tmp=tmp_path)
    assert len(records) == len(evs)
    assert sorted(records) == sorted(exploded)


def test_explode_types_and_nulls():
    vec = pa.FixedSizeListArray.from_arrays(pa.array(np.arange(6, dtype=np.int64)), 2)
    b = pa.RecordBatch.from_pydict({
        "key": ["a", "b", "c"], "ts": [1.0, 2.0, 3.0], "seq": [0, 1, 2], "sub": [0, 0, 0], "pos": [0, 1, 2],
        "fresh": [True, False, False], "reset": ["new", "", ""], "model_version": ["v"] * 3,
        "topk": vec, "lp": pa.array([np.nan, -1.5, -2.0], pa.float32()),
        "lp_next": pa.array([-1.5, None, -3.0], pa.float32()),
        "topk_next": pa.array([[2, 3], None, [4, 5]], pa.list_(pa.int64(), 2))})
    got = list(explode(b))
    assert len(got) == 3
    p = got[0]
    assert tuple(p)[:-1] == ("a", 1.0, 0, 0, 0, True, "new", "v")
    assert list(p.outputs) == ["topk", "lp", "lp_next", "topk_next"]
    assert isinstance(p.outputs["topk"], np.ndarray) and p.outputs["topk"].tolist() == [0, 1]
    assert isinstance(p.outputs["lp"], np.float32) and np.isnan(p.outputs["lp"])
    assert got[1].outputs["lp_next"] is None and got[1].outputs["topk_next"] is None
    assert got[2].outputs["topk_next"].tolist() == [4, 5] and got[0].outputs["lp_next"] == -1.5
    assert type(got[0].outputs["lp_next"]) is np.float32  # a row's value types never depend on the other rows
    # a table of several chunks explodes to the same records
    chunked = list(explode(pa.Table.from_batches([b.slice(0, 1), b.slice(1)])))
    assert [_record(q, 0, 0) for q in chunked] == [_record(q, 0, 0) for q in got]


def test_blocks_is_the_arrow_output_and_explode_is_exported():
    import streamrnn.beam as sb

    assert sb.explode is explode and "explode" in sb.__all__
    inf = StatefulInference(model="exported/charlm.onnx", num_shards=2, window_size=10, output="blocks")
    assert inf.output == "arrow"


def test_shard_step_lists_no_helpers_but_keeps_its_state_and_timers():
    """ShardStep leaves its private helpers out of dir() (Beam introspects every listed method per bundle);
    Beam still finds every state and timer, and no helper declares a DoFn parameter."""
    from apache_beam.runners.common import MethodWrapper
    from apache_beam.transforms import userstate
    from apache_beam.transforms.core import _DoFnParam

    from streamrnn.beam.step import stateful as st

    step = st.ShardStep.__new__(st.ShardStep)
    states, timers = userstate.get_dofn_specs(step)
    assert {s.name for s in states} == {"pending", "log", "ctrl"} and len(timers) == 2
    assert not st._HELPERS & set(dir(step)) and {"process", "on_flush", "on_end"} <= set(dir(step))
    for name in st._HELPERS:
        assert not [d for d in MethodWrapper(step, name).defaults if isinstance(d, _DoFnParam)], name
