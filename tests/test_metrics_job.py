"""The next-token job's metrics as a user meets them: flags, errors, a multi-process run, a quiet terminal."""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from streamrnn.metrics import Recorder
from streamrnn.metrics_export import push

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Gateway:
    """A local stand-in for a Pushgateway: records each PUT's path and body."""

    def __init__(self):
        got = self.got = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_PUT(self):
                got.append((self.path, self.rfile.read(int(self.headers["Content-Length"])).decode()))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.srv = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.srv.server_port}"
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def close(self):
        self.srv.shutdown()
        self.srv.server_close()

    def samples(self) -> dict[str, float]:
        """name{labels} -> value of the last push."""
        out = {}
        for fam in text_string_to_metric_families(self.got[-1][1]):
            for smp in fam.samples:
                out[smp.name + json.dumps(smp.labels, sort_keys=True)] = smp.value
        return out


def test_push_sends_the_registry_to_a_gateway_and_never_raises():
    gw = _Gateway()
    try:
        reg = CollectorRegistry()
        Recorder("batchjob", reg).dead("invalid", 4)
        assert push(gw.address, "batchjob", registry=reg) is None
    finally:
        gw.close()
    assert gw.got[-1][0] == "/metrics/job/batchjob"
    dead = {json.loads(k[len("streamrnn_dead_letters_total"):])["reason"]: v for k, v in gw.samples().items()
            if k.startswith("streamrnn_dead_letters_total")}
    assert dead == {"invalid": 4, "late": 0, "duplicate": 0, "error": 0}
    err = push(f"127.0.0.1:{_free_port()}", "batchjob", registry=reg, timeout=2)
    assert err is not None and "rror" in err


# -- the dashboard is what its generator writes, and uses catalogued metrics only ----------------
def test_multi_processing_job_is_quiet_and_its_workers_metrics_add_up(tmp_path):
    """A batch job on 2 worker processes: a few lines on stderr, and the pushed totals cover both workers."""
    ev = tmp_path / "ev.jsonl"
    ev.write_text("".join(json.dumps({"key": f"k{i % 4}", "ts": 100.0 + i, "seq": i, "text": f"line {i}\n"}) + "\n"
                          for i in range(40)) + '{"key": "k0", "ts": "bad", "seq": 999, "text": "x"}\n')
    gw = _Gateway()
    try:
        out = subprocess.run(
            [sys.executable, "-m", "beam_jobs.next_token", "--input", str(ev), "--output", str(tmp_path / "out"),
             "--providers", "cpu", "--shards", "2", "--metrics-port", str(_free_port()), "--metrics-job", "mpjob",
             "--pushgateway", gw.address, "--direct_running_mode=multi_processing", "--direct_num_workers=2"],
            cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    finally:
        gw.close()
    assert out.returncode == 0, out.stderr
    lines = out.stderr.strip().splitlines()
    assert not [ln for ln in lines if "INFO" in ln or "WARNING" in ln or "apitools" in ln], out.stderr
    assert len(lines) <= 6, out.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    got = gw.samples()

    def total(prefix: str) -> float:
        return sum(v for k, v in got.items() if k.startswith(prefix + "{"))

    assert total("streamrnn_events_applied_total") == summary["events"] == sum(len(f"line {i}\n") for i in range(40))
    assert total("streamrnn_dead_letters_total") == sum(summary["dead_letters"].values()) == 1
    assert total("streamrnn_events_in_total") == summary["events"] + 1
    assert "metrics pushed to" in out.stderr


def test_job_import_prints_no_beam_noise():
    out = subprocess.run([sys.executable, "-c", "import beam_jobs.next_token"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stderr == "", out.stderr


def _job_args(tmp_path, *extra: str) -> list[str]:
    ev = tmp_path / "ev.jsonl"
    ev.write_text(json.dumps({"key": "a", "ts": 1.0, "seq": 0, "text": "hi"}) + "\n")
    return ["--input", str(ev), "--output", str(tmp_path / "out"), "--providers", "cpu", "--quiet", *extra]


@pytest.mark.parametrize("setup, message", [
    (lambda mp, tmp: None, "--metrics-port: expected a port in [0, 65535] (0 disables), got 70000"),
    (lambda mp, tmp: mp.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp / "nope")),
     "PROMETHEUS_MULTIPROC_DIR: expected a writable directory, got"),
])
def test_job_metrics_mistakes_are_one_line_exit_2(tmp_path, monkeypatch, capsys, setup, message):
    from beam_jobs import next_token

    setup(monkeypatch, tmp_path)
    port = "70000" if "70000" in message else "0"
    assert next_token.main(_job_args(tmp_path, "--metrics-port", port)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("next_token: ") and message in err[-1] and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "out").exists()  # the folder this run made is removed again
