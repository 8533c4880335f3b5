"""``--health`` on both jobs (issue 17), through their ``main()``: with ``flag`` or ``heal`` the Parquet outputs gain
``state_health`` (null where unknown), equal to ``KeyedOperator(health=...)`` over each key's events, with the heals
as ``reset="health"``; with ``off`` the column is absent and the schema is the one before. The default is the
model's (``health.default_policy``): ``flag`` for charlm (it has a reference loss), ``off`` for the forecaster. The
``heal`` runs pass the tuning flags (``--health-reset-window``, ``--health-stay-margin``), compared with the
operator under the same ``HealthConfig``."""

from __future__ import annotations

import json
import math
import pathlib

import background
import numpy as np
import pyarrow.parquet as pq
import pytest

from beam_jobs import market_forecast, next_token
from streamrnn.forecast.beam_output import output_schema
from streamrnn.forecast.evaluate import forecast_meta
from streamrnn.forecast.features import FeatureConfig, offline_features
from streamrnn.forecast.synthetic import simulate, write_sp500_layout
from streamrnn.keyed.health import HEALTH, HealthConfig
from streamrnn.keyed.operator import KeyedOperator
from streamrnn.model.loaded import load
from streamrnn.model.runtime import CPU

ROOT = pathlib.Path(__file__).resolve().parent.parent
LM, MARKET = str(ROOT / "exported" / "charlm.onnx"), str(ROOT / "exported" / "market.onnx")


def _table(folder: pathlib.Path, prefix: str):
    return pq.read_table(sorted(folder.glob(f"{prefix}-*.parquet")))


def _nan(v) -> float:
    return math.nan if v is None else v


# -- next_token ----------------------------------------------------------------------------------------------------
TEXTS = {  # English, then random letters (out of domain: the EW loss passes the reference and a shadow starts)
    "en": "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun. " * 3,
    "noise": "".join(np.random.default_rng(0).choice(list("qxzjkvQXZJK0123456789{}[]|~^"), 300)),
}


@background.job("next_token and market_forecast runs of test_health_jobs", file=__file__)
def _job_runs(folder: pathlib.Path) -> dict:
    """Both jobs with their default health policy and with heal, on inputs written here, run one after another in
    a process of their own (tests/run_jobs.py), beside the other tests (tests/background.py): {(job, health):
    output folder}."""
    events = folder / "events.jsonl"
    events.write_text("".join(json.dumps({"key": k, "ts": 1000.0 + i, "seq": 0, "text": t}) + "\n"
                              for i, (k, t) in enumerate(TEXTS.items())))
    files = [str(p) for p in write_sp500_layout(market_bars(), folder / "bars")]
    runs = {}
    for health in ("default", "heal"):
        flag = [] if health == "default" else ["--health", health, *HEAL_FLAGS]
        runs["lm", health] = ("beam_jobs.next_token", [
            "--input", str(events), "--output", str(folder / f"lm-{health}"), "--model", LM, "--providers", "cpu",
            "--quiet", "--shards", "2", "--metrics-port", "0", *flag])
        runs["market", health] = ("beam_jobs.market_forecast", [
            "--input", ",".join(files), "--output", str(folder / f"market-{health}"), "--model", MARKET, "--quiet",
            "--metrics-port", "0", "--shards", "2", "--location", "model", *flag])
    ran = background.run_jobs(folder, {f"{job}/{health}": run for (job, health), run in runs.items()})
    for name, r in ran.items():
        assert r["rc"] == 0, f"{name}: {r['stderr'][-3000:]}"
    return {key: pathlib.Path(argv[argv.index("--output") + 1]) for key, (_, argv) in runs.items()}


#: the heal runs' tuning flags, and the operator's config they make
HEAL_FLAGS = ["--health-reset-window", "24", "--health-stay-margin", "0.01"]
HEAL = HealthConfig("heal", reset_window=24, stay_margin=0.01)


def market_bars():
    """Two simulated symbols of ~630 daily bars (the forecaster samples a watch in one 64-bar window of 8)."""
    return simulate(["AAA", "BBB"], start="2014-01-01", end="2016-06-01", seed=11)


@pytest.fixture(scope="module")
def lm_runs():
    out = background.result("next_token and market_forecast runs of test_health_jobs")
    return {h: _table(out["lm", h], next_token.PREDICTIONS) for h in ("default", "heal")}


def test_next_token_flags_by_default_as_the_operator(lm_runs):
    """No --health: charlm's default policy, flag: state_health is the operator's (EW loss / reference), no heal."""
    t = lm_runs["default"]
    assert t.schema.equals(next_token.prediction_schema(True)) and not t.schema.equals(next_token.PREDICTION_SCHEMA)
    op = KeyedOperator(load(LM, providers=[CPU]), health="flag")
    rows = t.to_pylist()
    for k, text in TEXTS.items():
        mine = sorted((r for r in rows if r["key"] == k), key=lambda r: r["offset"])
        r = op.process([k] * len(text), np.frombuffer(text.encode(), np.uint8).astype(np.int64))
        np.testing.assert_allclose([_nan(x["state_health"]) for x in mine], r.state_health, rtol=1e-5,
                                   equal_nan=True)
    assert HEALTH not in {x["reset"] for x in rows}
    noise = [x["state_health"] for x in rows if x["key"] == "noise"]
    assert noise[0] is None and min(noise[1:]) > 1.15  # out of domain: in bad health from its second byte


def test_next_token_heal_writes_the_operators_state_health_and_heals(lm_runs):
    t = lm_runs["heal"]
    assert t.schema.equals(next_token.prediction_schema(True))
    assert t.schema.names.index("state_health") == t.schema.names.index("model_version") - 1
    op = KeyedOperator(load(LM, providers=[CPU]), health=HEAL)
    rows = t.to_pylist()
    for k, text in TEXTS.items():
        mine = sorted((r for r in rows if r["key"] == k), key=lambda r: r["offset"])
        r = op.process([k] * len(text), np.frombuffer(text.encode(), np.uint8).astype(np.int64))
        assert [x["reset"] for x in mine] == ["new", *r.reset.tolist()[1:]]
        got = np.array([_nan(x["state_health"]) for x in mine])
        np.testing.assert_allclose(got, r.state_health, rtol=1e-5, equal_nan=True)
    noise = np.array([_nan(x["state_health"]) for x in rows if x["key"] == "noise"])
    # charlm's reference loss makes it known from the second byte, in bad health at once (EW loss / reference; the
    # watch starts after it, and its shadow's first byte is not scored), then the window's carried / shadow ratio;
    # on noise a young state does better than one with context: the key heals, and while it heals (reset again
    # every reset window) its served, reset state scores below the shadow that goes on without the reset
    assert np.isfinite(noise[1:]).all() and noise[1:3].min() > 1.15 and noise[-1] < 1.0
    assert [x["reset"] for x in rows if x["key"] == "noise"].count(HEALTH) >= 2
    assert {x["state_health"] is None for x in rows if x["offset"] == 0} == {True}  # a first byte: unknown


# -- market_forecast -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def market_runs():
    out = background.result("next_token and market_forecast runs of test_health_jobs")
    return market_bars(), {h: _table(out["market", h], market_forecast.FORECASTS) for h in ("default", "heal")}


def test_market_default_is_off_and_writes_the_schema_before(market_runs):
    """No --health: a forecaster has no reference loss, so its default policy is off (no state_health column)."""
    _, t = market_runs
    assert "state_health" not in t["default"].column_names
    assert t["default"].schema.names == output_schema(5).names
    assert t["heal"].schema.names == output_schema(5, health=True).names
    assert t["heal"].schema.names.index("state_health") == t["heal"].schema.names.index("model_version") - 1


def test_market_health_is_the_operators(market_runs):
    """A forecaster has no reference loss: state_health is unknown (null) outside the sampled watches, which give
    the carried / shadow NLL ratio, and the heals, as the operator over the symbol's features."""
    bars, t = market_runs
    model = load(MARKET, providers=[CPU])
    cfg = FeatureConfig(**forecast_meta(model)["features"])
    op = KeyedOperator(model, health=HEAL)
    rows = t["heal"].to_pylist()
    known = 0
    for b in bars:
        x = offline_features(b, cfg).x.astype(np.float32)
        mine = sorted((r for r in rows if r["symbol"] == b.symbol), key=lambda r: r["bar"])
        assert [r["bar"] for r in mine] == list(range(len(x)))
        r = op.process([b.symbol] * len(x), x)
        assert [m["reset"] for m in mine] == ["new", *r.reset.tolist()[1:]]
        got = np.array([_nan(m["state_health"]) for m in mine])
        # window sums of float32 NLLs from calls of other batch shapes: equal to ~2e-5 (the resets above exactly)
        np.testing.assert_allclose(got, r.state_health, rtol=1e-4, equal_nan=True)
        known += int(np.isfinite(got).sum())
    assert 0 < known < t["heal"].num_rows
