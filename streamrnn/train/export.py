"""Export a trained :class:`RecurrentNet` to a self-verifying streamrnn ONNX file.

Export fails (:class:`~streamrnn.errors.ExportError`) unless ONNX Runtime matches
torch within ``tol`` on several (B, T) shapes, running a sequence in chunks with
carried state equals running it whole, and ragged ``lengths`` give each row the
state after its own last step.

The tolerance is absolute for values of magnitude <= 1 and relative above:
``|ort - torch| <= tol * max(1, |torch|)``. A float32 LSTM's cell state ``c`` is
unbounded (|c| reaches 25-100 on random input), and there two float32
implementations, or torch float32 against float64, already differ by more than
1e-5 absolute. The largest absolute difference is recorded in the metadata too.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import torch

from ..errors import ExportError
from ..model.loaded import Model
from ..model.runtime import CPU, create_session
from ..model.spec import SPEC_KEY, InputSpec, ModelSpec, OutputTensor
from ..model.weights import read_graph
from .graph import build_model, set_spec
from .nets import RecurrentNet

VERIFY_SHAPES = ((1, 1), (3, 7), (2, 33), (5, 1))


def _input_spec(net: RecurrentNet, feature_names=(), mean=None, std=None) -> InputSpec:
    c = net.config
    if c.input_kind == "tokens":
        return InputSpec(kind="tokens", vocab_size=c.vocab_size,
                         encoding="utf-8 bytes" if c.vocab_size == 256 else "token ids")
    F = c.n_features
    names = tuple(feature_names) or tuple(f"f{i}" for i in range(F))
    if len(names) != F:
        raise ExportError(f"export: feature_names: expected {F} names, got {len(names)}")
    for what, v in (("mean", mean), ("std", std)):
        if v is not None and np.shape(v) != (F,):
            raise ExportError(f"export: {what}: expected {F} values (one per feature), got shape {list(np.shape(v))}")
    for i, n in enumerate(names):
        m = float(mean[i]) if mean is not None else 0.0
        sd = float(std[i]) if std is not None else 1.0
        if not np.isfinite(m):
            raise ExportError(f"export: mean of feature {n!r}: expected a finite number, got {m}")
        if not (sd > 0 and np.isfinite(sd)):
            raise ExportError(f"export: std of feature {n!r}: expected a finite number > 0 (the graph divides by "
                              f"it; a constant feature carries no signal: drop it), got {sd}")
    return InputSpec(kind="features", n_features=F, feature_names=names,
                     mean=tuple(float(v) for v in (mean if mean is not None else np.zeros(F))),
                     std=tuple(float(v) for v in (std if std is not None else np.ones(F))))


def _outputs(net: RecurrentNet) -> tuple[OutputTensor, ...]:
    c = net.config
    if c.task == "lm":
        return (OutputTensor("logprobs", ("batch", "time", c.vocab_size),
                             "natural-log probability of each token being the NEXT token, given the "
                             "sequence up to and including this step (log-softmax over the vocabulary)"),)
    K = c.n_targets
    return (OutputTensor("mean", ("batch", "time", K), "Gaussian mean of the next step's targets"),
            OutputTensor("log_scale", ("batch", "time", K), "natural log of the Gaussian standard deviation"))


def _torch_ref(net: RecurrentNet, x: np.ndarray, state: tuple[np.ndarray, ...], spec: ModelSpec):
    if spec.input.kind == "features":  # the ONNX graph normalises; the torch net sees normalised input
        x = ((x - np.asarray(spec.input.mean)) / np.asarray(spec.input.std)).astype(np.float32)
    with torch.no_grad():
        xt = torch.from_numpy(x)
        out, new = net(xt, tuple(torch.from_numpy(s) for s in state))
        if spec.task == "lm":
            out = torch.log_softmax(out, dim=-1)
            outs = {"logprobs": out.numpy()}
        else:
            K = net.config.n_targets
            outs = {"mean": out[..., :K].numpy(), "log_scale": out[..., K:].numpy()}
    return outs, tuple(s.numpy() for s in new)


def _sample_x(net: RecurrentNet, rng: np.random.Generator, B: int, T: int) -> np.ndarray:
    c = net.config
    if c.input_kind == "tokens":
        return rng.integers(0, c.vocab_size, (B, T)).astype(np.int64)
    return rng.normal(size=(B, T, c.n_features)).astype(np.float32)


def verify(net: RecurrentNet, model: Model, *, tol: float = 1e-5, seed: int = 0) -> dict[str, float]:
    """Compare ONNX Runtime with torch; raise ExportError past ``tol``. Returns the max abs errors."""
    net.eval()
    rng = np.random.default_rng(seed)
    spec = model.spec
    worst = {"torch_vs_ort": 0.0, "torch_vs_ort_abs": 0.0, "chunked_vs_whole": 0.0, "ragged_lengths": 0.0}

    def check(kind: str, a: np.ndarray, b: np.ndarray, where: str) -> None:
        if not a.size:
            return
        diff = np.abs(a.astype(np.float64) - b)
        err = float(np.max(diff / np.maximum(1.0, np.abs(b))))
        worst[kind] = max(worst[kind], err)
        if kind == "torch_vs_ort":
            worst["torch_vs_ort_abs"] = max(worst["torch_vs_ort_abs"], float(diff.max()))
        if not err <= tol:
            raise ExportError(f"export verification {kind} at {where}: expected |diff| <= {tol} * max(1, |value|), "
                              f"got {err:.3g} (max abs diff {float(diff.max()):.3g})")

    for B, T in VERIFY_SHAPES:
        x = _sample_x(net, rng, B, T)
        st = tuple(rng.normal(scale=0.5, size=s.concrete_shape(B)).astype(np.float32) for s in spec.state)
        ref_out, ref_state = _torch_ref(net, x, st, spec)
        out, new = model.step(x, st)
        for k in ref_out:
            check("torch_vs_ort", out[k], ref_out[k], f"(B={B}, T={T}) output {k}")
        for s, r in zip(new, ref_state, strict=True):
            check("torch_vs_ort", s, r, f"(B={B}, T={T}) state")
    # chunked == whole
    B, T = 2, 40
    x = _sample_x(net, rng, B, T)
    whole, whole_state = model.step(x)
    state, parts = None, []
    t = 0
    for size in (1, 7, 3, 16, 13):
        o, state = model.step(x[:, t:t + size], state)
        parts.append(o)
        t += size
    for k in whole:
        check("chunked_vs_whole", np.concatenate([p[k] for p in parts], axis=1), whole[k], f"output {k}")
    for a, b in zip(state, whole_state, strict=True):
        check("chunked_vs_whole", a, b, "final state")
    # ragged lengths: row i's state equals running its first lengths[i] steps alone
    lengths = np.array([5, 1, 3], np.int32)
    x = _sample_x(net, rng, 3, 5)
    out, st = model.step(x, lengths=lengths)
    for i, n in enumerate(lengths):
        o1, s1 = model.step(x[i:i + 1, :n])
        for k in o1:
            check("ragged_lengths", out[k][i:i + 1, :n], o1[k], f"row {i} output {k}")
        for a, b in zip(st, s1, strict=True):
            check("ragged_lengths", a[:, i:i + 1], b, f"row {i} state")
    return worst


def export(net: RecurrentNet, path: str | os.PathLike, *, name: str, version: str = "1.0.0",
           training: dict | None = None, metrics: dict | None = None, feature_names=(), mean=None, std=None,
           tol: float = 1e-5) -> ModelSpec:
    """Build, verify against torch, and write the ONNX file. Returns its spec."""
    net = net.eval()
    onnx_model, spec = build_model(
        net.net_weights(), task=net.config.task, input_spec=_input_spec(net, feature_names, mean, std),
        outputs=_outputs(net), name=name, version=version, training=training, metrics=metrics)
    blob = onnx_model.SerializeToString()
    # the file's own checks (weights, wiring, normalisation) run on the graph before torch parity
    model = Model(create_session(blob, [CPU], what=f"export of {name}"), spec, source=f"export of {name}",
                  graph=read_graph(blob, source=name))
    worst = verify(net, model, tol=tol)
    spec = replace(spec, metrics={**spec.metrics, **{f"export_parity_{k}": v for k, v in worst.items()}})
    set_spec(onnx_model, spec)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(onnx_model.SerializeToString())
    os.replace(tmp, path)
    return spec


def update_metadata(path: str | os.PathLike, *, metrics: dict | None = None, training: dict | None = None) -> ModelSpec:
    """Add metrics/training facts to an exported model's spec in place."""
    m = onnx.load(os.fspath(path))
    meta = {p.key: p.value for p in m.metadata_props}
    spec = ModelSpec.from_json(meta[SPEC_KEY], source=os.fspath(path))
    spec = replace(spec, metrics={**spec.metrics, **(metrics or {})}, training={**spec.training, **(training or {})})
    set_spec(m, spec)
    onnx.save(m, os.fspath(path))
    return spec
