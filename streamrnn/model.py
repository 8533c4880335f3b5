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
from typing import Any

import numpy as np
import onnxruntime as ort

from . import shipped
from .errors import InputError, ModelLoadError, StateError
from .runtime import CUDA, ProviderArg, SessionConfig, create_session
from .spec import SPEC_KEY, ModelSpec
from .weights import Initializer, fingerprint, read_initializers


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
                 initializers: Mapping[str, Initializer] | None = None):
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
        if initializers is not None:
            self._check_weights(initializers)

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

    def _check_weights(self, inits: Mapping[str, Initializer]) -> None:
        """The weights themselves: fingerprint, and the shapes the spec implies (vocab rows, hidden)."""
        got = fingerprint(dict(inits))
        if got != self.spec.fingerprint:
            raise ModelLoadError(
                f"{self.source}: weights fingerprint: expected {self.spec.fingerprint} (its spec), got {got} "
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

    def run_unchecked(self, x: np.ndarray, lengths: np.ndarray, state: State) -> tuple[dict[str, np.ndarray], State]:
        """``step`` without validation, for callers that validated already (host state only)."""
        feeds = {"x": x, self.spec.lengths_input: lengths}
        for n in self._state_names:
            feeds[n] = state.raw(n)
        res = self.session.run(self._output_names, feeds)
        k = self._n_task
        return dict(zip(self._task_outputs, res)), State(  # noqa: B905 - res has task + state outputs
            dict(zip(self._state_names, res[k:])), self._state_names, self._sig)  # noqa: B905

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
        self.session.run_with_iobinding(io)
        vals = io.get_outputs()
        k = len(self._task_outputs)
        outputs = {n: vals[i].numpy() for i, n in enumerate(self._task_outputs)}
        return outputs, State(dict(zip(self._state_names, vals[k:], strict=True)), self._state_names, self._sig)


def load(path: str | os.PathLike, providers: ProviderArg = "auto", *,
         session_config: SessionConfig | None = None) -> Model:
    """Load a streamrnn ONNX model.

    ``providers="auto"`` picks CUDA when it really loads, else the CPU (one log line
    says which); an explicit list such as ``["CPUExecutionProvider"]`` is honoured.
    Raises :class:`~streamrnn.errors.ModelLoadError` for a missing or corrupt file, a
    file without a streamrnn spec, a spec that does not match the graph, and weights
    whose sha256 (recomputed from the file's initializers) differs from the spec's
    ``fingerprint``. ``shipped:NAME`` loads a model shipped in the package (:mod:`streamrnn.shipped`).
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
    return Model(sess, spec, source=source, initializers=read_initializers(blob, source=source))
