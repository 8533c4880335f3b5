"""Smoke test of ``streamrnn bench beam --quick --json``: every section runs and reports sane numbers.

No timing is asserted (speed targets live in the bench's own JSON); what is checked is
the report's shape, that every number is finite and positive, that the ratios are the
quotients of the reported throughputs, and one property that does not depend on timing:
the state bytes a flush writes follow the keys it touches, not the keys the shard holds
(while a full snapshot grows with the keys held).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import background
import pytest

from streamrnn.cli.commands import main as cli


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@background.job("bench beam --quick", file=__file__)
def _quick_run(_folder) -> subprocess.CompletedProcess:
    """(A process of its own: it runs beside the other tests, tests/background.py.)"""
    return subprocess.run([sys.executable, "-m", "streamrnn.cli", "bench", "beam", "--quick", "--json"],
                          capture_output=True, text=True, timeout=600, env=background.ENV, cwd=background.ROOT)


@pytest.fixture(scope="module")
def quick():
    r = background.result("bench beam --quick")
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def test_batch_variants_and_their_ratios(quick):
    v = quick["variants"]
    assert set(v) == {"a", "b", "c", "d"}
    n = quick["config"]["keys"] * quick["config"]["events_per_key"]
    for name, r in v.items():
        assert r["events"] == n, name
        assert _positive(r["seconds_median"]) and _positive(r["events_per_s"]) and _positive(r["peak_rss_mb"])
        assert r["events_per_s"] == pytest.approx(n / r["seconds_median"])
        assert _positive(r["cpu_seconds_median"])
        assert r["events_per_cpu_s"] == pytest.approx(n / r["cpu_seconds_median"])
    eps = {k: r["events_per_s"] for k, r in v.items()}
    assert quick["ratios"]["a_over_b"] == pytest.approx(eps["a"] / eps["b"])
    assert quick["ratios"]["a_over_min_c_d"] == pytest.approx(eps["a"] / min(eps["c"], eps["d"]))
    assert quick["ratios"]["a_over_d"] == pytest.approx(eps["a"] / eps["d"])
    q = quick["quality_b_vs_a"]
    assert _positive(q["bits_per_char_a"]) and _positive(q["bits_per_char_b"])


def test_streaming_section(quick):
    s = quick["stream"]
    assert s["events"] == quick["config"]["keys"] * quick["config"]["events_per_key"]
    assert s["watermark_steps"] >= 5
    stateful = {"stateful_inference", "stateful_identity_model", "stateful_inference_no_cache"}
    assert set(s["variants"]) == stateful | {"identity"}
    for r in s["variants"].values():
        assert _positive(r["seconds_median"]) and _positive(r["events_per_s"]) and _positive(r["cpu_seconds_median"])
        assert r["events_per_s"] == pytest.approx(s["events"] / r["seconds_median"])
        assert r["events_per_cpu_s"] == pytest.approx(s["events"] / r["cpu_seconds_median"])
    for name in stateful:  # a flush per shard and window (at least), counted in the process that ran them
        assert s["variants"][name]["flushes"] >= s["watermark_steps"], name
    shards = s["shards"]
    # the cache outlives the DoFn (torn down after every bundle): a replay rebuilds a shard at most once ...
    assert s["rebuilds_at_most_one_per_shard"]
    assert s["variants"]["stateful_inference"]["state_rebuilds"] <= shards
    # ... while with no cache every flush but a shard's first rebuilds it from Beam state
    cold = s["variants"]["stateful_inference_no_cache"]
    assert cold["state_rebuilds"] >= cold["flushes"] - 2 * shards
    eps = {k: r["events_per_s"] for k, r in s["variants"].items()}
    assert s["ratio_stateful_over_identity"] == pytest.approx(eps["stateful_inference"] / eps["identity"])
    assert quick["ratios"]["stream_over_identity"] == pytest.approx(eps["stateful_inference"] / eps["identity"])
    assert quick["ratios"]["stream_identity_model_over_identity"] == pytest.approx(
        eps["stateful_identity_model"] / eps["identity"])
    assert quick["ratios"]["stream_over_no_cache"] == pytest.approx(
        eps["stateful_inference"] / eps["stateful_inference_no_cache"])


def test_streaming_keys_held(quick):
    h = quick["stream"]["held_keys"]
    by = h["by_keys"]
    assert sorted(int(n) for n in by) == [40, 400]
    for r in by.values():
        for f in ("window_seconds_median", "events_per_s", "flush_seconds_median", "flush_events_per_s",
                  "events_per_cpu_s"):
            assert _positive(r[f]), f
        assert len(r["window_seconds_all"]) == h["windows_timed"] * h["repeats"]
        assert r["events_per_s"] == pytest.approx(h["events_per_window"] / r["window_seconds_median"])
        assert all(n <= 1 for n in r["state_rebuilds"]) and all(f > h["windows_timed"] for f in r["flushes"])
        assert r["flush_seconds_median"] < r["window_seconds_median"]  # the flush is part of a window's cost
    assert h["ratio_max_over_min_keys"] == pytest.approx(by["400"]["events_per_s"] / by["40"]["events_per_s"])
    assert quick["ratios"]["stream_held_max_over_min_keys"] == h["ratio_max_over_min_keys"]


def test_key_sweep_section(quick):
    k = quick["key_sweep"]
    by = k["by_keys"]
    assert sorted(int(n) for n in by) == [50, 500]
    for r in by.values():
        for f in ("flush_seconds_median", "events_per_s", "events_per_s_amortized", "populate_seconds",
                  "state_bytes_per_flush_median", "compaction_seconds", "compaction_bytes", "rebuild_seconds",
                  "flushes_between_compactions_est"):
            assert _positive(r[f]), f
        assert len(r["flush_seconds_all"]) == k["flushes_timed"]
        assert r["events_per_s"] == pytest.approx(k["events_per_flush"] / r["flush_seconds_median"])
    small, big = by["50"], by["500"]
    # the same events per flush write about the same state, whatever the keys held ...
    assert big["state_bytes_per_flush_median"] <= 1.1 * small["state_bytes_per_flush_median"]
    # ... while a full snapshot follows the keys held
    assert big["compaction_bytes"] > 5 * small["compaction_bytes"]
    assert quick["ratios"]["sweep_max_over_min_keys"] == pytest.approx(big["events_per_s"] / small["events_per_s"])
    paired = sorted(a / b for a, b in zip(small["flush_seconds_all"], big["flush_seconds_all"], strict=True))
    assert paired[0] <= quick["ratios"]["sweep_max_over_min_keys_paired"] <= paired[-1]
    assert set(quick["goals"]) == {"a_over_b", "a_over_min_c_d", "stream_over_identity", "sweep_max_over_min_keys",
                                   "stream_held_max_over_min_keys", "a_over_d"}


def test_bad_variant_is_a_one_line_error(capsys):
    assert cli(["bench", "beam", "--variants", "az"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) <= 2 and "--variants" in err[-1] and "'az'" in err[-1]
