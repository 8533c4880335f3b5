"""Scores of location-scale predictive distributions: Gaussian (``df = inf``) or Student-t (``df > 2``).

A forecast is ``(loc, scale, df)`` per point; ``loc`` is also its median. For the
Student-t, ``scale`` is the t scale parameter (the standard deviation is
``scale * sqrt(df / (df - 2))``).

* NLL: ``-log p(y)``, natural log, in % log-return units;
* CRPS: closed forms (Gaussian: Gneiting & Raftery 2007; Student-t: Jordan, Krueger & Lerch 2019);
* MAE of the median; MASE = MAE / MAE of the naive forecast (median 0) on the same points,
  computed per symbol and summarised by the median over symbols;
* coverage: share of ``y`` inside the central 80% / 95% interval (or the ``levels`` asked for).

The density, quantiles and coverage come from :mod:`.distribution` (no scipy, for the serving
path); CRPS here needs scipy.
"""

from __future__ import annotations

import math

import numpy as np

from .distribution import covered, nll, quantile

__all__ = ["LEVELS", "covered", "crps", "nll", "quantile", "summarize"]

LEVELS = (0.80, 0.95)


def crps(y, loc, scale, df) -> np.ndarray:
    """Continuous ranked probability score per point (same units as ``y``). Needs scipy (the 'eval' extra)."""
    from scipy import special, stats

    z = (np.asarray(y, np.float64) - loc) / scale
    df = np.broadcast_to(np.asarray(df, np.float64), z.shape)
    g = np.isinf(df)
    out = np.empty_like(z)
    zg = z[g]
    out[g] = zg * (2 * stats.norm.cdf(zg) - 1) + 2 * stats.norm.pdf(zg) - 1 / math.sqrt(math.pi)
    v = df[~g]
    zt = z[~g]
    beta = np.exp(special.betaln(0.5, v - 0.5) - 2 * special.betaln(0.5, v / 2))
    out[~g] = (zt * (2 * stats.t.cdf(zt, v) - 1) + 2 * stats.t.pdf(zt, v) * (v + zt ** 2) / (v - 1)
               - 2 * np.sqrt(v) * beta / (v - 1))
    return out * np.broadcast_to(scale, z.shape)


def _coverage_key(level: float) -> str:
    return f"coverage_{100 * level:.10g}"


def summarize(y: np.ndarray, loc: np.ndarray, scale: np.ndarray, df, groups: np.ndarray,
              levels: tuple[float, ...] = LEVELS) -> dict:
    """One horizon's scores over points ``y`` (1-d), ``groups`` the symbol of each point (for MASE);
    ``coverage_{100 L}`` for each of ``levels`` (``coverage_80``, ``coverage_95`` by default)."""
    if len(y) == 0:
        return {"nll": None, "crps": None, "mae": None, "mase": None,
                **{_coverage_key(lv): None for lv in levels}, "n": 0}
    df = np.broadcast_to(np.asarray(df, np.float64), y.shape)
    err = np.abs(y - loc)
    ratios = []
    for g in np.unique(groups):
        m = groups == g
        naive = np.abs(y[m]).mean()
        if naive > 0:
            ratios.append(err[m].mean() / naive)
    return {
        "nll": float(nll(y, loc, scale, df).mean()),
        "crps": float(crps(y, loc, scale, df).mean()),
        "mae": float(err.mean()),
        "mase": float(np.median(ratios)) if ratios else None,
        **{_coverage_key(lv): float(covered(lv, y, loc, scale, df).mean()) for lv in levels},
        "n": len(y),
    }
