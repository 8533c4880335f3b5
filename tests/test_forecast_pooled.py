"""The market-wide scale term of the market job's calibration (issue 15, ``--pool``; streamrnn.forecast.pooled).

Reference: a plain loop over the steps in ``(release time, bar time)`` order (a row released late issued at the
``u`` of its bar time), with ``E|T|`` from scipy, the
per-symbol calibrator ``OnlineConformal`` fed one bar at a time (``learn_one`` / ``predict_one``) at the pooled
scales. The job's vectorised step must equal it; chunks through Arrow IPC (a cold worker) must equal one pass;
a row behind an applied step is applied and counted, never lost."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
from scipy import stats
from test_forecast_agaci_job import DF, KW, _ipc_roundtrip

from streamrnn.beam.step.clock import END_OF_INPUT_MICROS
from streamrnn.beam.step.intake import REL
from streamrnn.errors import DeployError, InputError
from streamrnn.forecast.calibrate_step import POOL_META, Calibrator
from streamrnn.forecast.conformal import OnlineConformal, label
from streamrnn.forecast.pooled import HISTORY, POOL_BOUND, POOL_N0, MarketScale, expected_abs_t

DAY = 86400.0
H = 2


def _table(rng: np.random.Generator, symbols: int = 5, days: int = 70, gaps: dict | None = None) -> pa.Table:
    """Daily rows of ``symbols`` symbols with a common shock (days 30..40 at 4x the forecast scale, every symbol),
    each row released at its symbol's next bar (the last ones at the end of the input); ``gaps``: symbol index ->
    days it has no bar (a halt: its row before the gap is released only after it)."""
    gaps = gaps or {}
    common = rng.standard_t(5, days) * np.where((np.arange(days) >= 30) & (np.arange(days) < 40), 4.0, 0.7)
    cols: dict[str, list] = {k: [] for k in ("symbol", "ts", "close", "bar", REL)}
    locs = {f"h{h}_ret_{w}": [] for h in range(1, H + 1) for w in ("loc", "scale")}
    for s in range(symbols):
        days_s = [d for d in range(days) if d not in gaps.get(s, ())]
        ret = common[days_s] + rng.standard_t(5, len(days_s)) * 0.7
        close = 40.0 * np.exp(np.cumsum(ret) / 100)
        for i, d in enumerate(days_s):
            cols["symbol"].append(f"S{s}")
            cols["ts"].append(d * DAY)
            cols["close"].append(close[i])
            cols["bar"].append(i)
            nxt = days_s[i + 1] * DAY * 1e6 if i + 1 < len(days_s) else END_OF_INPUT_MICROS
            cols[REL].append(int(nxt))
            for h in range(1, H + 1):
                locs[f"h{h}_ret_loc"].append(0.02 * h)
                locs[f"h{h}_ret_scale"].append(math.sqrt(h) * (0.9 + 0.1 * (s % 3)))
    n = len(cols["symbol"])
    return pa.table({**cols, **locs, "flags": [""] * n, "model_version": ["m"] * n})


def _reference(t: pa.Table, w: float) -> dict[tuple[str, int], dict[str, np.ndarray]]:
    """Each row's calibrated bands (prices) by (symbol, bar), from the plain loop (module doc)."""
    rows = t.to_pylist()
    eabs = [stats.t(d).expect(abs) for d in DF]
    hist: dict[str, list[dict]] = {}
    cal = OnlineConformal(DF, **KW)
    u = [0.0] * H
    clock, seen_u = None, {}  # the latest bar time of a step; u at the end of each bar time's steps
    out = {}
    steps: dict[tuple[int, float], list[dict]] = {}
    for r in rows:
        steps.setdefault((r[REL], r["ts"]), []).append(r)
    for key in sorted(steps):
        step = steps[key]
        learned = []
        for r in step:
            past = hist.setdefault(r["symbol"], [])
            y, loc, scale, valid, absz = [0.0] * H, [0.0] * H, [1.0] * H, [False] * H, [None] * H
            for h in range(1, H + 1):
                if len(past) >= h:
                    o = past[-h]
                    y[h - 1] = 100 * math.log(r["close"] / o["close"])
                    loc[h - 1] = o[f"h{h}_ret_loc"]
                    scale[h - 1] = o[f"h{h}_ret_scale"] * o["mult"][h - 1]
                    valid[h - 1] = True
                    absz[h - 1] = abs(y[h - 1] - o[f"h{h}_ret_loc"]) / o[f"h{h}_ret_scale"]
            learned.append((r, y, loc, scale, valid, absz))
        for h in range(H):
            zs = [a[h] for *_, a in learned if a[h] is not None]
            if zs:
                wn = w * len(zs) / (len(zs) + POOL_N0)
                target = min(max(math.log(sum(zs) / len(zs) / eabs[h]), -POOL_BOUND), POOL_BOUND)
                u[h] = min(max((1 - wn) * u[h] + wn * target, -POOL_BOUND), POOL_BOUND)
        ts = key[1]
        if clock is None or ts >= clock:
            clock, issue = ts, list(u)
            seen_u[ts] = issue
        else:  # released late: u as it was when the clock was at its bar time
            before = [c for c in seen_u if c <= ts]
            issue = seen_u[max(before)] if before else [0.0] * H
        for r, y, loc, scale, valid, _ in learned:
            if any(valid):
                cal.learn_one(r["symbol"], y, loc, scale, valid)
            else:
                cal.learn_one(r["symbol"])
            mult = [math.exp(x) for x in issue]
            b = cal.predict_one(r["symbol"], [r[f"h{h}_ret_loc"] for h in range(1, H + 1)],
                                [r[f"h{h}_ret_scale"] * mult[h - 1] for h in range(1, H + 1)])
            out[(r["symbol"], r["bar"])] = {k: r["close"] * np.exp(v / 100) if k[:2] in ("lo", "hi") else v
                                            for k, v in b.items() if k != "alpha"}
            hist[r["symbol"]].append({**r, "mult": mult})
    return out


def _check(out: pa.Table, ref: dict) -> None:
    got = out.to_pydict()
    assert len(got["symbol"]) == len(ref)
    for i, key in enumerate(zip(got["symbol"], got["bar"], strict=True)):
        want = ref[key]
        for h in range(1, H + 1):
            for lv in KW["levels"]:
                for side in ("lo", "hi"):
                    np.testing.assert_allclose(got[f"h{h}_cal_{side}{label(lv)}"][i], want[f"{side}{label(lv)}"][h - 1],
                                               rtol=1e-12, err_msg=f"{key} h{h} {side}{lv}")
            for p in KW["tails"]:
                np.testing.assert_allclose(got[f"h{h}_var{label(p)}"][i], want[f"var{label(p)}"][h - 1], rtol=1e-12)
                np.testing.assert_allclose(got[f"h{h}_es{label(p)}"][i], want[f"es{label(p)}"][h - 1], rtol=1e-12)


@pytest.mark.parametrize("w", [0.0, 0.1, 0.6])
@pytest.mark.parametrize("gaps", [None, {1: (20, 21, 22), 3: (35,)}])
def test_one_pass_equals_the_plain_loop(w, gaps):
    t = _table(np.random.default_rng(3), gaps=gaps)
    out, state, _ = Calibrator(DF, pool=w, **KW).apply(None, None, t)
    _check(out, _reference(t, w))
    meta = state.schema.metadata or {}
    assert (POOL_META in meta) == bool(w)


def test_a_common_shock_widens_the_bands_within_days():
    """The common shock (days 30..40, every symbol at 4x the forecast scale): with the term, the bands widen
    against per-symbol ACI's alone (small step, so ACI itself barely moves) within days of its start, by the
    multiplier (40 symbols: each day's step is 2/3 of ``w``)."""
    t = _table(np.random.default_rng(5), symbols=40, days=50)
    kw = {**KW, "gamma": 0.005}
    on = Calibrator(DF, pool=0.3, **kw).apply(None, None, t)[0].to_pydict()
    off = Calibrator(DF, **kw).apply(None, None, t)[0].to_pydict()
    day = np.array(on["ts"]) / DAY
    ratio = (np.array(on["h1_cal_hi80"]) - np.array(on["h1_cal_lo80"])) / (
        np.array(off["h1_cal_hi80"]) - np.array(off["h1_cal_lo80"]))
    calm, shock = np.median(ratio[(day >= 20) & (day < 30)]), np.median(ratio[(day >= 34) & (day < 40)])
    assert shock / calm > 1.5
    assert np.median(ratio[(day >= 48)]) < shock  # and it decays after


@pytest.mark.parametrize("w", [0.1, 0.6])
def test_chunks_through_arrow_ipc_equal_one_pass(w):
    """Firings cut at release times (what the streaming path applies), the state and ring through IPC between
    them (a cold worker): the same columns, bit for bit."""
    t = _table(np.random.default_rng(11), gaps={2: (10, 11), 4: (50,)})
    c = Calibrator(DF, pool=w, **KW)
    whole = c.apply(None, None, t)[0]
    rel = t.column(REL).to_numpy()
    cuts = np.unique(rel)[[5, 17, 40, 60]]
    state = ring = None
    parts = []
    lo = -1
    for hi in [*cuts.tolist(), END_OF_INPUT_MICROS]:
        sel = (rel > lo) & (rel <= hi)
        out, state, ring = c.apply(state, ring, t.filter(pa.array(sel)))
        assert c.late_rows == 0
        state, ring = _ipc_roundtrip(state), _ipc_roundtrip(ring)
        parts.append(out)
        lo = hi
    got = pa.concat_tables(parts).sort_by([("symbol", "ascending"), ("bar", "ascending")])
    assert got.equals(whole)


def test_a_row_behind_an_applied_step_is_applied_and_counted():
    """A runner that delivers a row after its release time's step: the row is applied (its bands and scores are
    there), as a step of its own, and counted; nothing is lost or raised."""
    t = _table(np.random.default_rng(2), symbols=3, days=30)
    rel = t.column(REL).to_numpy()
    r10 = np.unique(rel)[10]
    held = (rel == r10) & (np.array(t.column("symbol").to_pylist()) == "S1")
    c = Calibrator(DF, pool=0.2, **KW)
    first, state, ring = c.apply(None, None, t.filter(pa.array((rel <= r10) & ~held)))
    second, _, _ = c.apply(state, ring, t.filter(pa.array((rel > r10) | held)))
    assert c.late_rows == 1
    assert first.num_rows + second.num_rows == t.num_rows
    assert second.filter(pa.array(np.isin(second.column("bar").to_numpy(), t.filter(pa.array(held))
                                          .column("bar").to_numpy()))).num_rows >= 1


def test_pooled_state_survives_restore_and_a_bad_one_is_refused():
    t = _table(np.random.default_rng(4), symbols=3, days=20)
    c = Calibrator(DF, pool=0.2, **KW)
    _, state, ring = c.apply(None, None, t)
    ms = MarketScale(0.2, DF)
    ms.restore(state.schema.metadata[POOL_META])
    assert ms.steps > 0 and np.abs(ms.u).max() > 0
    bad = state.replace_schema_metadata({**state.schema.metadata, POOL_META: b'{"u": [99, 0], "steps": 1, '
                                         b'"last_rel": 5, "clock": null, "history": []}'})
    with pytest.raises(DeployError, match="pooled scale restore: u: expected 2 numbers within"):
        c.apply(bad, ring, _table(np.random.default_rng(4), symbols=3, days=22).slice(60))


@pytest.mark.parametrize("w", [-0.1, 1.5, True, "0.2", float("nan")])
def test_a_bad_weight_is_one_line(w):
    with pytest.raises(InputError, match=r"calibration: pool: expected a weight in \[0, 1\]"):
        Calibrator(DF, pool=w, **KW)


def test_a_model_without_a_finite_abs_mean_is_refused():
    with pytest.raises(InputError, match="df are all > 1"):
        Calibrator([1.0, 6.0], pool=0.1, **KW)
    Calibrator([1.0, 6.0], pool=0.0, **KW)  # off: no E|T| needed


def test_expected_abs_t_against_scipy():
    for d in (1.5, 2.5, 4.0, 30.0):
        assert expected_abs_t([d])[0] == pytest.approx(stats.t(d).expect(abs), rel=1e-9)
    assert expected_abs_t([np.inf])[0] == pytest.approx(math.sqrt(2 / math.pi))


# -- a halt: a row released late (found by review) ----------------------------------------------------------
def _halt_rows(b_close: list[float]) -> pa.Table:
    """Symbol A: bars at days 0 and 10 (a halt in between: its day-0 row is released at day 10). Symbols B, C:
    a bar every day 0..10 (each released at its next bar), B's closes ``b_close``."""
    cols: dict[str, list] = {k: [] for k in ("symbol", "ts", "close", "bar", REL)}

    def add(sym, days, closes):
        for i, (d, c) in enumerate(zip(days, closes, strict=True)):
            cols["symbol"].append(sym)
            cols["ts"].append(d * DAY)
            cols["close"].append(c)
            cols["bar"].append(i)
            cols[REL].append(int(days[i + 1] * DAY * 1_000_000) if i + 1 < len(days) else END_OF_INPUT_MICROS)

    add("A", [0, 10], [50.0, 50.0])
    add("B", list(range(11)), b_close)
    add("C", list(range(11)), [30.0 * (1.0 + 0.001 * (d % 2)) for d in range(11)])
    n = len(cols["symbol"])
    extra = {f"h{h}_ret_{w}": [0.0 if w == "loc" else float(h)] * n for h in (1, 2) for w in ("loc", "scale")}
    return pa.table({**cols, **extra, "flags": [""] * n, "model_version": ["m"] * n})


def test_a_row_released_late_does_not_see_bars_after_its_own():
    """pooled.py: "no row sees a bar later than its own". A's day-0 row is released at day 10 (its next bar), so
    it is issued after the steps of B's and C's days 1..8: its band must not depend on B's closes on days 1..8
    (they lie inside A's own forecast horizon)."""
    calm = [40.0 * (1.0 + 0.001 * (d % 2)) for d in range(11)]
    shock = [40.0 * np.exp(0.3 * (d % 2)) for d in range(11)]  # +-30% log moves on days 1..10
    c = Calibrator(DF, pool=0.5, **KW)
    a_calm = c.apply(None, None, _halt_rows(calm))[0].filter(pa.compute.equal(pa.compute.field("symbol"), "A"))
    a_shock = c.apply(None, None, _halt_rows(shock))[0].filter(pa.compute.equal(pa.compute.field("symbol"), "A"))
    day0 = lambda t: t.filter(pa.compute.equal(t.column("bar"), 0))  # noqa: E731
    assert day0(a_calm).column("h1_cal_hi80").to_pylist() == day0(a_shock).column("h1_cal_hi80").to_pylist()


@pytest.mark.parametrize("u", ['["x", 0]', '{"a": 1}', '[true, 0]', '[0.1]', '"0"'])
def test_a_pooled_state_of_non_numbers_is_one_line(u):
    """A corrupt pooled state (the calibrator state's metadata) is a DeployError naming the field, like a
    ``u`` out of bounds, never a ValueError / TypeError traceback."""
    t = _halt_rows([40.0] * 11)
    c = Calibrator(DF, pool=0.2, **KW)
    first = pa.array(t.column(REL).to_numpy() <= 3 * DAY * 1_000_000)
    _, state, ring = c.apply(None, None, t.filter(first))
    bad = state.replace_schema_metadata({**state.schema.metadata,
                                         POOL_META: f'{{"u": {u}, "steps": 1, "last_rel": 5, "clock": null, '
                                                    f'"history": []}}'.encode()})
    with pytest.raises(DeployError, match="pooled scale restore: u"):
        c.apply(bad, ring, t.filter(pa.compute.invert(first)))


def test_a_row_older_than_the_history_is_issued_at_the_model_scale_and_the_history_round_trips():
    """MarketScale directly: after HISTORY + 10 bar times, a row released late at bar time 5 (out of the kept
    history) gets multiplier 1; one at a kept bar time gets that time's u; the JSON state restores exactly."""
    ms = MarketScale(0.5, DF)
    n = HISTORY + 10
    absz = np.full((n, H), 3.0)  # every surprise 3 |z|: u rises
    f, late = ms.advance(np.arange(1, n + 1) * 10, np.arange(n, dtype=float), absz, np.ones((n, H), bool))
    assert late == 0 and len(ms.history) == HISTORY and (np.diff(f[:, 0]) >= 0).all()
    back = MarketScale(0.5, DF)
    back.restore(ms.to_json())
    assert back.to_json() == ms.to_json()
    g, late = ms.advance(np.array([10 * n + 5, 10 * n + 5]), np.array([5.0, n - 3.0]), np.zeros((2, H)),
                         np.zeros((2, H), bool))
    assert late == 0
    np.testing.assert_array_equal(g[0], np.ones(H))
    np.testing.assert_array_equal(g[1], f[n - 3])


@pytest.mark.parametrize("runner", [
    [], ["--direct_running_mode=multi_processing", "--direct_num_workers=2"],
    ["--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=LOOPBACK"]],
    ids=["direct", "multi_processing", "portable"])
def test_the_transform_on_every_runner_equals_one_pass(runner):
    """``Calibrate(pool=...)`` in a pipeline (blocks of rows at their release times, with sub-millisecond
    fractions, on 4 requested shards: one Beam key) equals the calibrator applied in one pass to the rows with
    those release times, on the DirectRunner, its multi_processing mode and the PortableRunner (LOOPBACK)."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.testing.util import assert_that, equal_to
    from apache_beam.transforms.window import TimestampedValue
    from apache_beam.utils.timestamp import Timestamp

    from streamrnn.forecast.calibrate_step import Calibrate

    t = _table(np.random.default_rng(9), symbols=4, days=40, gaps={1: (12, 13), 2: (25,)})
    rel = t.column(REL).to_numpy()
    rel = np.where(rel == END_OF_INPUT_MICROS, rel.max(where=rel < END_OF_INPUT_MICROS, initial=0) + 86_400_000_000,
                   rel) + 237  # a finite end, and a sub-millisecond fraction on every time
    t = t.set_column(t.column_names.index(REL), REL, pa.array(rel))
    blocks = [(t.filter(pa.array(rel == r)).drop_columns([REL]), int(r)) for r in np.unique(rel)]
    want_t = Calibrator(DF, pool=0.4, **KW).apply(None, None, t)[0]
    cols = ["symbol", "bar", "h1_cal_lo80", "h2_cal_hi50", "h1_var5", "scored_h1_cal_in80"]
    want = [tuple(r[c] for c in cols) for r in want_t.select(cols).to_pylist()]
    with beam.Pipeline(options=PipelineOptions(runner)) as p:
        got = (p | beam.Create([TimestampedValue(b.combine_chunks().to_batches()[0], Timestamp(micros=r))
                                for b, r in blocks])
               | Calibrate(DF, num_shards=4, pool=0.4, **KW)
               | beam.FlatMap(lambda b, cols=cols: [tuple(r[c] for c in cols) for r in b.to_pylist()]))
        assert_that(got, equal_to(want))


def test_a_failed_firing_retried_from_the_same_state_equals_one_pass():
    """A firing that fails (a row out of bar order) returns nothing and leaves the caller's state as it was; the
    retried firing from that state (through IPC: a cold worker) gives one pass's rows and pooled state."""
    t = _table(np.random.default_rng(13), symbols=3, days=30, gaps={0: (9,)})
    c = Calibrator(DF, pool=0.3, **KW)
    whole, whole_state, _ = c.apply(None, None, t)
    rel = t.column(REL).to_numpy()
    cut = np.unique(rel)[12]
    first, state, ring = c.apply(None, None, t.filter(pa.array(rel <= cut)))
    state, ring = _ipc_roundtrip(state), _ipc_roundtrip(ring)
    before = (state.schema.metadata[POOL_META], ring.to_pydict())
    rest = t.filter(pa.array(rel > cut))
    stale = t.filter(pa.array((rel <= cut) & (np.array(t.column("symbol").to_pylist()) == "S1")))
    with pytest.raises(RuntimeError, match="rows out of bar order"):
        c.apply(state, ring, pa.concat_tables([rest, stale.slice(0, 1)]))
    assert (state.schema.metadata[POOL_META], ring.to_pydict()) == before
    second, state2, _ = c.apply(state, ring, rest)
    got = pa.concat_tables([first, second]).sort_by([("symbol", "ascending"), ("bar", "ascending")])
    assert got.equals(whole)
    assert state2.schema.metadata[POOL_META] == whole_state.schema.metadata[POOL_META]
