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

from ..model.loaded import Model
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


# ---- online calibration (ACI) against the raw model: coverage, VaR exceedances, by year and quarter ----------


def conformal_alphas(cal, symbols: list[str], y: list[np.ndarray], loc: list[np.ndarray], scale: list[np.ndarray],
                     valid: list[np.ndarray], chunk: int = 64) -> list[np.ndarray]:
    """Run ``cal`` (an :class:`~.conformal.OnlineConformal`) over each symbol's whole history (origin-indexed
    ``[n, H]`` arrays, from its first bar: causal, the state at an origin has seen only targets completed by
    then); the ``a`` issued at every origin ``[n, H, K]`` per symbol. Symbols run ``chunk`` at a time
    (independent states; the memory stays ``chunk * T * H * K``)."""
    out = []
    for s in range(0, len(symbols), chunk):
        part = list(range(s, min(s + chunk, len(symbols))))
        lens = np.array([len(y[i]) for i in part], np.int64)
        got = cal.run([symbols[i] for i in part], *(_pad([a[i] for i in part], fill, lens) for a, fill in (
            (y, 0.0), (loc, 0.0), (scale, 1.0), (valid, False))), lens)
        out += [got[j, :lens[j]] for j in range(len(part))]
    return out


def _pad(rows: list[np.ndarray], fill, lens: np.ndarray) -> np.ndarray:
    """``[n_i, H]`` arrays as one ``[S, max n, H]`` array, ``fill`` past each end."""
    z = np.full((len(rows), int(lens.max()), rows[0].shape[1]), fill, dtype=np.asarray(rows[0]).dtype)
    for j, a in enumerate(rows):
        z[j, :lens[j]] = a
    return z


def _periods(day: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = np.datetime64("1970-01-01") + day.astype("timedelta64[D]")
    months = d.astype("datetime64[M]").astype(int)
    years = months // 12 + 1970
    return years, years * 10 + (months % 12) // 3 + 1


def _pct(v: float) -> float:
    return float(100.0 * v)


def conformal_points(cfg, df: np.ndarray, y: np.ndarray, loc: np.ndarray, scale: np.ndarray,
                     alpha: np.ndarray, widths: bool = True, cal_scale: np.ndarray | None = None
                     ) -> dict[str, np.ndarray]:
    """Per scored point ``[N, H]`` (``y`` NaN: not scored): the misses of the raw and the ACI targets ``[N, H, K]``
    and whether the issued ``a`` sat at the clip; with ``widths`` also, per level ``[N, H, L]``, each interval's
    width and interval score (Gneiting and Raftery 2007, at the nominal level), and per tail ``[N, H, P]`` the
    VaR's pinball loss and the ES (positive loss), for :func:`conformal_table`. ``cal_scale``: the scales the
    calibrated bands are issued at (the pooled term's, :mod:`.pooled`; default ``scale``)."""
    from .conformal import issued, misses, pit
    from .distribution import expected_shortfall, std_quantiles

    L = len(cfg.levels)
    ok = np.isfinite(y)
    y0 = np.where(ok, y, 0.0)
    p2, lower = pit(y0, np.where(ok, loc, 0.0), np.where(ok, scale, 1.0), df)
    p2c, lowerc = (p2, lower) if cal_scale is None else pit(y0, np.where(ok, loc, 0.0), np.where(ok, cal_scale, 1.0),
                                                            df)
    nominal = np.broadcast_to(cfg.nominal, alpha.shape)
    two = cfg.two_sided
    out = {"ok": ok, "raw_miss": misses(p2, lower, nominal, two) & ok[..., None],
           "aci_miss": misses(p2c, lowerc, alpha, two) & ok[..., None],
           "clipped": (issued(alpha) != alpha) & ok[..., None]}
    if not widths:
        return out
    sel = np.broadcast_to(ok[..., None], alpha.shape)
    dfk = np.broadcast_to(np.asarray(df, np.float64)[None, :, None], alpha.shape)
    lck, yk = (np.broadcast_to(a[..., None], alpha.shape) for a in (loc, y0))
    for kind, a in (("raw", nominal), ("aci", issued(alpha))):
        sck = np.broadcast_to((scale if kind == "raw" or cal_scale is None else cal_scale)[..., None], alpha.shape)
        # only the points scored (the quantiles cost ~5 us each); the raw ones are one value per horizon and target
        t = np.full(alpha.shape, np.nan)
        if kind == "raw":
            p = np.where(two, 1.0 - 0.5 * cfg.nominal, cfg.nominal)[None, :]
            t[sel] = np.broadcast_to(std_quantiles(p, np.asarray(df, np.float64)[:, None])[None], alpha.shape)[sel]
            es = np.broadcast_to(expected_shortfall(cfg.nominal[None, L:], 0.0, 1.0,
                                                    np.asarray(df, np.float64)[:, None])[None], alpha[..., L:].shape)
            es = -lck[..., L:] + es * sck[..., L:]
        else:
            p = np.where(two, 1.0 - 0.5 * a, a)
            t[sel] = std_quantiles(p[sel], dfk[sel])
            es = np.full(alpha[..., L:].shape, np.nan)
            st = sel[..., L:]
            es[st] = expected_shortfall(a[..., L:][st], lck[..., L:][st], sck[..., L:][st], dfk[..., L:][st])
        half = t[..., :L] * sck[..., :L]
        lo, hi = lck[..., :L] - half, lck[..., :L] + half
        an = cfg.nominal[:L]
        out[f"{kind}_width"] = np.where(sel[..., :L], 2.0 * half, np.nan)
        out[f"{kind}_is"] = np.where(sel[..., :L], 2.0 * half + 2.0 / an * (np.maximum(lo - yk[..., :L], 0.0)
                                                                           + np.maximum(yk[..., :L] - hi, 0.0)), np.nan)
        q = lck[..., L:] + t[..., L:] * sck[..., L:]
        out[f"{kind}_pinball"] = np.where(sel[..., L:], ((yk[..., L:] < q) - cfg.nominal[L:]) * (q - yk[..., L:]),
                                          np.nan)
        out[f"{kind}_var"] = np.where(sel[..., L:], -q, np.nan)
        out[f"{kind}_es"] = np.where(sel[..., L:], es, np.nan)
    return out


def _period_name(v: int, kind: str) -> str:
    return str(v) if kind == "year" else f"{v // 10}Q{v % 10}"


def conformal_table(cfg, pts: Mapping[str, np.ndarray], h: int, sel: np.ndarray, y: np.ndarray,
                    day: np.ndarray, symbol: np.ndarray) -> dict:
    """One horizon ``h`` (0-based) over the points ``sel``, raw and ACI: per level the coverage (% of points), its
    deviation from the level (points), the worst calendar year and quarter (largest |deviation|), the mean width
    and interval score; per tail the exceedance rate, Kupiec's test pooled (days of one date are not
    independent across symbols: read it as a guide) and per symbol (% of symbols rejected at 5%), the worst
    year, the pinball loss, the mean VaR and ES, and the ES ratio (mean realised loss on exceedances / mean ES
    there: 1 when the ES is right); coverage and exceedance rate by year; % of points whose ``a`` sat at the clip."""
    from .conformal import kupiec, label

    m = sel & pts["ok"][:, h]
    n = int(m.sum())
    L = len(cfg.levels)
    names = [label(x) for x in (*cfg.levels, *cfg.tails)]
    res: dict = {"n": n, "levels": {}, "tails": {}, "by_year": {},
                 "clipped": {nm: _pct(pts["clipped"][m, h, k].mean()) if n else None for k, nm in enumerate(names)}}
    if n == 0:
        return res
    yy = y[m, h]
    years, quarters = _periods(day[m])
    sym = symbol[m]
    has_w = "aci_width" in pts
    uy, iy = np.unique(years, return_inverse=True)
    ny = np.bincount(iy)
    i_sym = np.unique(sym, return_inverse=True)[1]
    n_sym = np.bincount(i_sym)
    for kind in ("raw", "aci"):
        miss = pts[f"{kind}_miss"][m, h]  # [n, K]
        for k, lv in enumerate(cfg.levels):
            cov = 1.0 - miss[:, k]
            r = {"coverage": _pct(cov.mean()), "dev": _pct(cov.mean() - lv)}
            for name, per in (("year", years), ("quarter", quarters)):
                u, inv = np.unique(per, return_inverse=True)
                cnt = np.bincount(inv)
                c = np.bincount(inv, cov) / cnt
                w = int(np.argmax(np.abs(c - lv)))
                r[f"worst_{name}"] = {"period": _period_name(int(u[w]), name), "coverage": _pct(c[w]),
                                      "dev": _pct(c[w] - lv), "n": int(cnt[w])}
            if has_w:
                r["width"] = float(np.mean(pts[f"{kind}_width"][m, h, k]))
                r["interval_score"] = float(np.mean(pts[f"{kind}_is"][m, h, k]))
            res["levels"].setdefault(names[k], {})[kind] = r
        for j, p in enumerate(cfg.tails):
            ex = miss[:, L + j]
            x = int(ex.sum())
            lr, pv = kupiec(n, x, p)
            x_sym = np.bincount(i_sym, ex, len(n_sym))
            per_sym = [kupiec(int(a), int(b), p)[1] for a, b in zip(n_sym, x_sym, strict=True)]
            c = np.bincount(iy, ex) / ny
            w = int(np.argmax(np.abs(c - p)))
            r = {"n": n, "exceedances": x, "rate": _pct(x / n), "kupiec_lr": lr, "kupiec_p": pv,
                 "symbols": len(per_sym), "symbols_rejected": _pct(np.mean(np.asarray(per_sym) < 0.05)),
                 "worst_year": {"period": str(int(uy[w])), "rate": _pct(c[w]), "n": int(ny[w])}}
            if has_w:
                es = pts[f"{kind}_es"][m, h, j]
                r.update({"pinball": float(np.mean(pts[f"{kind}_pinball"][m, h, j])),
                          "var_mean": float(np.mean(pts[f"{kind}_var"][m, h, j])), "es_mean": float(es.mean()),
                          "es_ratio": float(-yy[ex].mean() / es[ex].mean()) if x else None})
            res["tails"].setdefault(names[L + j], {})[kind] = r
    rates = {kind: [np.bincount(iy, pts[f"{kind}_miss"][m, h][:, k], len(uy)) / ny for k in range(len(names))]
             for kind in ("raw", "aci")}
    for i, yr in enumerate(uy):
        res["by_year"][str(int(yr))] = {"n": int(ny[i]), **{
            kind: {nm: _pct(1.0 - r[k][i] if k < L else r[k][i]) for k, nm in enumerate(names)}
            for kind, r in rates.items()}}
    return res
