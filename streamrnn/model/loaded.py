"""A loaded streamrnn model: ``initial_state`` and a pure ``step``.

>>> import numpy as np, streamrnn
>>> m = streamrnn.load(streamrnn.DEFAULT_MODEL)
>>> state = m.initial_state(batch=2)
>>> out, state = m.step(np.array([[72, 105], [84, 111]]), state)   # B=2, T=2
>>> out["logprobs"].shape
(2, 2, 256)
>>> state["h"].shape == (m.spec.layers, 2, m.spec.hidden)
True
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from functools import partial
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from ..errors import InferenceError, InputError, ModelLoadError, StateError
from . import shipped
from .runtime import CUDA, ProviderArg, SessionConfig, create_session
from .spec import SPEC_KEY, ModelSpec
from .weights import Graph, Initializer, Node, fingerprint, model_fingerprint, read_graph

#: what ONNX Runtime raises from ``run`` (its pybind exception types are plain Exceptions)
ORT_ERRORS: tuple[type[Exception], ...] = (RuntimeError, *(
    c for c in vars(_ort_state).values() if isinstance(c, type) and issubclass(c, Exception)))


def inference_error(source: str, e: Exception) -> InferenceError:
    """An ONNX Runtime failure as the project's error, on one line (the state passed in is unchanged)."""
    msg = " ".join(str(e).split()) or "no message"
    return InferenceError(f"{source}: run: expected ONNX Runtime to run the model, got {type(e).__name__}: {msg}")


class State:
    """Recurrent state of B sequences: one tensor per spec state, ``[layers, B, hidden]``.

    For an LSTM ``state["h"]`` and ``state["c"]``; ``tuple(state)`` gives them in
    spec order. On the CUDA provider the tensors are ``OrtValue``s that stay on the
    device between steps; :meth:`numpy` copies them to the host. A State is never
    modified in place.
    """

    __slots__ = ("_names", "_sig", "_t")

    def __init__(self, tensors: Mapping[str, Any], names: Sequence[str], signature: tuple | None = None):
        self._t = dict(tensors)
        self._names = tuple(names)
        self._sig = signature  # set by a Model once shapes are validated against its spec

    def __getitem__(self, name: str) -> np.ndarray:
        v = self._t[name]
        return v if isinstance(v, np.ndarray) else v.numpy()

    def __iter__(self):
        return (self[n] for n in self._names)

    def __len__(self) -> int:
        return len(self._names)

    def raw(self, name: str) -> Any:
        """The stored tensor, a numpy array or a device ``OrtValue``, without copying."""
        return self._t[name]

    @property
    def names(self) -> tuple[str, ...]:
        return self._names

    @property
    def on_device(self) -> bool:
        return any(not isinstance(v, np.ndarray) for v in self._t.values())

    @property
    def batch(self) -> int:
        v = self._t[self._names[0]]
        return int(v.shape[1] if isinstance(v, np.ndarray) else v.shape()[1])

    def numpy(self) -> State:
        """A host copy (numpy arrays)."""
        return State({n: np.array(self[n]) for n in self._names}, self._names)

    def __repr__(self) -> str:
        where = "device" if self.on_device else "host"
        return f"State({', '.join(self._names)}; batch={self.batch}; {where})"


class Model:
    """A streamrnn ONNX model on an ONNX Runtime session. Create with :func:`load`.

    Thread-safe: ``step`` keeps no state of its own, and ONNX Runtime allows
    concurrent ``run`` calls on one session.
    """

    def __init__(self, session: ort.InferenceSession, spec: ModelSpec, *, source: str = "model",
                 graph: Graph | None = None):
        """``graph`` (the file read by :func:`~streamrnn.model.weights.read_graph`): check the weights and the wiring
        the spec claims against it, and bind ``spec`` to the model (its fingerprint becomes the model
        fingerprint). Without it (a spec already bound, on another session of the same bytes) nothing is
        re-checked."""
        self.session = session
        self.spec = spec
        self.source = source
        self.provider = session.get_providers()[0]
        self.device_id = int(session.get_provider_options().get(CUDA, {}).get("device_id", 0))
        self._state_names = tuple(s.name for s in spec.state)
        self._state_outputs = [s.output for s in spec.state]
        self._task_outputs = [o.name for o in spec.outputs]
        self._output_names = self._task_outputs + self._state_outputs
        self._n_task = len(self._task_outputs)
        self._tokens = spec.input.kind == "tokens"
        self._vocab = spec.input.vocab_size
        self._nfeat = spec.input.n_features
        self._shape_tail = tuple(int(d) for d in spec.state[0].shape[2:])
        self._layers = int(spec.state[0].shape[0])
        self._sig = spec.state_signature
        self._full_lengths: dict[tuple[int, int], np.ndarray] = {}
        self._check_graph()
        if graph is not None:
            weights = self._check_weights(graph.initializers)
            _Wiring(graph, spec, source).check()
            self._check_probe()
            self.spec = replace(spec, weights_sha256=weights,
                                fingerprint=model_fingerprint(weights, graph, spec.contract()))

    def _check_graph(self) -> None:
        want = {"x", self.spec.lengths_input, *self._state_names}
        got = {i.name for i in self.session.get_inputs()}
        if want != got:
            raise ModelLoadError(
                f"{self.source}: graph inputs: expected {sorted(want)} (from its spec), got {sorted(got)}")
        want_out = set(self._output_names)
        got_out = {o.name for o in self.session.get_outputs()}
        if want_out != got_out:
            raise ModelLoadError(f"{self.source}: graph outputs: expected {sorted(want_out)}, got {sorted(got_out)}")
        declared = {i.name: list(i.shape) for i in [*self.session.get_inputs(), *self.session.get_outputs()]}
        for s in self.spec.state:
            for name in (s.name, s.output):
                got = declared[name]
                if len(got) != 3 or got[0] != self._layers or got[2:] != list(self._shape_tail):
                    raise ModelLoadError(f"{self.source}: graph {name} shape: expected "
                                         f"[{self._layers}, batch, {', '.join(map(str, self._shape_tail))}] "
                                         f"(layers, hidden of its spec), got {got}")
        if not self._tokens:
            got = declared["x"]
            if len(got) != 3 or got[2] != self._nfeat:
                raise ModelLoadError(f"{self.source}: graph x shape: expected [batch, time, {self._nfeat}] "
                                     f"(n_features of its spec), got {got}")
        for o in self.spec.outputs:
            got = declared[o.name]
            if got[2:] != list(o.shape[2:]):
                raise ModelLoadError(f"{self.source}: graph output {o.name} shape: expected {list(o.shape)}, "
                                     f"got {got}")

    def _check_probe(self, B: int = 2, T: int = 3) -> None:
        """One tiny run: every output has the shape the spec declares (symbolic axes are not checked by ORT, so a
        graph emitting ``[time, batch, ...]`` would otherwise load and hand back transposed outputs), and an
        ``lm``'s logprobs are log-probabilities over the vocabulary."""
        if self._tokens:
            x = (np.arange(B * T, dtype=np.int64) % self._vocab).reshape(B, T)
        else:
            x = np.linspace(-1.0, 1.0, B * T * self._nfeat, dtype=np.float32).reshape(B, T, self._nfeat)
        try:
            out, state = self.run_unchecked(x, np.full(B, T, np.int32), self.initial_state(B))
        except InferenceError as e:
            raise ModelLoadError(f"{self.source}: a probe run (batch {B}, time {T}, zero state): expected outputs, "
                                 f"got {e}") from e
        got = [(o.name, list(out[o.name].shape), [B, T, *o.shape[2:]]) for o in self.spec.outputs]
        got += [(s.output, list(state[s.name].shape), [self._layers, B, *self._shape_tail]) for s in self.spec.state]
        for name, shape, want in got:
            if shape != want:
                raise ModelLoadError(f"{self.source}: output {name} of a probe run (batch {B}, time {T}): expected "
                                     f"shape {want}, got {shape}")
        if self.spec.task == "lm":
            lp = out["logprobs"].astype(np.float64)
            lse = np.log(np.exp(lp - lp.max(-1, keepdims=True)).sum(-1)) + lp.max(-1)
            if not np.abs(lse).max() < 1e-3:
                raise ModelLoadError(f"{self.source}: output logprobs of a probe run: expected log-probabilities "
                                     f"over the vocabulary (logsumexp 0 over the last axis), got logsumexp up to "
                                     f"{float(np.abs(lse).max()):.3g}")

    def _check_weights(self, inits: Mapping[str, Initializer]) -> str:
        """The weights themselves: fingerprint, and the shapes the spec implies (vocab rows, hidden).
        Returns the weights sha256."""
        got = fingerprint(dict(inits))
        want = self.spec.weights_sha256 or self.spec.fingerprint  # a bound spec written back keeps both
        if got != want:
            raise ModelLoadError(
                f"{self.source}: weights fingerprint: expected {want} (its spec), got {got} "
                "(sha256 of the file's initializers): the weights were changed after export")
        if self._tokens:
            emb = inits.get("embed")
            if emb is None or len(emb.dims) != 2 or emb.dims[0] != self._vocab:
                raise ModelLoadError(f"{self.source}: embedding rows: expected {self._vocab} (vocab_size of its "
                                     f"spec), got {None if emb is None else list(emb.dims)}")
        H = self.spec.hidden
        for li in range(self.spec.layers):
            r = inits.get(f"R{li}")
            if r is None or r.dims[-1:] != (H,):
                raise ModelLoadError(f"{self.source}: layer {li} recurrent weights: expected [1, gates*{H}, {H}] "
                                     f"(hidden of its spec), got {None if r is None else list(r.dims)}")
        return got

    def __repr__(self) -> str:
        s = self.spec
        return f"Model({s.name} v{s.version}: {s.layers}x{s.hidden} {s.cell}, task={s.task}, provider={self.provider})"

    @property
    def on_cuda(self) -> bool:
        return self.provider == CUDA

    # -- state -----------------------------------------------------------------
    def initial_state(self, batch: int = 1) -> State:
        """Zero state for ``batch`` sequences: each tensor ``[layers, batch, hidden]``."""
        if not isinstance(batch, (int, np.integer)) or batch < 1:
            raise InputError(f"initial_state: batch: expected an int >= 1, got {batch!r}")
        z = {n: np.zeros((self._layers, int(batch), *self._shape_tail), np.float32) for n in self._state_names}
        return State(z, self._state_names, self._sig)

    def as_state(self, state: Any, batch: int | None = None) -> State:
        """Validate and wrap ``state`` (a State, a dict by name, or a tuple in spec order)."""
        if isinstance(state, State):
            if state._sig == self._sig and (batch is None or state.batch == batch):
                return state  # made by a model with this state signature: shapes already checked
            tensors = {n: state.raw(n) for n in state.names}
        elif isinstance(state, Mapping):
            tensors = dict(state)
        elif isinstance(state, (tuple, list)):
            if len(state) != len(self._state_names):
                raise StateError(f"{self.source}: state: expected {len(self._state_names)} tensors "
                                 f"{self._state_names}, got {len(state)}")
            tensors = dict(zip(self._state_names, state, strict=True))
        else:
            raise StateError(
                f"{self.source}: state: expected a State, dict or tuple of arrays, got {type(state).__name__}")
        if set(tensors) != set(self._state_names):
            raise StateError(f"{self.source}: state names: expected {list(self._state_names)}, got {sorted(tensors)}")
        out = {}
        for n in self._state_names:
            v = tensors[n]
            if isinstance(v, ort.OrtValue):
                shape, dtype = tuple(v.shape()), v.data_type()
                ok_dtype = dtype == "tensor(float)"
            else:
                v = np.ascontiguousarray(v)
                shape, dtype = v.shape, v.dtype
                ok_dtype = dtype == np.float32
            b = batch if batch is not None else (shape[1] if len(shape) == 3 else -1)
            want = (self._layers, b, *self._shape_tail)
            if tuple(shape) != want:
                raise StateError(f"{self.source}: state '{n}' shape: expected {list(want)} "
                                 f"[layers, batch, hidden], got {list(shape)}")
            if not ok_dtype:
                raise StateError(f"{self.source}: state '{n}' dtype: expected float32, got {dtype}")
            if isinstance(v, np.ndarray) and not np.isfinite(v).all():
                bad = np.argwhere(~np.isfinite(v))[0].tolist()
                raise StateError(f"{self.source}: state '{n}' at {bad}: expected finite values, got {v[tuple(bad)]}")
            out[n] = v
        return State(out, self._state_names, self._sig)

    # -- inputs ----------------------------------------------------------------
    def check_x(self, x: Any) -> np.ndarray:
        """Validate ``x`` and return it as a contiguous int64 ``[B, T]`` / float32 ``[B, T, F]`` array."""
        x = np.asarray(x)
        if self._tokens:
            if x.dtype.kind not in "iu":
                raise InputError(f"{self.source}: x dtype: expected integer tokens, got {x.dtype}")
            if x.ndim != 2:
                raise InputError(f"{self.source}: x rank: expected 2 [batch, time], got shape {list(x.shape)}")
            V = self._vocab
            # small inputs (the latency path): a Python scan beats two numpy reductions
            out_of_vocab = (any(not 0 <= v < V for v in x.ravel().tolist()) if x.size <= 32
                            else bool(x.size) and (x.min() < 0 or x.max() >= V))
            if out_of_vocab:
                bad = x[(x < 0) | (x >= self._vocab)].ravel()[0]
                raise InputError(f"{self.source}: x token: expected 0 <= token < {self._vocab}, got {int(bad)}")
            x = np.ascontiguousarray(x, dtype=np.int64)
        else:
            if x.dtype.kind != "f":
                raise InputError(f"{self.source}: x dtype: expected float features, got {x.dtype}")
            if x.ndim != 3 or x.shape[2] != self._nfeat:
                raise InputError(f"{self.source}: x shape: expected [batch, time, {self._nfeat}], got {list(x.shape)}")
            x = np.ascontiguousarray(x, dtype=np.float32)
            if not np.isfinite(x).all():
                b, t, f = np.argwhere(~np.isfinite(x))[0]
                name = self.spec.input.feature_names[f] if self.spec.input.feature_names else f"#{f}"
                raise InputError(f"{self.source}: x feature {name} at [{b}, {t}]: expected a finite number, "
                                 f"got {x[b, t, f]}")
        if x.shape[0] < 1 or x.shape[1] < 1:
            raise InputError(f"{self.source}: x shape: expected batch >= 1 and time >= 1, got {list(x.shape)}")
        return x

    def _lengths(self, lengths: Any, B: int, T: int) -> np.ndarray:
        if lengths is None:
            full = self._full_lengths.get((B, T))
            if full is None:  # a small read-only cache: the latency path reuses one array per shape
                if len(self._full_lengths) > 64:
                    self._full_lengths.clear()
                full = self._full_lengths[(B, T)] = np.full(B, T, np.int32)
                full.flags.writeable = False
            return full
        lengths = np.asarray(lengths)
        if lengths.shape != (B,) or lengths.dtype.kind not in "iu":
            raise InputError(f"{self.source}: lengths: expected int [{B}], got {lengths.dtype} {list(lengths.shape)}")
        if lengths.min() < 1 or lengths.max() > T:
            raise InputError(f"{self.source}: lengths: expected values in 1..{T}, got "
                             f"{int(lengths.min())}..{int(lengths.max())}")
        return lengths.astype(np.int32, copy=False)

    # -- running ---------------------------------------------------------------
    def step(self, x: Any, state: Any = None, *, lengths: Any = None) -> tuple[dict[str, np.ndarray], State]:
        """Advance B independent sequences by T steps.

        Args:
          x: int tokens ``[B, T]`` or float features ``[B, T, F]``.
          state: the state before ``x`` (``[layers, B, hidden]`` tensors); None means
            :meth:`initial_state`. It is not modified.
          lengths: optional int ``[B]``, valid steps per row (rows right-padded). Each
            row's new state is taken after its own last valid step; outputs past it
            are padding.

        Returns:
          ``(outputs, new_state)``: outputs maps each task output name (e.g.
          ``"logprobs"``) to a ``[B, T, ...]`` array.
        """
        x = self.check_x(x)
        B, T = x.shape[:2]
        st = self.initial_state(B) if state is None else self.as_state(state, B)
        lens = self._lengths(lengths, B, T)
        if self.on_cuda:
            return self._step_iobinding(x, lens, st, device_id=self.device_id)
        return self.run_unchecked(x, lens, st)

    def run_unchecked(self, x: np.ndarray, lengths: np.ndarray, state: State, *,
                      binding: Binding | None = None) -> tuple[dict[str, np.ndarray], State]:
        """``step`` without validation, for callers that validated already (host state only).

        With ``binding`` (:meth:`binding`, made for this call's batch and steps) the inputs are copied into its
        bound buffers and the outputs returned are its buffers: valid until the binding's next run."""
        if binding is not None:
            return binding.run(x, lengths, state)
        feeds = {"x": x, self.spec.lengths_input: lengths}
        for n in self._state_names:
            feeds[n] = state.raw(n)
        try:
            res = self.session.run(self._output_names, feeds)
        except ORT_ERRORS as e:
            raise inference_error(self.source, e) from e
        k = self._n_task
        return dict(zip(self._task_outputs, res)), State(  # noqa: B905 - res has task + state outputs
            dict(zip(self._state_names, res[k:])), self._state_names, self._sig)  # noqa: B905

    def binding(self, batch: int, steps: int) -> Binding:
        """Preallocated, bound inputs and outputs for runs of ``batch`` rows of ``steps`` steps (host only)."""
        return Binding(self, batch, steps)

    def _step_iobinding(self, x: np.ndarray, lengths: np.ndarray, state: State, device: str = "cuda",
                        device_id: int = 0):
        """CUDA path: the state stays on ``device`` as OrtValues; only task outputs come to the host.

        ``device="cpu"`` runs the same binding logic on the CPU provider (used by tests).
        """
        io = self.session.io_binding()
        io.bind_cpu_input("x", x)
        io.bind_cpu_input(self.spec.lengths_input, lengths)
        for n in self._state_names:
            v = state.raw(n)
            if isinstance(v, ort.OrtValue):
                io.bind_ortvalue_input(n, v)
            else:
                io.bind_cpu_input(n, np.ascontiguousarray(v))
        # get_outputs() follows binding order: task outputs first, then state, as indexed below
        for name in self._task_outputs:
            io.bind_output(name, "cpu")
        for out in self._state_outputs:
            io.bind_output(out, device, device_id)
        try:
            self.session.run_with_iobinding(io)
        except ORT_ERRORS as e:
            raise inference_error(self.source, e) from e
        vals = io.get_outputs()
        k = len(self._task_outputs)
        outputs = {n: vals[i].numpy() for i, n in enumerate(self._task_outputs)}
        return outputs, State(dict(zip(self._state_names, vals[k:], strict=True)), self._state_names, self._sig)


class Binding:
    """One (B, T) shape's inputs and outputs in numpy buffers bound to the session once (an ONNX Runtime
    ``IOBinding``): a run copies its inputs into the bound buffers and ONNX Runtime writes the outputs into
    the others, so no feed dict, no per-call conversion of inputs and no output allocation (at B = 1, T = 1
    on a 2-core machine ~80 us less than ``session.run`` on the same arrays, of ~300 us).

    The outputs (:attr:`outputs`, :attr:`state`) are the binding's own buffers: a caller copies what it keeps
    before the next run. One user at a time (the caller locks); host sessions only. A failed run leaves the
    output buffers undefined and raises :class:`~streamrnn.errors.InferenceError`.
    """

    __slots__ = ("_io", "_model", "_run", "_state_in", "lengths", "outputs", "shape", "state", "x")

    def __init__(self, model: Model, batch: int, steps: int):
        spec, sess = model.spec, model.session
        B, T = int(batch), int(steps)
        self._model, self.shape = model, (B, T)
        self.x = (np.zeros((B, T), np.int64) if model._tokens else np.zeros((B, T, model._nfeat), np.float32))
        self.lengths = np.full(B, T, np.int32)
        self._state_in = {n: a for n, a in model.initial_state(B)._t.items()}
        self.outputs = {o.name: np.zeros((B, T, *(int(d) for d in o.shape[2:])), np.float32) for o in spec.outputs}
        state_out = {n: np.zeros_like(a) for n, a in self._state_in.items()}
        self.state = State(state_out, model._state_names, model._sig)
        io = self._io = sess.io_binding()
        for name, a in (("x", self.x), (spec.lengths_input, self.lengths), *self._state_in.items()):
            io.bind_input(name, "cpu", 0, a.dtype, list(a.shape), a.ctypes.data)
        for name, a in (*self.outputs.items(), *zip(model._state_outputs, state_out.values(), strict=True)):
            io.bind_output(name, "cpu", 0, a.dtype, list(a.shape), a.ctypes.data)
        inner, raw = getattr(sess, "_sess", None), getattr(io, "_iobinding", None)
        if hasattr(inner, "run_with_iobinding") and raw is not None:
            # the pybind call itself: InferenceSession.run_with_iobinding adds a WebGPU graph-capture check
            # (a host binding never captures) that costs ~190 us with run options and ~25 us without
            self._run = partial(inner.run_with_iobinding, raw, ort.RunOptions())
        else:
            self._run = partial(sess.run_with_iobinding, io)

    def state_in(self, name: str) -> np.ndarray:
        """The bound input buffer of state ``name`` ``[layers, B, ...]``: gather into it to skip a copy."""
        return self._state_in[name]

    def run(self, x: np.ndarray, lengths: np.ndarray, state: State) -> tuple[dict[str, np.ndarray], State]:
        """Copy ``x`` ``[B, T, ...]``, ``lengths`` ``[B]`` and ``state`` in, run; the binding's outputs."""
        np.copyto(self.x, x)
        if lengths is not self.lengths:
            np.copyto(self.lengths, lengths)
        for n, a in self._state_in.items():
            v = state.raw(n)
            if v is not a:  # (a caller may have gathered the state into :meth:`state_in` already)
                np.copyto(a, v)
        try:
            self._run()
        except ORT_ERRORS as e:
            raise inference_error(self._model.source, e) from e
        return self.outputs, self.state


def load(path: str | os.PathLike, providers: ProviderArg = "auto", *,
         session_config: SessionConfig | None = None) -> Model:
    """Load a streamrnn ONNX model.

    ``providers="auto"`` picks CUDA when it really loads, else the CPU (one log line
    says which); an explicit list such as ``["CPUExecutionProvider"]`` is honoured.
    Raises :class:`~streamrnn.errors.ModelLoadError` for a missing or corrupt file, a
    file without a streamrnn spec, a spec that does not match the graph (names, shapes,
    which state output feeds back into which state input, traced through the recurrent
    nodes; the feature normalisation the graph applies), and weights whose sha256
    (recomputed from the file's initializers) differs from the spec's ``fingerprint``.
    The returned model's ``spec.fingerprint`` is the model fingerprint (weights, graph
    structure and spec contract; :mod:`streamrnn.model.weights`). ``shipped:NAME`` loads a model
    shipped in the package (:mod:`streamrnn.model.shipped`).
    """
    source = shipped.resolve(path)
    try:
        with open(source, "rb") as f:
            blob = f.read()  # one read: the session is built from these bytes
    except FileNotFoundError:
        raise ModelLoadError(f"{source}: expected an ONNX file at {source!r}, got no such file") from None
    except OSError as e:
        raise ModelLoadError(f"{source}: expected a readable ONNX file at {source!r}, got {e.strerror or e}") from e
    sess = create_session(blob, providers, session_config, what=source)
    try:
        meta = sess.get_modelmeta().custom_metadata_map
    except UnicodeDecodeError as e:  # ORT decodes metadata strings itself: corrupt bytes surface here
        raise ModelLoadError(f"{source}: metadata: expected UTF-8 text, got undecodable bytes ({e.reason})") from e
    if SPEC_KEY not in meta:
        raise ModelLoadError(f"{source}: metadata: expected key '{SPEC_KEY}' (a streamrnn model), "
                             f"got keys {sorted(meta)}")
    spec = ModelSpec.from_json(meta[SPEC_KEY], source=source)
    return Model(sess, spec, source=source, graph=read_graph(blob, source=source))


# ONNX LSTM / GRU / RNN: input index of a state's initial value, output index of its final value
_PORTS = {"h": (5, 1), "c": (6, 2)}
_PORT_NAMES = {0: "Y", 1: "Y_h", 2: "Y_c"}
_RECURRENT_OP = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}


class _Wiring:
    """What the spec claims about the graph, checked against its nodes (not only its input and output names).

    Each state input must give each recurrent layer its initial state (a Slice of layer ``k``), each state
    output must be the final state of that kind from every layer in order (Concat on axis 0), every layer's
    ``sequence_lens`` must be ``lengths`` and its weights initializers, layer 0 must read ``x`` alone and
    layer ``k`` layer ``k - 1``'s outputs alone, the task outputs must come from the top layer's outputs
    alone (not from a state input directly), and a features model must normalise ``x`` with the spec's values.
    """

    def __init__(self, graph: Graph, spec: ModelSpec, source: str):
        self.g, self.spec, self.source = graph, spec, source
        self.producer = {o: (n, i) for n in graph.nodes for i, o in enumerate(n.outputs) if o}
        self.graph_inputs = {name for name, _, _ in graph.inputs}
        self.layer_of: dict[int, int] = {}  # id(node) -> layer

    def fail(self, what: str, want: str, got: str) -> None:
        raise ModelLoadError(f"{self.source}: {what}: expected {want}, got {got}")

    def through(self, value: str) -> str:
        """The value an Identity chain copies."""
        for _ in range(len(self.g.nodes) + 1):
            p = self.producer.get(value)
            if p is None or p[0].op_type != "Identity" or not p[0].inputs:
                return value
            value = p[0].inputs[0]
        return value

    def upstream(self, value: str) -> set[str]:
        """Every value ``value`` is computed from (itself included)."""
        seen, todo = set(), [value]
        while todo:
            v = todo.pop()
            if v in seen:
                continue
            seen.add(v)
            p = self.producer.get(v)
            if p is not None:
                todo.extend(i for i in p[0].inputs if i)
        return seen

    def ints(self, node: Node, i: int) -> list[int] | None:
        """Input ``i`` of ``node`` when it is an int64 initializer (Slice bounds), else None."""
        name = node.inputs[i] if len(node.inputs) > i else ""
        t = self.g.initializers.get(name)
        ok = t is not None and t.data_type == 7 and len(t.data) % 8 == 0
        return np.frombuffer(t.data, "<i8").tolist() if ok else None

    def reach(self, value: str) -> str:
        """What ``value`` is computed from, short of the recurrent nodes: ``layer k Y`` outputs and graph inputs."""
        inputs, rec, seen, todo = set(), set(), set(), [value]
        while todo:
            v = todo.pop()
            if not v or v in seen:
                continue
            seen.add(v)
            p = self.producer.get(v)
            if v in self.graph_inputs:
                inputs.add(repr(v))
            elif p is not None and id(p[0]) in self.layer_of:
                rec.add(f"layer {self.layer_of[id(p[0])]} {_PORT_NAMES.get(p[1], f'output {p[1]}')}")
            elif p is not None:
                todo.extend(p[0].inputs)
        return ", ".join([*sorted(rec), *sorted(inputs)]) or "constants alone"

    def check(self) -> None:
        layers = self.layers()
        lengths, x, top = self.spec.lengths_input, repr(self.spec.input.name), len(layers) - 1
        for k, node in enumerate(layers):
            got = self.through(node.inputs[4]) if len(node.inputs) > 4 else ""
            if got != lengths:
                self.fail(f"layer {k} sequence_lens", f"graph input {lengths!r} (each row's state after its own "
                          "last step)", repr(got or "none"))
            want = x if k == 0 else f"layer {k - 1} Y"
            if (got := self.reach(node.inputs[0])) != want:
                self.fail(f"layer {k} input", f"computed from {want} alone (a stack)", got)
            for j, what in ((1, "W"), (2, "R"), (3, "B")):
                got = self.through(node.inputs[j]) if len(node.inputs) > j else ""
                if got not in self.g.initializers:
                    self.fail(f"layer {k} {what}", "an initializer (weights)", repr(got or "none"))
        for o in self.spec.outputs:
            if (got := self.reach(o.name)) != f"layer {top} Y":
                self.fail(f"output {o.name}", f"computed from layer {top} Y alone (the top layer's outputs)", got)
        for s in self.spec.state:
            i_in, i_out = _PORTS[s.name]
            want = [f"{s.name}[{k}]" for k in range(len(layers))]
            got = [self.initial(n.inputs[i_in] if len(n.inputs) > i_in else "", len(layers)) for n in layers]
            if got != want:
                self.fail(f"state {s.name}", f"graph input {s.name!r} to give each layer its initial {s.name} "
                          f"({', '.join(want)})", ", ".join(got))
            want = [f"layer {k} {_PORT_NAMES[i_out]}" for k in range(len(layers))]
            got = self.finals(s.output)
            if got != want:
                self.fail(f"state {s.name} output {s.output!r}", f"{', '.join(want)} (the {s.name} each layer "
                          "computes, in layer order)", ", ".join(got))
        if self.spec.input.kind == "features":
            self.normalisation(layers[0])

    def layers(self) -> list[Node]:
        """The recurrent nodes in stack order (by how many recurrent nodes feed each one's input)."""
        spec, op = self.spec, _RECURRENT_OP[self.spec.cell]
        rec = [n for n in self.g.nodes if n.op_type in _RECURRENT_OP.values() and n.domain in ("", "ai.onnx")]
        if len(rec) != spec.layers or any(n.op_type != op for n in rec):
            self.fail("graph recurrent layers", f"{spec.layers} {op} nodes (cell and layers of its spec)",
                      str([n.op_type for n in rec]))
        ids = {id(n) for n in rec}
        depth = {}
        for n in rec:
            up = {id(self.producer[v][0]) for v in self.upstream(n.inputs[0]) if v in self.producer}
            depth[id(n)] = len(up & ids)
        order = sorted(rec, key=lambda n: depth[id(n)])
        if [depth[id(n)] for n in order] != list(range(len(rec))):
            self.fail("graph recurrent layers", "a stack (each layer reads the one below)",
                      f"layers fed by {sorted(depth.values())} recurrent nodes")
        forward = b"forward".hex()  # string attributes are read as hex (weights.read_graph)
        for k, n in enumerate(order):
            self.layer_of[id(n)] = k
            direction = n.attrs.get("direction", forward)
            if n.attrs.get("hidden_size") != spec.hidden or direction != forward:
                shown = bytes.fromhex(direction).decode("utf-8", "replace") if isinstance(direction, str) else direction
                self.fail(f"layer {k}", f"a forward {op} of hidden_size {spec.hidden} (hidden of its spec)",
                          f"hidden_size {n.attrs.get('hidden_size')}, direction {shown!r}")
        return order

    def initial(self, value: str, n_layers: int) -> str:
        """Which layer of which graph input ``value`` is, as ``name[k]`` (or what it is instead)."""
        v = self.through(value) if value else ""
        if v in self.graph_inputs:
            return f"{v}[0]" if n_layers == 1 else f"{v} (all layers)"
        p = self.producer.get(v)
        if p is not None and p[0].op_type == "Slice":
            node = p[0]
            data = self.through(node.inputs[0])
            starts, ends, axes, steps = (self.ints(node, i) for i in (1, 2, 3, 4))
            if (data in self.graph_inputs and axes in (None, [0]) and steps in (None, [1]) and starts and ends
                    and len(starts) == len(ends) == 1 and 0 <= starts[0] and ends[0] == starts[0] + 1):
                return f"{data}[{starts[0]}]"
        return f"{v or 'none'!r} ({p[0].op_type if p else 'not computed'})"

    def finals(self, value: str) -> list[str]:
        """The recurrent outputs ``value`` concatenates, as ``layer k Y_h`` (or what it is instead)."""
        v = self.through(value)
        p = self.producer.get(v)
        if p is None:
            return [f"{v!r} (not computed)"]
        node, i = p
        if id(node) in self.layer_of:
            return [f"layer {self.layer_of[id(node)]} {_PORT_NAMES.get(i, f'output {i}')}"]
        if node.op_type == "Concat" and node.attrs.get("axis") == 0:
            return [x for part in node.inputs for x in self.finals(part)]
        return [f"{v!r} ({node.op_type})"]

    def normalisation(self, first: Node) -> None:
        """``x`` is normalised by the graph's feat_mean / feat_inv_std, and the spec states those values."""
        feeds = self.upstream(first.inputs[0])
        sub = next((n for n in self.g.nodes if n.op_type == "Sub" and n.inputs == ("x", "feat_mean")), None)
        mul = sub and next((n for n in self.g.nodes if n.op_type == "Mul" and n.outputs[0] in feeds
                            and set(n.inputs) == {sub.outputs[0], "feat_inv_std"}), None)
        if not mul:
            self.fail("x normalisation", "(x - feat_mean) * feat_inv_std before the first layer", "no such nodes")
        inp = self.spec.input
        names = inp.feature_names or tuple(f"#{f}" for f in range(inp.n_features))
        for init, values, what in (("feat_mean", np.asarray(inp.mean, np.float64), "mean"),
                                   ("feat_inv_std", 1.0 / np.asarray(inp.std, np.float64), "std")):
            t = self.g.initializers.get(init)
            if t is None or t.data_type != 1 or len(t.data) != 4 * inp.n_features:
                self.fail(f"graph {init}", f"an initializer of {inp.n_features} float32 values (n_features)",
                          "none" if t is None else f"data type {t.data_type}, {len(t.data)} bytes")
            graph = np.frombuffer(t.data, "<f4").astype(np.float64)
            bad = np.flatnonzero(~np.isclose(values, graph, rtol=1e-6, atol=0.0))
            if len(bad):
                f = int(bad[0])
                want = graph[f] if what == "mean" else 1.0 / graph[f]
                spec_value = inp.mean[f] if what == "mean" else inp.std[f]
                self.fail(f"input.{what} of feature {names[f]!r}", f"{want:.7g} (what the graph applies: its {init})",
                          f"{spec_value:.7g} in its spec")
