"""The pooled scale term's late-row rule (streamrnn/forecast/pooled.py), adversarially (found in review):

Properties: (1) no row's multiplier (and no row's calibrated band) depends on a bar after its own bar time,
whatever the release pattern; (2) chunks cut at release times, the state through JSON / Arrow IPC, equal one
pass; (3) a restored state is either refused or keeps (1)."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pytest
from test_forecast_agaci_job import DF, KW, _ipc_roundtrip

from streamrnn.beam.step.intake import REL
from streamrnn.errors import SnapshotError
from streamrnn.forecast.calibrate_step import Calibrator
from streamrnn.forecast.pooled import HISTORY, MarketScale

H = len(DF)
DAY = 86400.0


def _random_rows(seed: int, n_sym: int = 6, days: int = 40, window: int = 1):
    """Rows of symbols with random calendars (gaps), each released at the window end of its symbol's next bar
    (``window`` days; the last bar at the end): (rel, ts, sym, absz, valid)."""
    rng = np.random.default_rng(seed)
    rel, ts, sym = [], [], []
    for s in range(n_sym):
        d = np.flatnonzero(rng.random(days) < 0.7)
        for i, t in enumerate(d):
            nxt = d[i + 1] if i + 1 < len(d) else days + 100
            rel.append(int((nxt // window + 1) * window * 1_000_000))
            ts.append(float(t))
            sym.append(s)
    n = len(rel)
    absz = np.abs(rng.standard_t(4, (n, H))) * rng.choice([0.5, 1.0, 4.0], (n, 1))
    valid = rng.random((n, H)) < 0.9
    return np.array(rel, np.int64), np.array(ts), np.array(sym), absz, valid


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("window", [1, 3, 7])
def test_no_multiplier_depends_on_a_later_bar(seed, window):
    """Perturb every surprise completed at a bar time after ``t*``: no row at or before ``t*`` may change."""
    rel, ts, _sym, absz, valid = _random_rows(seed, window=window)
    base, _ = MarketScale(0.6, DF).advance(rel, ts, absz, valid)
    for t_star in np.unique(ts)[::5]:
        z2 = absz.copy()
        z2[ts > t_star] *= 7.0
        got, _ = MarketScale(0.6, DF).advance(rel, ts, z2, valid)
        np.testing.assert_array_equal(got[ts <= t_star], base[ts <= t_star], err_msg=f"t*={t_star}")


@pytest.mark.parametrize("seed", range(8))
def test_chunks_at_release_times_through_json_equal_one_pass(seed):
    rel, ts, _sym, absz, valid = _random_rows(seed, window=2)
    whole = MarketScale(0.4, DF)
    f1, _ = whole.advance(rel, ts, absz, valid)
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.unique(rel), 6, replace=False))
    text, parts, lo = None, np.empty_like(f1), -1
    for hi in [*cuts.tolist(), int(rel.max())]:
        sel = (rel > lo) & (rel <= hi)
        ms = MarketScale(0.4, DF)
        ms.restore(text)
        parts[sel], late = ms.advance(rel[sel], ts[sel], absz[sel], valid[sel])
        assert late == 0
        text, lo = ms.to_json(), hi
    np.testing.assert_array_equal(parts, f1)
    assert text == whole.to_json()


def test_history_bound_chunked_equals_one_pass():
    """More than HISTORY bar times, a late row at the oldest kept one, cut into chunks."""
    n = HISTORY + 40
    rel = np.arange(1, n + 1, dtype=np.int64) * 10
    ts = np.arange(n, dtype=float)
    rel = np.concatenate([rel, [10 * n + 5, 10 * n + 5]])
    ts = np.concatenate([ts, [float(n - HISTORY), float(n - HISTORY - 1)]])
    absz = np.abs(np.sin(np.arange(len(ts))[:, None] + np.arange(H))) * 3
    valid = np.ones((len(ts), H), bool)
    whole = MarketScale(0.5, DF)
    f1, _ = whole.advance(rel, ts, absz, valid)
    np.testing.assert_array_equal(f1[-1], np.ones(H))  # one older than the history: the model's scale
    np.testing.assert_array_equal(f1[-2], f1[n - HISTORY])
    text, parts = None, np.empty_like(f1)
    for sel in (rel <= 100, (rel > 100) & (rel <= 10 * n), rel > 10 * n):
        ms = MarketScale(0.5, DF)
        ms.restore(text)
        parts[sel], _ = ms.advance(rel[sel], ts[sel], absz[sel], valid[sel])
        text = ms.to_json()
    np.testing.assert_array_equal(parts, f1)


def _halt_table(b_scale: float) -> pa.Table:
    """A: bars on days 0, 1 and 12 (its day-1 row released on day 12); B, C: every day 0..12; B's closes move
    by ``b_scale`` on days after 1."""
    cols: dict[str, list] = {k: [] for k in ("symbol", "ts", "close", "bar", REL)}
    for name, days in (("A", [0, 1, 12]), ("B", list(range(13))), ("C", list(range(13)))):
        for i, d in enumerate(days):
            cols["symbol"].append(name)
            cols["ts"].append(d * DAY)
            jump = b_scale * (d % 2) if (name == "B" and d > 1) else 0.001 * (d % 2)
            cols["close"].append(40.0 * math.exp(jump))
            cols["bar"].append(i)
            nxt = days[i + 1] if i + 1 < len(days) else 100
            cols[REL].append(int(nxt * DAY * 1_000_000))
    n = len(cols["symbol"])
    extra = {f"h{h}_ret_{w}": [0.0 if w == "loc" else float(h)] * n for h in range(1, H + 1) for w in ("loc", "scale")}
    return pa.table({**cols, **extra, "flags": [""] * n, "model_version": ["m"] * n})


@pytest.mark.parametrize("cut_day", [None, 1, 2, 5, 11])
def test_calibrator_halt_band_ignores_later_closes_chunked(cut_day):
    """Through Calibrator.apply (IPC between chunks, cut at a release time): A's day-1 band is the same whether
    B's later closes are calm or wild."""
    bands = []
    for b in (0.0, 0.3):
        t = _halt_table(b)
        c = Calibrator(DF, pool=0.5, **KW)
        if cut_day is None:
            out = c.apply(None, None, t)[0]
        else:
            rel = t.column(REL).to_numpy()
            first = rel <= int(cut_day * DAY * 1_000_000)
            o1, st, rg = c.apply(None, None, t.filter(pa.array(first)))
            o2 = c.apply(_ipc_roundtrip(st), _ipc_roundtrip(rg), t.filter(pa.array(~first)))[0]
            out = pa.concat_tables([o1, o2])
        d = out.to_pydict()
        i = next(k for k, (s, bar) in enumerate(zip(d["symbol"], d["bar"], strict=True)) if s == "A" and bar == 1)
        bands.append([d[f"h{h}_cal_hi80"][i] for h in range(1, H + 1)])
    assert bands[0] == bands[1]


def test_a_state_without_clock_is_refused_or_late_rows_stay_causal():
    """A pooled state written before 4af9e5a (c0acca8: u, steps, last_rel only; restore still accepts it) must
    not let a late row be issued at a u that saw later bars: either the restore refuses it, or the late row
    gets the model's own scale (its bar time is outside the (empty) history)."""
    rel = np.arange(1, 11, dtype=np.int64) * 10
    ts = np.arange(10, dtype=float)
    absz, valid = np.full((10, H), 3.0), np.ones((10, H), bool)
    ms = MarketScale(0.5, DF)
    ms.advance(rel, ts, absz, valid)
    old = json.loads(ms.to_json())
    legacy = json.dumps({k: old[k] for k in ("u", "steps", "last_rel")})
    back = MarketScale(0.5, DF)
    try:
        back.restore(legacy)
    except SnapshotError:
        return
    f, _ = back.advance(np.array([105]), np.array([2.0]), np.zeros((1, H)), np.zeros((1, H), bool))
    # the row's bar time (2) is before the bars the state learned from (up to 9)
    np.testing.assert_array_equal(f[0], np.ones(H))


@pytest.mark.parametrize("hist", ['[[NaN, [0.1, 0.1]]]', '[[Infinity, [0.1, 0.1]]]'])
def test_a_history_clock_that_is_not_a_finite_time_is_refused(hist):
    ms = MarketScale(0.5, DF)
    with pytest.raises(SnapshotError, match="history"):
        ms.restore(f'{{"u": [0, 0], "steps": 1, "last_rel": 5, "clock": 3.0, "history": {hist}}}')


def test_a_clock_behind_its_history_is_refused():
    """clock 3 with a history entry at 9: the next on-time step (bar time 5) appends after 9, and the state
    then written is refused by restore (out of clock order): refuse it when read instead."""
    ms = MarketScale(0.5, DF)
    with pytest.raises(SnapshotError):
        ms.restore('{"u": [0, 0], "steps": 1, "last_rel": 5, "clock": 3.0, "history": [[9.0, [0.1, 0.1]]]}')
