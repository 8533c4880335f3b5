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
``streamrnn.spec`` as JSON, parsed here into :class:`ModelSpec`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from .errors import ModelLoadError

SPEC_KEY = "streamrnn.spec"
FORMAT = "streamrnn/1"

Cell = Literal["lstm", "gru", "rnn"]
STATE_NAMES: dict[str, tuple[str, ...]] = {"lstm": ("h", "c"), "gru": ("h",), "rnn": ("h",)}


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
    """Parsed ``streamrnn.spec`` metadata of a model file."""

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

    @classmethod
    def from_json(cls, text: str, *, source: str = "model") -> ModelSpec:
        try:
            d = json.loads(text)
            if d.get("format") != FORMAT:
                raise ModelLoadError(
                    f"{source}: metadata '{SPEC_KEY}' format: expected {FORMAT!r}, got {d.get('format')!r}"
                )
            inp = d["input"]
            inp = InputSpec(
                **{**inp, "feature_names": tuple(inp.get("feature_names", ())),
                   "mean": tuple(inp.get("mean", ())), "std": tuple(inp.get("std", ()))}
            )
            state = tuple(StateTensor(**{**s, "shape": tuple(s["shape"])}) for s in d["state"])
            outputs = tuple(OutputTensor(**{**o, "shape": tuple(o["shape"])}) for o in d["outputs"])
            rest = {k: v for k, v in d.items() if k not in ("input", "state", "outputs")}
            return cls(input=inp, state=state, outputs=outputs, **rest)
        except ModelLoadError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise ModelLoadError(f"{source}: metadata '{SPEC_KEY}' is not a valid streamrnn spec: {e!r}") from e


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
    lines.append(f"weights   sha256 {spec.fingerprint}")
    for k, v in sorted(spec.training.items()):
        if k == "history":  # long: a JSON list of evaluations; see `streamrnn info --json`
            v = f"{len(json.loads(v)) if isinstance(v, str) else len(v)} evaluations (see --json)"
        lines.append(f"training  {k}: {v}")
    for k, v in sorted(spec.metrics.items()):
        lines.append(f"metric    {k}: {v}")
    return "\n".join(lines)
