"""Rolling-origin backtest for ``eval forecast``: yearly refits of the baselines, volatility regimes,
per-point losses aggregated overall / per year / per regime, and Diebold-Mariano tests.

**Origins.** The scored period ``[start, end)`` is cut at ``start`` and at every 1 January after it
(:func:`yearly_origins`). At each cut every baseline is refitted on the symbol's bars *before* the cut
and then filtered forward, with those parameters fixed, over the origins up to the next cut
(:func:`baseline_forecasts`): no forecast reads a bar after its origin, and no parameter reads a bar
after the cut it was fitted at. (A quant's ``statsforecast``/``darts`` "cross-validation with refit
every year", expanding window.)

* ``naive``: N(0, h s^2), ``s`` the sd of the returns before the cut;
* ``ewma_normal``: the RiskMetrics variance (causal, nothing to fit);
* ``ewma_t``: the same variance, Student-t shape fitted before the cut (:func:`.baselines.fit_t_shape`);
* ``garch_normal`` / ``garch_t``: GARCH(1,1) fitted by ``arch`` on the returns before the cut; the
  return series handed to ``arch`` ends at the segment's last origin, so its filter cannot see a later bar.

**Regimes** (:func:`regime_codes`). ``rv_t``: the realised volatility of the ``window`` returns up to
and including the origin bar ``t`` (root mean square, corporate-action bars left out). The cut points
are the terciles of the symbol's own ``rv`` over its bars before the yearly cut, so a regime is "calm /
usual / wild for this symbol, judged by its history": ``low`` (``rv <= q1/3``), ``mid``, ``high``
(``rv > q2/3``). Both use bars up to the origin only.

**Scores** (:func:`point_scores`, :func:`aggregate`): per point NLL, CRPS (closed forms,
:func:`.metrics.crps`), absolute error of the median, the two-sided tail mass (an outcome is inside the
central ``L`` interval iff it is at least ``1 - L``) and the PIT; a table cell is their mean over the
points selected, MASE the median over symbols of MAE / MAE of the zero-median naive forecast on the same
points (as :func:`.metrics.summarize`).

**Diebold-Mariano** (:func:`diebold_mariano`): the loss difference (model minus baseline) per point,
averaged over the symbols of each day (points of one day are not independent: a day-clustered test),
then a t statistic on the daily series with a Newey-West (Bartlett) long-run variance, lag
``max(h - 1, floor(4 (T/100)^(2/9)))`` (an h-bar target overlaps the next h - 1), p from a Student-t
with ``T - 1`` degrees of freedom. Negative t: the model's loss is lower.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from . import baselines
from .distribution import nll, tail2
from .features import SymbolSeries
from .metrics import crps

BASELINES = ("naive", "ewma_normal", "ewma_t", "garch_normal", "garch_t")
REGIMES = ("low", "mid", "high")
REGIME_WINDOW = 21
PIT_BINS = 20
DM_LOSSES = ("nll", "crps")


def _secs(day: str) -> float:
    return float(np.datetime64(day, "s").astype(np.int64))


def date_of(ts: float) -> str:
    return str(np.datetime64(int(ts), "s").astype("datetime64[D]"))


def yearly_origins(start: str, end: str | None, last_ts: float) -> list[float]:
    """The refit times (seconds): ``start``, then 1 January of every later year before ``end`` and not after
    the last bar ``last_ts``."""
    cuts = [_secs(start)]
    year = int(str(np.datetime64(start, "Y"))) + 1
    stop = _secs(end) if end is not None else math.inf
    while True:
        t = _secs(f"{year}-01-01")
        if t >= stop or t > last_ts:
            return cuts
        cuts.append(t)
        year += 1


def segment_of(ts: np.ndarray, cuts: Sequence[float]) -> np.ndarray:
    """The index of the last cut at or before each time (every ``ts`` at or after ``cuts[0]``)."""
    return np.searchsorted(np.asarray(cuts, np.float64), ts, side="right") - 1


def baseline_forecasts(s: SymbolSeries, origins: np.ndarray, cuts: Sequence[float], horizons: int, *,
                       garch: bool = True) -> tuple[dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], list[dict]]:
    """Every baseline's ``(loc, scale, df)`` ``[len(origins), H]`` at the bar indices ``origins`` of one symbol,
    refitted at each cut on the bars before it (module doc); and one record per refit (the cut, the
    training returns, the fitted naive sd, EWMA-t shape and GARCH parameters)."""
    n, H = len(origins), horizons
    methods = BASELINES if garch else BASELINES[:3]
    out = {m: (np.zeros((n, H)), np.ones((n, H)), np.full((n, H), np.inf)) for m in methods}
    seg = segment_of(s.ts[origins], cuts)
    fits = []
    accepted: dict[str, dict] = {}  # the last GARCH parameters that did not look failed (baselines.garch)
    for k in np.unique(seg):
        rows = np.flatnonzero(seg == k)
        o = origins[rows]
        n_train = int((s.ts < cuts[k]).sum())
        keep = ~s.jump[1:n_train]
        train_ret = s.ret[1:n_train][keep]
        sd = baselines.sd(train_ret)
        # EWMA-t: the shape fitted on the pairs (var after bar j, return of bar j + 1), bar j + 1 before the cut
        j = np.arange(baselines.EWMA_BURN_IN, n_train - 1)
        j = j[~s.jump[j + 1]]
        nu = baselines.fit_t_shape(s.ret[j + 1], s.var[j])
        got = {"naive": baselines.naive(sd, len(o), H), "ewma_normal": baselines.ewma(s.var[o], H),
               "ewma_t": baselines.ewma_t(s.var[o], H, nu)}
        fit = {"origin": date_of(cuts[k]), "n_train": len(train_ret), "naive_sd": sd, "ewma_t_nu": nu}
        if garch:
            # arch sees returns 1..last origin (index i - 1 is bar i's return); fitted on those before the cut
            ret = s.ret[1:int(o.max()) + 1]
            for name, dist in (("garch_normal", "normal"), ("garch_t", "t")):
                info: dict = {}
                got[name], params = baselines.garch(ret, n_train - 1, o - 1, H, dist, info=info,
                                                    fallback=accepted.get(name))
                fit[name] = params
                fit[f"{name}_fit"] = info
                if not info["suspect"]:
                    accepted[name] = params
        for m in methods:
            for a, b in zip(out[m], got[m], strict=True):
                a[rows] = b
        fits.append(fit)
    return out, fits


def realised_vol(ret: np.ndarray, jump: np.ndarray, window: int = REGIME_WINDOW) -> np.ndarray:
    """``rv[t]``: root mean square of the returns of bars ``t - window + 1 .. t`` (bar 0's and jump bars' left
    out); NaN until ``window`` bars have passed."""
    use = np.ones(len(ret), bool)
    use[:1] = False
    use &= ~np.asarray(jump, bool)
    r2 = np.where(use, np.asarray(ret, np.float64) ** 2, 0.0)
    c2 = np.concatenate([[0.0], np.cumsum(r2)])
    cn = np.concatenate([[0], np.cumsum(use)])
    out = np.full(len(ret), np.nan)
    if len(ret) >= window:
        s2 = c2[window:] - c2[:-window]
        cnt = cn[window:] - cn[:-window]
        with np.errstate(invalid="ignore", divide="ignore"):
            out[window - 1:] = np.where(cnt > 0, np.sqrt(s2 / np.maximum(cnt, 1)), np.nan)
    return out


def regime_codes(s: SymbolSeries, origins: np.ndarray, cuts: Sequence[float],
                 window: int = REGIME_WINDOW) -> np.ndarray:
    """0 / 1 / 2 (``REGIMES``) per origin: its realised vol against the terciles of the symbol's realised vol
    over the bars before the origin's yearly cut; -1 where either is unknown (fewer than ``window`` bars)."""
    rv = realised_vol(s.ret, s.jump, window)
    seg = segment_of(s.ts[origins], cuts)
    out = np.full(len(origins), -1, np.int8)
    for k in np.unique(seg):
        rows = np.flatnonzero(seg == k)
        hist = rv[:int((s.ts < cuts[k]).sum())]
        hist = hist[np.isfinite(hist)]
        if len(hist) < 3:
            continue
        q1, q2 = np.quantile(hist, [1 / 3, 2 / 3])
        v = rv[origins[rows]]
        code = np.where(v <= q1, 0, np.where(v <= q2, 1, 2)).astype(np.int8)
        out[rows] = np.where(np.isfinite(v), code, -1)
    return out


def point_scores(y: np.ndarray, loc: np.ndarray, scale: np.ndarray, df: np.ndarray) -> dict[str, np.ndarray]:
    """Per point ``[N, H]``: ``nll``, ``crps``, ``ae`` (|y - median|), ``p2`` (two-sided tail mass of the outcome)
    and ``pit`` (``P(Y <= y)``). ``y`` must be finite (fill unscored points)."""
    z = (y - loc) / scale
    p2 = tail2(z, df)
    return {"nll": nll(y, loc, scale, df), "crps": crps(y, loc, scale, df), "ae": np.abs(y - loc), "p2": p2,
            "pit": np.where(z < 0, 0.5 * p2, 1.0 - 0.5 * p2)}


def coverage_key(level: float) -> str:
    return f"coverage_{100 * level:.10g}"


def aci_coverage_key(level: float) -> str:
    """The coverage of the online-calibrated (ACI) band at ``level``: ``aci_coverage_80``."""
    return f"aci_{coverage_key(level)}"


def aggregate(pts: Mapping[str, np.ndarray], y: np.ndarray, scored: np.ndarray, sym: np.ndarray,
              levels: Sequence[float], aci: Mapping[float, np.ndarray] | None = None) -> dict:
    """One method's table cell per horizon (``h1``..) over the points ``scored [N, H]``: n, NLL, CRPS, MAE, MASE
    and the coverage of every level; None where nothing is scored. ``sym``: int symbol codes ``[N]``. ``aci``:
    per level, whether each point ``[N, H]`` fell inside the online-calibrated band; adds the coverage of those
    bands as ``aci_coverage_{L}`` (:func:`aci_coverage_key`)."""
    out = {}
    n_sym = int(sym.max()) + 1 if len(sym) else 0
    for h in range(scored.shape[1]):
        m = scored[:, h]
        n = int(m.sum())
        if n == 0:
            out[f"h{h + 1}"] = {"nll": None, "crps": None, "mae": None, "mase": None,
                                **{coverage_key(lv): None for lv in levels},
                                **{aci_coverage_key(lv): None for lv in aci or ()}, "n": 0}
            continue
        ae = pts["ae"][m, h]
        s_ae = np.bincount(sym[m], ae, n_sym)
        s_naive = np.bincount(sym[m], np.abs(y[m, h]), n_sym)
        ok = s_naive > 0
        p2 = pts["p2"][m, h]
        out[f"h{h + 1}"] = {
            "nll": float(pts["nll"][m, h].mean()), "crps": float(pts["crps"][m, h].mean()), "mae": float(ae.mean()),
            "mase": float(np.median(s_ae[ok] / s_naive[ok])) if ok.any() else None,
            **{coverage_key(lv): float((p2 >= 1.0 - lv).mean()) for lv in levels},
            **{aci_coverage_key(lv): float(hit[m, h].mean()) for lv, hit in (aci or {}).items()}, "n": n}
    return out


def newey_west_lag(T: int, horizon: int = 1) -> int:
    return max(horizon - 1, int(4 * (T / 100.0) ** (2.0 / 9.0)))


def diebold_mariano(diff: np.ndarray, day: np.ndarray, *, horizon: int = 1, lag: int | None = None) -> dict:
    """Day-clustered Diebold-Mariano test of a per-point loss difference ``diff`` (model minus baseline): the
    mean per day, then ``t = mean / sqrt(LRV / T)`` with a Newey-West (Bartlett) long-run variance of the daily
    series (module doc). ``better``: ``model`` / ``baseline`` where p < 0.05, else ``neither``."""
    from scipy import stats

    diff = np.asarray(diff, np.float64)
    if len(diff) == 0:
        return {"n": 0, "days": 0}
    inv = np.unique(day, return_inverse=True)[1]
    d = np.bincount(inv, diff) / np.bincount(inv)
    T = len(d)
    mean = float(d.mean())
    res = {"n": len(diff), "days": T, "mean_diff": mean}
    if T < 3:
        return {**res, "lag": 0, "t": None, "p": None, "better": "neither"}
    L = min(newey_west_lag(T, horizon) if lag is None else int(lag), T - 1)
    e = d - mean
    lrv = float(e @ e) / T
    for j in range(1, L + 1):
        lrv += 2.0 * (1.0 - j / (L + 1.0)) * float(e[j:] @ e[:-j]) / T
    if not lrv > 0:
        return {**res, "lag": L, "t": None, "p": None, "better": "neither"}
    t = mean / math.sqrt(lrv / T)
    p = float(2.0 * stats.t.sf(abs(t), T - 1))
    return {**res, "lag": L, "se": math.sqrt(lrv / T), "t": float(t), "p": p,
            "better": ("model" if t < 0 else "baseline") if p < 0.05 else "neither"}


def dm_table(model: Mapping[str, np.ndarray], others: Mapping[str, Mapping[str, np.ndarray]], scored: np.ndarray,
             day: np.ndarray) -> dict:
    """``{baseline: {h: {loss: DM result}}}`` of the model against each of ``others`` over ``scored [N, H]``."""
    out = {}
    for name, pts in others.items():
        out[name] = {}
        for h in range(scored.shape[1]):
            m = scored[:, h]
            out[name][f"h{h + 1}"] = {loss: diebold_mariano(model[loss][m, h] - pts[loss][m, h], day[m], horizon=h + 1)
                                      for loss in DM_LOSSES}
    return out


def pit_histogram(pit: np.ndarray, bins: int = PIT_BINS) -> list[int]:
    """Counts of PIT values in ``bins`` equal bins of [0, 1]."""
    return np.histogram(np.clip(pit, 0.0, 1.0), bins=bins, range=(0.0, 1.0))[0].astype(int).tolist()


def year_of(day: np.ndarray) -> np.ndarray:
    """Calendar year of days since 1970."""
    return (np.datetime64("1970-01-01") + np.asarray(day).astype("timedelta64[D]")).astype("datetime64[Y]").astype(
        int) + 1970
