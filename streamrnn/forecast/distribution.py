"""The forecast's predictive distribution on the serving path: Student-t (``df > 2``) or Gaussian (``df = inf``).

What workers and the launcher need (log density, quantiles, interval hits) with the standard
library and numpy only, so a runtime install (no scipy) serves the market model. The
Student-t CDF is the regularized incomplete beta function, by its continued fraction
(modified Lentz), fed x and 1 - x each at full precision; quantiles solve for the tail mass,
or near the median for the mass between 0 and t, by safeguarded Newton steps. The tests
check them against ``scipy.stats.t`` (relative 1e-9 for p in [1e-15, 1 - 1e-12]; absolute 1e-9
within 1e-8 of the median, where scipy's own ppf is off by ~1e-8 relative and this one agrees
with the first-order expansion to 1e-15).

>>> round(float(quantile(0.975, 0.0, 1.0, 5.0)[()]), 6)
2.570582
>>> round(float(quantile(0.975, 0.0, 1.0, float("inf"))[()]), 6)
1.959964
"""

from __future__ import annotations

import math
from functools import lru_cache
from statistics import NormalDist

import numpy as np

_TINY = 1e-300
_EPS = 1e-15
_LARGE_DF = 1e4


def _lgamma(x: np.ndarray) -> np.ndarray:
    """log|Γ| over an array, once per distinct value (df is one value per model); inf at the poles, as scipy."""
    flat = np.asarray(x, np.float64).ravel()
    u, inv = np.unique(flat, return_inverse=True)

    def one(a: float) -> float:
        try:
            return math.lgamma(a)
        except ValueError:  # 0, -1, -2, ...
            return math.inf

    return np.array([one(a) for a in u], np.float64)[inv].reshape(np.shape(x))


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (converges fast for x < (a+1)/(a+b+2))."""
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, 500):
        for aa in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                   -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + aa / c
            c = c if abs(c) > _TINY else _TINY
            h *= d * c
        if abs(d * c - 1.0) < _EPS:
            break
    return h


def _betainc(a: float, b: float, x: float, y: float) -> float:
    """The regularized incomplete beta function I_x(a, b), given x and y = 1 - x each to full precision."""
    if x <= 0.0:
        return 0.0
    if y <= 0.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(y))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_fraction(a, b, x) / a
    return 1.0 - front * _beta_fraction(b, a, y) / b


def _t_upper(t: float, df: float) -> float:
    """P(T > t) for t >= 0."""
    s = t * t
    return 0.5 * _betainc(0.5 * df, 0.5, df / (df + s), s / (df + s))


def _t_centre(t: float, df: float) -> float:
    """P(0 < T < t) for t >= 0 (small near 0, where 0.5 - P(T > t) would cancel)."""
    s = t * t
    return 0.5 * _betainc(0.5, 0.5 * df, s / (df + s), df / (df + s))


@lru_cache(maxsize=256)
def std_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of the standard Student-t with ``df`` degrees of freedom (Gaussian at inf)."""
    if not (0.0 < p < 1.0) or not df > 0.0:
        return math.nan
    if math.isinf(df):
        return NormalDist().inv_cdf(p)
    if df >= _LARGE_DF:  # the beta function's terms cancel there; Cornish-Fisher is exact to ~1e-13
        z = NormalDist().inv_cdf(p)
        z2 = z * z
        terms = ((z2 + 1) * z / 4, ((5 * z2 + 16) * z2 + 3) * z / 96, (((3 * z2 + 19) * z2 + 17) * z2 - 15) * z / 384,
                 ((((79 * z2 + 776) * z2 + 1482) * z2 - 1920) * z2 - 945) * z / 92160)
        return z + sum(g / df ** (k + 1) for k, g in enumerate(terms))
    if p == 0.5:
        return 0.0
    # Solve for t > 0, then give it p's side. Near the centre the mass between 0 and t is the unknown's
    # measure (p - 0.5 is exact there); in a tail, the tail mass (1 - p is exact for p > 0.5, p below).
    sign = 1.0 if p > 0.5 else -1.0
    centre = abs(p - 0.5)
    if centre < 0.25:
        def excess(t: float) -> float:  # increasing in t
            return _t_centre(t, df) - centre
    else:
        tail = 1.0 - p if p > 0.5 else p

        def excess(t: float) -> float:
            return tail - _t_upper(t, df)
    log_norm = math.lgamma(0.5 * (df + 1.0)) - math.lgamma(0.5 * df) - 0.5 * math.log(df * math.pi)
    lo, hi = 0.0, max(1.0, 2.0 * abs(NormalDist().inv_cdf(p)))
    while excess(hi) < 0:
        lo, hi = hi, 2.0 * hi
        if math.isinf(hi):
            return sign * math.inf
    t = 0.5 * (lo + hi)
    for _ in range(200):
        err = excess(t)
        if err < 0:
            lo = t
        else:
            hi = t
        pdf = math.exp(log_norm - 0.5 * (df + 1.0) * math.log1p(t * t / df))
        step = t - err / pdf if pdf > 0 else math.nan
        new = step if lo < step < hi else 0.5 * (lo + hi)  # Newton inside the bracket, else bisect
        if abs(new - t) <= 1e-15 * abs(t) or hi - lo <= 1e-15 * hi:
            return sign * new
        t = new
    return sign * t


def nll(y, loc, scale, df) -> np.ndarray:
    """Negative log density of ``y`` per point."""
    z = (np.asarray(y, np.float64) - loc) / scale
    df = np.broadcast_to(np.asarray(df, np.float64), z.shape)
    g = np.isinf(df)
    out = np.empty_like(z)
    out[g] = 0.5 * z[g] ** 2 + 0.5 * math.log(2 * math.pi)
    v = df[~g]
    zt = z[~g]
    with np.errstate(divide="ignore", invalid="ignore"):  # df <= 0 gives NaN, as scipy's t does
        out[~g] = -(_lgamma((v + 1) / 2) - _lgamma(v / 2) - 0.5 * np.log(v * math.pi)
                    - (v + 1) / 2 * np.log1p(zt ** 2 / v))
    return out + np.log(np.broadcast_to(scale, z.shape))


def quantile(p: float, loc, scale, df) -> np.ndarray:
    """The ``p`` quantile of each forecast."""
    loc = np.asarray(loc, np.float64)
    df = np.broadcast_to(np.asarray(df, np.float64), np.broadcast_shapes(loc.shape, np.shape(df)))
    u, inv = np.unique(df.ravel(), return_inverse=True)
    q = np.array([std_quantile(float(p), float(d)) for d in u], np.float64)[inv].reshape(df.shape)
    return loc + q * scale


def covered(level: float, y, loc, scale, df) -> np.ndarray:
    """Whether each ``y`` lies in the central ``level`` interval."""
    a = (1 - level) / 2
    return (y >= quantile(a, loc, scale, df)) & (y <= quantile(1 - a, loc, scale, df))


# ---- vectorised forms (issue 15: online calibration over many symbols and levels at once) ----------------
# The same continued fraction and safeguarded Newton as the scalar functions above, run elementwise over
# arrays. Every element iterates on its own values until it converges and is then frozen, so its result does
# not depend on which other elements share the call (one symbol alone == the same symbol in a batch, bit for
# bit).


def _beta_fraction_v(a: float, b: float, x: np.ndarray) -> np.ndarray:
    """:func:`_beta_fraction` over an array ``x`` (1-d, a, b scalars); the live elements are kept packed."""
    d = 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / np.where(np.abs(d) > _TINY, d, _TINY)
    h = d.copy()
    live = np.arange(len(x))
    xs, cs, ds, hs = x, np.ones_like(x), d, h.copy()
    for m in range(1, 500):
        if not len(live):
            break
        for aa in (m * (b - m) * xs / ((a + 2 * m - 1) * (a + 2 * m)),
                   -(a + m) * (a + b + m) * xs / ((a + 2 * m) * (a + 2 * m + 1))):
            ds = 1.0 + aa * ds
            ds = 1.0 / np.where(np.abs(ds) > _TINY, ds, _TINY)
            cs = 1.0 + aa / cs
            cs = np.where(np.abs(cs) > _TINY, cs, _TINY)
            hs = hs * (ds * cs)
        done = np.abs(ds * cs - 1.0) < _EPS
        if done.any():
            h[live[done]] = hs[done]
            keep = ~done
            live, xs, cs, ds, hs = live[keep], xs[keep], cs[keep], ds[keep], hs[keep]
    h[live] = hs
    return h


def _betainc_v(a: float, b: float, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """:func:`_betainc` over arrays ``x`` and ``y = 1 - x`` (1-d; a, b scalars)."""
    out = np.empty_like(x)
    lo, hi = x <= 0.0, (y <= 0.0) & ~(x <= 0.0)
    out[lo], out[hi] = 0.0, 1.0
    inner = ~(lo | hi)
    xi, yi = x[inner], y[inner]
    with np.errstate(divide="ignore"):
        front = np.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * np.log(xi) + b * np.log(yi))
    direct = xi < (a + 1.0) / (a + b + 2.0)
    res = np.empty_like(xi)
    res[direct] = front[direct] * _beta_fraction_v(a, b, xi[direct]) / a
    res[~direct] = 1.0 - front[~direct] * _beta_fraction_v(b, a, yi[~direct]) / b
    out[inner] = res
    return out


def _by_df(df, shape: tuple, fn) -> np.ndarray:
    """``fn(values_mask, df_value)`` filled per distinct df (one per horizon in practice) into ``shape``."""
    df = np.broadcast_to(np.asarray(df, np.float64), shape)
    out = np.empty(shape, np.float64)
    for v in np.unique(df):
        m = df == v
        out[m] = fn(m, float(v))
    return out


def _gauss_tail2(z: np.ndarray) -> np.ndarray:
    return np.frompyfunc(lambda t: math.erfc(abs(t) / math.sqrt(2.0)), 1, 1)(z).astype(np.float64)


def tail2(z, df) -> np.ndarray:
    """P(|T| >= |z|) for a standard Student-t with ``df`` (Gaussian at inf), elementwise; ``df <= 0`` or NaN z
    give NaN. Exact in relative terms in the tails (no ``1 - cdf`` cancellation).

    >>> [round(float(v), 6) for v in tail2(np.array([0.0, 2.570582, 1.959964]), np.array([5.0, 5.0, np.inf]))]
    [1.0, 0.05, 0.05]
    """
    z = np.asarray(z, np.float64)
    shape = np.broadcast_shapes(z.shape, np.shape(df))
    z = np.broadcast_to(z, shape)

    def one(m: np.ndarray, v: float) -> np.ndarray:
        t = z[m]
        if not v > 0.0:
            return np.full(t.shape, np.nan)
        if math.isinf(v):
            return _gauss_tail2(t)
        s = t * t
        out = _betainc_v(0.5 * v, 0.5, v / (v + s), s / (v + s))
        out[np.isnan(t)] = np.nan
        return out

    return _by_df(df, shape, one)


def cdf(y, loc, scale, df) -> np.ndarray:
    """P(Y <= y) of each forecast, elementwise (the lower tail without cancellation)."""
    z = (np.asarray(y, np.float64) - loc) / scale
    p = 0.5 * tail2(z, df)
    return np.where(z < 0, p, 1.0 - p)


def _t_pdf_v(t: np.ndarray, v: float) -> np.ndarray:
    log_norm = math.lgamma(0.5 * (v + 1.0)) - math.lgamma(0.5 * v) - 0.5 * math.log(v * math.pi)
    return np.exp(log_norm - 0.5 * (v + 1.0) * np.log1p(t * t / v))


def _excess_v(t: np.ndarray, v: float, mid: np.ndarray, centre: np.ndarray, tail: np.ndarray) -> np.ndarray:
    """:func:`std_quantile`'s ``excess`` elementwise (increasing in t > 0): the centre mass where ``mid``,
    else the tail mass."""
    s = t * t
    e = np.empty_like(t)
    c = mid
    e[c] = 0.5 * _betainc_v(0.5, 0.5 * v, s[c] / (v + s[c]), v / (v + s[c])) - centre[c]
    e[~c] = tail[~c] - 0.5 * _betainc_v(0.5 * v, 0.5, v / (v + s[~c]), s[~c] / (v + s[~c]))
    return e


def _solve_v(v: float, mid: np.ndarray, centre: np.ndarray, tail: np.ndarray, lo: np.ndarray, hi: np.ndarray,
             t: np.ndarray) -> np.ndarray:
    """Safeguarded Halley steps from ``t`` inside the bracket ``[lo, hi]``, each element until it converges
    (a Halley step of relative size d leaves an error of order d^3: done below 1e-6, or a 1e-15 bracket)."""
    res, lo, hi = t.copy(), lo.copy(), hi.copy()
    idx = np.arange(len(t))
    for _ in range(200):
        if not len(idx):
            break
        t, l_, h_ = res[idx], lo[idx], hi[idx]
        err = _excess_v(t, v, mid[idx], centre[idx], tail[idx])  # d/dt = pdf, d2/dt2 = -pdf (v+1) t / (v+t^2)
        l_ = np.where(err < 0, t, l_)
        h_ = np.where(err < 0, h_, t)
        pdf = _t_pdf_v(t, v)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            newton = np.where(pdf > 0, err / pdf, np.nan)
            step = t - newton / (1.0 + newton * (v + 1.0) * t / (2.0 * (v + t * t)))
        halley = (l_ < step) & (step < h_)
        new = np.where(err == 0, t, np.where(halley, step, 0.5 * (l_ + h_)))  # err == 0: t is the root
        done = (halley & (np.abs(new - t) <= 1e-6 * np.abs(t))) | (np.abs(new - t) <= 1e-15 * np.abs(t)) \
            | (h_ - l_ <= 1e-15 * h_)
        res[idx], lo[idx], hi[idx] = new, l_, h_
        idx = idx[~done]
    return res


def _widen_v(v: float, p: np.ndarray, mid: np.ndarray, centre: np.ndarray, tail: np.ndarray) -> np.ndarray:
    """:func:`std_quantile`'s bracket search and Newton steps elementwise: |t| for each ``p``."""
    gauss = np.frompyfunc(lambda a: abs(NormalDist().inv_cdf(float(a))), 1, 1)(p).astype(np.float64)
    lo, hi = np.zeros_like(p), np.maximum(1.0, 2.0 * gauss)
    idx = np.arange(len(p))
    while len(idx):  # widen the bracket until it holds the root
        below = _excess_v(hi[idx], v, mid[idx], centre[idx], tail[idx]) < 0
        idx = idx[below]
        lo[idx], hi[idx] = hi[idx], 2.0 * hi[idx]
        idx = idx[np.isfinite(hi[idx])]
    out = np.full(p.shape, np.inf)
    f = np.isfinite(hi)
    out[f] = _solve_v(v, mid[f], centre[f], tail[f], lo[f], hi[f], 0.5 * (lo[f] + hi[f]))
    return out


_TABLE_TAILS = np.geomspace(1e-13, 0.25, 400)
_TABLE_CENTRES = np.linspace(0.0, 0.25, 101)


@lru_cache(maxsize=64)
def _table(v: float) -> tuple[np.ndarray, np.ndarray]:
    """|t| at the tail masses ``_TABLE_TAILS`` and the centre masses ``_TABLE_CENTRES`` for one df: brackets
    and starting points, so a quantile takes two or three Newton steps."""
    p = np.concatenate([_TABLE_TAILS, 0.5 + _TABLE_CENTRES[1:]])
    centre, tail = np.abs(p - 0.5), np.where(p > 0.5, 1.0 - p, p)
    t = _widen_v(v, p, centre < 0.25, centre, tail)
    return t[:len(_TABLE_TAILS)], np.concatenate([[0.0], t[len(_TABLE_TAILS):]])  # the median is 0


def _std_quantile_v(p: np.ndarray, v: float) -> np.ndarray:
    """:func:`std_quantile` over an array ``p`` (1-d) for one ``df``."""
    out = np.full(p.shape, np.nan)
    out[p == 0.5] = 0.0
    ok = (p > 0.0) & (p < 1.0) & (v > 0.0) & (p != 0.5)
    if not ok.any():
        return out
    if math.isinf(v) or v >= _LARGE_DF:
        out[ok] = np.frompyfunc(lambda q: std_quantile(float(q), v), 1, 1)(p[ok]).astype(np.float64)
        return out
    q = p[ok]
    centre = np.abs(q - 0.5)
    tail = np.where(q > 0.5, 1.0 - q, q)
    mid = centre < 0.25
    t_tail, t_centre = _table(v)
    # the bracket: the table nodes either side (by the centre mass near 0.5, by the log tail mass further out)
    key = np.where(mid, centre, tail)
    nodes = np.where(mid[:, None], _TABLE_CENTRES[None, [0, -1]], _TABLE_TAILS[None, [0, -1]])
    res = np.empty_like(q)
    inside = (key >= nodes[:, 0]) & (key <= nodes[:, 1])
    for sel, grid, tab, rising in ((mid & inside, _TABLE_CENTRES, t_centre, True),
                                   (~mid & inside, _TABLE_TAILS, t_tail, False)):
        if not sel.any():
            continue
        k = key[sel]
        i = np.clip(np.searchsorted(grid, k) - 1, 0, len(grid) - 2)
        a, b = tab[i], tab[i + 1]
        lo, hi = (a, b) if rising else (b, a)
        # cubic Hermite between the nodes (dt/dmass = +-1/pdf): a start within ~1e-7, one Halley step from done
        dx = grid[i + 1] - grid[i]
        w = (k - grid[i]) / dx
        sgn = 1.0 if rising else -1.0
        da, db = sgn * dx / _t_pdf_v(a, v), sgn * dx / _t_pdf_v(b, v)
        start = ((2 * w ** 3 - 3 * w ** 2 + 1) * a + (w ** 3 - 2 * w ** 2 + w) * da
                 + (-2 * w ** 3 + 3 * w ** 2) * b + (w ** 3 - w ** 2) * db)
        start = np.clip(start, np.minimum(a, b), np.maximum(a, b))
        res[sel] = _solve_v(v, mid[sel], centre[sel], tail[sel], lo * (1 - 1e-12), hi * (1 + 1e-12) + 1e-300,
                            start)
    if (~inside).any():
        res[~inside] = _widen_v(v, q[~inside], mid[~inside], centre[~inside], tail[~inside])
    out[ok] = np.where(q > 0.5, 1.0, -1.0) * res
    return out


def std_quantiles(p, df) -> np.ndarray:
    """The standard Student-t ``p`` quantiles elementwise (``p`` and ``df`` arrays, broadcast; Gaussian at inf):
    :func:`std_quantile` vectorised, to the same precision (the tests check both against scipy).

    >>> [round(float(v), 6) for v in std_quantiles(np.array([0.975, 0.025, 0.5]), 5.0)]
    [2.570582, -2.570582, 0.0]
    """
    p = np.asarray(p, np.float64)
    shape = np.broadcast_shapes(p.shape, np.shape(df))
    p = np.broadcast_to(p, shape)
    return _by_df(df, shape, lambda m, v: _std_quantile_v(p[m], v))


def expected_shortfall(p, loc, scale, df) -> np.ndarray:
    """Expected shortfall at tail probability ``p`` (0 < p < 0.5) as a positive loss: ``-E[Y | Y <= q_p]``, in the
    forecast's units (% log return), elementwise. Closed form for the location-scale Student-t (``df > 1``):

        E[T | T <= t_p] = -f(t_p) (df + t_p^2) / ((df - 1) p),      Gaussian: -phi(z_p) / p,

    with ``f`` the standard t density; so ``ES = -loc + scale * f(t_p) (df + t_p^2) / ((df - 1) p)``.
    The value at risk at the same ``p`` is ``-quantile`` (:func:`value_at_risk`).

    >>> round(float(expected_shortfall(0.05, 0.0, 1.0, float("inf"))[()]), 6)  # phi(1.645) / 0.05
    2.062713
    """
    p = np.asarray(p, np.float64)
    loc = np.asarray(loc, np.float64)
    shape = np.broadcast_shapes(p.shape, loc.shape, np.shape(scale), np.shape(df))
    p = np.broadcast_to(p, shape)

    def one(m: np.ndarray, v: float) -> np.ndarray:
        pm = p[m]
        t = _std_quantile_v(pm, v)
        if math.isinf(v):
            return np.exp(-0.5 * t * t) / math.sqrt(2.0 * math.pi) / pm
        if not v > 1.0:
            return np.full(pm.shape, np.inf if v > 0 else np.nan)
        return _t_pdf_v(t, v) * (v + t * t) / ((v - 1.0) * pm)

    k = _by_df(df, shape, one)
    return -np.broadcast_to(loc, shape) + np.broadcast_to(np.asarray(scale, np.float64), shape) * k


def value_at_risk(p, loc, scale, df) -> np.ndarray:
    """Value at risk at tail probability ``p`` as a positive loss: ``-q_p`` of each forecast (% log return)."""
    return -quantiles(p, loc, scale, df)


def quantiles(p, loc, scale, df) -> np.ndarray:
    """``loc + scale * t_df^{-1}(p)`` elementwise, ``p`` an array (per point and level) as well."""
    return np.asarray(loc, np.float64) + std_quantiles(p, df) * np.asarray(scale, np.float64)
