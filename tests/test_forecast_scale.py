"""The volatility anchor (issue 15): anchored features follow the data's sd, online = offline, warm = rebuilt,
no look-ahead, and the job's postprocess recovers the previous bar's anchor exactly."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import numpy as np
import pytest

from streamrnn.forecast.beam import ForecastPostprocess
from streamrnn.forecast.features import FeatureConfig, OnlineFeatures, SymbolState, offline_features, step_features
from streamrnn.forecast.scale import absolute, bar_return
from streamrnn.forecast.synthetic import with_returns

CFG = FeatureConfig(anchor=True)
META = {"features": CFG.to_dict(), "df": [5.0, 5.0]}


def _jumpy(n: int = 600, seed: int = 1):
    """sd 0.5% for n/2 bars, then 5% (x10), t5 shocks."""
    rng = np.random.default_rng(seed)
    sd = np.where(np.arange(n) < n // 2, 0.5, 5.0)
    return sd, with_returns(sd * rng.standard_t(5, n) * math.sqrt(3 / 5), seed=seed)


def test_anchor_follows_a_x10_jump_in_sd():
    _sd, bars = _jumpy()
    s = offline_features(bars, CFG)
    ewma_sd = np.exp(s.x[:, 5])
    r = np.diff(np.log(bars.close)) * 100.0  # independent reference: realised trailing 60-bar sd (numpy)
    for t in (250, 290, 400, 500, 590):
        real = r[t - 60:t].std()  # returns of bars t-59..t
        assert 0.6 < ewma_sd[t] / real < 1.6, (t, ewma_sd[t], real)
    # the net's inputs are scale-free: sd of ret/sd_t is about the same in both regimes
    z = s.x[:, 0]
    a, b = z[100:300].std(), z[400:600].std()
    assert 0.6 < a < 1.4 and 0.6 < b < 1.4 and 0.7 < a / b < 1.4
    # a zero correction forecasts the EWMA sd itself: proportional to the data, no bound
    _loc, ls = absolute(META, np.zeros((len(s), 2)), np.zeros((len(s), 2)), s.x)
    np.testing.assert_allclose(np.exp(ls[:, 0]), ewma_sd, rtol=1e-6)  # log_vol as the model reads it: float32
    assert np.exp(ls[590, 0]) > 5 * np.exp(ls[290, 0])
    # the raw return comes back exactly from the anchored features
    np.testing.assert_allclose(bar_return(META, s.x), s.ret, rtol=0, atol=1e-9)


def test_online_equals_offline_and_warm_equals_rebuilt():
    rng = np.random.default_rng(3)
    r = rng.standard_t(4, 300)
    r[100] = 60.0  # a corporate-action-sized jump
    bars = with_returns(r, seed=3)
    off = offline_features(bars, CFG)
    rows = [{"symbol": "SYN", "ts": float(bars.ts[i]), **{c: float(getattr(bars, c)[i])
            for c in ("open", "high", "low", "close", "volume")}} for i in range(len(bars))]
    on = OnlineFeatures(CFG)
    xs = np.stack([on.update(b).x for b in rows])
    np.testing.assert_allclose(xs, off.x, rtol=0, atol=1e-9)
    # the carried state through JSON (as the job's state cell holds it) continues exactly
    st, warm = SymbolState(), []
    for i, b in enumerate(rows):
        if i == 150:
            st = SymbolState(**json.loads(json.dumps(asdict(st))))
        row, st = step_features(st, b, CFG, "SYN")
        warm.append(row.x)
    np.testing.assert_array_equal(np.stack(warm), xs)


def test_no_lookahead():
    _sd, bars = _jumpy(400)
    s = offline_features(bars, CFG)
    cut = 250
    bars.close[cut + 1:] *= 3.0
    bars.high[cut + 1:] *= 3.0
    bars.low[cut + 1:] *= 3.0
    bars.open[cut + 1:] *= 3.0
    s2 = offline_features(bars, CFG)
    np.testing.assert_array_equal(s.x[:cut + 1], s2.x[:cut + 1])
    assert not np.allclose(s.x[cut + 1:], s2.x[cut + 1:])


def test_postprocess_recovers_the_previous_anchor():
    from scipy import stats

    rng = np.random.default_rng(5)
    r = rng.standard_t(5, 80) * 1.3
    r[40] = -25.0
    r[60] = 55.0  # jump bar: the anchor is unchanged there
    s = offline_features(with_returns(r, seed=5), CFG)
    n, H = len(s), 2
    out = {"mean": rng.normal(0, 0.05, (n, H)).astype(np.float32),
           "log_scale": rng.normal(-0.2, 0.1, (n, H)).astype(np.float32)}
    prev = {k: np.concatenate([v[:1] * np.nan, v[:-1]]) for k, v in out.items()}
    post = ForecastPostprocess.for_model(META, location="model")
    assert post.anchor and post.lam == 0.94
    got = post(s.x, out, prev)
    np.testing.assert_allclose(got["ret"], s.ret, atol=1e-9)
    loc, ls = absolute(META, out["mean"], out["log_scale"], s.x)
    np.testing.assert_allclose(got["ret_scale"], np.exp(ls), rtol=1e-12)
    i = np.arange(1, n)
    keep = ~s.jump[i]
    want = stats.t.logpdf(s.ret[i], 5.0, loc=loc[i - 1, 0], scale=np.exp(ls[i - 1, 0]))
    np.testing.assert_allclose(got["logprob"][i][keep], want[keep], rtol=1e-6)
    assert np.isnan(got["logprob"][60])


@pytest.mark.parametrize("anchor", [False, True])
def test_config_round_trip(anchor):
    cfg = FeatureConfig(anchor=anchor)
    assert FeatureConfig(**cfg.to_dict()) == cfg
    assert ("anchor" in cfg.to_dict()) == anchor  # old models' metadata is unchanged


def test_anchored_net_never_sees_the_absolute_level():
    """The first layer's weights from log_vol stay zero through training steps (AdamW, weight decay)."""
    import torch

    from streamrnn.forecast.scale import LOG_VOL
    from streamrnn.train.forecast import ForecastTrainConfig, build_net, t_nll

    torch.manual_seed(0)
    net = build_net(ForecastTrainConfig(hidden=8, horizons=2, features=CFG))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=1e-2)
    x, y, lv = torch.randn(4, 30, 8), torch.randn(4, 30, 2), torch.randn(4, 30)
    for _ in range(3):
        out, _ = net(x)
        loss = t_nll(y, out, net.df_raw, lv).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(net.rnn.weight_ih_l0[:, LOG_VOL].abs().max()) == 0.0
    assert float(net.rnn.weight_ih_l0.abs().sum()) > 0


def test_the_shipped_market_model_is_anchored_and_its_spec_says_how_to_read_its_outputs():
    """exported/market.onnx (v2.0.0) is the anchored model: the job's ForecastPostprocess.for_model picks the
    anchor up from the spec, and the spec's output descriptions give the conversion for a direct ONNX caller."""
    from pathlib import Path

    from streamrnn.forecast.evaluate import forecast_meta
    from streamrnn.model.loaded import load
    from streamrnn.model.runtime import CPU

    model = load(str(Path(__file__).resolve().parent.parent / "exported" / "market.onnx"), providers=[CPU])
    meta = forecast_meta(model)
    assert meta["features"]["anchor"] is True and model.spec.version == "2.0.0"
    pp = ForecastPostprocess.for_model(meta, location="zero")
    assert pp.anchor and pp.lam == meta["features"]["lam"] and pp.df == meta["df"]
    desc = {o.name: o.semantics for o in model.spec.outputs}
    assert "exp(log_vol) * mean" in desc["mean"] and "exp(log_vol + log_scale)" in desc["log_scale"]


def test_the_anchor_is_the_float32_log_vol_the_model_reads():
    """Offline float64 features and a job's float32 events give the same absolute forecast, bit for bit."""
    s = offline_features(with_returns(np.random.default_rng(2).standard_t(5, 200) * 1.7, seed=2), CFG)
    out = {"mean": np.full((len(s), 2), 0.01, np.float32), "log_scale": np.full((len(s), 2), -0.2, np.float32)}
    prev = {k: np.concatenate([v[:1] * np.nan, v[:-1]]) for k, v in out.items()}
    x32 = s.x.astype(np.float32)
    assert np.array_equal(absolute(META, out["mean"], out["log_scale"], s.x)[1],
                          absolute(META, out["mean"], out["log_scale"], x32)[1])
    post = ForecastPostprocess.for_model(META, location="model")
    a, b = post(s.x, out, prev), post(x32, out, prev)
    assert np.array_equal(a["ret_loc"], b["ret_loc"]) and np.array_equal(a["ret_scale"], b["ret_scale"])
    assert np.array_equal(a["ret_scale"], np.exp(absolute(META, out["mean"], out["log_scale"], s.x)[1]))
