"""CLI smoke tests on a tiny model trained in the test, and training reproducibility/resume."""

from __future__ import annotations

import json

import pytest
import torch

from streamrnn.cli import main

TRAIN = ["--hidden", "16", "--layers", "2", "--embed", "8", "--batch", "4", "--bptt", "16",
         "--eval-every", "10", "--seed", "3", "--threads", "1"]


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    p = tmp_path_factory.mktemp("text") / "t.txt"
    p.write_text("ROMEO:\nBut soft, what light through yonder window breaks?\n" * 40)
    return p


@pytest.fixture(scope="module")
def trained(text, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "tiny.onnx"
    assert main(["train", "lm", "--text", str(text), "--out", str(out), "--steps", "20", *TRAIN]) == 0
    return out


def test_info(trained, capsys):
    assert main(["info", str(trained), "--json", "--providers", "CPUExecutionProvider"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["cell"] == "lstm" and d["hidden"] == 16 and d["training"]["steps"] == 20
    assert d["provider"] == "CPUExecutionProvider"
    assert main(["info", str(trained)]) == 0
    assert "2x16 LSTM" in capsys.readouterr().out


def test_eval_json_keys(trained, text, capsys):
    assert main(["eval", "lm", "--model", str(trained), "--text", str(text), "--json", "--chunk", "50"]) == 0
    d = json.loads(capsys.readouterr().out)
    for k in ("n_bytes", "bits_per_char", "nats_per_char", "reset_every", "bits_per_char_reset", "parity_max_abs"):
        assert k in d
    assert d["reset_every"] == 64 and d["parity_max_abs"] <= 1e-5 and d["n_bytes"] == text.stat().st_size


def test_generate(trained, capsys):
    assert main(["generate", "--model", str(trained), "--prompt", "ROMEO:", "-n", "30", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ROMEO:") and len(out.encode()) >= len("ROMEO:") + 1


def test_bad_model_is_a_clear_error(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing.onnx")]) == 2
    assert "expected an ONNX file" in capsys.readouterr().err


def test_resume_equals_uninterrupted(text, tmp_path):
    """Train 10 steps, resume to 20 == 20 steps straight (checkpoint carries RNG, optimiser, state)."""
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    assert main(["train", "lm", "--text", str(text), "--out", str(a), "--steps", "20", *TRAIN]) == 0
    assert main(["train", "lm", "--text", str(text), "--out", str(b), "--steps", "10", *TRAIN]) == 0
    assert main(["train", "lm", "--text", str(text), "--out", str(b), "--steps", "20", *TRAIN]) == 0
    wa = torch.load(a.with_suffix(".ckpt.pt"), weights_only=False)["net"]
    wb = torch.load(b.with_suffix(".ckpt.pt"), weights_only=False)["net"]
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_resume_with_other_settings_is_refused(text, tmp_path, capsys):
    out = tmp_path / "c.onnx"
    assert main(["train", "lm", "--text", str(text), "--out", str(out), "--steps", "5", *TRAIN]) == 0
    assert main(["train", "lm", "--text", str(text), "--out", str(out), "--steps", "10", *TRAIN, "--hidden", "32"]) == 2
    assert "settings: expected" in capsys.readouterr().err


def test_bench_operator_smoke():
    from streamrnn.bench.operator import run

    res = run(hidden=16, shapes=((2, 1), (1, 3)), seconds=0.01, min_calls=2)
    for r in res["results"]:
        for k in ("raw", "step", "keyed", "torch"):
            assert r[k]["key_steps_per_s"] > 0
        assert r["ratio_keyed_vs_raw"] > 0
    assert res["sgemm_peak_gflops"] > 0
