"""The model contract and its execution: a self-describing ONNX file (``spec``, ``weights``), loaded as a pure
``step`` (``loaded``) on ONNX Runtime sessions with deliberate providers (``runtime``); ``shipped`` names the
models inside the package."""
