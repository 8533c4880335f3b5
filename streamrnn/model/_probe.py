"""A tiny Identity ONNX model used to probe whether an execution provider loads."""

import base64

_MODEL = "CAg6OwoQCgF4EgF5IghJZGVudGl0eRIFcHJvYmVaDwoBeBIKCggIARIECgIIAWIPCgF5EgoKCAgBEgQKAggBQgQKABAR"


def identity_model() -> bytes:
    """Serialized ONNX model: float32 ``x [1] -> y [1]``."""
    return base64.b64decode(_MODEL)
