"""Keyed state kept on the execution device (CUDA) as ``OrtValue`` slabs, changed through IOBinding.

With the CUDA provider, a :class:`~streamrnn.keyed.operator.KeyedOperator` keeps every key's
state in device memory: each state tensor is one ``[layers, capacity, hidden]``
``OrtValue``. A batch is gathered, run and scattered back with three tiny ONNX graphs
(:mod:`streamrnn.keyed._slab_ops`) on the same provider, all bound with IOBinding, so state
never visits the host; only task outputs do. A host copy is made only for snapshots
and ``state_of``. Updates produce NEW slab values (a scatter does not modify its input),
so a commit is a swap of references: a failure anywhere leaves the old slabs intact.

The same code runs on the CPU provider with ``device="cpu"`` (how the tests exercise it).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnxruntime as ort

from ..model.runtime import CUDA
from . import _slab_ops


class DeviceSlabs:
    """State slabs on one device: ``slab[name]`` is an ``OrtValue`` ``[layers, capacity, *tail]``."""

    def __init__(self, session: ort.InferenceSession, state_tail: Mapping[str, tuple[int, ...]], capacity: int):
        providers = session.get_providers()
        options = session.get_provider_options()
        self.device = "cuda" if providers[0] == CUDA else "cpu"
        self.device_id = int(options.get(CUDA, {}).get("device_id", 0)) if self.device == "cuda" else 0
        prov = [(p, options.get(p, {})) for p in providers]
        so = ort.SessionOptions()
        so.log_severity_level = 3
        self._gather = ort.InferenceSession(_slab_ops.GATHER, so, providers=prov)
        self._scatter = ort.InferenceSession(_slab_ops.SCATTER, so, providers=prov)
        self._pad = ort.InferenceSession(_slab_ops.PAD, so, providers=prov)
        self.tail = dict(state_tail)
        self.cap = capacity
        self.slab = {n: self.from_host(np.zeros((t[0], capacity, *t[1:]), np.float32)) for n, t in self.tail.items()}

    def from_host(self, a: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a, np.float32), self.device, self.device_id)

    def _run(self, sess: ort.InferenceSession, feeds: dict) -> ort.OrtValue:
        io = sess.io_binding()
        for k, v in feeds.items():
            if isinstance(v, ort.OrtValue):
                io.bind_ortvalue_input(k, v)
            else:
                io.bind_cpu_input(k, np.ascontiguousarray(v))
        io.bind_output("out", self.device, self.device_id)
        sess.run_with_iobinding(io)
        return io.get_outputs()[0]

    def gather(self, name: str, slots: np.ndarray, fresh: np.ndarray) -> ort.OrtValue:
        """``[layers, B, ...]`` state of ``slots`` on the device; zeros where ``fresh``."""
        keep = (~np.asarray(fresh, bool)).astype(np.float32)
        return self._run(self._gather, {"slab": self.slab[name], "idx": np.asarray(slots, np.int64), "keep": keep})

    def scattered(self, slab: ort.OrtValue, slots: np.ndarray, values) -> ort.OrtValue:
        """A new slab: ``slab`` with columns ``slots`` replaced by ``values`` ``[layers, B, ...]``."""
        return self._run(self._scatter, {"slab": slab, "idx": np.asarray(slots, np.int64), "upd": values})

    def grown(self, slab: ort.OrtValue, cap: int) -> ort.OrtValue:
        """A new slab with zero columns up to ``cap``."""
        extra = cap - slab.shape()[1]
        return self._run(self._pad, {"slab": slab, "pads": np.array([0, 0, 0, 0, extra, 0], np.int64)})

    def host(self, name: str, slots: np.ndarray) -> np.ndarray:
        """A host copy of ``slots``' state, ``[layers, B, ...]`` (snapshots, ``state_of``)."""
        if not len(slots):
            t = self.tail[name]
            return np.zeros((t[0], 0, *t[1:]), np.float32)
        return self.gather(name, slots, np.zeros(len(slots), bool)).numpy()
