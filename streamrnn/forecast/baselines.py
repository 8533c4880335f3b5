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
  parameters. A fit that looks failed (no convergence, or a daily mean beyond half an sd, an
  intercept above the variance, a t at its bound) is refitted once from a standard start, and if
  that fails too, the previous refit's parameters are kept (:func:`garch`). For ``h > 1`` the sum
  of the per-step variances is used with the same shape (for the t: a t with the fitted ``nu``, an
  approximation; h = 1 is exact).
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


def _suspicious(res, train: np.ndarray) -> bool:
    """A GARCH fit a quant would not accept as it is: the optimizer did not converge, or it converged to a daily
    mean beyond half a standard deviation, an intercept above the sample variance, or a t at its upper bound
    (seen on split-adjusted histories whose early prices are quantised: most returns exactly 0)."""
    p = res.params
    v = float(np.var(train)) if len(train) > 1 else math.inf
    return (res.convergence_flag != 0 or not math.isfinite(res.loglikelihood)
            or abs(float(p["mu"])) > 0.5 * math.sqrt(v) or float(p["omega"]) > v or float(p.get("nu", 0.0)) >= 499.0)


def garch(ret: np.ndarray, n_train: int, origins: np.ndarray, horizons: int, dist: str = "t", *,
          info: dict | None = None, fallback: dict | None = None
          ) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], dict]:
    """GARCH(1,1) fitted on ``ret[:n_train]``; forecasts from each index in ``origins`` (into ``ret``).

    ``ret`` are one symbol's consecutive % returns (``ret[i]`` is known at origin ``i``).
    Returns ``(loc, scale, df)`` and the fitted parameters. A fit that looks failed (:func:`_suspicious`) is
    refitted once from a standard start (mean, 5% of the variance, alpha 0.05, beta 0.90, nu 8) and the converged
    fit with the higher likelihood is kept; if that still looks failed and ``fallback`` (an earlier fit's
    parameters) is given, those are used instead, fixed. ``info`` (if given) gets ``converged``, ``loglik``,
    ``restarted``, ``suspect`` (the fit kept still looks failed) and ``fallback`` (the earlier parameters were used;
    the parameters returned are those).
    """
    from arch import arch_model

    am = arch_model(ret, mean="Constant", vol="GARCH", p=1, q=1, dist="t" if dist == "t" else "normal",
                    rescale=False)
    train = np.asarray(ret[:n_train], np.float64)
    restarted = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = am.fit(last_obs=n_train, disp="off", show_warning=False)
        if _suspicious(res, train) and len(train) > 1:
            restarted = True
            start = [float(train.mean()), 0.05 * float(train.var()), 0.05, 0.90] + ([8.0] if dist == "t" else [])
            alt = am.fit(last_obs=n_train, disp="off", show_warning=False, starting_values=np.array(start))
            ok_alt, ok_res = alt.convergence_flag == 0, res.convergence_flag == 0
            if (ok_alt, alt.loglikelihood) > (ok_res, res.loglikelihood):
                res = alt
        suspect = restarted and _suspicious(res, train)
        used_fallback = suspect and fallback is not None
        if info is not None:
            info.update(converged=bool(res.convergence_flag == 0), loglik=float(res.loglikelihood),
                        restarted=restarted, suspect=bool(suspect), fallback=bool(used_fallback))
        if used_fallback:
            res = am.fix(np.array([fallback[k] for k in res.params.index]), last_obs=n_train)
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
