"""eval forecast's location diagnostics (the median's drift, and NLL with a zero location) against numpy and scipy."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from streamrnn.forecast.evaluate import location_bias


def _case(seed=0, n_days=300, per_day=4, drift=0.0, loc_bias=0.1):
    rng = np.random.default_rng(seed)
    day = np.repeat(np.arange(n_days), per_day)
    scale = rng.uniform(0.5, 2.0, len(day))
    y = drift + scale * rng.standard_t(5.0, len(day))
    loc = loc_bias + 0.01 * rng.standard_normal(len(day))
    return y, loc, scale, np.full(len(day), 5.0), day


def test_location_bias_against_scipy_and_a_direct_clustered_t():
    y, loc, scale, df, day = _case()
    r = location_bias(y, loc, scale, df, day)
    assert r["mean_loc"] == pytest.approx(loc.mean()) and r["mean_realised"] == pytest.approx(y.mean())
    assert r["bias"] == pytest.approx(loc.mean() - y.mean())
    assert r["share_loc_positive"] == pytest.approx((loc > 0).mean())
    ref = -stats.t.logpdf(y, 5.0, loc=loc, scale=scale)
    ref0 = -stats.t.logpdf(y, 5.0, loc=0.0, scale=scale)
    assert r["nll"] == pytest.approx(ref.mean(), rel=1e-12)
    assert r["nll_zero_loc"] == pytest.approx(ref0.mean(), rel=1e-12)
    assert r["mae_zero_loc"] == pytest.approx(np.abs(y).mean())
    # day-clustered: the per-day mean gain, its t over days
    g = (ref0 - ref).reshape(300, 4).mean(axis=1)
    assert r["nll_gain_t"] == pytest.approx(g.mean() / (g.std(ddof=1) / np.sqrt(300)), rel=1e-9)


def test_a_drift_where_there_is_none_shows_no_skill_and_a_real_one_shows_skill():
    no = location_bias(*_case(seed=1, drift=0.0, loc_bias=0.3))  # predicts +0.3 on data with no drift
    assert no["nll_zero_loc"] < no["nll"] and not no["location_skill"] and no["bias"] == pytest.approx(0.3, abs=0.1)
    yes = location_bias(*_case(seed=2, drift=0.5, loc_bias=0.5, n_days=2000))
    assert yes["location_skill"] and yes["nll_gain_t"] > 2


def test_empty():
    assert location_bias(*(np.zeros(0),) * 5) == {"n": 0}
