"""CLI smoke tests on a tiny model trained in the test, and training reproducibility/resume."""

from __future__ import annotations

import json

import pytest
import torch

from streamrnn.cli.commands import main

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

    res = run(hidden=16, shapes=((2, 1), (1, 3)), seconds=0.01, min_calls=2, events=200, universe=50)
    for r in res["results"]:
        for k in ("raw", "step", "keyed", "torch"):
            assert r[k]["key_steps_per_s"] > 0
        assert r["ratio_keyed_vs_raw"] > 0
    assert res["sgemm_peak_gflops"] > 0
    sk = res["skew"]
    burst = sk["cases"]["burst_1x300_plus_300x1"]
    assert burst["model_calls_packed"] >= 2
    assert burst["padded_key_steps_packed"] <= 2 * burst["events"]
    assert burst["padded_key_steps_unpacked"] == 301 * 300
    assert {"zipf_key_steps_ge_0.8x_uniform", "zipf_peak_memory_le_2x_uniform"} <= set(res["goals"])
    assert burst["unpacked"]["peak_rss_delta_bytes_fresh_session"] >= 0


def test_resume_on_other_text_is_refused(text, tmp_path, capsys):
    """Before: `--text a.txt` then `--text b.txt` "resumed" a's weights and exported b's hash."""
    other = tmp_path / "b.txt"
    other.write_text("HAMLET:\nTo be, or not to be, that is the question.\n" * 40)
    out = tmp_path / "d.onnx"
    assert main(["train", "lm", "--text", str(text), "--out", str(out), "--steps", "5", *TRAIN]) == 0
    capsys.readouterr()
    assert main(["train", "lm", "--text", str(other), "--out", str(out), "--steps", "10", *TRAIN]) == 2
    err = capsys.readouterr().err
    assert "training data: expected the text it was trained on" in err and "--restart" in err
    assert main(["train", "lm", "--text", str(other), "--out", str(out), "--steps", "5", "--restart", *TRAIN]) == 0
    import hashlib

    from streamrnn.model.loaded import load

    assert load(out).spec.training["data_sha256"] == hashlib.sha256(other.read_bytes()).hexdigest()


class NotAWeight:
    """Unpickling this would run code a checkpoint should never run."""


def test_checkpoint_is_loaded_without_unpickling_objects(text, tmp_path, capsys):
    out = tmp_path / "e.onnx"
    ckpt = out.with_suffix(".ckpt.pt")
    torch.save({"format": "streamrnn-lm-checkpoint/2", "payload": NotAWeight()}, ckpt)
    assert main(["train", "lm", "--text", str(text), "--out", str(out), "--steps", "5", *TRAIN]) == 2
    err = capsys.readouterr().err
    assert "--checkpoint" in err and "expected a streamrnn training checkpoint" in err
    assert len(err.strip().splitlines()) == 1


def _cases(tmp):
    """(argv, text the one error line must contain)."""
    d = tmp / "adir"
    d.mkdir()
    (tmp / "empty.txt").write_bytes(b"")
    (tmp / "small.txt").write_bytes(b"x" * 50)
    ok_text = tmp / "ok.txt"
    ok_text.write_text("ROMEO:\nBut soft, what light through yonder window breaks?\n" * 40)
    out = str(tmp / "o.onnx")
    tr = ["train", "lm", "--out", out, *TRAIN]
    t = ["--text", str(ok_text)]
    return [
        (["train", "lm", "--text", str(tmp / "missing.txt"), "--out", out], "--text: expected a readable"),
        (["train", "lm", "--text", str(d), "--out", out], "--text: expected a readable"),
        ([*tr, "--text", str(tmp / "empty.txt")], "--text: expected at least"),
        ([*tr, "--text", str(tmp / "small.txt")], "--text: expected at least"),
        ([*tr, *t, "--steps", "0"], "--steps: expected an int >= 1, got '0'"),
        ([*tr, *t, "--val-frac", "0"], "--val-frac: expected a fraction in (0, 1), got '0'"),
        ([*tr, *t, "--eval-every", "0"], "--eval-every: expected an int >= 1"),
        ([*tr, *t, "--bptt", "0"], "--bptt: expected an int >= 1"),
        ([*tr, *t, "--hidden", "abc"], "--hidden: expected an int, got 'abc'"),
        ([*tr, *t, "--lr", "nan"], "--lr: expected a finite number"),
        (["eval", "lm", *t, "--parity-bytes", "0"], "--parity-bytes: expected an int >= 2, got '0'"),
        (["eval", "lm", *t, "--last-frac", "1.5"], "--last-frac: expected a fraction in [0, 1], got '1.5'"),
        (["eval", "lm", "--text", str(d)], "--text: expected a readable file"),
        (["eval", "lm", *t, "--chunk", "0"], "--chunk: expected an int >= 1"),
        (["generate", "--top-k", "0"], "--top-k: expected an int >= 1, got '0'"),
        (["generate", "--top-k", "1000", "--providers", "cpu"],
         "--top-k: expected an int in 1..256 (the vocabulary size), got 1000"),
        (["generate", "--temperature", "0"], "--temperature: expected a number > 0.0"),
        (["generate", "-n", "-1"], "-n: expected an int >= 0"),
        (["generate", "--providers", "tpu"], "providers: expected 'auto', 'cpu', 'cuda'"),
        (["info", str(d)], "expected a readable ONNX file"),
        (["info", str(ok_text)], "expected a valid ONNX model"),
        (["info", "--providers", ""], "providers: expected"),
        (["nope"], "invalid choice: 'nope'"),
        (["info", "m.onnx", "--bogus"], "unrecognized arguments: --bogus"),
        (["bench", "operator", "--hidden", "0"], "--hidden: expected an int >= 1, got '0'"),
        (["bench", "operator", "--layers", "-1"], "--layers: expected an int >= 1"),
        (["bench", "operator", "--seconds", "0"], "--seconds: expected a number > 0.0"),
        (["bench", "operator", "--min-calls", "0"], "--min-calls: expected an int >= 1"),
        (["bench", "operator", "--threads", "-2"], "--threads: expected an int >= 0"),
        (["bench", "operator", "--events", "0"], "--events: expected an int >= 1"),
        (["bench", "operator", "--zipf-s", "1.0"], "--zipf-s: expected a number > 1.0"),
        (["bench", "operator", "--bogus"], "unrecognized arguments: --bogus"),
        (["bench", "nope"], "invalid choice: 'nope'"),
        (["bench", "beam", "--keys", "0"], "--keys: expected an int >= 1, got '0'"),
        (["bench", "beam", "--shards", "x"], "--shards: expected an int, got 'x'"),
        (["bench", "beam", "--bogus"], "unrecognized arguments: --bogus"),
        (["bench", "gpu", "--budget", "1"], "--budget: expected a number >= 10.0, got '1'"),
    ]


N_CASES = 37


@pytest.mark.parametrize("i", range(N_CASES))
def test_user_errors_are_one_line_exit_2(tmp_path, capsys, i):
    cases = _cases(tmp_path)
    assert len(cases) == N_CASES
    argv, want = cases[i]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1 and want in lines[0], err
    assert all(ln.startswith("streamrnn") for ln in err.strip().splitlines()), err
