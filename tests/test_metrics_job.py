"""The next-token job's metrics as a user meets them: flags, errors, a multi-process run, a quiet terminal."""

from __future__ import annotations

import http.server
import json
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import background
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from streamrnn.metrics.catalogue import Recorder
from streamrnn.metrics.export import push

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
        return _samples(self.got[-1][1])


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


class _Scraper:
    """Scrapes a job's /metrics every 0.1 s from a thread, as Prometheus would, keeping every answer."""

    def __init__(self, port: int):
        self.url, self.got, self.stop = f"http://127.0.0.1:{port}/metrics", [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.1):
            try:
                with urllib.request.urlopen(self.url, timeout=2) as r:
                    self.got.append(_samples(r.read().decode()))
            except OSError:
                continue

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)


def _samples(text: str) -> dict[str, float]:
    """An exposition as name{labels as JSON} -> value."""
    return {smp.name + json.dumps(smp.labels, sort_keys=True): smp.value
            for fam in text_string_to_metric_families(text) for smp in fam.samples}


def _total(samples: dict[str, float], name: str) -> float:
    return sum(v for k, v in samples.items() if k.startswith(name + "{"))


@background.job("multi-processing job with metrics", file=__file__)
def _mp_job(folder: Path) -> tuple[subprocess.CompletedProcess, _Scraper, _Gateway, Path]:
    """The job of the test below, scraped and pushing while it runs (beside the other tests: tests/background.py)."""
    ev = folder / "ev.jsonl"
    ev.write_text("".join(json.dumps({"key": f"k{i % 4}", "ts": 100.0 + i, "seq": i, "text": f"line {i}\n"}) + "\n"
                          for i in range(40)) + '{"key": "k0", "ts": "bad", "seq": 999, "text": "x"}\n')
    gw, port = _Gateway(), _free_port()
    scraper = _Scraper(port)
    try:
        out = subprocess.run(
            [sys.executable, "-m", "beam_jobs.next_token", "--input", str(ev), "--output", str(folder / "out"),
             "--providers", "cpu", "--shards", "2", "--ttl", "60", "--metrics-port", str(port), "--metrics-job",
             "mpjob", "--metrics-wait", "60", "--metrics-linger", "120", "--pushgateway", gw.address,
             "--direct_running_mode=multi_processing", "--direct_num_workers=2"],
            cwd=ROOT, capture_output=True, text=True, timeout=300, env={**background.ENV, "PYTHONPATH": str(ROOT)})
    finally:
        scraper.close()
        gw.close()
    return out, scraper, gw, folder


def test_multi_processing_job_is_quiet_and_its_workers_metrics_add_up():
    """A batch job on 2 worker processes, scraped while it runs: its first scrape shows its series at 0
    (--metrics-wait: nothing is counted before it), its last one the final figures after the workers exited
    (--metrics-linger: the launcher serves them, and stops once they were scraped), with no key held after
    every key expired; the pushed totals cover both workers; and stderr has a few lines."""
    out, scraper, gw, folder = background.result("multi-processing job with metrics")
    assert out.returncode == 0, out.stderr
    lines = out.stderr.strip().splitlines()
    noise = [ln for ln in lines if ("INFO" in ln and "INFO streamrnn metrics: serving http" not in ln)
             or "WARNING" in ln or "apitools" in ln]
    assert not noise, out.stderr
    assert len(lines) <= 7, out.stderr
    summary = json.loads((folder / "out" / "summary.json").read_text())
    events, dead = summary["events"], sum(summary["dead_letters"].values())
    assert events == sum(len(f"line {i}\n") for i in range(40)) and dead == 1
    first, last = scraper.got[0], scraper.got[-1]
    assert _total(first, "streamrnn_events_in_total") == 0 and _total(first, "streamrnn_dead_letters_total") == 0
    assert 'streamrnn_events_in_total{"job": "mpjob"}' in first  # served at 0, not absent
    for got in (last, gw.samples()):
        assert _total(got, "streamrnn_events_applied_total") == events
        assert _total(got, "streamrnn_dead_letters_total") == dead
        assert _total(got, "streamrnn_events_in_total") == events + dead
    assert _total(last, "streamrnn_expired_keys_total") == 4  # every key's stream ended by its TTL ...
    assert last['streamrnn_active_keys{"job": "mpjob"}'] == 0  # ... so none is held, in any worker
    assert "metrics pushed to" in out.stderr


@background.job("import beam_jobs.next_token", file=__file__)
def _import_job(_folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import beam_jobs.next_token"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=background.ENV)


def test_job_import_prints_no_beam_noise():
    out = background.result("import beam_jobs.next_token")
    assert out.returncode == 0 and out.stderr == "", out.stderr


def _job_args(tmp_path, *extra: str) -> list[str]:
    ev = tmp_path / "ev.jsonl"
    ev.write_text(json.dumps({"key": "a", "ts": 1.0, "seq": 0, "text": "hi"}) + "\n")
    return ["--input", str(ev), "--output", str(tmp_path / "out"), "--providers", "cpu", "--quiet", *extra]


@pytest.mark.parametrize("setup, message", [
    (lambda mp, tmp: None, "--metrics-port: expected a port in [0, 65535] (0 disables), got 70000"),
    (lambda mp, tmp: mp.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp / "nope")),
     "PROMETHEUS_MULTIPROC_DIR: expected a writable directory, got"),
    (lambda mp, tmp: None, "--metrics-wait: expected a number >= 0.0, got '-1'"),
])
def test_job_metrics_mistakes_are_one_line_exit_2(tmp_path, monkeypatch, capsys, setup, message):
    from beam_jobs import next_token

    setup(monkeypatch, tmp_path)
    port = "70000" if "70000" in message else "0"
    wait = ["--metrics-wait", "-1"] if "--metrics-wait" in message else []
    assert next_token.main(_job_args(tmp_path, "--metrics-port", port, *wait)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("next_token: ") and message in err[-1] and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "out").exists()  # the folder this run made is removed again


def test_a_taken_metrics_port_is_one_line_exit_2_and_keeps_old_outputs(tmp_path, capsys):
    """The DirectRunner's launcher serves /metrics: a port another process holds stops the job before it starts,
    with one line (it printed two, the launcher's and the exporter's, and served on the next port)."""
    from beam_jobs import next_token

    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text("{}")  # an earlier run's output, which a refused run must not clear
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert next_token.main(_job_args(tmp_path, "--metrics-port", str(port))) == 2
    err = capsys.readouterr().err
    assert err == (f"next_token: --metrics-port: expected a free port on 127.0.0.1, got {port} "
                   "(in use by another process; pick another port, or 0 for no exporter)\n")
    assert [p.name for p in out.iterdir()] == ["summary.json"]


@background.job("a job on a taken default metrics port", file=__file__)
def _default_port_taken(folder: Path) -> tuple[subprocess.CompletedProcess, int]:
    run = ("import sys; from streamrnn.beam.job import launcher; launcher.METRICS_PORT = int(sys.argv[1]); "
           "from beam_jobs import next_token; sys.exit(next_token.main(sys.argv[2:]))")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        r = subprocess.run([sys.executable, "-c", run, str(port), *_job_args(folder)], capture_output=True,
                           text=True, timeout=240, cwd=ROOT, env=background.ENV)
    return r, port


def test_the_default_metrics_port_taken_moves_to_the_next_free_port_in_one_line():
    """Jobs side by side on one machine with the default port: the second serves the next free port, says so once
    (also when Beam was imported before the job set up its logging: Beam's import-time warning had put
    logging's implicit root handler beside the job's, and the line printed twice).

    In a process of its own, as a job runs: in this test process an earlier job's exporter may still serve."""
    r, port = background.result("a job on a taken default metrics port")
    assert r.returncode == 0, r.stderr[-3000:]
    said = [line for line in r.stderr.splitlines() if "in use" in line]
    assert len(said) == 1 and f"port {port} in use; serving http://127.0.0.1:" in said[0], said
