"""eval forecast over a period of the user's choosing: what is scored, what is skipped and why, no look-ahead."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from streamrnn.cli.commands import main
from streamrnn.errors import InputError
from streamrnn.forecast.bars import Bars, read_bars
from streamrnn.forecast.evaluate import MIN_TRAIN, eval_forecast, render_table
from streamrnn.forecast.progress import Progress
from streamrnn.forecast.synthetic import simulate, write_sp500_layout

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODEL = str(ROOT / "exported" / "market.onnx")
START, END = "2016-03-01", "2016-06-01"


def _cut(b: Bars, lo: str | None = None, hi: str | None = None) -> Bars:
    m = np.ones(len(b), bool)
    if lo:
        m &= b.ts >= np.datetime64(lo, "s").astype(np.int64)
    if hi:
        m &= b.ts < np.datetime64(hi, "s").astype(np.int64)
    return b.take(np.flatnonzero(m))


@pytest.fixture(scope="module")
def bars(tmp_path_factory) -> pathlib.Path:
    """FULL spans the period; EARLY ends before it; LATE starts after it; YOUNG starts too close to it."""
    full, early, late, young = simulate(["FULL", "EARLY", "LATE", "YOUNG"], start="2014-06-01", end="2016-09-01",
                                        seed=11)
    folder = tmp_path_factory.mktemp("period")
    write_sp500_layout([full, _cut(early, hi="2015-12-01"), _cut(late, lo="2016-07-01"),
                        _cut(young, lo="2015-09-01")], folder)
    return folder


def _run(bars, **kw) -> dict:
    return eval_forecast(MODEL, str(bars), garch=False, parity_symbols=1, **kw)


def test_period_scores_exactly_the_targets_inside_it_and_names_every_skipped_symbol(bars):
    r = _run(bars, start=START, end=END)
    assert r["period"] == "custom" and (r["start"], r["end"]) == (START, END)
    assert r["n_symbols"] == 1
    reasons = {k["symbol"]: k["reason"] for k in r["skipped"]}
    assert reasons == {"EARLY": "(ends 2015-11-30, before the period)",
                       "LATE": "(starts 2016-07-01, after the period)",
                       "YOUNG": f"(starts 2015-09-01: {reasons['YOUNG'].split(': ')[1].split()[0]} returns before "
                                f"{START}, the baselines need {MIN_TRAIN})"}
    assert int(reasons["YOUNG"].split(": ")[1].split()[0]) < MIN_TRAIN
    # independent count: origins in [START, END) whose h-bar target's last bar is before END
    (full,) = read_bars(str(bars / "FULL_data.csv"))
    ts = full.ts
    lo, hi = (np.datetime64(d, "s").astype(np.int64) for d in (START, END))
    for h in range(1, r["horizons"] + 1):
        want = sum(1 for i in range(len(ts) - h) if lo <= ts[i] < hi and ts[i + h] < hi)
        assert r["metrics"]["lstm"][f"h{h}"]["n"] == want
    text = render_table(r)
    first = text.splitlines()[0]
    assert "scored 1 symbol (0 held out)" in first
    for sym, why in reasons.items():
        assert f"skipped {sym} {why}" in text


def test_no_look_ahead_bars_after_the_period_change_nothing(bars, tmp_path):
    """The baselines are fitted before START and the model is causal: cutting the bars a week after END (the
    last target ends before END) leaves every score as it was."""
    (full,) = read_bars(str(bars / "FULL_data.csv"))
    write_sp500_layout([_cut(full, hi="2016-06-08")], tmp_path)
    a, b = _run(bars, start=START, end=END, symbols=["FULL"]), _run(tmp_path, start=START, end=END)
    assert json.dumps(a["metrics"], sort_keys=True) == json.dumps(b["metrics"], sort_keys=True)
    # the online calibration too: the a issued at an origin has seen only the targets completed by then
    assert json.dumps(a["conformal"], sort_keys=True) == json.dumps(b["conformal"], sort_keys=True)


def test_a_period_with_nothing_to_score_is_one_error(bars):
    with pytest.raises(InputError, match=r"period 2017-01-01\.\.end: expected symbols to score .* got none of 4 "
                                         r"\(EARLY \(ends 2015-11-30, before the period\); FULL \(ends 2016-08-31"):
        _run(bars, start="2017-01-01")


@pytest.mark.parametrize("argv, message", [
    (["--start", "2017-01-01"], "eval forecast: period 2017-01-01..end: expected symbols to score"),
    (["--start", "2016-06-01", "--end", "2016-03-01"], "--end: expected a date after --start 2016-06-01"),
    (["--end", "2016-03-01"], "--end: expected --start with it"),
    (["--start", "2016-02-30"], "argument --start: expected a date YYYY-MM-DD, got '2016-02-30'"),
    (["--period", "test", "--start", "2016-03-01"], "--period: expected either --period or --start/--end"),
    (["--start", START, "--levels", "0.8,1.2"],
     "argument --levels: expected comma-separated interval levels in (0, 1), got '0.8,1.2'"),
    (["--start", START, "--var", "0.01,0.5"],
     "argument --var: expected comma-separated tail probabilities in (0, 0.5), got '0.01,0.5'"),
    (["--start", START, "--gamma", "x"], "argument --gamma: expected comma-separated ACI steps in (0, 1), got 'x'"),
])
def test_cli_period_mistakes_are_one_line_exit_2(bars, capsys, argv, message):
    code = main(["eval", "forecast", "--model", MODEL, "--bars", str(bars), "--no-garch", *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_progress_lines_after_ten_seconds_then_every_ten():
    now = [0.0]
    lines: list[str] = []

    class Out:
        def write(self, s: str) -> None:
            lines.append(s)

        def flush(self) -> None:
            pass

    p = Progress("eval forecast", out=Out(), clock=lambda: now[0])
    printed = []
    for t in (0.0, 5.0, 9.9, 10.0, 12.0, 19.9, 20.0, 45.0):
        now[0] = t
        printed.append(p.tick(3, 7, "symbols scored", "AAPL"))
    assert printed == [False, False, False, True, False, False, True, True]
    text = "".join(lines)
    assert text.splitlines() == ["eval forecast: 3/7 symbols scored (AAPL), 10 s",
                                 "eval forecast: 3/7 symbols scored (AAPL), 20 s",
                                 "eval forecast: 3/7 symbols scored (AAPL), 45 s"]
    assert "\r" not in text


def test_levels_and_the_calibrated_table_against_an_independent_bar_by_bar_calibrator(bars):
    """--levels/--var reach every table; the raw coverage equals the metrics' (``covered``, quantile ends); the
    calibrated coverage and VaR exceedances equal those of an OnlineConformal fed bar by bar (learn, then the
    bands of predict) from FULL's first bar, scored on the period's origins by comparing with the band ends."""
    from streamrnn.forecast import conformal
    from streamrnn.forecast.dataset import load as load_data
    from streamrnn.forecast.distribution import quantile
    from streamrnn.forecast.evaluate import forecast_meta, model_outputs
    from streamrnn.forecast.features import FeatureConfig
    from streamrnn.model.loaded import load

    levels, tails = (0.5, 0.9), (0.025,)
    r = _run(bars, start=START, end=END, symbols=["FULL"], levels=levels, tails=tails, gamma=[0.02, 0.005])
    c = r["conformal"]
    assert (c["levels"], c["tails"], c["gamma"]) == (list(levels), list(tails), 0.02)
    assert [g["gamma"] for g in c["gamma_scan"]] == [0.02, 0.005]
    h1 = c["groups"]["all"]["h1"]
    assert h1["n"] == r["metrics"]["lstm"]["h1"]["n"]
    for lv in ("50", "90"):
        assert h1["levels"][lv]["raw"]["coverage"] == pytest.approx(100 * r["metrics"]["lstm"]["h1"][f"coverage_{lv}"])
    model = load(MODEL, providers=["CPUExecutionProvider"])
    meta = forecast_meta(model)
    (p,) = load_data(str(bars), meta["horizons"], symbols=["FULL"], features=FeatureConfig(**meta["features"]))
    loc, ls = model_outputs(model, [p])[0]
    cal = conformal.OnlineConformal(meta["df"], levels=levels, tails=tails, gamma=0.02)
    H = meta["horizons"]
    window = p.window(START, END)
    hits = {k: [] for k in ("50", "90", "2.5")}
    for t in range(len(p.series)):
        o = t - 1 - np.arange(H)
        ok = o >= 0
        take = np.where(ok, o, 0)
        v = ok & p.valid[take, np.arange(H)]
        cal.learn_one("FULL", np.where(v, p.y[take, np.arange(H)], 0.0), loc[take, np.arange(H)],
                      np.exp(ls[take, np.arange(H)]), v)
        if window[t, 0]:
            b = cal.predict_one("FULL", loc[t], np.exp(ls[t]))
            y = p.y[t, 0]
            hits["50"].append(b["lo50"][0] <= y <= b["hi50"][0])
            hits["90"].append(b["lo90"][0] <= y <= b["hi90"][0])
            hits["2.5"].append(y < -b["var2.5"][0])
    assert len(hits["50"]) == h1["n"]
    for lv in ("50", "90"):
        assert h1["levels"][lv]["aci"]["coverage"] == pytest.approx(100 * np.mean(hits[lv]), abs=1e-9)
    assert h1["tails"]["2.5"]["aci"]["exceedances"] == sum(hits["2.5"])
    w = window[:, 0]
    raw_var = quantile(0.025, loc[w, 0], np.exp(ls[w, 0]), meta["df"][0])  # the scalar quantile path
    assert h1["tails"]["2.5"]["raw"]["exceedances"] == int(np.sum(p.y[w, 0] < raw_var)) > 0
    text = render_table(r)
    assert "online calibration: ACI per symbol (gamma 0.02" in text and "VaR 2.5% exceedances" in text
    assert "gamma scan" in text
