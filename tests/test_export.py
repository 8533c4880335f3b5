"""Export: self-verification fails loudly, metadata is complete, feature normalisation is in the graph."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from conftest import make_net

from streamrnn import ExportError
from streamrnn.model.loaded import load
from streamrnn.model.runtime import CPU
from streamrnn.model.spec import SPEC_KEY, ModelSpec, describe
from streamrnn.train import graph
from streamrnn.train.export import export, update_metadata


def test_wrong_gate_order_fails_export(tmp_path, monkeypatch):
    """A graph that disagrees with torch (here: LSTM gates not reordered) must not be written."""
    monkeypatch.setitem(graph._GATE_ORDER, "lstm", (0, 1, 2, 3))
    with pytest.raises(ExportError, match="export verification torch_vs_ort at .* expected"):
        export(make_net("lstm"), tmp_path / "bad.onnx", name="bad")
    assert not (tmp_path / "bad.onnx").exists()


def test_metadata_is_self_describing(tmp_path):
    path = tmp_path / "m.onnx"
    spec = export(make_net("gru"), path, name="described", version="2.1.0",
                  training={"data_sha256": "abc", "steps": 3}, metrics={"val_loss": 1.5})
    raw = {p.key: p.value for p in onnx.load(str(path)).metadata_props}[SPEC_KEY]
    parsed = ModelSpec.from_json(raw)
    assert parsed == spec
    assert parsed.cell == "gru" and [s.name for s in parsed.state] == ["h"]
    assert parsed.state[0].shape == (2, "batch", 16)
    assert parsed.training["data_sha256"] == "abc" and parsed.metrics["val_loss"] == 1.5
    assert parsed.metrics["export_parity_torch_vs_ort"] <= 1e-5
    assert "NEXT token" in parsed.outputs[0].semantics
    text = describe(parsed)
    assert "2x16 GRU" in text and "v2.1.0" in text
    spec2 = update_metadata(path, metrics={"bits_per_char": 1.9})
    assert load(path, providers=[CPU]).spec.metrics["bits_per_char"] == 1.9 == spec2.metrics["bits_per_char"]
    assert json.loads(parsed.to_json())["format"] == "streamrnn/1"


def test_feature_normalisation_is_part_of_the_model(tmp_path, rng):
    net = make_net("lstm", kind="features")
    mean, std = np.array([10.0, -2.0, 0.5]), np.array([2.0, 0.5, 4.0])
    path = tmp_path / "f.onnx"
    export(net, path, name="feat", feature_names=("ret", "vol", "range"), mean=mean, std=std)
    m = load(path, providers=[CPU])
    assert m.spec.input.feature_names == ("ret", "vol", "range") and m.spec.input.mean == (10.0, -2.0, 0.5)
    x = (rng.normal(size=(2, 5, 3)) * std + mean).astype(np.float32)
    out, _ = m.step(x)
    with torch.no_grad():
        ref, _ = net(torch.from_numpy(((x - mean) / std).astype(np.float32)))
    np.testing.assert_allclose(out["mean"], ref[..., :2].numpy(), atol=1e-5)


@pytest.mark.parametrize(("std", "mean", "match"), [
    ([2.0, 0.0, 4.0], [0.0, 0.0, 0.0], r"std of feature 'vol': expected a finite number > 0 .* got 0.0"),
    ([2.0, 1.0, np.inf], [0.0, 0.0, 0.0], r"std of feature 'range': expected a finite number > 0 .* got inf"),
    ([2.0, 1.0, 1.0], [0.0, np.nan, 0.0], r"mean of feature 'vol': expected a finite number, got nan"),
    ([2.0, 1.0], [0.0, 0.0, 0.0], r"std: expected 3 values \(one per feature\), got shape \[2\]"),
])
def test_export_refuses_unusable_normalisation(tmp_path, std, mean, match):
    """std = 0 became 1/std = inf inside the graph."""
    with pytest.raises(ExportError, match=match):
        export(make_net("lstm", kind="features"), tmp_path / "f.onnx", name="feat",
               feature_names=("ret", "vol", "range"), mean=np.array(mean), std=np.array(std))
    assert not (tmp_path / "f.onnx").exists()
