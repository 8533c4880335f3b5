"""Calibration over regimes (issue 15): does the forecast's scale follow the data's volatility?

* :func:`known_sd_table`: synthetic series with a known daily sd (0.1% .. 12.8%), the model's implied
  next-day sd (``scale * sqrt(df / (df - 2))``, median over the bars after a burn-in) against the
  truth, and the 80% / 95% coverage of its h1 intervals there. A scale that saturates shows as a ratio
  far from 1 at the ends of the table.
* :func:`shock_response`: the implied sd the day before and the day of one large move (a multiple of
  the running sd, and a -38% day), on an otherwise calm series.
* :func:`by_year`: h1 NLL and 80% / 95% coverage per calendar year of scored points, so calm and wild
  years cannot cancel in one overall number.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from ..model import Model
from .distribution import covered, nll
from .features import FeatureConfig, offline_features
from .scale import absolute
from .synthetic import known_sd, with_returns

SDS = (0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8)
SHOCKS = (4.0, 8.0, 16.0)


def _forecast(model: Model, meta: Mapping, bars) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """h1 (loc, scale) per bar and the cleaned returns of one symbol's bars."""
    s = offline_features(bars, FeatureConfig(**meta["features"]))
    out, _ = model.step(s.x[None].astype(np.float32))
    loc, ls = absolute(meta, out["mean"][0], out["log_scale"][0], s.x)
    return loc[:, 0], np.exp(ls[:, 0]), s.ret


def _sd_factor(df: float) -> float:
    return math.sqrt(df / (df - 2.0)) if math.isfinite(df) else 1.0


def known_sd_table(model: Model, meta: Mapping, sds=SDS, *, n: int = 1000, burn: int = 250, seed: int = 0,
                   nu: float = 5.0) -> list[dict]:
    """One row per true sd: implied h1 sd (median after ``burn`` bars), the ratio, h1 coverage there."""
    df = float(meta["df"][0])
    rows = []
    for sd in sds:
        loc, scale, ret = _forecast(model, meta, known_sd(sd, n, seed=seed, nu=nu))
        implied = scale[burn:-1] * _sd_factor(df)
        y, lo, sc = ret[burn + 1:], loc[burn:-1], scale[burn:-1]
        rows.append({"true_sd": sd, "implied_sd": float(np.median(implied)),
                     "ratio": float(np.median(implied) / sd),
                     "implied_sd_p10": float(np.quantile(implied, 0.1)),
                     "implied_sd_p90": float(np.quantile(implied, 0.9)),
                     "coverage_80": float(covered(0.80, y, lo, sc, df).mean()),
                     "coverage_95": float(covered(0.95, y, lo, sc, df).mean()),
                     "nll_minus_true": float(nll(y, lo, sc, df).mean() - _true_nll(y, sd, nu)), "n": len(y)})
    return rows


def _true_nll(y: np.ndarray, sd: float, nu: float) -> float:
    """Mean NLL under the generating distribution (the floor a forecaster can reach)."""
    s = sd * math.sqrt((nu - 2) / nu)
    return float(nll(y, 0.0, s, nu).mean())


def shock_response(model: Model, meta: Mapping, *, base_sd: float = 1.0, shocks=SHOCKS, n: int = 500,
                   seed: int = 0, crash: float = -38.0) -> list[dict]:
    """The implied h1 sd before and after one move of ``k`` running sds (and a ``crash``% simple-return day)
    after ``n`` calm bars of sd ``base_sd``."""
    df = float(meta["df"][0])
    calm = known_sd(base_sd, n, seed=seed)
    base = np.diff(np.log(calm.close)) * 100.0
    cfg = FeatureConfig(**meta["features"])
    v = offline_features(with_returns(np.concatenate([[0.0], base]), seed=seed), cfg).var[-1]
    moves = [(f"{k:g} running sd", -k * math.sqrt(v)) for k in shocks]
    moves.append((f"{crash:g}% day", 100.0 * math.log1p(crash / 100.0)))
    rows = []
    for what, r in moves:
        _, scale, _ = _forecast(model, meta, with_returns(np.concatenate([[0.0], base, [r]]), seed=seed))
        before, after = scale[-2] * _sd_factor(df), scale[-1] * _sd_factor(df)
        rows.append({"move": what, "return": float(r), "sd_before": float(before), "sd_after": float(after),
                     "ratio": float(after / before)})
    return rows


def by_year(y: np.ndarray, loc: np.ndarray, scale: np.ndarray, df: np.ndarray, day: np.ndarray) -> dict:
    """Per calendar year (``day``: days since 1970): n, NLL, 80% and 95% coverage."""
    years = np.datetime64("1970-01-01") + day.astype("timedelta64[D]")
    years = years.astype("datetime64[Y]").astype(int) + 1970
    out = {}
    for yr in np.unique(years):
        m = years == yr
        out[str(int(yr))] = {"n": int(m.sum()), "nll": float(nll(y[m], loc[m], scale[m], df[m]).mean()),
                             "coverage_80": float(covered(0.80, y[m], loc[m], scale[m], df[m]).mean()),
                             "coverage_95": float(covered(0.95, y[m], loc[m], scale[m], df[m]).mean())}
    return out


def render(r: Mapping) -> list[str]:
    """Text lines for ``eval forecast``: the known-sd table, the shock responses and coverage by year."""
    lines = []
    if r.get("known_sd"):
        lines.append("\nsynthetic series with a known daily sd (i.i.d. t5; implied = h1 scale*sqrt(df/(df-2)), median "
                     "after 250 bars)")
        lines.append("  true sd %  implied %  ratio   cov80   cov95")
        for row in r["known_sd"]:
            lines.append(f"  {row['true_sd']:9.2f}  {row['implied_sd']:9.3f}  {row['ratio']:5.2f}   "
                         f"{row['coverage_80']:.3f}   {row['coverage_95']:.3f}")
    if r.get("shocks"):
        lines.append("one large move after 500 calm bars (sd 1%): implied h1 sd before -> after")
        for row in r["shocks"]:
            lines.append(f"  {row['move']:>16s} ({row['return']:+.1f}%): {row['sd_before']:.2f} -> "
                         f"{row['sd_after']:.2f} (x{row['ratio']:.2f})")
    for m, years in (r.get("by_year") or {}).items():
        if not years:
            continue
        lines.append(f"coverage by year, h1 ({m}): year n cov80 cov95 nll")
        for yr, v in years.items():
            lines.append(f"  {yr} {v['n']:7d} {v['coverage_80']:.3f} {v['coverage_95']:.3f} {v['nll']:.4f}")
    return lines


__all__ = ["SDS", "by_year", "known_sd_table", "render", "shock_response"]
