"""The model contract is checked against the graph itself (issue 19, items 1-3 and 8).

A file whose spec pairs a state output with the wrong state input, claims a normalisation
the graph does not apply, or labels features as a language model is refused at load; the
fingerprint covers the spec and the graph's structure; an ONNX Runtime failure is a
streamrnn error. The references are the onnx package and raw ONNX Runtime sessions.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import CELLS, make_net
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

import streamrnn
from streamrnn import KeyedOperator, ModelLoadError, SnapshotError, StreamRNNError
from streamrnn.errors import InferenceError
from streamrnn.model.loaded import ORT_ERRORS, Model, load
from streamrnn.model.runtime import CPU, create_session
from streamrnn.model.spec import SPEC_KEY, ModelSpec
from streamrnn.train.export import export

MARKET = "exported/market.onnx"


# -- helpers: an edited copy of a model, and what its graph really does ------------------------------------
def edited(src, dst, *, spec=None, graph=None):
    """Copy ``src`` to ``dst``, editing the spec dict and/or the onnx graph in place."""
    m = onnx.load(str(src))
    if graph is not None:
        graph(m.graph)
    if spec is not None:
        for p in m.metadata_props:
            if p.key == SPEC_KEY:
                d = json.loads(p.value)
                spec(d)
                p.value = json.dumps(d)
    onnx.save(m, str(dst))
    return dst


def spec_dict(path) -> dict:
    return json.loads({p.key: p.value for p in onnx.load(str(path)).metadata_props}[SPEC_KEY])


def stepwise_gap(path, steps: int = 6) -> float:
    """Raw ORT: one whole-sequence call vs one call per step feeding each state output back into the input the
    spec pairs it with. A wrong pairing shows here (and never in a single whole-sequence call)."""
    d = spec_dict(path)
    sess = ort.InferenceSession(str(path), providers=[CPU])
    L, H = d["layers"], d["hidden"]
    rng = np.random.default_rng(0)
    if d["input"]["kind"] == "tokens":
        x = rng.integers(0, d["input"]["vocab_size"], (2, steps)).astype(np.int64)
    else:
        x = rng.normal(size=(2, steps, d["input"]["n_features"])).astype(np.float32)
    names = [o["name"] for o in d["outputs"]]
    zeros = {s["name"]: np.zeros((L, 2, H), np.float32) for s in d["state"]}
    whole = sess.run(names, {"x": x, "lengths": np.full(2, steps, np.int32), **zeros})
    state, parts = zeros, []
    for t in range(steps):
        res = sess.run(names + [s["output"] for s in d["state"]],
                       {"x": x[:, t:t + 1], "lengths": np.full(2, 1, np.int32), **state})
        parts.append(res[:len(names)])
        state = {s["name"]: v for s, v in zip(d["state"], res[len(names):], strict=True)}
    return max(float(np.abs(np.concatenate([p[i] for p in parts], axis=1) - whole[i]).max())
               for i in range(len(names)))


def _node(g, op, output=None, contains=None):
    return next(n for n in g.node if n.op_type == op and (output is None or output in n.output)
                and (contains is None or contains in n.input))


def reverse_concat(g):
    node = _node(g, "Concat", output="h_out")
    node.input[:] = list(reversed(node.input))


def swap_slices(g):
    a, b = _node(g, "Slice", output="h0_in"), _node(g, "Slice", output="h1_in")
    a.input[1:3], b.input[1:3] = list(b.input[1:3]), list(a.input[1:3])


def swap_initial_h_c(g):
    for n in g.node:
        if n.op_type == "LSTM":
            n.input[5], n.input[6] = n.input[6], n.input[5]


def swap_spec_outputs(d):
    d["state"][0]["output"], d["state"][1]["output"] = d["state"][1]["output"], d["state"][0]["output"]


# -- item 1: which state output feeds back into which state input -------------------------------------------
def test_swapped_state_outputs_in_the_spec_are_refused(nets_and_paths, tmp_path):
    """The issue's case: one whole call matches, stepwise differs; the file is now refused at load."""
    src = nets_and_paths[("lstm", "tokens")][1]
    bad = edited(src, tmp_path / "swapped.onnx", spec=swap_spec_outputs)
    assert stepwise_gap(src) < 1e-5 and stepwise_gap(bad) > 1e-2
    with pytest.raises(ModelLoadError) as e:
        load(bad, providers=[CPU])
    assert str(e.value) == (f"{bad}: state h output 'c_out': expected layer 0 Y_h, layer 1 Y_h (the h each layer "
                            "computes, in layer order), got layer 0 Y_c, layer 1 Y_c")


def test_the_shipped_charlm_with_swapped_outputs_is_refused(tmp_path):
    bad = edited(streamrnn.DEFAULT_MODEL, tmp_path / "charlm.onnx", spec=swap_spec_outputs)
    with pytest.raises(ModelLoadError, match=r"state h output 'c_out': expected layer 0 Y_h, layer 1 Y_h .* got "
                                             r"layer 0 Y_c, layer 1 Y_c"):
        load(bad, providers=[CPU])


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize(("mutate", "match"), [
    (reverse_concat, r"state h output 'h_out': expected layer 0 Y_h, layer 1 Y_h .* got layer 1 Y_h, layer 0 Y_h"),
    (swap_slices, r"state h: expected graph input 'h' to give each layer its initial h \(h\[0\], h\[1\]\), "
                  r"got h\[1\], h\[0\]"),
])
def test_miswired_graphs_are_refused_for_every_cell(nets_and_paths, tmp_path, cell, mutate, match):
    """Wiring read from the graph (not the names): each miswiring really changes stepwise results."""
    src = nets_and_paths[(cell, "tokens")][1]
    bad = edited(src, tmp_path / "bad.onnx", graph=mutate)
    assert stepwise_gap(bad) > 1e-3
    with pytest.raises(ModelLoadError, match=match):
        load(bad, providers=[CPU])


def test_lstm_reading_c_as_h_is_refused(nets_and_paths, tmp_path):
    bad = edited(nets_and_paths[("lstm", "features")][1], tmp_path / "bad.onnx", graph=swap_initial_h_c)
    assert stepwise_gap(bad) > 1e-3
    with pytest.raises(ModelLoadError, match=r"state h: expected graph input 'h' to give each layer its initial h "
                                             r"\(h\[0\], h\[1\]\), got c\[0\], c\[1\]"):
        load(bad, providers=[CPU])


def test_unwired_lengths_are_refused(nets_and_paths, tmp_path):
    """Without sequence_lens every row's state is taken after the padded end: ragged batches go wrong."""
    def unwire(g):
        for n in g.node:
            if n.op_type == "GRU":
                n.input[4] = ""
    bad = edited(nets_and_paths[("gru", "tokens")][1], tmp_path / "bad.onnx", graph=unwire)
    with pytest.raises(ModelLoadError, match=r"layer 0 sequence_lens: expected graph input 'lengths' .* got 'none'"):
        load(bad, providers=[CPU])


@given(data=st.data())
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_rewired_graph_is_refused_or_keeps_the_pairing(nets_and_paths, tmp_path, data):
    """Node inputs rewired to other values of the graph (or cut), int attributes changed (axes, perms): load raises
    only ModelLoadError, and a graph it accepts runs stepwise exactly as in one call (the pairing its spec claims
    holds), or fails when run (which Model.step raises as InferenceError)."""
    path = nets_and_paths[data.draw(st.sampled_from(sorted(nets_and_paths)))][1]
    m = onnx.load(str(path))
    g = m.graph
    values = sorted({v for n in g.node for v in (*n.input, *n.output) if v} | {i.name for i in g.input})
    for _ in range(data.draw(st.integers(1, 3))):
        node = data.draw(st.sampled_from(list(g.node)))
        ints = [a for a in node.attribute if a.type in (onnx.AttributeProto.INT, onnx.AttributeProto.INTS)]
        if ints and data.draw(st.booleans()):
            a = data.draw(st.sampled_from(ints))
            if a.type == onnx.AttributeProto.INT:
                a.i = data.draw(st.sampled_from([-1, 0, 1, 2]))
            else:
                a.ints[:] = data.draw(st.permutations(list(a.ints)))
        else:
            i = data.draw(st.integers(0, len(node.input) - 1))
            node.input[i] = data.draw(st.sampled_from(["", *values]))
    bad = tmp_path / "rewired.onnx"
    onnx.save(m, str(bad))
    try:
        load(bad, providers=[CPU])
    except ModelLoadError:
        return
    try:
        gap = stepwise_gap(bad)
    except ORT_ERRORS:  # accepted, but fails when run (Model.step raises InferenceError: tested below)
        return
    assert gap < 1e-4


def _attr(op: str, name: str, value):
    def edit(g):
        for n in g.node:
            if n.op_type == op and (op != "Transpose" or "top" in n.output):
                a = next(a for a in n.attribute if a.name == name)
                if isinstance(value, list):
                    a.ints[:] = value
                else:
                    a.i = value
    return edit


@pytest.mark.parametrize(("edit", "match"), [
    (_attr("Transpose", "perm", [0, 1, 2]),
     r"output logprobs of a probe run \(batch 2, time 3\): expected shape \[2, 3, 256\], got \[3, 2, 256\]"),
    (_attr("LogSoftmax", "axis", 1), r"output logprobs of a probe run: expected log-probabilities over the vocabulary "
                                     r"\(logsumexp 0 over the last axis\), got logsumexp up to"),
])
def test_what_the_graph_returns_is_probed_at_load(lstm_path, tmp_path, edit, match):
    """ORT does not check symbolic axes: time-major outputs, or a softmax over time, loaded and ran before."""
    with pytest.raises(ModelLoadError, match=match):
        load(edited(lstm_path, tmp_path / "p.onnx", graph=edit), providers=[CPU])


@pytest.mark.parametrize("cell", CELLS)
def test_one_layer_models_wire_through_identity(model_dir, cell):
    path = model_dir / f"one_{cell}.onnx"
    export(make_net(cell, layers=1), path, name=f"one-{cell}")
    m = load(path, providers=[CPU])
    assert m.spec.layers == 1 and stepwise_gap(path) < 1e-5


# -- the fingerprint: weights, graph structure and spec contract ---------------------------------------------
def _hex(v):
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, list):
        return [_hex(x) for x in v]
    return v


def reference_fingerprint(path) -> str:
    """The documented definition (streamrnn/model/weights.py), computed with the onnx package alone."""
    m = onnx.load(str(path))
    h = hashlib.sha256()
    for t in sorted(m.graph.initializer, key=lambda t: t.name):
        a = numpy_helper.to_array(t)
        h.update(f"{t.name}\0{t.data_type}\0{','.join(map(str, t.dims))}\0".encode())
        h.update(a.astype(a.dtype.newbyteorder("<")).tobytes())

    def io(v):
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param if d.HasField("dim_param") else None
                for d in v.type.tensor_type.shape.dim]
        return [v.name, v.type.tensor_type.elem_type, dims]

    spec = spec_dict(path)
    doc = {"definition": "streamrnn-model/1", "weights": h.hexdigest(),
           "graph": {"opsets": sorted([o.domain, o.version] for o in m.opset_import),
                     "inputs": [io(v) for v in m.graph.input], "outputs": [io(v) for v in m.graph.output],
                     "nodes": [[n.domain, n.op_type, list(n.input), list(n.output),
                                {a.name: _hex(helper.get_attribute_value(a)) for a in n.attribute}]
                               for n in m.graph.node]},
           "spec": {k: v for k, v in spec.items()
                    if k not in ("fingerprint", "weights_sha256", "name", "version", "metrics")}}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def test_fingerprint_matches_the_documented_definition(nets_and_paths):
    for path in [p for _, p in nets_and_paths.values()] + [streamrnn.DEFAULT_MODEL, MARKET]:
        spec = load(path, providers=[CPU]).spec
        assert spec.fingerprint == reference_fingerprint(path)
        assert spec.weights_sha256 == spec_dict(path)["fingerprint"] != spec.fingerprint


def test_fingerprint_is_the_same_in_another_process():
    """Deterministic: no set or dict order, no hash seed (the Beam launcher and workers compare it)."""
    code = "import streamrnn; print(streamrnn.load(streamrnn.DEFAULT_MODEL, providers='cpu').spec.to_json())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "12345", "PATH": ""}).stdout
    assert ModelSpec.from_json(out) == load(streamrnn.DEFAULT_MODEL, providers=[CPU]).spec


@pytest.mark.parametrize(("edit", "same"), [
    (lambda d: d.update(name="renamed", version="9.9.9"), True),
    (lambda d: d["metrics"].update(bits_per_char=1.23), True),
    (lambda d: d["input"].update(feature_names=["a", "b", "c"]), False),
    (lambda d: d["outputs"][0].update(semantics="something else"), False),
    (lambda d: d["training"].update(note="another claim"), False),
])
def test_fingerprint_covers_the_contract_not_the_labels(nets_and_paths, tmp_path, edit, same):
    src = nets_and_paths[("gru", "features")][1]
    a = load(src, providers=[CPU])
    b = load(edited(src, tmp_path / "e.onnx", spec=edit), providers=[CPU])
    assert b.spec.weights_sha256 == a.spec.weights_sha256
    assert (b.spec.fingerprint == a.spec.fingerprint) is same
    op = KeyedOperator(a)
    op.process(["k"], np.zeros((1, 3), np.float32))
    other = KeyedOperator(b)
    if same:
        assert other.restore(op.snapshot()) == 1
    else:
        with pytest.raises(SnapshotError, match="model: expected a snapshot of"):
            other.restore(op.snapshot())


def test_fingerprint_covers_the_graph_structure(nets_and_paths, tmp_path):
    """Same weights and spec, one node attribute changed (GRU linear_before_reset): another model."""
    src = nets_and_paths[("gru", "tokens")][1]

    def before_reset(g):
        for n in g.node:
            for a in n.attribute:
                if a.name == "linear_before_reset":
                    a.i = 0
    other = edited(src, tmp_path / "g.onnx", graph=before_reset)
    a, b = load(src, providers=[CPU]), load(other, providers=[CPU])
    assert a.spec.weights_sha256 == b.spec.weights_sha256 and a.spec.fingerprint != b.spec.fingerprint
    assert b.spec.fingerprint == reference_fingerprint(other)


def test_a_snapshot_written_before_model_fingerprints_still_restores(lstm, other_lstm_path):
    """Older snapshots carry the weights sha256 as their fingerprint: the same weights restore, others do not."""
    op = KeyedOperator(lstm)
    op.process(["k"], [1])
    t = op.snapshot()
    meta = json.loads(t.schema.metadata[b"streamrnn.snapshot"])
    legacy = t.replace_schema_metadata({b"streamrnn.snapshot": json.dumps(
        {**meta, "fingerprint": lstm.spec.weights_sha256}).encode()})
    assert KeyedOperator(lstm).restore(legacy) == 1
    with pytest.raises(SnapshotError, match="model: expected a snapshot of tiny-other"):
        KeyedOperator(load(other_lstm_path, providers=[CPU])).restore(legacy)


def test_a_loaded_spec_written_back_loads_to_the_same_fingerprint(lstm_path, tmp_path):
    spec = load(lstm_path, providers=[CPU]).spec
    back = edited(lstm_path, tmp_path / "b.onnx", spec=lambda d: d.update(json.loads(spec.to_json())))
    again = load(back, providers=[CPU]).spec
    assert again == spec and ModelSpec.from_json(spec.to_json()) == spec


# -- item 2: one source of truth for the normalisation ------------------------------------------------------
def test_spec_normalisation_that_is_not_the_graphs_is_refused(tmp_path):
    """The issue's case: mean 1000.0 for every feature loaded and `info` showed it; the graph used its own."""
    bad = edited(MARKET, tmp_path / "m.onnx", spec=lambda d: d["input"].update(mean=[1000.0] * 8))
    with pytest.raises(ModelLoadError, match=r"input.mean of feature 'ret': expected 0.03032573 \(what the graph "
                                             r"applies: its feat_mean\), got 1000 in its spec"):
        load(bad, providers=[CPU])


@given(data=st.data())
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_normalisation_in_the_spec_must_be_the_graphs(nets_and_paths, tmp_path, data):
    src = nets_and_paths[("lstm", "features")][1]
    graph = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(src)).graph.initializer}
    d = spec_dict(src)
    np.testing.assert_array_equal(np.float32(d["input"]["mean"]), graph["feat_mean"])  # the reference: the graph
    np.testing.assert_allclose(1.0 / np.asarray(d["input"]["std"]), graph["feat_inv_std"], rtol=1e-7)
    what = data.draw(st.sampled_from(["mean", "std"]))
    f = data.draw(st.integers(0, 2))
    factor = data.draw(st.floats(1e-4, 10.0)) * data.draw(st.sampled_from([1, -1]))

    def edit(d):
        v = d["input"][what]
        v[f] = v[f] * (1 + factor) + (factor if what == "mean" else 0.0)
        if what == "std":
            v[f] = abs(v[f]) + 1e-3
    bad = edited(src, tmp_path / "n.onnx", spec=edit)
    with pytest.raises(ModelLoadError, match=rf"input.{what} of feature 'f{f}': expected .* got .* in its spec"):
        load(bad, providers=[CPU])


# -- item 3: the task fixes the input kind ------------------------------------------------------------------
@pytest.mark.parametrize(("path", "edit", "match"), [
    (MARKET, lambda d: d.update(task="lm"), r"input.kind: expected 'tokens' \(task 'lm'\), got 'features'"),
    ("charlm", lambda d: d.update(task="forecast"), r"input.kind: expected 'features' \(task 'forecast'\), got "
                                                    r"'tokens'"),
    ("charlm", lambda d: d.update(task="translate"), r"task: expected one of \['forecast', 'lm'\], got 'translate'"),
    (MARKET, lambda d: d["outputs"].reverse(), r"outputs: expected \['mean', 'log_scale'\] \(task 'forecast'\)"),
])
def test_task_is_tied_to_the_input_kind(tmp_path, path, edit, match):
    src = streamrnn.DEFAULT_MODEL if path == "charlm" else path
    with pytest.raises(ModelLoadError, match=match):
        load(edited(src, tmp_path / "t.onnx", spec=edit), providers=[CPU])


# -- item 8: ONNX Runtime failures are streamrnn errors -----------------------------------------------------
@pytest.fixture()
def failing_model(lstm_path):
    """A real ORT failure: the graph's embedding has 200 rows while the spec promises 256 tokens.
    (Built as a bench or a caller would, on a session of other bytes, so load's checks do not stop it.)"""
    m = onnx.load(str(lstm_path))
    for i, t in enumerate(m.graph.initializer):
        if t.name == "embed":
            m.graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t)[:200], "embed"))
    spec = load(lstm_path, providers=[CPU]).spec
    return Model(create_session(m.SerializeToString(), [CPU], what="test"), spec, source="truncated")


def test_an_ort_failure_is_an_inference_error(failing_model):
    failing_model.step(np.array([[1, 2]]))  # in range: runs
    with pytest.raises(InferenceError) as e:
        failing_model.step(np.array([[1, 250]]))
    assert isinstance(e.value, StreamRNNError) and isinstance(e.value, RuntimeError)
    msg = str(e.value)
    assert msg.startswith("truncated: run: expected ONNX Runtime to run the model, got ") and "\n" not in msg


def test_an_ort_failure_in_process_changes_nothing(failing_model):
    op = KeyedOperator(failing_model, max_keys=2, keep_last_output=True)
    op.process(["a", "b"], [1, 2])
    before = (op.snapshot(), op.keys(), len(op), op.evictions)
    with pytest.raises(InferenceError, match="expected ONNX Runtime to run the model"):
        op.process(["a", "c"], [3, 250])  # c would evict a key; a would advance
    assert op.snapshot().equals(before[0], check_metadata=True)
    assert (op.keys(), len(op), op.evictions) == before[1:]
