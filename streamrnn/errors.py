"""Exception types. Every message names the thing, what was expected and what was got."""

from __future__ import annotations


class StreamRNNError(Exception):
    """Base class for all streamrnn errors."""


class ModelLoadError(StreamRNNError):
    """A model file is missing, corrupt, or carries no valid streamrnn spec."""


class InputError(StreamRNNError, ValueError):
    """An input has the wrong dtype, rank, shape or values (NaN, out-of-vocabulary...)."""


class StateError(StreamRNNError, ValueError):
    """A recurrent state does not belong to this model (other names, shapes or dtype)."""


class SnapshotError(StreamRNNError, ValueError):
    """A snapshot cannot be restored into this operator."""


class ExportError(StreamRNNError):
    """Export failed, e.g. ONNX Runtime and torch disagree beyond tolerance."""


def expected(what: str, want: object, got: object) -> str:
    """Format a uniform 'what: expected X, got Y' message."""
    return f"{what}: expected {want}, got {got}"


class DeployError(StreamRNNError):
    """A worker runs something other than what the launcher built the pipeline with (versions, model file), or
    carries state written under other settings (the market job's calibration state)."""


class InferenceError(StreamRNNError, RuntimeError):
    """ONNX Runtime failed to run the model (a kernel error, out of memory); the state passed in is unchanged."""
