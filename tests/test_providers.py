"""Providers: one spelling everywhere, CUDA failure reasons from ORT's log, OOM is not 'unreadable'."""

from __future__ import annotations

import onnxruntime as ort
import pytest

from streamrnn import InputError, ModelLoadError
from streamrnn.model import runtime
from streamrnn.model.loaded import load
from streamrnn.model.runtime import CPU, CUDA, SessionConfig, cuda_failure_reason, resolve_providers

# What onnxruntime-gpu 1.31 printed on a machine without CUDA 13 (colour codes included).
ORT_LOG = (
    "\x1b[0;93m2026-11-27 23:04:14.170675566 [W:onnxruntime:Default, onnxruntime_pybind_state.cc:856 operator()] "
    "No registered plugin EP device found for 'CUDAExecutionProvider' with device_id=0\x1b[m\n"
    "\x1b[1;31m2026-11-27 23:04:14.171145372 [E:onnxruntime:Default, provider_bridge_ort.cc:2458 operator()] "
    "/onnxruntime_src/onnxruntime/core/session/provider_bridge_ort.cc:2043 onnxruntime::Provider& "
    "onnxruntime::ProviderLibrary::Get() [ONNXRuntimeError] : 1 : FAIL : Failed to load library "
    "/x/libonnxruntime_providers_cuda.so with error: libcublasLt.so.13: cannot open shared object file: "
    "No such file or directory\n\x1b[m\n"
    "\x1b[0;93m2026-11-27 23:04:14.171163999 [W:onnxruntime:Default, onnxruntime_pybind_state.cc:1295 "
    "CreateExecutionProviderFactoryInstance] Failed to create CUDAExecutionProvider. Require cuDNN 9.* and "
    "CUDA 13.*. Please install all dependencies\x1b[m\n"
)


@pytest.mark.parametrize(("arg", "want"), [
    ("auto", "auto"), ("AUTO", "auto"),
    ("cpu", [CPU]), ("CPU", [CPU]), (CPU, [CPU]), ([CPU], [CPU]), ("cpu,", None),
    ("cuda", [(CUDA, {"device_id": 0})]), ("cuda:3", [(CUDA, {"device_id": 3})]),
    ("cuda,cpu", [(CUDA, {"device_id": 0}), CPU]), (f"{CUDA},{CPU}", [(CUDA, {"device_id": 0}), CPU]),
    ([(CUDA, {"device_id": 1}), CPU], [(CUDA, {"device_id": 1}), CPU]),
    ("tpu", None), ("cuda:x", None), ("cpu:1", None), ("", None), ([], None), (5, None), ([5], None),
])
def test_one_spelling(arg, want):
    if want is None:
        with pytest.raises(InputError, match="providers: expected"):
            resolve_providers(arg)
    else:
        assert resolve_providers(arg) == want


def test_configured_device_id_is_used():
    assert resolve_providers("cuda", device_id=2) == [(CUDA, {"device_id": 2})]
    assert resolve_providers("cuda:1", device_id=2) == [(CUDA, {"device_id": 1})]


def test_load_and_cli_accept_the_short_names(lstm_path, capsys):
    assert load(lstm_path, providers="cpu").provider == CPU
    from streamrnn.cli.commands import main

    assert main(["generate", "--model", str(lstm_path), "--providers", "cpu", "-n", "3", "--seed", "0"]) == 0


def test_cuda_failure_reason_is_ort_s_own():
    why = cuda_failure_reason(ORT_LOG)
    assert why.startswith("libcublasLt.so.13: cannot open shared object file")
    assert f"onnxruntime-gpu {ort.__version__} needs CUDA 13 and cuDNN 9" in why
    assert "\x1b" not in why and "\n" not in why
    assert "no usable CUDA" in cuda_failure_reason("")


def test_probe_never_changes_ort_global_log_severity(monkeypatch):
    calls = []
    monkeypatch.setattr(ort, "set_default_logger_severity", lambda *a: calls.append(a))
    monkeypatch.setattr(runtime, "_auto_choice", {})
    ok, reason = runtime.cuda_usable(0)
    assert calls == []
    assert ("loaded on device 0" in reason) if ok else ("failed to load on device 0" in reason or "no CUDA" in reason)


@pytest.mark.skipif(runtime.cuda_usable()[0], reason="CUDA loads here")
def test_explicit_cuda_error_names_the_reason(lstm_path):
    with pytest.raises(ModelLoadError, match=r"CUDAExecutionProvider failed to load: \S"):
        load(lstm_path, providers="cuda:0")


def test_out_of_memory_is_not_an_unreadable_model(monkeypatch):
    def oom(*a, **kw):
        raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : CUDA failure 2: out of memory ; "
                           "GPU=1 ; expr=cudaMalloc(&p, size);")

    monkeypatch.setattr(runtime.ort, "InferenceSession", oom)
    with pytest.raises(ModelLoadError, match="expected enough free GPU memory on device 1 .* got out of memory") as e:
        runtime._open(b"", [(CUDA, {"device_id": 1}), CPU], SessionConfig(), "m.onnx")
    assert "unreadable" not in str(e.value)
    monkeypatch.undo()
    with pytest.raises(ModelLoadError, match="expected a valid ONNX model, got an unreadable one"):
        runtime._open(b"\x08\x07garbage", [CPU], SessionConfig(), "m.onnx")
