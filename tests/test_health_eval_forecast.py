"""``streamrnn eval health`` of a forecaster (issue 17): each policy's mean NLL per part of a volatility-break series
against an independent computation (each symbol's whole series in one model call, or its reset windows each from
zeros; scipy's t density anchored by the previous bar's log_vol), flag changes nothing, and the CLI's JSON and
one-line errors."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from test_health_forecast import scipy_loss

from streamrnn.cli.commands import main
from streamrnn.forecast.evaluate import forecast_meta
from streamrnn.forecast.features import FeatureConfig, offline_features
from streamrnn.forecast.health_eval import break_returns, eval_forecast_health
from streamrnn.forecast.synthetic import with_returns
from streamrnn.model.loaded import load
from streamrnn.model.runtime import CPU

MODEL = str(pathlib.Path(__file__).resolve().parent.parent / "exported" / "market.onnx")
SMALL = {"streams": 3, "calm_bars": 60, "break_bars": 30, "reset_every": 16, "seed": 4}


@pytest.fixture(scope="module")
def model():
    return load(MODEL, providers=[CPU])


def _series(model) -> np.ndarray:
    """The simulated symbols eval_forecast_health builds, rebuilt from the module's documented recipe."""
    cfg = FeatureConfig(**forecast_meta(model)["features"])
    rng = np.random.default_rng(SMALL["seed"])
    return np.stack([offline_features(with_returns(break_returns(rng, 60, 30, 1.0, 4.0), seed=4 + i,
                                                   symbol=f"SIM{i}"), cfg).x for i in range(3)]).astype(np.float32)


def _losses(model, x: np.ndarray, every: int | None) -> np.ndarray:
    """One symbol's per-bar NLL by hand: its bars in one call (or windows of ``every``, each from zeros)."""
    loss = scipy_loss(forecast_meta(model))
    L = len(x)
    outs = []
    for a in range(0, L, every or L):
        o, _ = model.step(x[None, a:a + (every or L)])
        outs.append({n: v[0] for n, v in o.items()})
    out = {n: np.concatenate([o[n] for o in outs]) for n in outs[0]}
    return np.array([np.nan] + [loss({n: v[t - 1] for n, v in out.items()}, x[t - 1], x[t]) for t in range(1, L)])


def test_each_policys_nll_per_part_is_the_independent_one(model):
    r = eval_forecast_health(model, **SMALL)
    segs = _series(model)
    parts = {"calm_before": slice(0, 60), "break": slice(60, 90), "calm_after": slice(90, 150)}
    for name, every in (("carried", None), ("reset16", 16)):
        ls = np.stack([_losses(model, s, every) for s in segs])
        for p, sl in parts.items():
            assert r.nll[name][p] == pytest.approx(np.nanmean(ls[:, sl]), rel=1e-5), (name, p)
        calm = np.concatenate([ls[:, parts["calm_before"]], ls[:, parts["calm_after"]]], axis=1)
        assert r.nll[name]["calm"] == pytest.approx(np.nanmean(calm), rel=1e-5)
    assert r.nll["flag"] == r.nll["carried"]  # flag changes no state
    assert r.scored_bars == 3 * 149 and r.nll["carried"]["break"] > r.nll["carried"]["calm"] + 1.0
    gap = r.nll["heal"]["calm"] - r.nll["carried"]["calm"]
    assert r.target == {"heal_minus_carried_calm": gap, "limit": 0.005, "met": gap <= 0.005}


def test_heals_are_counted_where_they_happen(model):
    """A hair-trigger heal (every window watched, any carried loss above the shadow's a strike) heals; the
    counts per part add up to the total."""
    from streamrnn.keyed.health import HealthConfig

    cfg = HealthConfig("heal", window=8, warmup=2, margin=-1e9, patience=1, sample_every=1)
    r = eval_forecast_health(model, **SMALL, heal=cfg)
    assert r.heals > 0 and sum(r.heals_by_part.values()) == r.heals
    assert r.heal_config["window"] == 8 and r.heal_config["reference"] is None


def test_cli_json_and_one_line_errors(capsys):
    argv = ["eval", "health", "--task", "forecast", "--providers", "cpu", "--streams", "2", "--calm-bars", "20",
            "--break-bars", "10", "--json"]
    assert main(argv) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["task"] == "forecast" and d["model"].endswith("market.onnx") and d["bars_per_stream"] == 50
    assert set(d["nll"]) == {"carried", "flag", "heal", "reset64"} and "met" in d["target"]
    assert main(["eval", "health", "--model", MODEL, "--task", "lm", "--providers", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "expected a model of task 'lm' (--task), got task 'forecast'" in err
    assert main(["eval", "health", "--providers", "cpu"]) == 2  # the shipped LM needs its text
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--text: expected the language model's training text" in err
