"""The market_forecast job end to end (batch and --replay), against ForecastOperator and eval forecast per bar."""

from __future__ import annotations

import math
import pathlib
import sys
from types import SimpleNamespace

import apache_beam as beam
import background
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_stream import TestStream as Stream  # (not collected as a test class)
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import TimestampedValue

from beam_jobs import market_forecast
from streamrnn.beam.records import END_OF_INPUT
from streamrnn.forecast import plot
from streamrnn.forecast.bars import read_bars
from streamrnn.forecast.beam import Features
from streamrnn.forecast.evaluate import forecast_meta, model_outputs
from streamrnn.forecast.features import FeatureConfig, OnlineFeatures, offline_features, targets
from streamrnn.forecast.serve import ForecastOperator
from streamrnn.forecast.synthetic import simulate, write_sp500_layout
from streamrnn.model.loaded import load
from streamrnn.model.runtime import CPU

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODEL = str(ROOT / "exported" / "market.onnx")
SP500 = ROOT.parent / "shared" / "data" / "market" / "sp500_daily_2013_2018"
# EBAY: -57% at the PayPal spin-off (a corporate-action jump); NI: -63%; AAPL: plain
REAL = ("AAPL", "EBAY", "NI")
DAY = 86400.0
COLS = ("open", "high", "low", "close", "volume")


@pytest.fixture(scope="module")
def model():
    return load(MODEL, providers=[CPU])


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("sim")
    return [str(p) for p in write_sp500_layout(simulate(["AAA", "BB.B", "CCC"], start="2016-01-01",
                                                        end="2016-08-01", seed=3), folder)]


def _argv(files, out: pathlib.Path, *extra: str) -> list[str]:
    return ["--input", ",".join(files), "--output", str(out), "--quiet", "--metrics-port", "0", "--shards", "3",
            "--location", "model", *extra]


def _run(files, out: pathlib.Path, *extra: str) -> int:
    return market_forecast.main(_argv(files, out, *extra))


def _table(out: pathlib.Path, prefix: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(str(f)) for f in sorted(out.glob(f"{prefix}-*.parquet"))])


_REFS: dict = {}


def _references(model, files):
    key = tuple(files)
    if key not in _REFS:  # the batch and replay runs of the same bars share their references
        _REFS[key] = _compute_references(model, files)
    return _REFS[key]


def _compute_references(model, files):
    """Per (symbol, ts): ForecastOperator rows (online features, carried state, one call per timestamp),
    eval forecast's whole-sequence (loc, scale) on offline features, and each bar's next realised return."""
    bars = [b for f in files for b in read_bars(f)]
    rows = sorted(({"symbol": b.symbol, "ts": float(b.ts[i]), **{c: float(getattr(b, c)[i]) for c in COLS}}
                   for b in bars for i in range(len(b))), key=lambda r: r["ts"])
    at: dict[float, list] = {}
    for r in rows:
        at.setdefault(r["ts"] if math.isfinite(r["ts"]) else -math.inf, []).append(r)
    fo, op, dead = ForecastOperator(model), {}, []
    for ts in sorted(at):  # one call per timestamp, as the bars stream in
        got, d = fo.process(at[ts])
        op.update({(r["symbol"], r["ts"]): r for r in got})
        dead += d
    cfg = FeatureConfig(**forecast_meta(model)["features"])
    series = [offline_features(b, cfg) for b in bars]
    whole = model_outputs(model, [SimpleNamespace(series=s) for s in series])
    ev, raw, nxt = {}, {}, {}
    for s, (loc, ls) in zip(series, whole, strict=True):
        y, m = targets(s.ret, s.jump, 1)
        # independent of streamrnn.forecast.scale: the raw ONNX outputs, anchored here by hand when the model
        # says so (loc = exp(log_vol) * mean, log scale = log_vol + log_scale; log_vol is feature 5)
        if not len(s):
            continue
        o, _ = model.step(s.x[None].astype(np.float32), lengths=np.array([len(s)], np.int32))
        lv = s.x[:, 5:6].astype(np.float64) if cfg.anchor else np.zeros((len(s), 1))
        r_loc = o["mean"][0].astype(np.float64) * np.exp(lv)
        r_scale = np.exp(o["log_scale"][0].astype(np.float64) + lv)
        for i, t in enumerate(s.ts):
            ev[(s.symbol, float(t))] = (loc[i], np.exp(ls[i]))
            raw[(s.symbol, float(t))] = (r_loc[i], r_scale[i])
            nxt[(s.symbol, float(t))] = y[i, 0] if m[i, 0] else None
    return op, (ev, raw), nxt, dead


def _parity(model, files, out: pathlib.Path) -> dict:
    op, (ev, raw), nxt, _ = _references(model, files)
    got = _table(out, "forecasts").to_pylist()
    assert len(got) == len(op) == len(ev)
    assert {(r["symbol"], r["ts"]) for r in got} == set(op)
    H = len(next(iter(ev.values()))[0])
    names = [f"h{h}_{n}" for h in range(1, H + 1) for n in ("median", "lo80", "hi80", "lo95", "hi95")]
    worst = {"ret_vs_operator": 0.0, "ret_vs_eval": 0.0, "ret_vs_raw_model": 0.0, "price_rel_vs_operator": 0.0,
             "realised": 0.0}
    for r in got:
        k = (r["symbol"], r["ts"])
        ref = op[k]
        assert r["close"] == ref["close"] and r["flags"] == ref["flags"]
        loc = np.array([r[f"h{h}_ret_loc"] for h in range(1, H + 1)])
        scale = np.array([r[f"h{h}_ret_scale"] for h in range(1, H + 1)])
        worst["ret_vs_operator"] = max(worst["ret_vs_operator"], *np.abs(loc - [ref[f"h{h}_ret_loc"] for h in range(
            1, H + 1)]), *np.abs(scale - [ref[f"h{h}_ret_scale"] for h in range(1, H + 1)]))
        worst["ret_vs_eval"] = max(worst["ret_vs_eval"], *np.abs(loc - ev[k][0]), *np.abs(scale - ev[k][1]))
        worst["ret_vs_raw_model"] = max(worst["ret_vs_raw_model"], *np.abs(loc - raw[k][0]),
                                        *np.abs(scale - raw[k][1]))
        worst["price_rel_vs_operator"] = max(worst["price_rel_vs_operator"],
                                             *(abs(r[n] / ref[n] - 1.0) for n in names))
        if nxt[k] is None:
            assert r["realised_ret_h1"] is None and r["nll_h1"] is None
        else:
            worst["realised"] = max(worst["realised"], abs(r["realised_ret_h1"] - nxt[k]))
            assert math.isclose(r["error_h1"], r["realised_ret_h1"] - r["h1_ret_loc"], abs_tol=1e-12)
            assert r["in80_h1"] == (r["h1_lo80"] <= r["realised_close_h1"] <= r["h1_hi80"])
    print(f"parity {out.name}: {worst}", file=sys.stderr)
    # the same float32 features, the same anchor (the float32 log_vol the model reads): bit-equal forecasts;
    # the hand-anchored raw outputs (one unpadded call) and the float32 realised return agree to rounding
    assert worst["ret_vs_operator"] == 0.0 and worst["ret_vs_eval"] == 0.0, worst
    assert max(worst.values()) <= 1e-5, worst
    return worst


@background.job("market_forecast runs of test_market_job", file=__file__)
def _job_runs(folder: pathlib.Path) -> dict:
    """The job runs of the parity, layout and bad-bar tests below, on inputs written here, run one after another
    in a process of their own (tests/run_jobs.py), beside the other tests (tests/background.py)."""
    import importlib.util

    sim = [str(p) for p in write_sp500_layout(simulate(["AAA", "BB.B", "CCC"], start="2016-01-01", end="2016-08-01",
                                                       seed=3), folder / "sim")]
    # the batch run also plots two symbols (where the plot extra is installed): test_plot_writes_png
    png = folder / "fig" / "f.png" if importlib.util.find_spec("matplotlib") else None
    runs = {"synthetic/batch": _argv(sim, folder / "synthetic-batch",
                                     *(["--plot", str(png), "--plot-symbols", "BB.B,CCC"] if png else [])),
            # 4-week windows over 7 months in one-week watermark steps: the last window's features are released
            # after the last step, in the drain (without it the DirectRunner dropped those 36 forecasts silently)
            "synthetic/replay": _argv(sim, folder / "synthetic-replay", "--replay", "--window", str(28 * DAY),
                                      "--step", str(7 * DAY))}
    real = _real_files(folder / "real") if SP500.is_dir() else []
    if real:
        runs["real/batch"] = _argv(real, folder / "real-batch")
        runs["real/replay"] = _argv(real, folder / "real-replay", "--replay", "--window", str(182 * DAY))
    bars = _layout_bars()
    runs["layout/csv"] = _argv([str(p) for p in write_sp500_layout(bars, folder / "layout-csv")], folder / "layout-a")
    for form in LAYOUTS:
        files, flags = _write_layout(bars, folder / f"layout-{form}", form)
        runs[f"layout/{form}"] = _argv(files, folder / f"layout-{form}-out", *flags)
    good, nocol = _bad_bars(folder / "bad")
    runs["bad bars"] = _argv([str(good), str(nocol)], folder / "bad-out")
    ran = background.run_jobs(folder, {name: ("beam_jobs.market_forecast", argv) for name, argv in runs.items()})
    return {"sim": sim, "real": real, "png": png, "bad": (good, nocol),
            "runs": {name: {**ran[name], "out": pathlib.Path(argv[argv.index("--output") + 1])}
                     for name, argv in runs.items()}}


def _ran(name: str) -> dict:
    """The background run ``name``: it succeeded; its output folder ("out"), what it printed."""
    r = background.result("market_forecast runs of test_market_job")["runs"][name]
    assert r["rc"] == 0, r["stderr"][-3000:]
    return r


@pytest.mark.parametrize("replay", [False, True], ids=["batch", "replay"])
def test_synthetic_market_parity(model, replay):
    # the shipped model is volatility-anchored, so these parity runs cover the job's anchored postprocess
    assert forecast_meta(model)["features"].get("anchor") is True
    r = _ran("synthetic/replay" if replay else "synthetic/batch")
    out, table = r["out"], r["stdout"]
    _parity(model, background.result("market_forecast runs of test_market_job")["sim"], out)
    assert not list(out.glob("dead_letters-*.parquet")) or _table(out, "dead_letters").num_rows == 0
    s = market_forecast.read_summary(str(out))
    t = _table(out, "forecasts")
    known = t.filter(pc.is_valid(t.column("nll_h1")))
    assert s["bars"] == t.num_rows and s["scored"] == known.num_rows
    assert math.isclose(s["nll_h1"], float(np.mean(known.column("nll_h1").to_numpy())), rel_tol=1e-9)
    assert math.isclose(s["coverage_80"], float(np.mean(known.column("in80_h1").to_numpy(zero_copy_only=False))),
                        rel_tol=1e-9)
    assert s["simulated"] is False
    assert "live one-bar-ahead forecast scores" in table
    header = next(line for line in table.splitlines() if line.strip().startswith("symbol"))
    assert header.split()[3:5] == ["nll", "(nats/bar)"], header  # the unit of nll_h1, as the progress line


def _real_files(folder: pathlib.Path) -> list[str]:
    """The REAL symbols' rows (unchanged) from 2014-07-01 to 2015-12-31: both corporate-action jumps with a
    year of history before them (the whole 5 years are 3.3x the bars, and no other case)."""
    folder.mkdir()
    files = []
    for s in REAL:
        header, *rows = (SP500 / f"{s}_data.csv").read_text().splitlines(keepends=True)
        kept = [r for r in rows if "2014-07-01" <= r[:10] <= "2015-12-31"]
        (folder / f"{s}_data.csv").write_text(header + "".join(kept))
        files.append(str(folder / f"{s}_data.csv"))
    return files


@pytest.mark.skipif(not SP500.is_dir(), reason="shared S&P 500 data not mounted")
@pytest.mark.parametrize("replay", [False, True], ids=["batch", "replay"])
def test_real_symbols_parity(model, replay):
    files = background.result("market_forecast runs of test_market_job")["real"]
    out = _ran("real/replay" if replay else "real/batch")["out"]
    _parity(model, files, out)
    assert min(len(b) for f in files for b in read_bars(f)) > 350
    t = _table(out, "forecasts")
    jumps = t.filter(pc.match_substring(t.column("flags"), "jump")).to_pylist()
    assert {(r["symbol"], str(np.datetime64(int(r["ts"]), "s"))[:10]) for r in jumps} >= {
        ("EBAY", "2015-07-20"), ("NI", "2015-07-02")}


def _write_layout(bars, folder: pathlib.Path, form: str) -> tuple[list[str], list[str]]:
    """The same bars as Parquet (other column names, a timestamp column) or the long-daily .txt layout."""
    folder.mkdir()
    if form == "parquet":
        t = pa.table({"Ticker": [b.symbol for b in bars for _ in range(len(b))],
                      "When": pa.array(np.concatenate([b.ts for b in bars]).astype("datetime64[s]")),
                      **{c.title(): np.concatenate([np.round(getattr(b, c), 4) for b in bars]) for c in COLS}})
        pq.write_table(t, str(folder / "bars.parquet"), row_group_size=50)
        return [str(folder / "bars.parquet")], ["--columns", "ts=When,symbol=Ticker"]
    for b in bars:  # Date,Open,High,Low,Close,Volume,OpenInt with CRLF; the symbol is the file name
        lines = ["Date,Open,High,Low,Close,Volume,OpenInt"] + [
            f"{np.datetime64(int(b.ts[i]), 's').astype('datetime64[D]')},"
            + ",".join(f"{getattr(b, c)[i]:.4f}" for c in COLS[:4]) + f",{int(b.volume[i])},0" for i in range(len(b))]
        (folder / f"{b.symbol.lower()}.us.txt").write_bytes(("\r\n".join(lines) + "\r\n").encode())
    return [str(folder)], []


def _layout_bars():
    return simulate(["PQA", "PQB"], start="2016-01-01", end="2016-05-01", seed=5)


def _sorted_forecasts(out: pathlib.Path) -> pa.Table:
    return _table(out, "forecasts").sort_by([("symbol", "ascending"), ("ts", "ascending")])


LAYOUTS = ("parquet", "long_daily_txt")


@pytest.mark.parametrize("form", LAYOUTS)
def test_input_layouts_give_the_same_forecasts(form):
    """The layout's run gives the forecasts of the run over the same bars as S&P 500 CSV files."""
    a, b = (_sorted_forecasts(_ran(name)["out"]) for name in ("layout/csv", f"layout/{form}"))
    assert a.num_rows == sum(len(x) for x in _layout_bars())
    assert a.equals(b)


# -- bad bars --------------------------------------------------------------------------------------
GOOD = {"symbol": "ABC", "open": 10.0, "high": 10.5, "low": 9.8, "close": 10.2, "volume": 1000.0}


def _day(d: int) -> float:
    return float(np.datetime64("2016-01-04", "s").astype(np.int64)) + d * DAY


def _bad_bars(folder: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """A CSV of ABC's bars with bad ones among them, and a file without a close column."""
    lines = ["date,open,high,low,close,volume,Name"]
    rows = [(0, "10,10.5,9.8,10.2,1000,ABC"), (1, "10.2,10.6,10,10.4,1100,ABC"),
            (2, "nan,10.6,10,10.4,1100,ABC"),     # NaN price
            (2, "0,10.6,10,10.4,1100,ABC"),       # zero price
            (2, "10.2,10.6,10,-10.4,1100,ABC"),   # negative price
            (2, "10.2,9.0,10,10.4,1100,ABC"),     # high < low
            (1, "10.2,10.6,10,10.4,1100,ABC"),    # duplicated timestamp
            (2, "10.2,10.6,10,10.4,1100,AB C!"),  # unknown symbol format
            (3, "10.4,10.9,10.3,10.8,900,ABC")]
    for d, r in rows:
        lines.append(f"{np.datetime64(int(_day(d)), 's').astype('datetime64[D]')},{r}")
    folder.mkdir()
    good = folder / "bars.csv"
    good.write_text("\n".join(lines) + "\n")
    nocol = folder / "noclose.csv"
    nocol.write_text("date,open,high,low,volume,Name\n2016-01-04,1,2,0.5,10,XYZ\n")
    return good, nocol


def test_bad_bars_are_dead_letters(model):
    good, nocol = background.result("market_forecast runs of test_market_job")["bad"]
    out = _ran("bad bars")["out"]
    dead = _table(out, "dead_letters").to_pylist()
    reasons = sorted(d["reason"].split(":")[0] for d in dead)
    assert reasons == sorted(["open", "open", "close", "high/low", "ts", "symbol", f"{nocol}"]), dead
    assert {d["kind"] for d in dead if d["reason"].startswith("ts")} == {"duplicate"}
    assert any("'close'" in d["reason"] for d in dead if d["key"] is None)
    # the reasons are ForecastOperator's own (same bars, time order), and the accepted bars' forecasts equal its
    ref_dead = _references(model, [str(good)])[3]
    assert sorted(d.reason for d in ref_dead) == sorted(d["reason"] for d in dead if d["key"] is not None)
    fc = _table(out, "forecasts")
    assert fc.column("ts").to_pylist() == [_day(0), _day(1), _day(3)]
    _parity(model, [str(good)], out)


def test_late_bars_are_dead_letters_and_state_unpoisoned():
    """Streaming: bars out of order within their window are reordered; a bar of a window the symbol already
    released (beyond the allowed lateness) is a `late` dead letter, older or newer than the last applied bar;
    the features of the rest equal OnlineFeatures' over the accepted bars."""
    cfg = FeatureConfig()
    bars = {d: {**GOOD, "ts": _day(d), "close": 10.0 + 0.1 * d, "high": 12.0} for d in range(12)}
    stale = {**bars[3], "close": 99.0}
    opts = PipelineOptions()
    opts.view_as(StandardOptions).streaming = True
    # epoch-aligned weeks: days 0-2 are one window, days 3-9 the next, day 10 on the one after
    stream = (Stream()
              .add_elements([TimestampedValue(bars[d], bars[d]["ts"]) for d in (1, 0, 2, 4, 3)])
              .advance_watermark_to(_day(10) + 1)  # both windows released: days 0..4 applied
              .add_elements([TimestampedValue(b, b["ts"]) for b in (bars[11], stale, bars[5])])
              .advance_watermark_to(END_OF_INPUT).advance_watermark_to_infinity())
    on = OnlineFeatures(cfg)
    want = [on.update(bars[d]) for d in (0, 1, 2, 3, 4, 11)]
    with beam.Pipeline(options=opts) as p:
        events, dead = p | stream | Features(cfg, window=7 * DAY, lateness=0.0)
        assert_that(events | beam.Map(lambda e: (e.ts, e.seq, tuple(np.round(e.x, 12)))),
                    equal_to([(w.ts, i, tuple(np.round(w.x, 12))) for i, w in enumerate(want)]), label="events")
        assert_that(dead | beam.Map(lambda d: (d.kind, d.ts, d.reason.endswith("allowed lateness (late)"))),
                    equal_to([("late", _day(3), True), ("late", _day(5), True)]), label="dead")


def test_epoch_millisecond_bar_is_a_dead_letter_not_a_crash():
    ms = {**GOOD, "ts": _day(0) * 1000.0}
    with beam.Pipeline() as p:
        events, dead = p | beam.Create([ms, {**GOOD, "ts": _day(1)}]) | Features(FeatureConfig(), window=DAY,
                                                                                  lateness=0.0)
        assert_that(events | beam.Map(lambda e: (e.key, e.ts, e.seq)), equal_to([("ABC", _day(1), 0)]), label="ok")
        assert_that(dead | beam.Map(lambda d: (d.kind, "epoch milliseconds" in d.reason)),
                    equal_to([("invalid", True)]), label="dead")


# -- the launcher ----------------------------------------------------------------------------------
def _one_line_error(capsys, code: int, *words: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("market_forecast: "), err
    assert all(w in err[0] for w in words), err


def test_missing_input_unwritable_output_bad_flags(synthetic, tmp_path, capsys):
    _one_line_error(capsys, _run([str(tmp_path / "nope.csv")], tmp_path / "o1"), "nope.csv")
    assert not (tmp_path / "o1").exists()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _one_line_error(capsys, _run(synthetic, blocker / "out"), "output")
    _one_line_error(capsys, _run(synthetic, tmp_path / "o2", "--columns", "when"), "--columns")
    _one_line_error(capsys, _run(synthetic, tmp_path / "o3", "--model", str(tmp_path / "m.onnx")), "model")
    _one_line_error(capsys, _run(synthetic, tmp_path / "o4", "--plot", str(tmp_path / "x.jpg")), "--plot")


def test_plot_writes_png():
    """(The synthetic batch run plotted two symbols.)"""
    pytest.importorskip("matplotlib", reason="needs the 'plot' extra")
    r, png = _ran("synthetic/batch"), background.result("market_forecast runs of test_market_job")["png"]
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    assert "BB.B, CCC" in r["stderr"]
    with pytest.raises(plot.InputError, match="--plot-symbols"):
        plot.plot_forecasts(str(r["out"]), str(png.with_name("other.png")), symbols=["ZZZ"])


def test_plot_without_matplotlib_is_one_line(monkeypatch, synthetic, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    _one_line_error(capsys, _run(synthetic, tmp_path / "o", "--plot", str(tmp_path / "f.png")), "matplotlib")
    assert not (tmp_path / "o").exists()
