"""The Apache Beam layer: stateful recurrent inference carried across windows.

>>> from streamrnn.beam import StatefulInference, Event   # doctest: +SKIP
>>> outputs, dead = events | StatefulInference(model="exported/charlm.onnx", num_shards=8,
...                                            window_size=60, allowed_lateness=30)   # doctest: +SKIP

See the README section "Apache Beam" for the semantics and how to run on Flink, Spark or Dataflow.
"""

from __future__ import annotations

from .postprocess import NextTokenPostprocess, Postprocess
from .records import DeadLetter, Event, ModelUpdate, Prediction, shard_of
from .transform import NAMESPACE, StatefulInference, StatefulResult, model_version

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
    "model_version",
    "shard_of",
]
