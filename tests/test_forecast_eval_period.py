"""eval forecast over a period of the user's choosing: what is scored, what is skipped and why, no look-ahead."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from streamrnn.cli import main
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
