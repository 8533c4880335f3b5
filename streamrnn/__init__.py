"""streamrnn: stateful recurrent models in streams.

Per-key recurrent state ``(h, c)`` is carried forward as events arrive, executed by
ONNX Runtime (CUDA provider on a GPU, CPU otherwise). The Beam layer lives in
:mod:`streamrnn.beam`; this package's core imports no Beam.

>>> import numpy as np, streamrnn
>>> model = streamrnn.load(streamrnn.DEFAULT_MODEL)
>>> op = streamrnn.KeyedOperator(model, max_keys=10_000, ttl=600.0)
>>> r = op.process(["user-1", "user-2"], streamrnn.lm.encode("Hi"))
>>> r.outputs["logprobs"].shape
(2, 256)
"""

from __future__ import annotations

import os
from pathlib import Path

from . import lm
from .errors import (
    DeployError,
    ExportError,
    InputError,
    ModelLoadError,
    SnapshotError,
    StateError,
    StreamRNNError,
)
from .keyed.operator import Evictions, KeyedOperator, KeyedResult
from .lm import NextTokenOperator, NextTokenResult
from .model.loaded import Model, State, load
from .model.runtime import SessionConfig
from .model.spec import ModelSpec

__version__ = "0.1.0"

#: The shipped byte-level language model (override with STREAMRNN_MODEL). ``streamrnn/exported``
#: links to the repository's ``exported/`` folder, and is package data in the wheel.
DEFAULT_MODEL = os.environ.get(
    "STREAMRNN_MODEL", str(Path(__file__).resolve().parent / "exported" / "charlm.onnx"))

__all__ = [
    "DEFAULT_MODEL",
    "DeployError",
    "Evictions",
    "ExportError",
    "InputError",
    "KeyedOperator",
    "KeyedResult",
    "Model",
    "ModelLoadError",
    "ModelSpec",
    "NextTokenOperator",
    "NextTokenResult",
    "SessionConfig",
    "SnapshotError",
    "State",
    "StateError",
    "StreamRNNError",
    "lm",
    "load",
]
