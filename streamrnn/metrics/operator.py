"""The catalogue's metrics for operator-API users (no Beam): wrap a KeyedOperator, pass a registry.

>>> from prometheus_client import CollectorRegistry
>>> import streamrnn
>>> from streamrnn.metrics.operator import MeteredOperator
>>> reg = CollectorRegistry()
>>> op = MeteredOperator(streamrnn.KeyedOperator(streamrnn.load(streamrnn.DEFAULT_MODEL), keep_last_output=True),
...                      registry=reg, job="chat")
>>> _ = op.process(["a", "a", "b"], streamrnn.lm.encode("hi!"))
>>> reg.get_sample_value("streamrnn_events_applied_total", {"job": "chat", "model": "charlm",
...     "model_version": op.labels["model_version"], "task": "lm", "provider": "CPU"})
3.0

Serve ``reg`` with ``prometheus_client.start_http_server(port, registry=reg)`` or
:func:`streamrnn.metrics.export.start_exporter`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

from .. import lm
from .catalogue import guarded, model_labels, recorder, state_bytes_per_key


class MeteredOperator:
    """``op`` with each :meth:`process` call recorded in ``registry`` under ``job``; everything else passes through.

    Per call: one ``batch`` (its wall time and events), events applied, the operator's keys
    and state bytes, keys expired by its TTL since the last call, and, for a byte LM with
    ``keep_last_output``, the online loss of the events it had predicted. A metrics failure
    never fails the call.
    """

    def __init__(self, op: Any, *, registry: CollectorRegistry | None = None, job: str = "streamrnn",
                 requested_providers: Any = None):
        self.op = op
        self.rec = recorder(job, registry)
        self.labels = model_labels(op.model, job)
        self._ttl_seen = op.evictions.ttl
        guarded(self.rec.bind, op.model, requested_providers)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.op, name)

    def __len__(self) -> int:
        return len(self.op)

    def __contains__(self, key: Any) -> bool:
        return key in self.op

    def process(self, keys: Sequence[Any], x: Any):
        t0 = time.perf_counter()
        res = self.op.process(keys, x)
        guarded(self._record, time.perf_counter() - t0, x, res)
        return res

    def _record(self, seconds: float, x: Any, res: Any) -> None:
        model, rec = self.op.model, self.rec
        n = len(res.pos)
        rec.batch(model, seconds, n)
        rec.applied(model, n)
        prev = res.prev_outputs.get("logprobs") if res.prev_outputs else None
        if prev is not None:
            rec.scored(model, lm.token_logprob(prev, np.asarray(x, np.int64)))
        ttl = self.op.evictions.ttl
        rec.inc("streamrnn_expired_keys_total", ttl - self._ttl_seen)
        self._ttl_seen = ttl
        keys = len(self.op)
        rec.shard_state(("operator", id(self.op)), keys, keys * state_bytes_per_key(model))
