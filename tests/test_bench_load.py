"""``streamrnn bench load --quick``: the churn load runs on 1 and 2 workers, every event applied once, TTL bounds state.

No timing asserts: the speed figures are the bench's output, not a test's pass condition.
"""

from __future__ import annotations

import json
import subprocess
import sys

import background
import numpy as np
import onnxruntime as ort
import pyarrow.parquet as pq
import pytest

from streamrnn import DEFAULT_MODEL
from streamrnn.bench.load import QUICK, write_events

pytest.importorskip("torch")  # the bench builds its tiny LSTM through streamrnn.train.export


def _graph_state_bytes(path: str) -> int:
    """Per-key bytes of the graph's h/c inputs, read from ONNX Runtime (independent of the spec)."""
    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return sum(4 * int(np.prod([d for d in i.shape if d != "batch"])) for i in s.get_inputs() if i.name in ("h", "c"))


@background.job("bench load --quick", file=__file__)
def _quick_run(_folder) -> subprocess.CompletedProcess:
    """(A subprocess and its workers: it runs beside the other tests, tests/background.py.)"""
    return subprocess.run([sys.executable, "-m", "streamrnn.bench.load", "--quick", "--json"], capture_output=True,
                          text=True, timeout=300, env=background.ENV, cwd=background.ROOT)


@pytest.fixture(scope="module")
def quick() -> dict:
    r = background.result("bench load --quick")
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def test_quick_runs_both_worker_counts_and_applies_every_event_once(quick):
    keys, events = quick["config"]["keys"], quick["config"]["events"]
    assert keys == QUICK["keys"] and events == keys * quick["config"]["events_per_key"]
    assert set(quick["runs"]) == {"1", "2"}
    for w, run in quick["runs"].items():
        c = run["counters"]
        assert c["events_in"] == c["events_applied"] == c["outputs"] == events, (w, c)
        assert c["dead_letters"] == c["dead"] == 0, (w, c)
        assert run["events_per_s"] > 0 and run["seconds"] > 0
        assert run["peak_rss_mb"]["workers"] > 0 and run["peak_rss_mb"]["worker_processes_max"] >= 1
    eps = quick["events_per_s"]
    assert quick["ratio_2_over_1_workers"] == pytest.approx(eps["2"] / eps["1"])


def test_ttl_drops_idle_keys_so_held_state_stays_bounded(quick):
    cfg, run = quick["config"], quick["runs"]["1"]
    keys = cfg["keys"]
    assert run["counters"]["expired"] == keys  # every key went idle, and every key's state was dropped
    # A key is held from its wave's start until its last event + ttl is released: at most this many waves at once.
    span = cfg["wave_gap_s"] + (cfg["events_per_key"] - 1) * cfg["event_gap_s"] + cfg["ttl_s"] + 2 * cfg["window_s"]
    bound = keys / cfg["waves"] * (span / cfg["wave_gap_s"] + 1)
    assert 0 < run["keys_held_peak"] <= bound and run["keys_held_peak"] < keys / 2
    assert run["keys_held_after_input_end"] == 0
    th = run["apply_phase_thirds"]
    assert th["first"]["samples"] and th["last"]["samples"]
    assert th["last"]["keys_held_max"] <= 1.5 * th["first"]["keys_held_max"]  # no growth with the keys seen
    assert quick["bounded"]["1"]["every_key_expired"] is True


def test_shipped_models_state_bytes_match_their_graphs(quick):
    from pathlib import Path

    for name, got in quick["shipped_models"].items():
        path = str(Path(DEFAULT_MODEL).parent / name)
        assert got["state_bytes_per_key"] == _graph_state_bytes(path), name


def test_churn_events_arrive_in_waves_of_new_keys(tmp_path):
    path = str(tmp_path / "ev.parquet")
    n = write_events(path, keys=300, waves=3, events_per_key=4, wave_gap=30.0, event_gap=5.0, seed=1)
    t = pq.read_table(path).to_pandas()
    assert n == len(t) == 1200 and t["ts"].is_monotonic_increasing
    per_key = t.groupby("key")
    assert (per_key.size() == 4).all() and per_key["seq"].apply(lambda s: sorted(s) == [0, 1, 2, 3]).all()
    first = per_key["ts"].min().sort_index().to_numpy()
    wave = np.arange(300) * 3 // 300
    assert np.all((first >= 1000 + wave * 30.0) & (first < 1000 + (wave + 1) * 30.0))


def test_bad_workers_is_one_line_exit_2():
    r = subprocess.run([sys.executable, "-m", "streamrnn.bench.load", "--workers", "0,x"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--workers" in r.stderr
