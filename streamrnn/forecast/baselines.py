"""Baseline forecasts of the cumulative % log return to horizons 1..H, per forecast origin.

Every baseline returns ``(loc, scale, df)`` arrays ``[n_origins, H]`` (``df = inf``: Gaussian):

* ``naive``: random walk. Median 0 (tomorrow's price = today's); a Gaussian with the
  symbol's training-period return standard deviation, ``sqrt(h)``-scaled.
* ``ewma``: RiskMetrics, ``v_t = lam v_{t-1} + (1 - lam) r_t^2`` with lam = 0.94 (the
  ``var`` the feature engine carries), Gaussian ``N(0, h v_t)``.
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
