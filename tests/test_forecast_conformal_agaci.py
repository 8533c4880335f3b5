"""AgACI (conformal.py, method="agaci"): ACI experts at a grid of steps aggregated online by BOA on the pinball loss.

References are independent: a per-expert, per-step Python loop with scipy's Student-t quantiles and cdf."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from streamrnn.errors import InputError, SnapshotError
from streamrnn.forecast import conformal
from streamrnn.forecast.conformal import OnlineConformal

LEVELS, TAILS, GAMMAS = (0.5, 0.8, 0.95), (0.05,), (0.01, 0.05, 0.2)


def _reference(z: np.ndarray, valid: np.ndarray, df: list[float], levels, tails, gammas) -> np.ndarray:
    """One key, scalar loops: for each horizon h (delay h + 1) and target, the experts' ACI, BOA's weights on the
    linearised pinball loss of the band edge (Wintenberger 2017), the aggregate edge turned back into an ``a``.
    ``z [T, H]`` outcomes in scale units by origin. Returns the ``a`` issued at every origin ``[T, H, K]``."""
    T, H = z.shape
    noms = [1 - lv for lv in levels] + list(tails)
    two = [True] * len(levels) + [False] * len(tails)
    E = len(gammas)
    out = np.zeros((T, H, len(noms)))
    for h in range(H):
        t_ = stats.t(df[h])
        for k, (nom, ts) in enumerate(zip(noms, two, strict=True)):
            def edge(a, ts=ts, t_=t_):
                a = min(max(a, 1e-6), 1 - 1e-6)
                return t_.ppf(1 - a / 2) if ts else t_.ppf(a)
            ea = [nom] * E
            hist_e, hist_a = {}, {}
            R, V, B = [0.0] * E, [0.0] * E, 0.0
            a = nom
            for t in range(T):
                o = t - 1 - h
                if o >= 0 and valid[o, h]:
                    zz = z[o, h]
                    qa = edge(hist_a[o])
                    miss = (abs(zz) > qa) if ts else (zz < qa)
                    g = (nom - miss) if ts else (miss - nom)
                    eta = [min(1 / (2 * B), math.sqrt(math.log(E) / V[e]) if V[e] else math.inf) if B else math.inf
                           for e in range(E)]
                    for e in range(E):
                        qe = hist_e[o][e]
                        emiss = (abs(zz) > qe) if ts else (zz < qe)
                        ea[e] = min(max(ea[e] + gammas[e] * nom / 0.2 * (nom - emiss), -1.0), 2.0)
                        r = g * (qa - qe)
                        R[e] += r - (eta[e] if math.isfinite(eta[e]) else 0.0) * r * r
                        V[e] += r * r
                        B = max(B, abs(r))
                    if B > 0:
                        eta = [min(1 / (2 * B), math.sqrt(math.log(E) / V[e]) if V[e] else math.inf) for e in range(E)]
                        lw = [math.log(eta[e]) + eta[e] * R[e] for e in range(E)]
                        w = [math.exp(x - max(lw)) for x in lw]
                        w = [x / sum(w) for x in w]
                    else:
                        w = [1 / E] * E
                    q = sum(w[e] * edge(ea[e]) for e in range(E))
                    a = 2 * t_.sf(q) if ts else t_.cdf(q)
                hist_a[t] = a
                hist_e[t] = [edge(x) for x in ea]
                out[t, h, k] = a
    return out


@pytest.fixture(scope="module")
def series():
    rng = np.random.default_rng(3)
    T, H = 160, 2
    scale = np.where(np.arange(T) < 80, 1.0, 3.0)[:, None] * np.ones((1, H))  # a shift the model misses
    y = rng.standard_t(5, (T, H)) * scale
    valid = rng.random((T, H)) > 0.05
    return y, valid


def test_aggregation_equals_a_per_expert_loop_reference(series):
    y, valid = series
    df = [5.0, 8.0]
    cal = OnlineConformal(df, levels=LEVELS, tails=TAILS, method="agaci", gammas=GAMMAS)
    got = cal.run(["A"], y[None], np.zeros_like(y)[None], np.ones_like(y)[None], valid[None])[0]
    want = _reference(y, valid, df, LEVELS, TAILS, GAMMAS)
    # float32 state and the edge tables (conformal.EdgeTable): within 2e-5 of the float64 scipy loop
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
    assert np.abs(got - got[:1]).max() > 0.05  # it moved


def test_learn_per_bar_equals_run_bit_for_bit_and_snapshot_restore_midstream(series):
    y, valid = series
    y2 = np.stack([y, -y[::-1]])
    v2 = np.stack([valid, valid[::-1]])
    loc, sc = np.zeros_like(y2), np.ones_like(y2)
    kw = dict(levels=LEVELS, tails=TAILS, method="agaci", gammas=GAMMAS)
    whole = OnlineConformal([5.0, 8.0], **kw)
    ref = whole.run(["A", "B"], y2, loc, sc, v2)
    T, H = y.shape
    live = OnlineConformal([5.0, 8.0], **kw)
    for t in range(T):
        if t == T // 2:  # restore into a fresh calibrator, once from arrays and once from Arrow
            snap = live.snapshot()
            live = OnlineConformal([5.0, 8.0], **kw)
            live.restore(live_arrow(snap, kw) if t % 2 else snap)
        o = t - 1 - np.arange(H)
        ok = o >= 0
        yy, vv = np.zeros((2, H)), np.zeros((2, H), bool)
        yy[:, ok] = y2[:, o[ok], np.flatnonzero(ok)]
        vv[:, ok] = v2[:, o[ok], np.flatnonzero(ok)]
        live.learn(["A", "B"], yy, np.zeros((2, H)), np.ones((2, H)), vv)
        np.testing.assert_array_equal(live.alpha, ref[:, t])
    for f, a in whole.snapshot().items():
        if f not in ("keys", "config"):
            np.testing.assert_array_equal(live.snapshot()[f], a)
    again = OnlineConformal([5.0, 8.0], **kw)
    again.restore(whole.to_arrow())
    for f in conformal.ConformalConfig(2, LEVELS, TAILS, method="agaci", gammas=GAMMAS).fields:
        np.testing.assert_array_equal(again.snapshot()[f], whole.snapshot()[f])
    w = whole.weights("A")
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)  # float32


def live_arrow(snap, kw):
    c = OnlineConformal([5.0, 8.0], **kw)
    c.restore(snap)
    return c.to_arrow()


def test_coverage_converges_on_an_iid_series_with_a_wrong_scale():
    # small (AgACI runs every expert per bar): 32 keys x 800 bars; the raw band is 14 points off, the calibrated
    # one within 2 (the 5% tail too)
    rng = np.random.default_rng(11)
    S, T = 32, 800
    y = rng.standard_t(5, (S, T, 1)) * 1.4  # the model's scale is 1.0: its bands are too narrow
    cal = OnlineConformal([5.0], levels=(0.8,), tails=(0.05,), method="agaci")
    a = cal.run([f"k{i}" for i in range(S)], y, np.zeros_like(y), np.ones_like(y), np.ones_like(y, bool))
    p2, lower = conformal.pit(y[..., 0], 0.0, 1.0, 5.0)
    assert abs((p2 >= 0.2).mean() - 0.8) > 0.1  # the raw band is off
    late = slice(T // 4, None)  # after the first 200 bars (the experts start at the nominal)
    assert abs((p2 >= conformal.issued(a[..., 0, 0]))[:, late].mean() - 0.8) < 0.02
    assert abs((lower < conformal.issued(a[..., 0, 1]))[:, late].mean() - 0.05) < 0.02


@pytest.mark.parametrize("kw, message", [
    (dict(method="boa"), "conformal: method: expected one of ['aci', 'agaci', 'none'], got 'boa'"),
    (dict(method="agaci", gammas=()), "conformal: gammas: expected distinct steps in (0, 1), got []"),
    (dict(method="agaci", gammas=(0.1, 0.1)), "conformal: gammas: expected distinct steps in (0, 1), got [0.1, 0.1]"),
    (dict(method="agaci", gammas=(0.1, 1.5)), "conformal: gammas: expected distinct steps in (0, 1), got [0.1, 1.5]"),
    (dict(method="agaci", gammas="ab"), "conformal: gammas: expected steps in (0, 1), got 'ab'"),
])
def test_bad_config_is_one_line(kw, message):
    with pytest.raises(InputError) as e:
        OnlineConformal([5.0], **kw)
    assert str(e.value) == message


def test_restore_refuses_another_method_or_grid_and_keeps_the_state(series):
    y, valid = series
    aci = OnlineConformal([5.0, 8.0])
    aci.run(["A"], y[None], np.zeros_like(y)[None], np.ones_like(y)[None], valid[None])
    ag = OnlineConformal([5.0, 8.0], method="agaci", gammas=GAMMAS)
    ag.learn_one("Z")
    before = ag.snapshot()
    with pytest.raises(SnapshotError, match="^conformal restore: config: expected method/gammas"):
        ag.restore(aci.snapshot())
    other = OnlineConformal([5.0, 8.0], method="agaci", gammas=(0.01, 0.02))
    with pytest.raises(SnapshotError, match="^conformal restore: config: expected method/gammas"):
        ag.restore(other.snapshot())
    bad = ag.snapshot()
    bad["sq"] = -bad["sq"] - 1
    with pytest.raises(SnapshotError, match="^conformal restore: sq: expected finite values >= 0"):
        ag.restore(bad)
    assert ag.keys() == ["Z"]
    for f in conformal.AGACI_FIELDS:
        np.testing.assert_array_equal(ag.snapshot()[f], before[f])


def test_state_bytes_per_key():
    cal = OnlineConformal([5.0] * 5, method="agaci")
    cal.learn_one("A")
    per_key = sum(a.nbytes for f, a in cal.snapshot().items() if f not in ("keys", "config"))
    assert per_key == conformal.state_bytes(5, 6, len(conformal.GAMMAS))
