"""Progress lines on stderr for the CLI commands that can run long (issue 16): plain lines, nothing in the first
10 s, then at most one every 10 s, never on stdout (where --json goes)."""

from __future__ import annotations

import io
import json

import pytest

from streamrnn.cli import args as cliargs
from streamrnn.cli.commands import main


class FakeClock:
    """Each reading is ``step`` seconds after the one before."""

    def __init__(self, step: float):
        self.t, self.step = 0.0, step

    def __call__(self) -> float:
        self.t += self.step
        return self.t


def test_heartbeat_waits_10_s_then_writes_at_most_every_10_s(monkeypatch):
    clock = iter([0.0, 5.0, 9.9, 10.0, 15.0, 19.9, 20.5, 100.0])
    monkeypatch.setattr(cliargs, "_clock", lambda: next(clock))
    out = io.StringIO()
    hb = cliargs.Heartbeat("streamrnn x", "starting", out=out)  # reads 0.0
    wrote = [hb.check() for _ in range(3)]  # 5.0, 9.9: quiet; 10.0: due
    hb.update("step 2/3")  # 15.0: not due
    wrote += [hb.check(), hb.check()]  # 19.9: not due; 20.5: due
    hb.update("step 3/3")  # 100.0: due
    assert wrote == [False, False, True, False, True]
    assert out.getvalue() == ("streamrnn x: starting, 10 s\nstreamrnn x: step 2/3, 20 s\n"
                              "streamrnn x: step 3/3, 100 s\n")


def test_heartbeat_thread_stops_with_its_block(monkeypatch):
    monkeypatch.setattr(cliargs, "_clock", FakeClock(20.0))  # every check is due
    out = io.StringIO()
    with cliargs.Heartbeat("streamrnn x", out=out, poll=0.001) as hb:
        while hb.lines < 2:  # the thread writes while the command is busy
            pass
    after = out.getvalue()
    assert after.startswith("streamrnn x: running, ") and hb._thread is not None and not hb._thread.is_alive()
    assert out.getvalue() == after


def _err_lines(err: str, name: str) -> list[str]:
    assert "\r" not in err
    return [line for line in err.splitlines() if line.startswith(f"{name}: ")]


def test_eval_lm_tells_each_part_on_stderr_and_keeps_json_on_stdout(monkeypatch, capsys, lstm_path, tmp_path):
    text = tmp_path / "t.txt"
    text.write_bytes(b"ROMEO: But soft, what light through yonder window breaks?\n" * 20)  # 1,160 bytes
    monkeypatch.setattr(cliargs, "_clock", FakeClock(11.0))  # a line at every update
    assert main(["eval", "lm", "--model", str(lstm_path), "--providers", "cpu", "--text", str(text),
                 "--chunk", "256", "--reset-every", "64", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["n_bytes"] == 1160
    lines = _err_lines(err, "streamrnn eval lm")
    assert any(line.startswith("streamrnn eval lm: carried state, 256/1,159 bytes, ") for line in lines), err
    assert any("state reset every 64 bytes, " in line for line in lines), err
    assert any("parity, one call over the first 1,160 bytes" in line for line in lines), err


def test_a_short_eval_lm_prints_no_progress(capsys, lstm_path, tmp_path):
    text = tmp_path / "t.txt"
    text.write_bytes(b"short text\n" * 10)
    assert main(["eval", "lm", "--model", str(lstm_path), "--providers", "cpu", "--text", str(text)]) == 0
    assert _err_lines(capsys.readouterr().err, "streamrnn eval lm") == []


@pytest.mark.parametrize("json_flag", [["--json"], []])
def test_bench_operator_tells_its_shapes_on_stderr(monkeypatch, capsys, json_flag):
    monkeypatch.setattr(cliargs, "_clock", FakeClock(11.0))
    assert main(["bench", "operator", "--hidden", "8", "--layers", "1", "--seconds", "0.01", "--min-calls", "1",
                 "--no-skew", "--no-charlm", *json_flag]) == 0
    out, err = capsys.readouterr()
    if json_flag:
        assert json.loads(out)["benchmark"] == "operator"
    lines = _err_lines(err, "streamrnn bench operator")
    shapes = list(dict.fromkeys(line.split(", ")[0] for line in lines if ": shape " in line))
    assert shapes == [f"streamrnn bench operator: shape {i}/4 (B={b}" for i, b in enumerate((1, 256, 1, 256), 1)], err
    assert any(line.startswith("streamrnn bench operator: building the model, ") for line in lines), err


def test_train_lm_writes_step_lines_on_stderr_and_its_result_on_stdout(monkeypatch, tmp_path, capsys):
    """``train lm`` off a terminal (no tqdm bar): plain step lines on stderr when due, its evaluation lines there
    too; stdout has only the result lines."""
    pytest.importorskip("torch")
    monkeypatch.setattr(cliargs, "_clock", FakeClock(4.0))  # a line is due every third step
    text = tmp_path / "t.txt"
    text.write_bytes(b"to be or not to be, that is the question\n" * 60)
    rc = main(["train", "lm", "--text", str(text), "--out", str(tmp_path / "m.onnx"), "--hidden", "8",
               "--layers", "1", "--embed", "4", "--batch", "2", "--bptt", "8", "--steps", "9", "--eval-every", "9",
               "--val-frac", "0.2", "--threads", "1"])
    out, err = capsys.readouterr()
    assert rc == 0
    steps = [ln for ln in err.splitlines() if ln.startswith("train lm: step ")]
    assert steps and all(ln.endswith(" s") and "nats/char" in ln for ln in steps), err
    assert [int(ln.split("step ")[1].split("/")[0]) for ln in steps] == sorted(
        int(ln.split("step ")[1].split("/")[0]) for ln in steps)
    assert any(ln.startswith("step 9/9 ") and "bits/char" in ln for ln in err.splitlines()), err
    assert "\r" not in err
    assert out.splitlines()[0].startswith("wrote ") and "step 9/9" not in out
