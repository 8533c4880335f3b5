"""Build the streamrnn ONNX graph from numpy weights (torch parameter layout).

The graph uses ONNX's native ``LSTM`` / ``GRU`` / ``RNN`` operators, one per
layer, with their ``sequence_lens`` input wired to the graph input
``lengths``. That is what lets one batched call advance many keys by
different numbers of steps: each row's state output is the state after its
own last valid step. ONNX Runtime runs these operators with its fused CPU
kernels and with cuDNN on the CUDA provider. ``torch.onnx`` cannot express
``sequence_lens``, which is why the graph is assembled here; ``export.py``
checks it against torch before anything is written.

:func:`streamrnn.load` (and export, before writing) reads this wiring back from the
nodes: state input ``s`` is sliced per layer into each recurrent node's initial ``s``,
state output ``s_out`` concatenates each layer's final ``s`` in layer order, and
``lengths`` is every node's ``sequence_lens``. A graph built otherwise is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..model.spec import (
    SPEC_KEY,
    InputSpec,
    ModelSpec,
    OutputTensor,
    state_tensors,
)
from ..model.weights import fingerprint, read_initializers

OPSET = 17
# torch gate order -> ONNX gate order, as row blocks of the stacked weights.
_GATE_ORDER = {"lstm": (0, 3, 1, 2), "gru": (1, 0, 2), "rnn": (0,)}
_ONNX_OP = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}


@dataclass
class LayerWeights:
    """One recurrent layer in torch layout: ``w_ih [G*H, in]``, ``w_hh [G*H, H]``, biases ``[G*H]``."""

    w_ih: np.ndarray
    w_hh: np.ndarray
    b_ih: np.ndarray
    b_hh: np.ndarray


@dataclass
class NetWeights:
    """All weights of a stacked recurrent net.

    ``embed`` is ``[vocab, embed_dim]`` for token input (None for features).
    ``head_w [out, hidden]`` / ``head_b [out]`` map the top layer's h to the task output.
    """

    cell: str
    layers: list[LayerWeights]
    head_w: np.ndarray
    head_b: np.ndarray
    embed: np.ndarray | None = None

    @property
    def hidden(self) -> int:
        return self.layers[0].w_hh.shape[1]


def _reorder(w: np.ndarray, cell: str, hidden: int) -> np.ndarray:
    blocks = [w[g * hidden:(g + 1) * hidden] for g in _GATE_ORDER[cell]]
    return np.concatenate(blocks, axis=0).astype(np.float32)


def _const(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(value), name)


def build_model(
    weights: NetWeights,
    *,
    task: str,
    input_spec: InputSpec,
    outputs: tuple[OutputTensor, ...],
    name: str,
    version: str,
    training: dict | None = None,
    metrics: dict | None = None,
) -> tuple[onnx.ModelProto, ModelSpec]:
    """Assemble the ONNX model and its spec.

    ``task="lm"`` emits one output ``logprobs [batch, time, vocab]`` (log-softmax).
    ``task="forecast"`` emits ``mean`` and ``log_scale`` ``[batch, time, targets]``
    of a Gaussian over the next step's targets, in target units.
    """
    cell, L, H = weights.cell, len(weights.layers), weights.hidden
    states = state_tensors(cell, L, H)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(n: str, v: np.ndarray) -> str:
        inits.append(_const(n, v))
        return n

    if input_spec.kind == "tokens":
        x_info = helper.make_tensor_value_info("x", TensorProto.INT64, ["batch", "time"])
        nodes.append(helper.make_node("Gather", [const("embed", weights.embed.astype(np.float32)), "x"], ["emb"]))
        seq_in = "emb"
    else:
        F = input_spec.n_features
        x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "time", F])
        mean = np.asarray(input_spec.mean, np.float32)
        inv_std = (1.0 / np.asarray(input_spec.std, np.float64)).astype(np.float32)
        nodes.append(helper.make_node("Sub", ["x", const("feat_mean", mean)], ["x_c"]))
        nodes.append(helper.make_node("Mul", ["x_c", const("feat_inv_std", inv_std)], ["x_n"]))
        seq_in = "x_n"
    nodes.append(helper.make_node("Transpose", [seq_in], ["seq0"], perm=[1, 0, 2]))  # [T, B, E]

    const("axis0", np.array([0], np.int64))
    const("axis1", np.array([1], np.int64))
    layer_state_out: dict[str, list[str]] = {s.name: [] for s in states}
    cur = "seq0"
    for li, lw in enumerate(weights.layers):
        W = const(f"W{li}", _reorder(lw.w_ih, cell, H)[None])
        R = const(f"R{li}", _reorder(lw.w_hh, cell, H)[None])
        B = const(f"B{li}", np.concatenate([_reorder(lw.b_ih[:, None], cell, H)[:, 0],
                                            _reorder(lw.b_hh[:, None], cell, H)[:, 0]])[None])
        const(f"start{li}", np.array([li], np.int64))
        const(f"end{li}", np.array([li + 1], np.int64))
        init_names = []
        for s in states:
            n = f"{s.name}{li}_in"
            nodes.append(helper.make_node("Slice", [s.name, f"start{li}", f"end{li}", "axis0"], [n]))
            init_names.append(n)
        y = f"y{li}"
        outs = [y] + [f"{s.name}{li}_out" for s in states]
        attrs = {"hidden_size": H}
        if cell == "gru":
            attrs["linear_before_reset"] = 1
        nodes.append(helper.make_node(_ONNX_OP[cell], [cur, W, R, B, "lengths", *init_names], outs, **attrs))
        for s in states:
            layer_state_out[s.name].append(f"{s.name}{li}_out")
        nodes.append(helper.make_node("Squeeze", [y, "axis1"], [f"seq{li + 1}"]))  # [T, B, H]
        cur = f"seq{li + 1}"

    for s in states:
        parts = layer_state_out[s.name]
        if len(parts) == 1:
            nodes.append(helper.make_node("Identity", parts, [s.output]))
        else:
            nodes.append(helper.make_node("Concat", parts, [s.output], axis=0))

    nodes.append(helper.make_node("Transpose", [cur], ["top"], perm=[1, 0, 2]))  # [B, T, H]
    hw = const("head_w", weights.head_w.T.astype(np.float32))
    hb = const("head_b", weights.head_b.astype(np.float32))
    nodes.append(helper.make_node("MatMul", ["top", hw], ["head_mm"]))
    nodes.append(helper.make_node("Add", ["head_mm", hb], ["head"]))
    out_infos = []
    if task == "lm":
        nodes.append(helper.make_node("LogSoftmax", ["head"], ["logprobs"], axis=-1))
        V = weights.head_w.shape[0]
        out_infos.append(helper.make_tensor_value_info("logprobs", TensorProto.FLOAT, ["batch", "time", V]))
    elif task == "forecast":
        K = weights.head_w.shape[0] // 2
        const("split_k", np.array([K, K], np.int64))
        nodes.append(helper.make_node("Split", ["head", "split_k"], ["mean", "log_scale"], axis=-1))
        for n in ("mean", "log_scale"):
            out_infos.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", "time", K]))
    else:
        raise ValueError(f"task: expected 'lm' or 'forecast', got {task!r}")

    graph_inputs = [x_info, helper.make_tensor_value_info("lengths", TensorProto.INT32, ["batch"])]
    graph_outputs = list(out_infos)
    for s in states:
        graph_inputs.append(helper.make_tensor_value_info(s.name, TensorProto.FLOAT, [L, "batch", H]))
        graph_outputs.append(helper.make_tensor_value_info(s.output, TensorProto.FLOAT, [L, "batch", H]))
    graph = helper.make_graph(nodes, name, graph_inputs, graph_outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="streamrnn", producer_version=version)
    model.ir_version = 8
    spec = ModelSpec(
        name=name, version=version, task=task, cell=cell, layers=L, hidden=H,
        input=input_spec, state=states, outputs=outputs,
        fingerprint=fingerprint(read_initializers(model.SerializeToString(), source=name)),
        training=dict(training or {}), metrics=dict(metrics or {}),
    )
    set_spec(model, spec)
    onnx.checker.check_model(model)
    return model, spec


def set_spec(model: onnx.ModelProto, spec: ModelSpec) -> None:
    """Write (or replace) the spec in the model's metadata."""
    keep = [p for p in model.metadata_props if p.key != SPEC_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    helper.set_model_props(model, {**{p.key: p.value for p in keep}, SPEC_KEY: spec.to_json()})
