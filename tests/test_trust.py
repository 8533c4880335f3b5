"""Trust in files: weights fingerprint, spec vs graph, and only documented error types on bad bytes."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

import streamrnn
from streamrnn import KeyedOperator, ModelLoadError, SnapshotError, StateError
from streamrnn.model.loaded import load
from streamrnn.model.runtime import CPU
from streamrnn.model.spec import ModelSpec


def onnx_fingerprint(path) -> str:
    """The documented definition, computed with the onnx package (independent of streamrnn's reader)."""
    h = hashlib.sha256()
    for t in sorted(onnx.load(str(path)).graph.initializer, key=lambda t: t.name):
        a = numpy_helper.to_array(t)
        h.update(f"{t.name}\0{t.data_type}\0{','.join(map(str, t.dims))}\0".encode())
        h.update(a.astype(a.dtype.newbyteorder("<")).tobytes())
    return h.hexdigest()


def _edit(src, dst, *, spec=None, init=None):
    """Copy a model, editing its spec dict and/or one initializer (name, fn(array) -> array)."""
    from test_model_contract import edited

    def graph(g):
        name, fn = init
        for i, t in enumerate(g.initializer):
            if t.name == name:
                g.initializer[i].CopyFrom(numpy_helper.from_array(fn(numpy_helper.to_array(t)), name))

    return edited(src, dst, spec=spec, graph=graph if init is not None else None)


def test_fingerprint_is_recomputable_from_the_file(nets_and_paths):
    """The weights sha256 the file stores (its spec's ``fingerprint``), kept by load as ``weights_sha256``; the
    bound ``fingerprint`` (weights, graph, contract) is checked in test_model_contract."""
    for path in [p for _, p in nets_and_paths.values()] + [streamrnn.DEFAULT_MODEL]:
        assert load(path, providers=[CPU]).spec.weights_sha256 == onnx_fingerprint(path)


def test_changed_weights_are_refused_at_load(lstm_path, tmp_path):
    """+5 on head_b kept the old (torch-layout, never checked) fingerprint and loaded silently."""
    bad = _edit(lstm_path, tmp_path / "b.onnx", init=("head_b", lambda a: a + 5))
    with pytest.raises(ModelLoadError, match="weights fingerprint: expected .* got .*changed after export"):
        load(bad, providers=[CPU])
    # a snapshot stays bound to the fingerprint: a re-exported file with other weights is another model
    fixed = _edit(bad, tmp_path / "c.onnx", spec=lambda d: d.update(fingerprint=onnx_fingerprint(bad)))
    op = KeyedOperator(load(lstm_path, providers=[CPU]))
    op.process(["k"], [1])
    with pytest.raises(SnapshotError, match="model: expected a snapshot of"):
        KeyedOperator(load(fixed, providers=[CPU])).restore(op.snapshot())


def _hidden32(d):
    d["hidden"] = 32
    for s in d["state"]:
        s["shape"] = [2, "batch", 32]


@pytest.mark.parametrize(("kind", "edit", "match"), [
    ("tokens", _hidden32, r"graph h shape: expected \[2, batch, 32\] .* got \[2, 'batch', 16\]"),
    ("tokens", lambda d: d["input"].update(vocab_size=1000),
     r"output logprobs: expected shape \['batch', 'time', 1000\] \(input.vocab_size\), got \['batch', 'time', 256\]"),
    ("tokens", lambda d: d["input"].update(vocab_size=1000) or d["outputs"][0].update(shape=["batch", "time", 1000]),
     r"graph output logprobs shape: expected \['batch', 'time', 1000\]"),
    ("tokens", lambda d: d.update(layers=3) or [s.update(shape=[3, "batch", 16]) for s in d["state"]],
     r"graph h shape: expected \[3, batch, 16\]"),
    ("features", lambda d: d["input"].update(n_features=4, mean=[0.0] * 4, std=[1.0] * 4, feature_names=[]),
     r"graph x shape: expected \[batch, time, 4\] .* got \['batch', 'time', 3\]"),
    ("features", lambda d: d["input"].update(std=[1.0, 0.0, 1.0]), r"input.std: expected finite values > 0"),
    ("features", lambda d: [o.update(shape=["batch", "time", 3]) for o in d["outputs"]],
     r"graph output mean shape: expected \['batch', 'time', 3\]"),
])
def test_spec_is_checked_against_the_graph(nets_and_paths, tmp_path, kind, edit, match):
    src = nets_and_paths[("lstm", kind)][1]
    with pytest.raises(ModelLoadError, match=match):
        load(_edit(src, tmp_path / "m.onnx", spec=edit), providers=[CPU])


# -- fuzz: only documented error types --------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_bytes(nets_and_paths):
    return nets_and_paths[("gru", "tokens")][1].read_bytes()


@given(data=st.data())
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_corrupted_model_bytes_raise_model_load_error(model_bytes, tmp_path, data):
    blob = bytearray(model_bytes)
    how = data.draw(st.sampled_from(["flip", "truncate", "splice"]))
    if how == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(blob) - 1))
            blob[i] = data.draw(st.integers(0, 255))
    elif how == "truncate":
        blob = blob[:data.draw(st.integers(0, len(blob) - 1))]
    else:
        i = data.draw(st.integers(0, len(blob)))
        blob[i:i] = data.draw(st.binary(min_size=1, max_size=64))
    p = tmp_path / "fuzz.onnx"
    p.write_bytes(bytes(blob))
    try:
        m = load(p, providers=[CPU])
    except ModelLoadError:
        return
    m.step(np.array([[1, 2]]))  # it loaded: then it must also run (the flip hit something harmless)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                           max_leaves=10)


@given(data=st.data())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_spec_parser_raises_only_model_load_error(lstm, data):
    d = json.loads(lstm.spec.to_json())
    path = []
    node = d
    while isinstance(node, (dict, list)) and node and data.draw(st.booleans()):
        key = data.draw(st.sampled_from(sorted(node) if isinstance(node, dict) else list(range(len(node)))))
        path.append(key)
        if not isinstance(node[key], (dict, list)) or data.draw(st.booleans()):
            break
        node = node[key]
    if path:
        target = d
        for k in path[:-1]:
            target = target[k]
        if data.draw(st.booleans()):
            target[path[-1]] = data.draw(json_values)
        elif isinstance(target, dict):
            del target[path[-1]]
    text = json.dumps(d)
    if data.draw(st.booleans()):
        text = data.draw(st.sampled_from([text[:len(text) // 2], "\udcff", "[]", "1", "null", '{"format": 1}']))
    try:
        ModelSpec.from_json(text)
    except ModelLoadError:
        pass
    try:
        ModelSpec.from_json(data.draw(st.binary(max_size=40)))
    except ModelLoadError:
        pass


def _mutate_column(t: pa.Table, data) -> pa.Table:
    name = data.draw(st.sampled_from(t.column_names))
    i = t.column_names.index(name)
    how = data.draw(st.sampled_from(["drop", "nulls", "type", "width", "bytes"]))
    n = t.num_rows
    if how == "drop":
        return t.remove_column(i)
    if how == "nulls":
        return t.set_column(i, name, pa.nulls(n, t.column(i).type))
    if how == "type":
        return t.set_column(i, name, pa.array([data.draw(st.text(max_size=3)) for _ in range(n)]))
    if how == "width":
        return t.set_column(i, name, pa.array([[1.0] * data.draw(st.integers(0, 3)) for _ in range(n)]))
    return t.set_column(t.column_names.index("key"), "key",
                        pa.array([data.draw(st.binary(max_size=3)) for _ in range(n)], pa.binary()))


@given(data=st.data())
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_restore_of_corrupted_snapshots_raises_only_documented_errors(lstm, data):
    a = KeyedOperator(lstm, keep_last_output=True)
    a.process(["x", "y", b"z", "x"], [1, 2, 3, 4])
    t = a.snapshot()
    if data.draw(st.booleans()):
        t = _mutate_column(t, data)
    else:
        meta = data.draw(st.sampled_from([b"{", b"[]", b'{"format": "streamrnn-snapshot/1"}', b"\xff\xfe",
                                          json.dumps({**json.loads(t.schema.metadata[b"streamrnn.snapshot"]),
                                                      "state": 5}).encode()]))
        t = t.replace_schema_metadata({b"streamrnn.snapshot": meta})
    b = KeyedOperator(lstm, keep_last_output=True)
    b.process(["p"], [9])
    before = b.snapshot()
    try:
        b.restore(t)
    except (SnapshotError, StateError):
        assert b.snapshot().equals(before, check_metadata=True) and b.keys() == ["p"]
