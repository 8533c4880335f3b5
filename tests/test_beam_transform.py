"""StatefulInference: parity with the offline operator on every runner, ordering, dedupe, dead letters, metrics.

The reference is independent of the pipeline: each key's applied events, sorted by
(ts, seq, sub), run through ``Model.step`` from the initial state in one call.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import apache_beam as beam
import background
import numpy as np
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from beam_gather import Gather
from conftest import export_tiny_lm, make_net
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamrnn import InputError
from streamrnn.beam import NAMESPACE, DeadLetter, Event, NextTokenPostprocess, StatefulInference
from streamrnn.model.loaded import load
from streamrnn.model.runtime import CPU
from streamrnn.train.export import export

RUNNERS = {
    "batch": [],
    "multi_processing": ["--direct_running_mode=multi_processing", "--direct_num_workers=2"],
    "portable": ["--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=LOOPBACK"],
}
TOL = 1e-5


# ---------------------------------------------------------------------------- helpers
_BEAM_MODELS: dict[str, str] = {}


@pytest.fixture(scope="session")
def beam_models(tmp_path_factory):
    """tiny LSTM LM, same-shape other weights, wider (incompatible) LSTM, features forecaster.

    Exported once per test run: pytest makes a session fixture of its own for every module that aliases this
    one (``beam_models = tbt.beam_models``), and each of them returns these files."""
    if not _BEAM_MODELS:
        d = tmp_path_factory.mktemp("beam_models")
        paths = {"tiny": d / "tiny.onnx", "other": d / "other.onnx", "wide": d / "wide.onnx",
                 "feat": d / "feat.onnx"}
        export_tiny_lm([str(paths["tiny"])])
        export(make_net("lstm", seed=1), paths["other"], name="tiny-other", version="2")
        export(make_net("lstm", hidden=24), paths["wide"], name="tiny-wide", version="3")
        export(make_net("lstm", kind="features"), paths["feat"], name="tiny-feat")
        _BEAM_MODELS.update({k: str(v) for k, v in paths.items()})
    return dict(_BEAM_MODELS)


def make_events(rng, n_keys=4, per_key=25, span=600.0, t0=1_000.0):
    """Events of several keys spread over ``span`` seconds (many windows), unique (key, seq)."""
    evs = []
    for k in range(n_keys):
        ts = np.sort(rng.uniform(t0, t0 + span, per_key))
        for i in range(per_key):
            evs.append(Event(f"k{k}", float(ts[i]), i, int(rng.integers(0, 256))))
    return evs


def offline_streams(model, events, segments=None):
    """Each key's events, (ts, seq, sub)-sorted and cut by ``segments``: yields (part, tokens [1, T], logprobs [T, V])
    with every part run alone from the initial state."""
    by_key: dict[str, list] = {}
    for e in events:
        by_key.setdefault(e.key, []).append(e)
    for k, es in by_key.items():
        es.sort(key=lambda e: (e.ts, e.seq, e.sub))
        for part in (segments(k, es) if segments else [es]):
            x = np.array([[e.x for e in part]], np.int64)
            yield part, x, model.step(x)[0]["logprobs"][0]


def offline(model, events, segments=None):
    """{(key, seq, sub): (pos, logprobs)} running each key's events, (ts, seq, sub)-sorted, from zero state."""
    return {(e.key, e.seq, e.sub): (i, lp[i])
            for part, _, lp in offline_streams(model, events, segments) for i, e in enumerate(part)}


def check_outputs(want, *, fresh_reason=None):
    """An assert_that matcher: exactly the expected events, each within TOL of the reference."""

    def _check(preds):
        got = {(p.key, p.seq, p.sub): p for p in preds}
        if len(got) != len(preds):
            raise AssertionError(f"outputs: expected each event once, got {len(preds) - len(got)} repeats")
        if set(got) != set(want):
            raise AssertionError(f"outputs: missing {sorted(set(want) - set(got))[:5]}, "
                                 f"unexpected {sorted(set(got) - set(want))[:5]}")
        for k, (pos, lp) in want.items():
            p = got[k]
            if p.pos != pos:
                raise AssertionError(f"{k}: pos expected {pos}, got {p.pos}")
            err = float(np.max(np.abs(p.outputs["logprobs"] - lp)))
            if not err <= TOL:
                raise AssertionError(f"{k}: logprobs differ from the offline run by {err:.3g}")
            if p.fresh != (pos == 0):
                raise AssertionError(f"{k}: fresh expected {pos == 0}, got {p.fresh}")
            if fresh_reason and p.fresh and p.reset != fresh_reason(p):
                raise AssertionError(f"{k}: reset expected {fresh_reason(p)!r}, got {p.reset!r}")

    return _check


def offline_next(model, events, segments=None):
    """{(key, seq, sub): logprob_next} per key, (ts, seq, sub)-sorted, each stream run from the initial state.

    ``logprob_next`` of event i is the log-prob the model gave, at i, to the byte of event i + 1 of the
    same stream (None for a stream's last event).
    """
    return {(e.key, e.seq, e.sub): float(lp[i, x[0, i + 1]]) if i + 1 < len(part) else None
            for part, x, lp in offline_streams(model, events, segments) for i, e in enumerate(part)}


def check_next(want):
    """Matcher: each event once; ``logprob_next`` equals the offline reference (None where a stream ended)."""

    def _check(preds):
        got = {(p.key, p.seq, p.sub): p.outputs["logprob_next"] for p in preds}
        if len(got) != len(preds) or set(got) != set(want):
            raise AssertionError(f"outputs: expected each of {len(want)} events once, got {len(preds)} rows, "
                                 f"missing {sorted(set(want) - set(got))[:5]}")
        for k, v in want.items():
            g = got[k]
            g = None if g is None else float(g)  # a NaN (e.g. a fresh byte's logprob paired by mistake) fails
            if (v is None) != (g is None) or (v is not None and not abs(g - v) <= TOL):
                raise AssertionError(f"{k}: logprob_next expected {v}, got {g}")

    return _check


def check_dead(want: dict):
    """Matcher: dead letters as a multiset of (key, seq, kind)."""

    def _check(dls):
        got: dict = {}
        for d in dls:
            got[(d.key, d.seq, d.kind)] = got.get((d.key, d.seq, d.kind), 0) + 1
        if got != want:
            raise AssertionError(f"dead letters: expected {want}, got {got}")

    return _check


def counters(result, step: str = "") -> dict[str, int]:
    """The transform's counters, summed over its steps (only those under the label ``step``, if given)."""
    q = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))
    out: dict[str, int] = {}
    for c in q["counters"]:  # one entry per step: sum them
        if c.key.step.startswith(step):
            out[c.key.metric.name] = out.get(c.key.metric.name, 0) + c.committed
    return out


# ---------------------------------------------------------------------------- parity on every runner
def worker_path(monkeypatch):
    """Worker subprocesses (multi_processing) import the tests' helpers (beam_gather) by name."""
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([here, root, os.environ.get("PYTHONPATH", "")]))


def _parity_input(rng):
    """Events of 5 keys, 6 duplicates and 3 invalid events, shuffled; the dead letters they must give."""
    events = make_events(rng, n_keys=5, per_key=30)
    dups = [events[i] for i in rng.choice(len(events), 6, replace=False)]
    bad = [Event("k0", math.nan, 999, 1), Event("k1", 1001.0, 998, 300), Event("", 1002.0, 997, 1)]
    arrived = [*events, *dups, *bad]
    arrived = [arrived[i] for i in rng.permutation(len(arrived))]
    want_dead: dict = {}
    for d in dups:
        want_dead[(d.key, d.seq, "duplicate")] = want_dead.get((d.key, d.seq, "duplicate"), 0) + 1
    want_dead.update({("k0", 999, "invalid"): 1, ("k1", 998, "invalid"): 1, ("", 997, "invalid"): 1})
    return events, dups, arrived, want_dead


def _next_input(rng):
    """Events of 4 keys and a one-event key (its only row has no next), 4 duplicates, shuffled."""
    events = make_events(rng, n_keys=4, per_key=20)
    events.append(Event("solo", 1_100.0, 0, 65))
    dups = [events[i] for i in rng.choice(len(events), 4, replace=False)]
    arrived = [*events, *dups]
    return events, [arrived[i] for i in rng.permutation(len(arrived))]


AT_ONCE = {"batch": (True, False), "multi_processing": (False,), "portable": (False,)}


def _run_runner_cell(runner: str, model: str, folder: Path) -> None:
    """One pipeline on ``runner`` with every check of this file that runs on every runner, each on its own
    input through its own StatefulInference: parity with dedupe and dead letters, and ``logprob_next``
    (flushed at once and held back across windows on the batch runner). Outputs gathered under ``folder``,
    the parity transform's counters in ``folder/counters.json``."""
    g = Gather(folder)
    _, _, parity_in, _ = _parity_input(np.random.default_rng(7))
    _, next_in = _next_input(np.random.default_rng(21))
    p = beam.Pipeline(options=PipelineOptions(RUNNERS[runner]))
    out, dead = p | "ParityIn" >> beam.Create(parity_in, reshuffle=False) | "Parity" >> StatefulInference(
        model=model, num_shards=3, window_size=45.0, providers=[CPU])
    g(out, "parity/outputs")
    g(dead, "parity/dead")
    next_src = p | "NextIn" >> beam.Create(next_in, reshuffle=False)
    for at_once in AT_ONCE[runner]:
        out, _ = next_src | f"Next[{at_once}]" >> StatefulInference(
            model=model, num_shards=2, window_size=45.0, providers=[CPU], postprocess=NextTokenPostprocess(3),
            next_fields=("logprob",), flush_bounded_at_once=at_once, max_steps_per_call=7)
        g(out, f"next[{at_once}]/outputs")
    result = p.run()
    result.wait_until_finish()
    (folder / "counters.json").write_text(json.dumps(counters(result, "Parity/")))


def _run_runner_cells(argv: list[str]) -> int:
    """tests/run_jobs.py's entry, in a process of its own: the tiny model exported into the folder ``argv[0]``,
    then every runner's pipeline, gathered under ``argv[0]/RUNNER``."""
    folder = Path(argv[0])
    export_tiny_lm([str(folder / "tiny.onnx")])
    with pytest.MonkeyPatch.context() as mp:
        worker_path(mp)
        for runner in RUNNERS:
            _run_runner_cell(runner, str(folder / "tiny.onnx"), folder / runner)
    return 0


@background.job("parity x runner matrix", file=__file__)
def _runner_matrix(folder: Path) -> dict:
    """The runners' pipelines, in a process of their own beside the other tests (tests/background.py)."""
    return {**background.run_jobs(folder, {"cells": ("test_beam_transform:_run_runner_cells", [str(folder)])})[
        "cells"], "folder": folder}


@pytest.fixture(scope="module", params=list(RUNNERS))
def runner_run(request):
    """The runner's pipeline: (runner, the model it ran, its gathered outputs, the parity transform's counters)."""
    got = background.result("parity x runner matrix")
    assert got["rc"] == 0, got["stderr"][-4000:]
    folder = got["folder"] / request.param
    return (request.param, str(got["folder"] / "tiny.onnx"), Gather(folder),
            json.loads((folder / "counters.json").read_text()))


def test_parity_dedupe_and_dead_letters_on_every_runner(runner_run):
    runner, model, g, c = runner_run
    events, dups, _, want_dead = _parity_input(np.random.default_rng(7))
    want = offline(load(model, providers=[CPU]), events)
    check_outputs(want, fresh_reason=lambda _p: "new")(g["parity/outputs"])
    check_dead(want_dead)(g["parity/dead"])
    _check_reasons(sorted(d.reason for d in g["parity/dead"] if d.kind == "invalid"))
    if runner == "batch":
        assert c["events_applied"] == len(events)
        assert c["duplicates"] == len(dups) and c["invalid"] == 3 and c["dead_letters"] == len(dups) + 3
        assert c.get("late", 0) == 0 and c["batches"] >= 1


def _check_reasons(rs):
    want = ["key: expected a non-empty string, got str ''",
            "ts: expected finite seconds since the epoch within ±1e+11, got nan",
            "x: expected a token in [0, 256), got 300"]
    if rs != want:
        raise AssertionError(f"reasons: expected {want}, got {rs}")


# ---------------------------------------------------------------------------- hypothesis parity (batch)
@given(seed=st.integers(0, 2**16), n_keys=st.integers(1, 5), per_key=st.integers(1, 30),
       window=st.sampled_from([1.0, 7.0, 60.0, 1e4]), shards=st.integers(1, 4), n_dups=st.integers(0, 8),
       flush_at_once=st.booleans())
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_parity_random_permutations_windows_duplicates(beam_models, tmp_path_factory, seed, n_keys, per_key, window,
                                                        shards, n_dups, flush_at_once):
    rng = np.random.default_rng(seed)
    events = make_events(rng, n_keys=n_keys, per_key=per_key, span=300.0)
    # ties in ts are broken by seq
    if len(events) > 2:
        events[1] = events[1]._replace(ts=events[0].ts) if events[1].key == events[0].key else events[1]
    model = load(beam_models["tiny"], providers=[CPU])
    want = offline(model, events)
    dups = [events[i] for i in rng.integers(0, len(events), n_dups)]
    arrived = [*events, *dups]
    arrived = [arrived[i] for i in rng.permutation(len(arrived))]
    want_dead: dict = {}
    for d in dups:
        want_dead[(d.key, d.seq, "duplicate")] = want_dead.get((d.key, d.seq, "duplicate"), 0) + 1
    g = Gather(tmp_path_factory.mktemp("example"))
    with beam.Pipeline() as p:
        out, dead = p | beam.Create(arrived) | StatefulInference(
            model=beam_models["tiny"], num_shards=shards, window_size=window, providers=[CPU],
            max_steps_per_call=int(rng.integers(1, 40)), max_batch=int(rng.integers(1, 6)),
            flush_bounded_at_once=flush_at_once)
        g(out, "outputs")
        g(dead, "dead")
    check_outputs(want)(g["outputs"])
    check_dead(want_dead)(g["dead"])


# ---------------------------------------------------------------------------- payloads and forms
def test_feature_payload_and_arrow_blocks_in_and_out(beam_models, tmp_path):
    import pyarrow as pa

    rng = np.random.default_rng(3)
    model = load(beam_models["feat"], providers=[CPU])
    keys = ["a", "b", "a", "c", "b", "a", "a"]
    ts = [10.0, 11.0, 70.0, 71.0, 130.0, 131.0, 500.0]
    x = rng.normal(size=(len(keys), 3)).astype(np.float32)
    block = pa.RecordBatch.from_pydict({
        "key": keys, "ts": ts, "seq": list(range(len(keys))),
        "x": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 3)})
    bad = pa.RecordBatch.from_pydict({"key": ["a"], "ts": [9.0], "seq": [99],
                                      "x": pa.array([[1.0, float("nan"), 2.0]], pa.list_(pa.float32()))})
    want = {}
    for k in set(keys):
        idx = [i for i, kk in enumerate(keys) if kk == k]
        out, _ = model.step(x[idx][None])
        for j, i in enumerate(idx):
            want[(k, i)] = (j, out["mean"][0, j], out["log_scale"][0, j])

    def check(batches):
        t = pa.Table.from_batches(batches)
        assert t.num_rows == len(keys)
        for r in t.to_pylist():
            pos, mean, ls = want[(r["key"], r["seq"])]
            assert r["pos"] == pos and r["model_version"].startswith("tiny-feat-1.0.0+")
            np.testing.assert_allclose(r["mean"], mean, atol=TOL)
            np.testing.assert_allclose(r["log_scale"], ls, atol=TOL)

    g = Gather(tmp_path)
    with beam.Pipeline() as p:
        out, dead = p | beam.Create([block, bad]) | StatefulInference(
            model=beam_models["feat"], num_shards=2, window_size=60.0, output="arrow", providers=[CPU])
        g(out, "outputs")
        g(dead, "dead")
    check(g["outputs"])
    _eq([(d.kind, d.reason) for d in g["dead"]], [("invalid", "x: expected 3 finite floats, got [1.0, nan, 2.0]")])


def _eq(got, want):
    if sorted(got) != sorted(want):
        raise AssertionError(f"expected {want}, got {got}")


def test_config_is_keyword_only_and_validated(beam_models):
    with pytest.raises(TypeError):
        StatefulInference(beam_models["tiny"])  # type: ignore[misc]
    for bad in ({"num_shards": 0}, {"window_size": 0}, {"window_size": math.nan}, {"window_size": math.inf},
                {"allowed_lateness": -1}, {"allowed_lateness": math.nan}, {"ttl": 0}, {"ttl": math.nan},
                {"dedupe_horizon": math.inf}, {"output": "pandas"}, {"max_batch": 0}, {"shard_cache_bytes": -1}):
        with pytest.raises(InputError, match=next(iter(bad))):
            StatefulInference(model=beam_models["tiny"], **bad)


def test_dead_letter_is_typed():
    assert DeadLetter._fields == ("key", "ts", "seq", "sub", "kind", "reason", "event")


# ---------------------------------------------------------------------------- logprob_next (pair with next event)
def test_logprob_next_matches_offline(runner_run):
    """at_once (batch): the bounded flush resolves every row; otherwise rows are held back per key across
    windows and the last ones are released by the end-of-input timer."""
    runner, model, g, _ = runner_run
    events, _ = _next_input(np.random.default_rng(21))
    want = offline_next(load(model, providers=[CPU]), events)
    for at_once in AT_ONCE[runner]:
        check_next(want)(g[f"next[{at_once}]/outputs"])


def test_logprob_next_ttl_gaps_in_batch(beam_models, tmp_path):
    rng = np.random.default_rng(4)
    evs = [Event("a", float(t), i, int(rng.integers(0, 256))) for i, t in enumerate([0, 5, 500, 510, 2000])]
    evs += [Event("b", float(t), i, int(rng.integers(0, 256))) for i, t in enumerate([0, 50, 100])]
    want = offline_next(load(beam_models["tiny"], providers=[CPU]), evs,
                        segments=lambda k, es: [es[:2], es[2:4], es[4:]] if k == "a" else [es])
    assert want[("a", 1, 0)] is None and want[("a", 2, 0)] is not None  # a stream ends at each gap
    g = Gather(tmp_path)
    with beam.Pipeline() as p:
        src = p | beam.Create(evs)
        for at_once in (True, False):
            out, _ = src | f"SI[{at_once}]" >> StatefulInference(
                model=beam_models["tiny"], num_shards=1, window_size=20.0, ttl=100.0, providers=[CPU],
                postprocess=NextTokenPostprocess(), next_fields=("logprob",), flush_bounded_at_once=at_once)
            g(out, f"at_once={at_once}")
    for at_once in (True, False):
        check_next(want)(g[f"at_once={at_once}"])
