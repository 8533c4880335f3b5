"""The Apache Beam layer: stateful recurrent inference carried across windows.

>>> from streamrnn.beam import StatefulInference, Event   # doctest: +SKIP
>>> outputs, dead = events | StatefulInference(model="exported/charlm.onnx", num_shards=8,
...                                            window_size=60, allowed_lateness=30)   # doctest: +SKIP

Modules, one concern each: ``intake`` (validation, one copy per event), ``clock`` (event
time in integer micros), ``apply`` (dedupe, order, TTL, batched ORT calls), ``store``
(per-shard state as a delta log with a verified cache), ``pairing`` (next-event fields),
``stateful`` (the timers), ``outputs`` (output blocks or records; ``explode`` turns a block into its
records), ``transform`` (the PTransform). See docs/beam.md.
"""

from __future__ import annotations

from .models import model_version
from .postprocess import NextTokenPostprocess, Postprocess
from .records import DeadLetter, Event, ModelUpdate, Prediction, shard_of
from .step.counters import NAMESPACE
from .step.outputs import explode
from .transform import StatefulInference, StatefulResult

__all__ = [
    "NAMESPACE",
    "DeadLetter",
    "Event",
    "ModelUpdate",
    "NextTokenPostprocess",
    "Postprocess",
    "Prediction",
    "StatefulInference",
    "StatefulResult",
    "explode",
    "model_version",
    "shard_of",
]
