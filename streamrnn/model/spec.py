"""The model contract: a JSON spec stored in the ONNX file's metadata.

A streamrnn model is one self-describing ONNX file. Its graph has:

* ``x``: int64 ``[batch, time]`` tokens, or float32 ``[batch, time, features]``;
* ``lengths``: int32 ``[batch]``, valid steps per row (rows are right-padded);
* one input per state tensor (``h``, and ``c`` for an LSTM), each
  ``[layers, batch, hidden]`` float32;
* the task outputs for every step (``[batch, time, ...]``);
* one output per state tensor (``h_out``, ``c_out``): the state after each
  row's last valid step.

Everything needed to run and interpret it lives in the metadata key
``streamrnn.model.spec`` as JSON, parsed here into :class:`ModelSpec`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from ..errors import ModelLoadError

SPEC_KEY = "streamrnn.spec"
FORMAT = "streamrnn/1"

Cell = Literal["lstm", "gru", "rnn"]
STATE_NAMES: dict[str, tuple[str, ...]] = {"lstm": ("h", "c"), "gru": ("h",), "rnn": ("h",)}
#: each task's input kind and task outputs: what serving code may rely on once a file loads
TASKS: dict[str, tuple[str, tuple[str, ...]]] = {"lm": ("tokens", ("logprobs",)),
                                                 "forecast": ("features", ("mean", "log_scale"))}
#: spec fields left out of the model fingerprint: the fingerprint itself, labels, and measurements added later
NOT_IN_CONTRACT = ("fingerprint", "weights_sha256", "name", "version", "metrics")


@dataclass(frozen=True)
class StateTensor:
    """One recurrent state tensor: graph input ``name``, graph output ``output``.

    ``shape`` is ``[layers, "batch", hidden]``; the string marks the batch axis.
    """

    name: str
    output: str
    shape: tuple[int | str, ...]
    dtype: str = "float32"

    @property
    def batch_axis(self) -> int:
        return self.shape.index("batch")

    def concrete_shape(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if d == "batch" else int(d) for d in self.shape)


@dataclass(frozen=True)
class OutputTensor:
    """One task output, ``[batch, time, ...]``, and what its values mean."""

    name: str
    shape: tuple[int | str, ...]
    semantics: str
    dtype: str = "float32"


@dataclass(frozen=True)
class InputSpec:
    """The ``x`` input: tokens (``vocab_size``) or features (``n_features`` + normalisation)."""

    kind: Literal["tokens", "features"]
    name: str = "x"
    vocab_size: int | None = None
    encoding: str | None = None
    n_features: int | None = None
    feature_names: tuple[str, ...] = ()
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    @property
    def dtype(self) -> str:
        return "int64" if self.kind == "tokens" else "float32"


@dataclass(frozen=True)
class ModelSpec:
    """Parsed ``streamrnn.model.spec`` metadata of a model file.

    ``fingerprint``: in a file, the sha256 of its weights (:func:`streamrnn.model.weights.fingerprint`).
    :func:`streamrnn.load` checks that, then binds the spec to the model: ``weights_sha256`` takes
    the weights sha256 and ``fingerprint`` becomes the model fingerprint, over the weights, the
    graph's structure and :meth:`contract` (:func:`streamrnn.model.weights.model_fingerprint`), so two
    files that compute different things, or pair state differently, never share a fingerprint.
    """

    name: str
    version: str
    task: str
    cell: Cell
    layers: int
    hidden: int
    input: InputSpec
    state: tuple[StateTensor, ...]
    outputs: tuple[OutputTensor, ...]
    fingerprint: str
    lengths_input: str = "lengths"
    format: str = FORMAT
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    weights_sha256: str = ""  # set by load; empty in a spec read from a file's metadata

    @property
    def state_signature(self) -> tuple[tuple[str, tuple[int | str, ...], str], ...]:
        """What must match for a state to be reusable by another model."""
        return tuple((s.name, s.shape, s.dtype) for s in self.state)

    def output(self, name: str) -> OutputTensor:
        for o in self.outputs:
            if o.name == name:
                return o
        raise KeyError(name)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def contract(self) -> dict[str, Any]:
        """The spec fields the model fingerprint covers: all but the fingerprints, name, version and metrics."""
        return {k: v for k, v in json.loads(self.to_json()).items() if k not in NOT_IN_CONTRACT}

    @classmethod
    def from_json(cls, text: str | bytes, *, source: str = "model") -> ModelSpec:
        """Parse and validate a spec; any defect is a :class:`ModelLoadError` naming the field."""
        try:
            d = json.loads(text)
            if not isinstance(d, dict):
                raise _Bad(f"expected a JSON object, got {type(d).__name__}")
            if d.get("format") != FORMAT:
                raise ModelLoadError(
                    f"{source}: metadata '{SPEC_KEY}' format: expected {FORMAT!r}, got {d.get('format')!r}"
                )
            inp = _obj(d, "input")
            inp = InputSpec(
                **{**inp, "feature_names": tuple(_list(inp, "feature_names")),
                   "mean": tuple(_list(inp, "mean")), "std": tuple(_list(inp, "std"))}
            )
            state = tuple(StateTensor(**{**_as_obj(s, "state[]"), "shape": tuple(_list(s, "shape"))})
                          for s in _list(d, "state"))
            outputs = tuple(OutputTensor(**{**_as_obj(o, "outputs[]"), "shape": tuple(_list(o, "shape"))})
                            for o in _list(d, "outputs"))
            rest = {k: v for k, v in d.items() if k not in ("input", "state", "outputs")}
            spec = cls(input=inp, state=state, outputs=outputs, **rest)
            _validate(spec)
            return spec
        except ModelLoadError:
            raise
        except (_Bad, KeyError, TypeError, ValueError, AttributeError, RecursionError) as e:
            raise ModelLoadError(f"{source}: metadata '{SPEC_KEY}' is not a valid streamrnn spec: {e}") from e


class _Bad(Exception):
    pass


def _as_obj(v: Any, what: str) -> dict:
    if not isinstance(v, dict):
        raise _Bad(f"{what}: expected an object, got {type(v).__name__}")
    return v


def _obj(d: dict, key: str) -> dict:
    if key not in d:
        raise _Bad(f"{key}: expected an object, got nothing")
    return _as_obj(d[key], key)


def _list(d: dict, key: str) -> list:
    v = d.get(key, [])
    if not isinstance(v, list):
        raise _Bad(f"{key}: expected a list, got {type(v).__name__}")
    return v


def _posint(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _validate(s: ModelSpec) -> None:
    """Field types and cross-field consistency (the graph itself is checked at load)."""
    def need(ok: bool, what: str, want: str, got: Any) -> None:
        if not ok:
            raise _Bad(f"{what}: expected {want}, got {got!r}")

    for f in ("name", "version", "task", "fingerprint", "lengths_input", "weights_sha256"):
        need(isinstance(getattr(s, f), str), f, "a string", getattr(s, f))
    need(s.cell in STATE_NAMES, "cell", f"one of {sorted(STATE_NAMES)}", s.cell)
    need(_posint(s.layers), "layers", "an int >= 1", s.layers)
    need(_posint(s.hidden), "hidden", "an int >= 1", s.hidden)
    need(isinstance(s.training, dict) and isinstance(s.metrics, dict), "training/metrics", "objects",
         (type(s.training).__name__, type(s.metrics).__name__))
    i = s.input
    need(i.kind in ("tokens", "features"), "input.kind", "'tokens' or 'features'", i.kind)
    if i.kind == "tokens":
        need(_posint(i.vocab_size), "input.vocab_size", "an int >= 1", i.vocab_size)
    else:
        F = i.n_features
        need(_posint(F), "input.n_features", "an int >= 1", F)
        need(len(i.mean) == F and len(i.std) == F, "input.mean/std", f"{F} values each", (len(i.mean), len(i.std)))
        need(all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (*i.mean, *i.std)),
             "input.mean/std", "numbers", (i.mean, i.std))
        need(all(v > 0 and v != float("inf") for v in i.std), "input.std", "finite values > 0", i.std)
        need(not i.feature_names or len(i.feature_names) == F, "input.feature_names", f"{F} names",
             i.feature_names)
    names = tuple(t.name for t in s.state)
    need(names == STATE_NAMES[s.cell], "state", f"tensors {list(STATE_NAMES[s.cell])} for a {s.cell}", list(names))
    for t in s.state:
        need(t.shape == (s.layers, "batch", s.hidden) and t.dtype == "float32" and isinstance(t.output, str),
             f"state {t.name}", f"float32 [{s.layers}, 'batch', {s.hidden}] with an output name",
             (list(t.shape), t.dtype, t.output))
    need(len(s.outputs) >= 1, "outputs", "at least one", len(s.outputs))
    for o in s.outputs:
        need(isinstance(o.name, str) and len(o.shape) >= 2 and o.shape[:2] == ("batch", "time")
             and all(_posint(d) for d in o.shape[2:]), f"output {o.name}", "shape ['batch', 'time', ints >= 1]",
             list(o.shape))
    _validate_task(s, need)


def _validate_task(s: ModelSpec, need: Callable[[bool, str, str, Any], None]) -> None:
    """The task fixes the input kind and the outputs serving code reads (an 'lm' over features would load and
    fail later with a raw error in whatever reads its vocabulary)."""
    need(s.task in TASKS, "task", f"one of {sorted(TASKS)}", s.task)
    kind, names = TASKS[s.task]
    need(s.input.kind == kind, "input.kind", f"{kind!r} (task {s.task!r})", s.input.kind)
    need(tuple(o.name for o in s.outputs) == names, "outputs", f"{list(names)} (task {s.task!r})",
         [o.name for o in s.outputs])
    if s.task == "lm":
        need(s.outputs[0].shape == ("batch", "time", s.input.vocab_size), "output logprobs",
             f"shape ['batch', 'time', {s.input.vocab_size}] (input.vocab_size)", list(s.outputs[0].shape))
    else:
        need(s.outputs[0].shape == s.outputs[1].shape and len(s.outputs[0].shape) == 3, "output log_scale",
             f"the shape of output mean, {list(s.outputs[0].shape)}", list(s.outputs[1].shape))


def state_tensors(cell: str, layers: int, hidden: int) -> tuple[StateTensor, ...]:
    """The state tensors of a stacked ``cell``: ``[layers, batch, hidden]`` each."""
    return tuple(StateTensor(n, f"{n}_out", (layers, "batch", hidden)) for n in STATE_NAMES[cell])


def describe(spec: ModelSpec) -> str:
    """A human-readable multi-line summary (used by ``streamrnn info``)."""
    inp = spec.input
    if inp.kind == "tokens":
        x = f"x int64 [batch, time] tokens, vocab {inp.vocab_size} ({inp.encoding})"
    else:
        x = f"x float32 [batch, time, {inp.n_features}] features {list(inp.feature_names)}"
    lines = [
        f"model     {spec.name} v{spec.version} ({spec.format})",
        f"task      {spec.task}",
        f"network   {spec.layers}x{spec.hidden} {spec.cell.upper()}",
        f"input     {x}",
        f"lengths   {spec.lengths_input} int32 [batch]",
    ]
    def shape(s: tuple) -> str:
        return "[" + ", ".join(str(d) for d in s) + "]"

    for s in spec.state:
        lines.append(f"state     {s.name} -> {s.output} {s.dtype} {shape(s.shape)}")
    for o in spec.outputs:
        lines.append(f"output    {o.name} {o.dtype} {shape(o.shape)}: {o.semantics}")
    lines.append(f"weights   sha256 {spec.weights_sha256 or spec.fingerprint}")
    if spec.weights_sha256:
        lines.append(f"identity  fingerprint {spec.fingerprint} (weights, graph structure and this spec)")
    for k, v in sorted(spec.training.items()):
        if k == "history":  # long: a JSON list of evaluations; see `streamrnn info --json`
            v = f"{len(json.loads(v)) if isinstance(v, str) else len(v)} evaluations (see --json)"
        lines.append(f"training  {k}: {v}")
    for k, v in sorted(spec.metrics.items()):
        lines.append(f"metric    {k}: {v}")
    return "\n".join(lines)
