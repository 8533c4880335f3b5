"""Online calibration (ACI, issue 15): coverage under a regime switch, an independent scalar reference,
snapshot/restore, batch == loop, bad input; the vectorised Student-t, VaR and ES against scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, stats

from streamrnn.errors import InputError, SnapshotError
from streamrnn.forecast import conformal, distribution
from streamrnn.forecast.conformal import GAMMA, OnlineConformal, bands, kupiec
from streamrnn.forecast.distribution import covered

NU = 5.0


def _regime_market(S: int = 40, N: int = 3000, seed: int = 0):
    """S symbols, N calm bars (sd 0.5%) then N wild bars (sd 4%), t5 returns; a forecaster that knows the
    regime's level but is 25% too wide in calm and 40% too narrow in the wild half (the shipped model's
    failure, exaggerated). h1 and h2 targets, origin-indexed as features.targets gives them."""
    rng = np.random.default_rng(seed)
    sd = np.r_[np.full(N, 0.5), np.full(N, 4.0)]
    tscale = sd * math.sqrt((NU - 2) / NU)
    r = rng.standard_t(NU, (S, 2 * N)) * tscale
    fac = np.r_[np.full(N, 1.25), np.full(N, 0.6)]
    T = 2 * N
    y = np.zeros((S, T, 2))
    y[:, :-1, 0] = r[:, 1:]
    y[:, :-2, 1] = r[:, 1:-1] + r[:, 2:]
    valid = np.ones((S, T, 2), bool)
    valid[:, -1, :] = False
    valid[:, -2, 1] = False
    s1 = np.broadcast_to(tscale * fac, (S, T))
    scale = np.stack([s1, s1 * math.sqrt(2.0)], axis=-1)
    return y, scale, valid, N


def _coverage(y, lo, hi) -> np.ndarray:
    """Independent of the calibrator's tail-mass comparison: the outcome between the drawn band's ends."""
    return (y >= lo) & (y <= hi)


def test_calibrated_coverage_converges_per_regime_half_and_raw_does_not():
    """At the shipped step: the second half of each regime covers within a tolerance of every level, where the raw
    band is too wide (calm) or far too narrow (wild). The one exception is documented: the 99% band and the 1%
    VaR narrow only slowly after a too-wide regime (their step is 1/20 of the 80% level's and the information is
    in rare misses), so in the calm half they are only required to be nearer the level than the raw band."""
    y, scale, valid, N = _regime_market()
    S, T, H = y.shape
    cal = OnlineConformal([NU, NU])
    assert cal.config.gamma == GAMMA and cal.config.scaling == "proportional"
    A = cal.run([f"S{i}" for i in range(S)], y, np.zeros_like(y), scale, valid)
    tol = {0.5: 0.01, 0.8: 0.008, 0.95: 0.005, 0.99: 0.003, 0.01: 0.2 * 0.01, 0.05: 0.2 * 0.05}
    slow = (0.99, 0.01)
    for half, part in (("calm", slice(N // 2, N)), ("wild", slice(N + N // 2, T - 2))):
        b = bands(A[:, part], np.zeros_like(y[:, part]), scale[:, part], [NU, NU], cal.config)
        for h in range(H):
            yy, sc = y[:, part, h], scale[:, part, h]
            got = {lv: _coverage(yy, *(b[f"{e}{conformal.label(lv)}"][..., h] for e in ("lo", "hi"))).mean()
                   for lv in conformal.LEVELS}
            raw = {lv: covered(lv, yy, 0.0, sc, NU).mean() for lv in conformal.LEVELS}
            for p in conformal.TAILS:  # exceedances of the VaR (a positive loss): the return below -VaR
                got[p] = (yy < -b[f"var{conformal.label(p)}"][..., h]).mean()
                raw[p] = (yy < distribution.quantiles(p, 0.0, sc, NU)).mean()
            for x in (*conformal.LEVELS, *conformal.TAILS):  # x: the level, or the tail's nominal rate
                if half == "calm" and x in slow:
                    assert abs(got[x] - x) < abs(raw[x] - x), (half, h, x, got[x], raw[x])
                else:
                    assert abs(got[x] - x) < tol[x], (half, h, x, got[x])
                if not (half == "calm" and x == 0.99):  # raw 99% in the calm half: 99.5%, hardly off
                    assert abs(raw[x] - x) > 2 * tol[x], (half, h, x, raw[x])
    # the whole wild half, adaptation included: within 3 points at 80% (raw: 58.5%)
    b = bands(A[:, N:T - 2, :1], np.zeros((S, T - 2 - N, 1)), scale[:, N:T - 2, :1], [NU], conformal.ConformalConfig(1))
    assert abs(_coverage(y[:, N:T - 2, 0], b["lo80"][..., 0], b["hi80"][..., 0]).mean() - 0.8) < 0.03


def _reference(y, loc, scale, valid, df, levels, tails, gamma, proportional):
    """A scalar ACI written from the paper with scipy's quantiles: per key, per horizon and target, the band
    issued at origin o (at the state clipped to [1e-6, 1 - 1e-6]) is compared with o's outcome when it arrives
    (bar o + h + 1); the step is gamma, or gamma * a / 0.2 for a target of miscoverage a."""
    T, H = y.shape
    nominal = [1 - lv for lv in levels] + list(tails)
    steps = [gamma * a / 0.2 if proportional else gamma for a in nominal]
    a = [list(nominal) for _ in range(H)]
    issued = np.zeros((T, H, len(nominal)))
    for t in range(T):
        for h in range(H):
            o = t - 1 - h
            if o < 0 or not valid[o, h]:
                continue
            for k, nom in enumerate(nominal):
                p = min(max(issued[o, h, k], 1e-6), 1 - 1e-6)
                if k < len(levels):
                    lo = loc[o, h] + stats.t.ppf(p / 2, df[h]) * scale[o, h]
                    hi = loc[o, h] + stats.t.ppf(1 - p / 2, df[h]) * scale[o, h]
                    err = not (lo <= y[o, h] <= hi)
                else:
                    err = y[o, h] < loc[o, h] + stats.t.ppf(p, df[h]) * scale[o, h]
                a[h][k] = a[h][k] + steps[k] * (nom - err)
        issued[t] = a
    return issued


@pytest.mark.parametrize("scaling", ["proportional", "constant"])
def test_matches_a_scalar_reference_written_from_the_paper_with_delayed_horizons(scaling):
    rng = np.random.default_rng(3)
    T, H = 300, 3
    df = [4.0, 6.0, 9.0]
    ret = rng.standard_t(3.0, T) * np.r_[np.full(150, 0.7), np.full(150, 2.0)]
    loc = rng.normal(0, 0.05, (T, H))
    scale = np.column_stack([np.full(T, 0.8 * math.sqrt(h + 1)) for h in range(H)])
    y = np.zeros((T, H))
    valid = np.zeros((T, H), bool)
    for h in range(H):
        y[:T - h - 1, h] = [ret[t + 1:t + h + 2].sum() for t in range(T - h - 1)]
        valid[:T - h - 1, h] = True
    valid[40, 1] = False  # a target crossing a corporate-action jump: never learned
    levels, tails, gamma = (0.5, 0.9), (0.05,), 0.05
    cal = OnlineConformal(df, levels=levels, tails=tails, gamma=gamma, scaling=scaling)
    got = cal.run(["K"], y[None], loc[None], scale[None], valid[None])[0]
    want = _reference(y, loc, scale, valid, df, levels, tails, gamma, scaling == "proportional")
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert np.abs(got - cal.config.nominal).max() > 0.1  # it moved


def _bars(seed: int, S: int, T: int, H: int = 2):
    rng = np.random.default_rng(seed)
    y = rng.standard_t(4.0, (S, T, H)) * rng.uniform(0.5, 3.0, (S, 1, 1))
    loc = rng.normal(0, 0.1, (S, T, H))
    scale = rng.uniform(0.5, 1.5, (S, T, H))
    valid = rng.random((S, T, H)) > 0.05
    return y, loc, scale, valid


def _feed(cal: OnlineConformal, keys, y, loc, scale, valid, t: int, batch: bool = True) -> None:
    """Bar t of every key: the targets of origins t-1..t-H (origin-indexed arrays), as :meth:`learn` takes them."""
    S, _, H = y.shape
    yy, ll, ss = np.zeros((S, H)), np.zeros((S, H)), np.ones((S, H))
    vv = np.zeros((S, H), bool)
    for h in range(H):
        o = t - 1 - h
        if o >= 0:
            yy[:, h], ll[:, h], ss[:, h], vv[:, h] = y[:, o, h], loc[:, o, h], scale[:, o, h], valid[:, o, h]
    vv &= np.isfinite(yy)
    if batch:
        cal.learn(keys, yy, ll, ss, vv)
    else:
        for i, k in enumerate(keys):
            cal.learn_one(k, yy[i], ll[i], ss[i], vv[i])


def _state(cal: OnlineConformal) -> dict:
    return {k: v for k, v in cal.snapshot().items() if k != "config"}


def _equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


def test_batch_learn_equals_the_per_key_loop_and_run_equals_learn_bit_for_bit():
    keys = ["A", "B", "C", "D"]
    y, loc, scale, valid = _bars(1, 4, 120)
    one, many, whole = (OnlineConformal([5.0, 7.0], gamma=0.02) for _ in range(3))
    issued_one, issued_many = [], []
    for t in range(120):
        _feed(one, keys, y, loc, scale, valid, t, batch=False)
        _feed(many, keys, y, loc, scale, valid, t)
        issued_one.append(np.stack([one.state_of(k)["alpha"] for k in keys]))
        issued_many.append(many.alpha.copy())
        if t % 30 == 29:  # the bands: one key at a time == the batch
            batch = many.predict(keys, loc[:, t], scale[:, t])
            for i, k in enumerate(keys):
                single = one.predict_one(k, loc[i, t], scale[i, t])
                assert all(np.array_equal(single[n], batch[n][i]) for n in batch)
    _equal(_state(one), _state(many))
    assert np.array_equal(np.stack(issued_one, 1), np.stack(issued_many, 1))
    # run: whole sequences, and keys of different lengths (D stops at 70 bars)
    lengths = np.array([120, 120, 120, 70])
    got = whole.run(keys, y, loc, scale, valid, lengths)
    short = OnlineConformal([5.0, 7.0], gamma=0.02)
    # a key's target exists only if its bar does: origin t, horizon h + 1 needs bar t + h + 1 < length
    inside = valid & (np.arange(120)[None, :, None] + np.arange(1, 3)[None, None, :] < lengths[:, None, None])
    for t in range(120):
        idx = [i for i in range(4) if t < lengths[i]]
        _feed(short, [keys[i] for i in idx], y[idx], loc[idx], scale[idx], inside[idx], t)
    _equal(_state(whole), _state(short))
    assert np.array_equal(got[:3], np.stack(issued_many, 1)[:3])
    assert (np.abs(got - conformal.ConformalConfig(2, gamma=0.02).nominal) > 0.01).any()


def test_snapshot_then_restore_mid_stream_continues_exactly_as_never_snapshotted():
    pa = pytest.importorskip("pyarrow")
    keys = ["X", "Y", "Z"]
    y, loc, scale, valid = _bars(2, 3, 200)
    ref = OnlineConformal([5.0, 7.0], gamma=0.01)
    for t in range(90):
        _feed(ref, keys, y, loc, scale, valid, t)
    snap, table = ref.snapshot(), ref.to_arrow()
    assert isinstance(table, pa.Table) and table.num_rows == 3
    assert table.schema.field("alpha").type == pa.list_(pa.float64(), 2 * 6)
    assert table.schema.field("issued").type == pa.list_(pa.float64(), 2 * 2 * 6)
    from_arrays, from_arrow = OnlineConformal([5.0, 7.0], gamma=0.01), OnlineConformal([5.0, 7.0], gamma=0.01)
    from_arrays.restore(snap)
    from_arrow.restore(pa.Table.from_batches(table.to_batches()))
    for t in range(90, 200):
        for cal in (ref, from_arrays, from_arrow):
            _feed(cal, keys, y, loc, scale, valid, t)
    _equal(_state(ref), _state(from_arrays))
    _equal(_state(ref), _state(from_arrow))
    out = [c.predict(keys, loc[:, -1], scale[:, -1]) for c in (ref, from_arrays, from_arrow)]
    for k in out[0]:
        assert np.array_equal(out[0][k], out[1][k]) and np.array_equal(out[0][k], out[2][k])


def _some_state() -> OnlineConformal:
    cal = OnlineConformal([5.0, 7.0])
    y, loc, scale, valid = _bars(4, 2, 30)
    for t in range(30):
        _feed(cal, ["A", "B"], y, loc, scale, valid, t)
    return cal


@pytest.mark.parametrize(("call", "message"), [
    (lambda c: c.learn(["A", "B"], [[np.nan, 0.0], [0.1, 0.2]], np.zeros((2, 2)), np.ones((2, 2))),
     "conformal learn: y: expected a finite number where valid, got nan (key 'A', h1)"),
    (lambda c: c.learn(["A", "B"], np.zeros((2, 3)), np.zeros((2, 2)), np.ones((2, 2))),
     "conformal learn: y: expected shape (2, 2), got (2, 3)"),
    (lambda c: c.learn(["A", "B"], np.zeros((2, 2)), np.zeros((2, 2)), [[1.0, 1.0], [0.0, 1.0]]),
     "conformal learn: scale: expected a finite number > 0 where valid, got 0.0 (key 'B', h1)"),
    (lambda c: c.learn(["A", "A"], np.zeros((2, 2)), np.zeros((2, 2)), np.ones((2, 2))),
     "conformal learn: keys: expected each key once per call, got 'A' twice"),
    (lambda c: c.learn(["A", "NEW"], np.zeros((2, 2)), np.zeros((2, 2)), np.ones((2, 2))),
     "conformal learn: valid: expected targets only of issued origins, got h1 of key 'NEW', which has 0 bar(s)"),
    (lambda c: c.learn(["A"], None, np.zeros((1, 2))),
     "conformal learn: y: expected the realised returns with loc/scale/valid, got none"),
    (lambda c: c.predict(["A"], np.zeros((1, 2)), np.ones((2, 2))),
     "conformal predict: scale: expected shape (1, 2), got (2, 2)"),
    (lambda c: c.restore({**c.snapshot(), "alpha": np.full((2, 2, 6), np.nan)}),
     "conformal restore: alpha: expected values in [-1, 2], got nan"),
    (lambda c: c.restore({**c.snapshot(), "issued": np.zeros((2, 2, 6))}),
     "conformal restore: issued: expected shape (2, 2, 2, 6), got (2, 2, 6)"),
    (lambda c: c.restore(OnlineConformal([5.0, 7.0], levels=(0.9,)).snapshot()),
     "conformal restore: config: expected horizons/levels/tails [2, [0.5, 0.8, 0.95, 0.99], [0.01, 0.05]], got "
     "[2, [0.9], [0.01, 0.05]]"),
    (lambda c: c.restore(c.to_arrow().drop_columns(["seq"])),
     "conformal restore: seq: expected a column"),
])
def test_bad_input_is_one_error_naming_the_field_and_the_state_is_unchanged(call, message):
    cal = _some_state()
    before = _state(cal)
    with pytest.raises((InputError, SnapshotError)) as e:
        call(cal)
    assert message in str(e.value) and "\n" not in str(e.value)
    _equal(before, _state(cal))
    assert cal.keys() == ["A", "B"]


@pytest.mark.parametrize(("kw", "message"), [
    ({"levels": (0.8, 1.0)}, "conformal: levels: expected distinct values in (0, 1), got [0.8, 1.0]"),
    ({"tails": (0.6,)}, "conformal: tails: expected distinct values in (0, 0.5), got [0.6]"),
    ({"gamma": 0.0}, "conformal: gamma: expected a step in (0, 1), got 0.0"),
    ({"scaling": "log"}, "conformal: scaling: expected one of ['proportional', 'constant'], got 'log'"),
    ({"df": []}, "conformal: df: expected one value > 0 per horizon, got []"),
])
def test_bad_configuration_is_one_error(kw, message):
    with pytest.raises(InputError) as e:
        OnlineConformal(kw.pop("df", [5.0]), **kw)
    assert message in str(e.value)


# ---- the vectorised distribution functions, VaR and ES -----------------------------------------------------


@pytest.mark.parametrize("df", [2.5, 5.484, 30.0, 2e4, np.inf])
def test_vectorised_tail_cdf_and_quantiles_against_scipy_and_the_scalar(df):
    rng = np.random.default_rng(0)
    dist = stats.norm if np.isinf(df) else stats.t(df)
    z = np.concatenate([rng.standard_t(3, 3000) * 3, [0.0, 1e-9, -40.0, 300.0]])
    np.testing.assert_allclose(distribution.tail2(z, df), 2 * dist.sf(np.abs(z)), rtol=1e-9, atol=1e-300)
    np.testing.assert_allclose(distribution.cdf(z, 0.0, 1.0, df), dist.cdf(z), rtol=1e-9, atol=1e-300)
    p = np.concatenate([rng.uniform(1e-6, 1 - 1e-6, 3000), 10 ** rng.uniform(-14, -2, 300), [1e-6, 0.25, 0.75]])
    q = distribution.std_quantiles(p, df)
    np.testing.assert_allclose(q, dist.ppf(p), rtol=1e-9)
    scalar = np.array([distribution.std_quantile(float(x), df) for x in p[:200]])
    np.testing.assert_allclose(q[:200], scalar, rtol=1e-13)
    # one value alone == the same value in a batch (each element iterates on its own)
    assert all(distribution.std_quantiles(p[i:i + 1], df)[0] == q[i] for i in range(0, 3000, 97))
    assert all(distribution.tail2(z[i:i + 1], df)[0] == distribution.tail2(z, df)[i] for i in range(0, 3000, 97))


@pytest.mark.parametrize(("p", "loc", "scale", "df"), [
    (0.01, 0.0, 1.0, 5.484), (0.05, 0.03, 1.7, 5.484), (0.01, -0.2, 0.4, 3.0), (0.05, 0.0, 2.0, 30.0),
    (0.01, 0.1, 1.2, np.inf), (0.2, 0.0, 1.0, 1.5)])
def test_expected_shortfall_closed_form_equals_the_integral(p, loc, scale, df):
    dist = stats.norm(loc, scale) if np.isinf(df) else stats.t(df, loc, scale)
    q = dist.ppf(p)
    tail_mean = integrate.quad(lambda x: x * dist.pdf(x), -np.inf, q, limit=400, epsabs=1e-13, epsrel=1e-12)[0] / p
    es = distribution.expected_shortfall(p, loc, scale, df)[()]
    assert es == pytest.approx(-tail_mean, rel=1e-8)
    assert distribution.value_at_risk(p, loc, scale, df)[()] == pytest.approx(-q, rel=1e-10)
    assert es > distribution.value_at_risk(p, loc, scale, df)[()]


def test_raw_bands_are_the_models_own_quantiles_and_es_is_positive_loss():
    cfg = conformal.ConformalConfig(1)
    b = bands(np.broadcast_to(cfg.nominal, (3, 1, 6)), np.array([[0.1], [0.0], [-0.2]]),
              np.array([[1.0], [2.0], [0.5]]), [5.484], cfg)
    for i, (loc, scale) in enumerate([(0.1, 1.0), (0.0, 2.0), (-0.2, 0.5)]):
        d = stats.t(5.484, loc, scale)
        assert b["lo95"][i, 0] == pytest.approx(d.ppf(0.025), rel=1e-10)
        assert b["hi50"][i, 0] == pytest.approx(d.ppf(0.75), rel=1e-10)
        assert b["var1"][i, 0] == pytest.approx(-d.ppf(0.01), rel=1e-10) and b["var1"][i, 0] > 0
        assert b["es5"][i, 0] == pytest.approx(-d.expect(lambda x: x, ub=d.ppf(0.05)) / 0.05, rel=1e-7)


def test_kupiec_against_the_likelihood_ratio_by_hand_and_chi2():
    n, x, p = 1000, 17, 0.01
    lr = -2 * (x * math.log(p) + (n - x) * math.log(1 - p) - x * math.log(x / n) - (n - x) * math.log(1 - x / n))
    got = kupiec(n, x, p)
    assert got[0] == pytest.approx(lr, rel=1e-12)
    assert got[1] == pytest.approx(stats.chi2.sf(lr, 1), rel=1e-10)
    assert kupiec(1000, 10, 0.01) == (0.0, 1.0)
    assert kupiec(500, 0, 0.01)[0] == pytest.approx(-2 * 500 * math.log(0.99))


def test_the_cli_help_states_the_module_defaults(capsys):
    """cli.py keeps numpy out of the CLI's start, so its help spells the defaults out: they must be these."""
    from streamrnn.cli.commands import main

    try:
        code = main(["eval", "forecast", "--help"])
    except SystemExit as e:
        code = e.code
    assert code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"(default {','.join(f'{x:g}' for x in conformal.LEVELS)})" in text
    assert f"(default {','.join(f'{x:g}' for x in conformal.TAILS)})" in text
    assert f"ACI step of the 80% level (default {GAMMA:g})" in text
