"""The forecaster end to end on a tiny simulated market: train, export, stream, evaluate, CLI."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("arch")

from streamrnn.cli.commands import main  # noqa: E402
from streamrnn.forecast import dataset  # noqa: E402
from streamrnn.forecast.dataset import Split  # noqa: E402
from streamrnn.forecast.features import FeatureRow, OnlineFeatures  # noqa: E402
from streamrnn.forecast.synthetic import simulate, write_sp500_layout  # noqa: E402
from streamrnn.keyed.operator import KeyedOperator  # noqa: E402
from streamrnn.model.loaded import load  # noqa: E402
from streamrnn.train.forecast import ForecastTrainConfig, build_net, train_forecast  # noqa: E402
from streamrnn.train.tcn import CausalTCN, TCNConfig  # noqa: E402

SYMBOLS = ["AAA", "BBB", "CCC", "HHH"]  # HHH is held out by the sha256 rule
TINY = ["--hidden", "8", "--layers", "2", "--horizons", "3", "--batch", "3", "--eval-every", "5"]


@pytest.fixture(autouse=True)
def _fresh_log_handlers():
    """``main`` calls logging.basicConfig, which binds a handler to the sys.stderr of that moment (an earlier
    test's capture, closed since); give each test a root logger without handlers and restore it after."""
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers.clear()
    yield
    root.handlers[:] = saved


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    d = tmp_path_factory.mktemp("market")
    write_sp500_layout(simulate(SYMBOLS, start="2014-06-01", end="2017-04-01", seed=11), d)
    return d


@pytest.fixture(scope="module")
def trained(market, tmp_path_factory):
    out = tmp_path_factory.mktemp("fc") / "m.onnx"
    assert main(["train", "forecast", "--bars", str(market), "--out", str(out), "--steps", "10", *TINY]) == 0
    return out


def test_split_rule_holds_out_hhh():
    s = Split()
    assert [x for x in SYMBOLS if s.held_out(x)] == ["HHH"]


def test_eval_forecast_json_keys_and_parity(trained, market, capsys):
    capsys.readouterr()
    assert main(["eval", "forecast", "--model", str(trained), "--bars", str(market), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["n_bars"] == sum(len(b) for b in simulate(SYMBOLS, start="2014-06-01", end="2017-04-01", seed=11))
    assert r["parity_max_abs"] <= 1e-5 and r["parity_bars"] == r["n_bars"]
    keys = {"nll", "crps", "mae", "mase", "coverage_80", "coverage_95"}
    assert set(r["metrics"]) >= {"lstm", "naive", "ewma_normal", "ewma_t", "garch_normal", "garch_t", "tcn"}
    for m, hs in r["metrics"].items():
        assert set(hs) == {"h1", "h2", "h3"}
        for v in hs.values():
            assert keys <= set(v)
            if m == "tcn":  # no --tcn given: a method that cannot be scored is null
                assert all(v[k] is None for k in keys)
            else:
                assert all(np.isfinite(v[k]) for k in keys)
                assert 0 <= v["coverage_80"] <= v["coverage_95"] <= 1
    assert r["metrics"]["naive"]["h1"]["mase"] == pytest.approx(1.0)
    assert r["n_symbols_heldout"] == 1 and r["groups"]["heldout_symbols"]["lstm"]["h1"]["nll"] is not None


def test_streaming_bar_by_bar_equals_whole_sequence(trained, market):
    """Raw bars -> online features -> one KeyedOperator call per bar, state carried: == one whole-sequence call."""
    m = load(trained, providers=["CPUExecutionProvider"])
    data = dataset.load(str(market), 3)
    op = KeyedOperator(m)
    online = OnlineFeatures()
    for p in data[:2]:
        s = p.series
        whole, _ = m.step(s.x[None].astype(np.float32))
        for i in range(0, len(s), 7):  # every 7th bar checked; all bars streamed
            for j in range(i, min(i + 7, len(s))):
                bar = {"symbol": s.symbol, "ts": s.ts[j], "close": s.close[j], **{k: v[j] for k, v in s.raw.items()}}
                row = online.update(bar)
                assert isinstance(row, FeatureRow)
                r = op.process([s.symbol], row.x[None].astype(np.float32))
            np.testing.assert_allclose(r.outputs["mean"][0], whole["mean"][0, j], rtol=0, atol=1e-5)
            np.testing.assert_allclose(r.outputs["log_scale"][0], whole["log_scale"][0, j], rtol=0, atol=1e-5)


def test_resume_continues_exactly(market, tmp_path):
    data = dataset.load(str(market), 2)
    cfg = ForecastTrainConfig(hidden=8, horizons=2, batch=2, steps=12, eval_every=6, dropout=0.1, threads=1)
    straight, _ = train_forecast(data, cfg, checkpoint=tmp_path / "a.pt", resume=False, log=lambda m: None)

    class Crash(Exception):
        pass

    def crash(msg):
        raise Crash(msg)

    with pytest.raises(Crash):
        train_forecast(data, cfg, checkpoint=tmp_path / "b.pt", resume=False, log=crash)  # dies after step 6
    resumed, summary = train_forecast(data, cfg, checkpoint=tmp_path / "b.pt", resume=True, log=lambda m: None)
    assert summary["steps"] == 12
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


def test_tcn_is_causal_and_scored_by_eval(market, trained, tmp_path, capsys):
    torch.manual_seed(0)
    net = CausalTCN(TCNConfig(n_features=3, channels=4, kernel=2, levels=3, out_dim=2)).eval()
    x = torch.randn(1, 30, 3)
    y = x.clone()
    y[0, 20:] += 5.0
    with torch.no_grad():
        a, b = net(x)[0], net(y)[0]
    torch.testing.assert_close(a[0, :20], b[0, :20])
    assert not torch.allclose(a[0, 20:], b[0, 20:])
    wide = CausalTCN(TCNConfig(n_features=3, channels=32, kernel=2, levels=3, out_dim=2))
    rf = wide.config.receptive_field  # 1 + 2 (k - 1)(2^levels - 1) = 15: x[0] reaches out[14], not out[15]
    xg = torch.randn(1, 30, 3, requires_grad=True)
    out, _ = wide(xg)
    g_in = torch.autograd.grad(out[0, rf - 1].sum(), xg, retain_graph=True)[0]
    g_out = torch.autograd.grad(out[0, rf].sum(), xg)[0]
    assert rf == 15 and g_in[0, 0].abs().sum() > 0 and g_out[0, 0].abs().sum() == 0
    assert build_net(ForecastTrainConfig(cell="tcn", hidden=4, tcn_levels=3)).config.channels == 4
    out = tmp_path / "tcn.pt"
    assert main(["train", "forecast", "--bars", str(market), "--out", str(out), "--cell", "tcn", "--steps", "5",
                 *TINY]) == 0
    capsys.readouterr()
    assert main(["eval", "forecast", "--model", str(trained), "--bars", str(market), "--tcn", str(out),
                 "--no-garch", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert np.isfinite(r["metrics"]["tcn"]["h1"]["nll"])
    assert r["metrics"]["garch_t"]["h1"]["nll"] is None


@pytest.mark.parametrize("case", ["no_path", "intraday", "lm_model", "bad_columns"])
def test_cli_user_errors_one_line_exit_2(case, trained, market, tmp_path, capsys):
    from streamrnn import DEFAULT_MODEL

    bars, model, extra = str(market), str(trained), []
    if case == "no_path":
        bars = str(tmp_path / "nothing")
    elif case == "intraday":
        p = tmp_path / "m1.csv"
        rows = [f"2006-01-02 09:{i:02d}:00,X,1,1.1,0.9,1.0,5" for i in range(40)]
        p.write_text("ts,symbol,open,high,low,close,volume\n" + "\n".join(rows) + "\n")
        bars = str(p)
    elif case == "lm_model":
        model = DEFAULT_MODEL
    else:
        extra = ["--columns", "ts"]
    capsys.readouterr()
    assert main(["eval", "forecast", "--model", model, "--bars", bars, "--no-garch", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("streamrnn eval: error:")
    want = {"no_path": "--bars", "intraday": "frequency", "lm_model": "forecast model", "bad_columns": "--columns"}
    assert want[case] in err[0]


def test_forecast_operator_bands_and_bad_bars_do_not_poison_state(trained, market):
    from scipy import stats

    from streamrnn.forecast.serve import ForecastOperator

    m = load(trained, providers=["CPUExecutionProvider"])
    s = dataset.load(str(market), 3, symbols=["AAA"])[0].series
    bars = [{"symbol": "AAA", "ts": s.ts[j], "close": s.close[j], **{k: v[j] for k, v in s.raw.items()}}
            for j in range(60)]
    clean_rows, dead = ForecastOperator(m).process(bars)
    assert not dead and len(clean_rows) == 60
    noisy = list(bars)
    for at, bad in ((40, {"symbol": "A A"}), (30, {"ts": bars[29]["ts"]}), (20, {"high": 1.0, "low": 2.0}),
                    (10, {"close": float("nan")})):  # each bad bar goes right before original bar `at`
        noisy.insert(at, {**bars[at - 1], **bad, "ts": bad.get("ts", bars[at - 1]["ts"] + 1.0)})
    op = ForecastOperator(m)
    rows = []
    for chunk in range(0, len(noisy), 9):  # several calls: state carried between them
        r, d = op.process(noisy[chunk:chunk + 9])
        rows += r
        dead += d
    assert len(dead) == 4 and len(rows) == 60
    for a, b in zip(rows, clean_rows, strict=True):
        assert a.keys() == b.keys()
        np.testing.assert_allclose([a[k] for k in a if k.startswith("h")], [b[k] for k in b if k.startswith("h")],
                                   rtol=1e-6)
    whole, _ = m.step(s.x[None, :60].astype(np.float32))
    df = m.spec.training["forecast"]["df"]
    r = rows[59]
    loc, scale = float(whole["mean"][0, 59, 0]), float(np.exp(whole["log_scale"][0, 59, 0]))
    assert r["h1_median"] == pytest.approx(s.close[59] * np.exp(loc / 100), rel=1e-5)
    assert r["h1_hi95"] == pytest.approx(s.close[59] * np.exp(stats.t.ppf(0.975, df[0], loc, scale) / 100), rel=1e-5)
    assert r["h1_lo80"] < r["h1_median"] < r["h1_hi80"] and r["h1_lo95"] < r["h1_lo80"]
