"""The market job's online calibration (ACI per symbol) and live scores of every horizon (issue 15).

References, computed here from the job's own output rows (its closes and the model's own forecasts,
``h{h}_ret_loc`` / ``h{h}_ret_scale``): the h-bar targets from the closes (invalid across a corporate-action
jump), an offline :class:`OnlineConformal` run over each symbol's rows from its first one, and scipy's
Student-t for the scores. Three job runs share them (a background job, tests/background.py): the demo (batch,
default levels), a ``--replay`` of the demo's bars (DirectRunner ``--streaming``, other levels, tails and
gamma), and a batch run of the same bars split over several files in shuffled row order, with a corporate
action injected.
"""

from __future__ import annotations

import itertools
import json
import math
import pathlib
import random

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
from prometheus_client import CollectorRegistry
from scipy import stats

from beam_jobs import market_forecast
from streamrnn.forecast.beam_output import output_schema
from streamrnn.forecast.calibrate_step import Calibrate, Calibrator, score_sums
from streamrnn.forecast.conformal import GAMMA, LEVELS, TAILS, OnlineConformal, bands, label
from streamrnn.forecast.evaluate import eval_forecast, forecast_meta
from streamrnn.metrics.catalogue import Recorder
from streamrnn.model.loaded import load
from streamrnn.model.runtime import CPU

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODEL = str(ROOT / "exported" / "market.onnx")
DAY = 86400.0
CUSTOM = {"levels": (0.6, 0.9), "tails": (0.02, 0.1), "gamma": 0.05, "scaling": "constant"}
DEFAULT = {"levels": LEVELS, "tails": TAILS, "gamma": GAMMA}
POOL = 0.3


@pytest.fixture(scope="module")
def df() -> list[float]:
    return [float(d) for d in forecast_meta(load(MODEL, providers=[CPU]))["df"]]


def _argv(*argv: str) -> list[str]:
    return [*argv, "--quiet", "--metrics-port", "0", "--model", MODEL]


def _main(*argv: str) -> int:
    return market_forecast.main(_argv(*argv))


def _table(out: pathlib.Path) -> pa.Table:
    t = pa.concat_tables([pq.read_table(str(f)) for f in sorted(out.glob("forecasts-*.parquet"))])
    return t.sort_by([("symbol", "ascending"), ("bar", "ascending")])


JOB = "market_forecast runs of test_market_job_calibration"


@background.job(JOB, file=__file__)
def _job_runs(folder: pathlib.Path) -> dict[str, pathlib.Path]:
    """The demo, then a replay and a split batch run of its bars (below), run in processes of their own
    (tests/run_jobs.py) beside the other tests (tests/background.py): {run: output folder}."""
    out = {name: folder / name for name in ("demo", "replay", "split", "pool_batch", "pool_replay", "pool_demo")}
    for step in ("first", "then"):
        (folder / step).mkdir()
    _ran(background.run_jobs(folder / "first", {"demo": ("beam_jobs.market_forecast",
                                                         _argv("--demo", "--output", str(out["demo"])))}))
    bars = sorted((out["demo"] / "simulated_bars").glob("*.csv"))
    replay_bars = _replay_bars(bars, folder / "replay_bars")
    # the market-wide scale term (--pool): bounded and streaming, on other shard counts, must agree; SIMB halts
    # across a 28-day window's end (2016-02-25), so its last row before the halt is released late, after
    # the other symbols' later days
    halted = folder / "halted_bars"
    halted.mkdir()
    for path in replay_bars.glob("*.csv"):
        head, *rows = path.read_text().splitlines()
        keep = [r for r in rows if not (path.name.startswith("SIMB") and "2016-02-22" <= r[:10] <= "2016-03-01")]
        (halted / path.name).write_text("\n".join([head, *keep]) + "\n")
    pooled = ("--input", str(halted), "--window", str(28 * DAY), "--pool", str(POOL))
    _ran(background.run_jobs(folder / "then", {
        "pool_batch": ("beam_jobs.market_forecast", _argv(*pooled, "--output", str(out["pool_batch"]),
                                                          "--shards", "5")),
        "pool_replay": ("beam_jobs.market_forecast", _argv(*pooled, "--output", str(out["pool_replay"]),
                                                           "--shards", "2", "--replay")),
        # the default window (one daily bar per window) and the model's location: eval forecast's setting
        "pool_demo": ("beam_jobs.market_forecast", _argv(
            "--input", str(out["demo"] / "simulated_bars"), "--output", str(out["pool_demo"]), "--pool", str(POOL),
            "--location", "model")),
        "replay": ("beam_jobs.market_forecast", _argv(
            "--input", str(replay_bars), "--output", str(out["replay"]), "--replay",
            "--window", str(28 * DAY), "--levels", ",".join(map(str, CUSTOM["levels"])),
            "--var", ",".join(map(str, CUSTOM["tails"])), "--gamma", str(CUSTOM["gamma"]),
            "--gamma-scaling", CUSTOM["scaling"])),
        "split": ("beam_jobs.market_forecast", _argv(
            "--input", str(_split_bars(bars, folder / "split_bars")), "--output", str(out["split"]),
            "--location", "model"))}))
    return out


def _ran(runs: dict[str, dict]) -> None:
    for name, r in runs.items():
        assert r["rc"] == 0, f"{name}: {r['stderr'][-3000:]}"


def _run(name: str, settings: dict) -> dict:
    out = background.result(JOB)[name]
    return {"out": out, "t": _table(out), "summary": json.loads((out / "summary.json").read_text()), **settings}


@pytest.fixture(scope="module")
def demo() -> dict:
    return _run("demo", DEFAULT)


@pytest.fixture(scope="module")
def replay() -> dict:
    """The demo's first four months (a replay costs about a second per window step), other levels and gamma."""
    return _run("replay", CUSTOM)


@pytest.fixture(scope="module")
def split() -> dict:
    """The demo's bars in 3 files per symbol, rows shuffled; SIMC halves from 2016-09-01 (a corporate action)."""
    return _run("split", DEFAULT)


def _replay_bars(bars: list[pathlib.Path], folder: pathlib.Path) -> pathlib.Path:
    folder.mkdir()
    for path in bars:
        head, *rows = path.read_text().splitlines()
        (folder / path.name).write_text("\n".join([head, *(r for r in rows if r[:10] < "2016-05-01")]) + "\n")
    return folder


def _split_bars(bars: list[pathlib.Path], folder: pathlib.Path) -> pathlib.Path:
    folder.mkdir()
    rng = random.Random(0)
    for path in bars:
        head, *rows = path.read_text().splitlines()
        if path.name.startswith("SIMC"):
            rows = [_halved(r) if r[:10] >= "2016-09-01" else r for r in rows]
        for k in range(3):
            part = rows[k * len(rows) // 3:(k + 1) * len(rows) // 3]
            rng.shuffle(part)
            (folder / f"{path.stem}_{k}.csv").write_text("\n".join([head, *part]) + "\n")
    return folder


def _halved(row: str) -> str:
    f = row.split(",")
    if len(f) != 7 or not f[1].replace(".", "").isdigit():
        return row
    return ",".join([f[0], *(f"{float(x) / 2:.4f}" for x in f[1:5]), *f[5:]])


# -- the offline reference ------------------------------------------------------------------------------
def _symbol(t: pa.Table, sym: str, H: int) -> dict:
    s = t.filter(pc.equal(t.column("symbol"), sym))
    close = s.column("close").to_numpy()
    bar = s.column("bar").to_numpy()
    jump = np.array(["jump" in f.split(",") for f in s.column("flags").to_pylist()])
    loc = np.stack([s.column(f"h{h}_ret_loc").to_numpy() for h in range(1, H + 1)], 1)
    scale = np.stack([s.column(f"h{h}_ret_scale").to_numpy() for h in range(1, H + 1)], 1)
    n = len(close)
    y, valid = np.zeros((n, H)), np.zeros((n, H), bool)
    for t0 in range(n):  # origin-indexed targets from the closes, by hand
        for h in range(1, H + 1):
            if t0 + h < n and bar[t0 + h] - bar[t0] == h and not jump[t0 + 1:t0 + h + 1].any():
                y[t0, h - 1], valid[t0, h - 1] = close[t0 + h] / close[t0], True
    y = 100.0 * np.log(y, out=np.zeros_like(y), where=valid)
    return {"s": s, "close": close, "loc": loc, "scale": scale, "y": y, "valid": valid, "n": n}


def _check_against_offline(run: dict, df: list[float]) -> int:
    """Every calibrated column equals an offline OnlineConformal.run over the symbol's rows; every score
    equals scipy's on the closes and the origin's forecast. Returns the h2..h5 targets scored."""
    t, H = run["t"], len(df)
    assert t.schema == output_schema(H, run["levels"], run["tails"])
    scored = 0
    for sym in sorted(set(t.column("symbol").to_pylist())):
        r = _symbol(t, sym, H)
        cal = OnlineConformal(df, levels=run["levels"], tails=run["tails"], gamma=run["gamma"],
                              scaling=run.get("scaling", "proportional"))
        a = cal.run([sym], r["y"][None], r["loc"][None], r["scale"][None], r["valid"][None])[0]
        b = bands(a, r["loc"], r["scale"], df, cal.config)
        s, close = r["s"], r["close"]
        for h in range(1, H + 1):
            for lv in run["levels"]:
                for side in ("lo", "hi"):
                    want = close * np.exp(b[f"{side}{label(lv)}"][:, h - 1] / 100.0)
                    np.testing.assert_array_equal(s.column(f"h{h}_cal_{side}{label(lv)}").to_numpy(), want)
            for p in run["tails"]:
                var = b[f"var{label(p)}"][:, h - 1]
                np.testing.assert_array_equal(s.column(f"h{h}_var{label(p)}").to_numpy(), var)
                np.testing.assert_array_equal(s.column(f"h{h}_es{label(p)}").to_numpy(), b[f"es{label(p)}"][:, h - 1])
                np.testing.assert_array_equal(s.column(f"h{h}_var{label(p)}_price").to_numpy(),
                                              close * np.exp(-var / 100.0))
            # the scores at each completing row t1 = origin + h (null where no valid target ends there)
            o = np.arange(r["n"]) - h
            ok = (o >= 0) & r["valid"][np.maximum(o, 0), h - 1]
            t1, o = np.flatnonzero(ok), o[ok]
            scored += len(t1) * (h > 1)
            col = {c: s.column(f"scored_h{h}_{c}") for c in ("ret", "error", "nll", "origin_ts")}
            assert all(col[c].null_count == r["n"] - len(t1) for c in col)
            yv, lo_, sc = r["y"][o, h - 1], r["loc"][o, h - 1], r["scale"][o, h - 1]

            def at(name: str, s=s, t1=t1) -> np.ndarray:
                return np.asarray(s.column(name).take(pa.array(t1)).to_pylist())

            def origin(name: str, s=s, o=o) -> np.ndarray:
                return s.column(name).to_numpy()[o]

            np.testing.assert_allclose(at(f"scored_h{h}_ret"), yv, rtol=0, atol=1e-12)  # np.log: rounding may differ
            np.testing.assert_allclose(at(f"scored_h{h}_error"), yv - lo_, rtol=0, atol=1e-12)
            np.testing.assert_array_equal(at(f"scored_h{h}_origin_ts"), origin("ts"))
            np.testing.assert_allclose(at(f"scored_h{h}_nll"), -stats.t.logpdf(yv, df[h - 1], lo_, sc), rtol=1e-9)
            for lv in run["levels"]:
                half = stats.t.ppf(0.5 + lv / 2, df[h - 1]) * sc
                np.testing.assert_array_equal(at(f"scored_h{h}_in{label(lv)}"), np.abs(yv - lo_) <= half)
                # calibrated: inside the band that the origin row issued (its price columns)
                inside = (origin(f"h{h}_cal_lo{label(lv)}") <= close[t1]) & (close[t1] <= origin(
                    f"h{h}_cal_hi{label(lv)}"))
                np.testing.assert_array_equal(at(f"scored_h{h}_cal_in{label(lv)}"), inside)
            for p in run["tails"]:
                np.testing.assert_array_equal(at(f"scored_h{h}_var{label(p)}_breach"),
                                              yv < lo_ + stats.t.ppf(p, df[h - 1]) * sc)
                np.testing.assert_array_equal(at(f"scored_h{h}_cal_var{label(p)}_breach"),
                                              close[t1] < origin(f"h{h}_var{label(p)}_price"))
    return scored


def _check_summary(run: dict) -> None:
    """summary.json's horizons blocks (per symbol and overall) are the means of the rows' score columns."""
    t, s = run["t"], run["summary"]
    H = len([c for c in t.column_names if c.startswith("scored_h") and c.endswith("_nll")])
    assert set(s["horizons"]) == {f"h{h}" for h in range(1, H + 1)}
    for scope, part in [("all", t), *((k, t.filter(pc.equal(t.column("symbol"), k))) for k in s["symbols"])]:
        got = s["horizons"] if scope == "all" else s["symbols"][scope]["horizons"]
        for h in range(1, H + 1):
            known = part.filter(pc.is_valid(part.column(f"scored_h{h}_nll")))
            g = got[f"h{h}"]
            assert g["scored"] == known.num_rows > 0
            assert math.isclose(g["nll"], float(np.mean(known.column(f"scored_h{h}_nll").to_numpy())), rel_tol=1e-9)
            for lv in run["levels"]:
                for how, c in (("raw", "in"), ("calibrated", "cal_in")):
                    want = float(np.mean(known.column(f"scored_h{h}_{c}{label(lv)}").to_numpy(zero_copy_only=False)))
                    assert math.isclose(g["coverage"][label(lv)][how], want, rel_tol=1e-12)


# -- the job runs -----------------------------------------------------------------------------------------
def test_demo_calibrated_columns_equal_offline_aci_and_scores(demo, df):
    assert demo["summary"]["simulated"] is True
    assert _check_against_offline(demo, df) > 4 * 1000
    _check_summary(demo)
    assert demo["summary"]["calibration"] == {"levels": list(LEVELS), "var": list(TAILS), "gamma": GAMMA,
                                              "gamma_scaling": "proportional"}
    # the h1 scores from the closes agree with the job's h1 columns from the float32 features
    t = demo["t"]
    for sym in set(t.column("symbol").to_pylist()):
        s = t.filter(pc.equal(t.column("symbol"), sym))
        prev = np.array(s.column("realised_ret_h1").to_pylist()[:-1], dtype=float)
        now = np.array(s.column("scored_h1_ret").to_pylist()[1:], dtype=float)
        np.testing.assert_allclose(now, prev, atol=1e-5)


def test_replay_equals_offline_with_other_levels_and_the_batch_scores(demo, replay, df):
    _check_against_offline(replay, df)
    _check_summary(replay)
    assert replay["summary"]["calibration"]["gamma"] == CUSTOM["gamma"]
    assert replay["summary"]["calibration"]["gamma_scaling"] == "constant"
    # causal: the scores that do not depend on the levels are the batch run's on the same bars, bit for bit
    cols = ["symbol", "bar", *(f"scored_h{h}_{c}" for h in range(1, len(df) + 1) for c in ("origin_ts", "ret", "nll"))]
    r = replay["t"].select(cols)
    may = float(np.datetime64("2016-05-01", "s").astype(np.int64))
    d = demo["t"].filter(pc.less(demo["t"].column("ts"), may)).select(cols)
    assert r.num_rows > 4 * 70 and r.equals(d)


def test_pooled_scale_bounded_equals_streaming_on_other_shard_counts(df):
    """``--pool``: a batch run on 5 shards and a streaming replay on 2 give the same bands and scores, bit for
    bit, with one symbol's row released late by a halt (the term reads every symbol, so the step is one Beam key
    whatever --shards is), and the term moved them
    (the per-symbol calibrator alone gives other bands on the same rows)."""
    b, r = _run("pool_batch", DEFAULT), _run("pool_replay", DEFAULT)
    simb = b["t"].filter(pc.equal(b["t"].column("symbol"), "SIMB")).column("ts").to_numpy()
    assert not ((simb >= np.datetime64("2016-02-22", "s").astype(np.int64))
                & (simb < np.datetime64("2016-03-02", "s").astype(np.int64))).any()  # the halt is there
    cols = [c for c in b["t"].column_names if "_cal_" in c or c.startswith(("scored_", "symbol", "bar"))
            or "_var" in c or "_es" in c]
    assert b["t"].num_rows > 4 * 70 and b["t"].select(cols).equals(r["t"].select(cols))
    assert b["summary"]["calibration"]["pool"] == r["summary"]["calibration"]["pool"] == POOL
    base = b["t"].select([c for c in b["t"].column_names if c in set(output_schema(len(df)).names)
                          and not any(k in c for k in ("_cal_", "scored_", "_var", "_es"))])
    alone = Calibrator(df).apply(None, None, base)[0]
    assert not alone.column("h1_cal_lo80").equals(b["t"].column("h1_cal_lo80"))


def test_pooled_scale_in_the_job_equals_eval_forecast(demo):
    """``eval forecast --pool`` (the pooled multipliers computed offline over every symbol's bars) scores the
    calibrated bands the job serves with ``--pool`` and the model's location: the same coverage at every horizon
    and level, to the last point; with the term off, eval gives other numbers (the term is not a no-op)."""
    job = _table(background.result(JOB)["pool_demo"])
    start = "2017-01-02"
    on = eval_forecast(MODEL, str(demo["out"] / "simulated_bars"), start=start, garch=False, pool=POOL)
    off = eval_forecast(MODEL, str(demo["out"] / "simulated_bars"), start=start, garch=False)
    assert on["conformal"]["pool"] == POOL and off["conformal"]["pool"] == 0.0
    s0 = float(np.datetime64(start, "s").astype(np.int64))
    differ = 0
    for h in range(1, 6):
        origin = np.array([np.nan if v is None else v for v in job.column(f"scored_h{h}_origin_ts").to_pylist()])
        sel = origin >= s0
        g = on["conformal"]["groups"]["all"][f"h{h}"]
        assert g["n"] == int(sel.sum()) > 400
        for lv in LEVELS:
            hits = np.array(job.column(f"scored_h{h}_cal_in{label(lv)}").to_pylist(), dtype=object)[sel].astype(bool)
            assert g["levels"][label(lv)]["aci"]["coverage"] == pytest.approx(100 * hits.mean(), abs=1e-9), (h, lv)
            differ += off["conformal"]["groups"]["all"][f"h{h}"]["levels"][label(lv)]["aci"]["coverage"] != \
                g["levels"][label(lv)]["aci"]["coverage"]
    assert differ >= 10


def test_split_shuffled_files_with_a_corporate_action_equal_offline(demo, split, df):
    scored = _check_against_offline(split, df)
    assert scored > 4 * 1000
    _check_summary(split)
    t = split["t"]
    c = t.filter(pc.equal(t.column("symbol"), "SIMC"))
    j = [i for i, f in enumerate(c.column("flags").to_pylist()) if "jump" in f]
    assert len(j) == 1  # the corporate action: no target across it is scored
    for h in range(1, len(df) + 1):
        assert c.column(f"scored_h{h}_ret")[j[0] + h - 1].as_py() is None
    # the symbols without the corporate action: the demo's forecasts of other files and order, so the same
    # scores where the location does not enter (the demo serves location 0)
    for sym in ("SIMA", "SIMB", "SIMD"):
        a, b = (x.filter(pc.equal(x.column("symbol"), sym)) for x in (demo["t"], t))
        assert a.column("scored_h3_ret").equals(b.column("scored_h3_ret"))
        assert a.column("h3_ret_scale").equals(b.column("h3_ret_scale"))


def test_levels_var_gamma_pool_errors_are_one_line(tmp_path, capsys):
    for flags, words in ((["--levels", "0.8,1.2"], ("--levels", "interval levels", "0.8,1.2")),
                         (["--levels", "0.8,0.8"], ("--levels",)), (["--levels", "abc"], ("--levels", "abc")),
                         (["--levels", "0.8,0.80000000001"], ("--levels", "distinct")),
                         (["--var", "0.6"], ("--var", "tail")), (["--gamma", "0"], ("--gamma", "fraction")),
                         (["--pool", "1.5"], ("--pool", "fraction", "1.5")), (["--pool", "x"], ("--pool", "x"))):
        code = _main("--demo", "--output", str(tmp_path / "o"), *flags)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("market_forecast: "), (flags, err)
        assert all(w in err[0] for w in words), (flags, err)
        assert not (tmp_path / "o").exists()


# -- the step itself --------------------------------------------------------------------------------------
def _rows(sym: str, a: int, b: int, H: int = 2, n: int = 60) -> pa.Table:
    """Rows ``a:b`` of a symbol's ``n`` job rows (random forecasts); G: every other bar index is missing."""
    rng = np.random.default_rng(ord(sym[0]))
    t = {"symbol": [sym] * n, "ts": np.arange(n) * DAY, "close": 50 * np.exp(np.cumsum(rng.normal(0, 0.02, n))),
         "bar": np.arange(n) * (2 if sym == "G" else 1), "flags": [""] * n}
    for h in range(1, H + 1):
        t[f"h{h}_ret_loc"], t[f"h{h}_ret_scale"] = rng.normal(0, 0.1, n), np.exp(rng.normal(0, 0.3, n)) * h
    t["model_version"] = ["m"] * n
    return pa.table(t).slice(a, b - a)


def test_chunks_and_symbols_in_any_order_equal_one_pass():
    """Rows applied in chunks (learn per bar, the state through Arrow) == one pass (run), whatever the order
    of symbols and rows inside a chunk; a symbol whose bar indices skip (a dead-lettered bar) scores nothing."""
    c = Calibrator([4.0, 6.0], levels=(0.8,), tails=(0.05,), gamma=0.1)
    syms = ("A", "B", "G")

    def go(cuts: list[int], seed: int) -> pa.Table:
        aci = ring = None
        outs = []
        for a, b in itertools.pairwise(cuts):
            rows = pa.concat_tables([_rows(s, a, b) for s in syms])
            rows = rows.take(pa.array(np.random.default_rng(seed).permutation(rows.num_rows)))
            out, aci, ring = c.apply(aci, ring, rows)
            assert pa.ipc.open_stream(_ipc(aci)).read_all().equals(aci)  # what Beam state holds
            outs.append(out)
        return pa.concat_tables(outs).sort_by([("symbol", "ascending"), ("bar", "ascending")])

    whole = go([0, 60], 1)
    assert go([0, 1, 2, 7, 30, 31, 60], 2).equals(whole)
    g = whole.filter(pc.equal(whole.column("symbol"), "G"))
    assert g.column("scored_h1_ret").null_count == g.num_rows
    _, aci, ring = c.apply(None, None, _rows("A", 0, 5))
    with pytest.raises(RuntimeError, match="out of bar order"):
        c.apply(aci, ring, _rows("A", 3, 6))


def _ipc(t: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, t.schema) as w:
        w.write_table(t)
    return sink.getvalue().to_pybytes()


def test_streaming_outputs_keep_their_timestamps_and_equal_the_batch_values():
    """A TestStream: each block goes out at its own timestamp (never before the timer that applies it), and
    the rows equal a bounded run's."""
    df = [4.0, 6.0]
    steps = [(1000.0 + a * DAY, [_rows(s, a, a + 5) for s in ("A", "B")]) for a in (0, 5, 10)]
    blocks = [(rows, at) for at, part in steps for rows in part]
    opts = PipelineOptions()
    opts.view_as(StandardOptions).streaming = True
    stream = Stream()
    for at, part in steps:
        stream = stream.add_elements([TimestampedValue(r.combine_chunks().to_batches()[0], at) for r in part])
        stream = stream.advance_watermark_to(at + 1)
    stream = stream.advance_watermark_to_infinity()

    def stamped(b, t=beam.DoFn.TimestampParam):
        return [(r["symbol"], r["bar"], float(t), r["h2_cal_lo80"], r["scored_h2_cal_in80"]) for r in b.to_pylist()]

    with beam.Pipeline(options=opts) as p:
        got = p | stream | Calibrate(df, levels=(0.8,), tails=(0.05,), gamma=0.1, num_shards=2) | beam.FlatMap(stamped)
        c = Calibrator(df, levels=(0.8,), tails=(0.05,), gamma=0.1)
        out, _, _ = c.apply(None, None, pa.concat_tables([r for r, _ in blocks]))
        at = {(r["symbol"], r["bar"]): t for rows, t in blocks for r in rows.to_pylist()}
        want = [(r["symbol"], r["bar"], at[(r["symbol"], r["bar"])], r["h2_cal_lo80"], r["scored_h2_cal_in80"])
                for r in out.to_pylist()]
        assert_that(got, equal_to(want))


def test_live_metrics_per_horizon_are_the_rows_scores(demo):
    """The Prometheus counters the step feeds (labelled by horizon, level, tail, calibration; never a symbol)
    hold the sums of the rows' score columns."""
    t, reg = demo["t"], CollectorRegistry()
    sums = score_sums(t, 5, demo["levels"], demo["tails"], by="model_version")
    (version, s), = sums.items()
    Recorder("j", reg).forecast_horizons(version, s, [label(x) for x in demo["levels"]],
                                         [label(x) for x in demo["tails"]])
    for h in range(1, 6):
        lab = {"job": "j", "model_version": version, "horizon": str(h)}
        known = t.filter(pc.is_valid(t.column(f"scored_h{h}_nll")))
        assert reg.get_sample_value("streamrnn_forecast_scored_total", lab) == known.num_rows
        assert math.isclose(reg.get_sample_value("streamrnn_forecast_loss_nats_total", lab),
                            float(np.sum(known.column(f"scored_h{h}_nll").to_numpy())), rel_tol=1e-12)
        hits = pc.sum(known.column(f"scored_h{h}_cal_in80").cast(pa.int64())).as_py()
        assert reg.get_sample_value("streamrnn_forecast_in_interval_total",
                                    {**lab, "level": "80", "calibration": "calibrated"}) == hits
        breaches = pc.sum(known.column(f"scored_h{h}_var1_breach").cast(pa.int64())).as_py()
        assert reg.get_sample_value("streamrnn_forecast_var_breaches_total",
                                    {**lab, "tail": "1", "calibration": "raw"}) == breaches
    labels = {name for m in reg.collect() if m.name.startswith("streamrnn_forecast_") for smp in m.samples
              for name in smp.labels}
    assert labels == {"job", "model_version", "horizon", "level", "tail", "calibration"}, labels

