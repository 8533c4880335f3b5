"""Build the three tiny ONNX graphs that keep keyed state on a device (see :mod:`streamrnn.keyed.device_slab`).

The run-time package carries them serialized (``streamrnn/keyed/_slab_ops.py``) so it needs no
``onnx`` package; ``tests/test_device_slab.py`` rebuilds them here and checks the bytes.
All shapes are dynamic: one set of graphs serves every model.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

F, I64 = TensorProto.FLOAT, TensorProto.INT64


def _model(name: str, nodes, inputs, outputs, inits=()) -> bytes:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=list(inits))
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="streamrnn")
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m.SerializeToString()


def _slab(name: str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, F, ["L", "C", "H"])


def gather_model() -> bytes:
    """``out[:, b] = slab[:, idx[b]] * keep[b]``: the batch's state (``keep=0`` gives a fresh key's zeros)."""
    return _model("slab_gather", [
        helper.make_node("Gather", ["slab", "idx"], ["g"], axis=1),
        helper.make_node("Unsqueeze", ["keep", "axes02"], ["k"]),
        helper.make_node("Mul", ["g", "k"], ["out"]),
    ], [_slab("slab"), helper.make_tensor_value_info("idx", I64, ["B"]),
        helper.make_tensor_value_info("keep", F, ["B"])],
        [helper.make_tensor_value_info("out", F, ["L", "B", "H"])],
        [numpy_helper.from_array(np.array([0, 2], np.int64), "axes02")])


def scatter_model() -> bytes:
    """``out = slab`` with ``out[:, idx[b]] = upd[:, b]`` (a new slab; the input is not modified)."""
    return _model("slab_scatter", [
        helper.make_node("Reshape", ["idx", "shape_1b1"], ["i3"]),
        helper.make_node("Shape", ["upd"], ["us"]),
        helper.make_node("Expand", ["i3", "us"], ["ie"]),
        helper.make_node("ScatterElements", ["slab", "ie", "upd"], ["out"], axis=1),
    ], [_slab("slab"), helper.make_tensor_value_info("idx", I64, ["B"]),
        helper.make_tensor_value_info("upd", F, ["L", "B", "H"])],
        [_slab("out")], [numpy_helper.from_array(np.array([1, -1, 1], np.int64), "shape_1b1")])


def pad_model() -> bytes:
    """``out = slab`` followed by ``pads[4]`` zero columns (growing the capacity; ``pads`` is ``[6]``)."""
    return _model("slab_pad", [helper.make_node("Pad", ["slab", "pads"], ["out"], mode="constant")],
                  [_slab("slab"), helper.make_tensor_value_info("pads", I64, [6])], [_slab("out")])


def source() -> str:
    """The text of ``streamrnn/keyed/_slab_ops.py``."""
    import base64

    lines = ['"""Serialized ONNX graphs for device-resident keyed state; built by streamrnn.train.slab_ops."""',
             "", "import base64", ""]
    for name, fn in (("GATHER", gather_model), ("SCATTER", scatter_model), ("PAD", pad_model)):
        b64 = base64.b64encode(fn()).decode()
        chunks = [b64[i:i + 100] for i in range(0, len(b64), 100)]
        lines.append(f"{name} = base64.b64decode(")
        lines += [f'    "{c}"' for c in chunks]
        lines.append(")")
    return "\n".join(lines) + "\n"
