"""``streamrnn bench gpu``: says whether CUDA really loads (ORT's reason if not) and exits 0 either way; its
measurement harness runs end to end with the CPU provider standing in (``--simulate-on-cpu``)."""

from __future__ import annotations

import json
import subprocess
import sys

import background
import onnxruntime as ort

from streamrnn.bench import gpu
from streamrnn.model import _probe
from streamrnn.model.runtime import CPU, CUDA


def _cuda_really_loads() -> bool:
    """Independent of the bench: a session asked for CUDA keeps it only when the provider library loads."""
    if CUDA not in ort.get_available_providers():
        return False
    so = ort.SessionOptions()
    so.log_severity_level = 4
    try:
        return CUDA in ort.InferenceSession(_probe.identity_model(), so, providers=[CUDA, CPU]).get_providers()
    except Exception:  # a provider that fails to load
        return False


@background.job("bench gpu --json", file=__file__)
def _bench_gpu(_folder) -> subprocess.CompletedProcess:
    """(A process of its own: it runs beside the other tests, tests/background.py.)"""
    return subprocess.run([sys.executable, "-m", "streamrnn.cli", "bench", "gpu", "--json"], capture_output=True,
                          text=True, timeout=300, env=background.ENV, cwd=background.ROOT)


def test_bench_gpu_json_reports_cuda_and_exits_0():
    r = background.result("bench gpu --json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["benchmark"] == "gpu" and res["onnxruntime"] == ort.__version__
    assert res["available_providers"] == ort.get_available_providers()
    assert res["cuda_available"] is _cuda_really_loads()
    assert res["reason"].strip()
    if not res["cuda_available"]:  # nothing measured, and ORT's own reason given
        assert "failed to load" in res["reason"] or "has no" in res["reason"], res["reason"]
        assert not {"parity", "throughput", "beam", "goals"} & res.keys()
    else:
        assert all(p["provider"] == CUDA for p in res["parity"].values())


def test_bench_gpu_harness_end_to_end_on_cpu(capsys):
    assert gpu.main(["--json", "--simulate-on-cpu"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["cuda_available"] and res["simulated_on_cpu"]
    assert {"charlm.onnx", "market.onnx"} <= res["parity"].keys()
    assert all(p["met"] for p in res["parity"].values())  # the same provider on both sides: identical
    rows = res["throughput"]
    assert [(r["B"], r["T"]) for r in rows] == [(1, 1), (64, 4)]
    for r in rows:
        for k in ("device", "keyed", "host", "cpu", "cudnn"):
            assert r[k]["key_steps_per_s"] > 0 and r[k]["median_s_per_call"] > 0
        assert r["ratio_device_vs_host"] == r["host"]["median_s_per_call"] / r["device"]["median_s_per_call"]
    b = res["beam"]
    assert b["events"] == 64 and b["cuda"]["events_per_s"] > 0 and b["cpu"]["events_per_s"] > 0
    assert res["goals"]["parity_le_1e-4"]["met"] is True
    assert res["goals"]["device_ge_2x_host_at_B_ge_1024"]["value"] is None  # no B >= 1024 at toy sizes


def test_bench_gpu_bad_flag_is_one_line_exit_2():
    r = subprocess.run([sys.executable, "-m", "streamrnn.cli", "bench", "gpu", "--budget", "1"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "--budget" in r.stderr and "Traceback" not in r.stderr, r.stderr
