"""Baseline forecasts of the cumulative % log return to horizons 1..H, per forecast origin.

Every baseline returns ``(loc, scale, df)`` arrays ``[n_origins, H]`` (``df = inf``: Gaussian):

* ``naive``: random walk. Median 0 (tomorrow's price = today's); a Gaussian with the
  symbol's training-period return standard deviation, ``sqrt(h)``-scaled.
* ``ewma_normal`` (EWMA-normal): RiskMetrics, ``v_t = lam v_{t-1} + (1 - lam) r_t^2`` with
  lam = 0.94 (the ``var`` the feature engine carries), Gaussian ``N(0, h v_t)``.
* ``ewma_t`` (EWMA-t): the same variance with a Student-t shape: ``nu`` is fitted per symbol by
  maximum likelihood on the training part only (:func:`fit_t_shape`: the returns before the
  scored period, each standardised by the EWMA variance of the bar before it, after a
  ``EWMA_BURN_IN``-bar burn-in), and the t's variance equals ``h v_t`` (scale
  ``sqrt(h v_t (nu - 2) / nu)``; for ``h > 1`` the same shape, as for GARCH-t).
* ``garch_normal`` / ``garch_t``: GARCH(1,1) with a constant mean, normal or Student-t
  innovations, fitted by the ``arch`` library on the symbol's training period only; the
  forecasts for later origins come from ``arch``'s own ``forecast`` with those fixed
  parameters. For ``h > 1`` the sum of the per-step variances is used with the same
  shape (for the t: a t with the fitted ``nu``, an approximation; h = 1 is exact).
"""

from __future__ import annotations

import math
import warnings

import numpy as np


def naive(sd_train: float, n: int, horizons: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    h = np.arange(1, horizons + 1)
    return (np.zeros((n, horizons)), np.tile(sd_train * np.sqrt(h), (n, 1)), np.full((n, horizons), np.inf))


def ewma(var: np.ndarray, horizons: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``var``: EWMA variance after each origin bar."""
    h = np.arange(1, horizons + 1)
    n = len(var)
    return np.zeros((n, horizons)), np.sqrt(np.outer(var, h)), np.full((n, horizons), np.inf)


EWMA_BURN_IN = 50  # bars of a symbol before its EWMA variance is used to fit a shape (v_0 is a prior)
NU_BOUNDS = (2.05, 200.0)


def ewma_t(var: np.ndarray, horizons: int, nu: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EWMA variance with a Student-t(``nu``) shape whose variance is ``h var``."""
    h = np.arange(1, horizons + 1)
    n = len(var)
    return (np.zeros((n, horizons)), np.sqrt(np.outer(var, h) * (nu - 2) / nu), np.full((n, horizons), float(nu)))


def t_shape_nll(nu: float, z: np.ndarray) -> float:
    """Mean NLL of standardised returns ``z`` under a unit-variance Student-t(``nu``)."""
    s = math.sqrt((nu - 2) / nu)
    return float(-(math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2) - 0.5 * math.log(nu * math.pi) - math.log(s))
                 + (nu + 1) / 2 * np.mean(np.log1p((z / s) ** 2 / nu)))


def fit_t_shape(ret_next: np.ndarray, var_prev: np.ndarray) -> float:
    """Maximum-likelihood ``nu`` of ``ret_next / sqrt(var_prev)`` under a unit-variance t (bounded Brent search on
    ``log(nu - 2)`` within ``NU_BOUNDS``); NaN with fewer than 2 points."""
    from scipy.optimize import minimize_scalar

    z = np.asarray(ret_next, np.float64) / np.sqrt(np.asarray(var_prev, np.float64))
    z = z[np.isfinite(z)]
    if len(z) < 2:
        return math.nan
    lo, hi = (math.log(b - 2) for b in NU_BOUNDS)
    res = minimize_scalar(lambda u: t_shape_nll(2 + math.exp(u), z), bounds=(lo, hi), method="bounded",
                          options={"xatol": 1e-6})
    return 2 + math.exp(float(res.x))


def ewma_recursion(ret: np.ndarray, lam: float, v0: float) -> np.ndarray:
    """Plain loop ``v_t = lam v_{t-1} + (1 - lam) r_t^2`` (the reference the tests compare with)."""
    out = np.empty(len(ret))
    v = v0
    for i, r in enumerate(ret):
        v = lam * v + (1 - lam) * r * r
        out[i] = v
    return out


def garch(ret: np.ndarray, n_train: int, origins: np.ndarray, horizons: int, dist: str = "t"
          ) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], dict]:
    """GARCH(1,1) fitted on ``ret[:n_train]``; forecasts from each index in ``origins`` (into ``ret``).

    ``ret`` are one symbol's consecutive % returns (``ret[i]`` is known at origin ``i``).
    Returns ``(loc, scale, df)`` and the fitted parameters.
    """
    from arch import arch_model

    am = arch_model(ret, mean="Constant", vol="GARCH", p=1, q=1, dist="t" if dist == "t" else "normal",
                    rescale=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = am.fit(last_obs=n_train, disp="off", show_warning=False)
    params = {k: float(v) for k, v in res.params.items()}
    n = len(origins)
    if n == 0:
        z = np.zeros((0, horizons))
        return (z, z, z), params
    f = res.forecast(horizon=horizons, start=int(origins.min()), reindex=False)
    mean = np.asarray(f.mean)[origins - origins.min()]
    var = np.asarray(f.variance)[origins - origins.min()]
    loc = np.cumsum(mean, axis=1)
    cvar = np.cumsum(var, axis=1)
    if dist == "t":
        nu = params["nu"]
        return (loc, np.sqrt(cvar * (nu - 2) / nu), np.full_like(loc, nu)), params
    return (loc, np.sqrt(cvar), np.full_like(loc, np.inf)), params


def sd(x: np.ndarray) -> float:
    return float(np.std(x)) if len(x) > 1 else math.nan
