"""``streamrnn eval forecast``: the forecaster and every baseline scored on the same bars.

Scored points: forecast origins at or after the model's ``test_start`` with a
valid target (no corporate-action jump inside it), on symbols with at least
``MIN_TRAIN`` returns before ``test_start`` (GARCH and the naive scale are fitted
on those). ``period="validation"`` scores ``[fit_end, val_end)`` instead, with
every baseline fitted before ``fit_end``: the period to compare designs on
without reading the test period. ``start=``/``end=`` (CLI ``--start DATE --end DATE``)
score a period of the user's choosing, ``[start, end)`` with every target ending
before ``end``; the baselines are fitted on each symbol's bars before ``start`` only.
Every symbol that cannot be scored is reported with its reason (``skipped``: it ends
before the period, starts after it, has no valid target in it, or has fewer than
``MIN_TRAIN`` returns before it); a period with nothing to score is an
:class:`~streamrnn.errors.InputError` naming the symbols and why.
Symbols are reported together (``metrics``) and in two groups
(``groups.seen_symbols``: trained-on tickers in the held-out period;
``groups.heldout_symbols``: tickers never seen in training).

``conformal`` (``levels=``/``tails=``/``gamma=``, CLI ``--levels``, ``--var``, ``--gamma``): the model's intervals
at every level and its VaR at every tail, raw and recalibrated online per symbol by adaptive conformal
inference (:mod:`.conformal`, run from each symbol's first bar), per group and horizon: coverage, the worst
year and quarter, VaR exceedances with Kupiec's test, ES ratio, by year; and a gamma scan.

``parity_max_abs``: the largest difference between the model's outputs when the
raw bars are streamed bar by bar (online features, then one
:class:`~streamrnn.keyed.operator.KeyedOperator` call per timestamp with state carried
per symbol) and when each symbol's whole sequence of offline features runs in
one call.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from ..dead_letters import DeadLetter
from ..errors import InputError
from ..keyed.operator import KeyedOperator
from ..model.loaded import Model, load
from . import backtest, calibration, conformal, pooled, scale
from .dataset import Prepared, Split, check_frequency
from .dataset import load as load_data
from .features import FeatureConfig, OnlineFeatures
from .metrics import LEVELS as COVERAGE_LEVELS
from .metrics import nll
from .pooled import check_weight
from .progress import Progress

MIN_TRAIN = 250
NAMES = {"ewma_normal": "EWMA-normal", "ewma_t": "EWMA-t", "garch_normal": "GARCH-normal", "garch_t": "GARCH-t"}
METHODS = ("lstm", "naive", "ewma_normal", "ewma_t", "garch_normal", "garch_t", "tcn")
#: ``(data, horizons, the model's forecast meta) -> (locs, log_scales, df)`` per symbol of ``data``: a second model
#: scored beside the LSTM (the CLI binds ``streamrnn.train.forecast.tcn_outputs`` to ``--tcn``; torch stays there)
TcnOutputs = Callable[[list[Prepared], int, Mapping], tuple]


def forecast_meta(model: Model) -> dict:
    meta = model.spec.training.get("forecast")
    if model.spec.task != "forecast" or not isinstance(meta, Mapping):
        raise InputError(f"{model.source}: model task: expected a forecast model (training.forecast in its spec), "
                         f"got task {model.spec.task!r}")
    return dict(meta)


def model_outputs(model: Model, data: list[Prepared], batch: int = 64) -> list[tuple[np.ndarray, np.ndarray]]:
    """Whole-sequence (loc, log_scale) ``[n, H]`` per symbol: each symbol's bars in one call (padded batches);
    absolute (% log return) also for a model whose outputs are relative to the EWMA sd (:mod:`.scale`)."""
    meta = forecast_meta(model)
    out = []
    F = model.spec.input.n_features
    for s in range(0, len(data), batch):
        part = data[s:s + batch]
        lens = np.array([max(1, len(p.series)) for p in part], np.int32)
        x = np.zeros((len(part), int(lens.max()), F), np.float32)
        for i, p in enumerate(part):
            x[i, :len(p.series)] = p.series.x
        o, _ = model.step(x, lengths=lens)
        out += [scale.absolute(meta, o["mean"][i, :n], o["log_scale"][i, :n], part[i].series.x[:n])
                for i, n in enumerate(lens)]
    return out


def streaming_parity(model: Model, data: list[Prepared], whole: list[tuple[np.ndarray, np.ndarray]],
                     features: FeatureConfig, progress: Progress | None = None) -> tuple[float, int]:
    """Stream raw bars through online features and a KeyedOperator, one call per timestamp; max |diff|."""
    rows = []
    for k, p in enumerate(data):
        s = p.series
        for i in range(len(s)):
            rows.append((s.ts[i], k, i))
    rows.sort()
    online = OnlineFeatures(features)
    op = KeyedOperator(model)
    meta = forecast_meta(model)
    worst, n = 0.0, 0
    j = 0
    while j < len(rows):
        ts = rows[j][0]
        keys, xs, where = [], [], []
        while j < len(rows) and rows[j][0] == ts:
            _, k, i = rows[j]
            s = data[k].series
            bar = {"symbol": s.symbol, "ts": float(s.ts[i]), "open": float(_raw(s, i, "open")),
                   "high": float(_raw(s, i, "high")), "low": float(_raw(s, i, "low")),
                   "close": float(s.close[i]), "volume": float(_raw(s, i, "volume"))}
            r = online.update(bar)
            if isinstance(r, DeadLetter):
                raise InputError(f"streaming parity: {s.symbol} bar {i} was accepted offline but not online: "
                                 f"{r.reason}")
            keys.append(s.symbol)
            xs.append(r.x)
            where.append((k, i))
            j += 1
        res = op.process(keys, np.asarray(xs, np.float32))
        if progress is not None:
            progress.tick(j, len(rows), "bars streamed (parity check)")
        for e, (k, i) in enumerate(where):
            loc, ls = whole[k]
            got_loc, got_ls = scale.absolute(meta, res.outputs["mean"][e], res.outputs["log_scale"][e], xs[e])
            worst = max(worst, float(np.abs(got_loc - loc[i]).max()), float(np.abs(got_ls - ls[i]).max()))
            n += 1
    return worst, n


def _raw(s, i: int, c: str) -> float:
    return s.raw[c][i]


def eval_forecast(model_path: str, bars: str, *, columns: Mapping[str, str] | None = None,
                  tcn: TcnOutputs | None = None, symbols=None, allow_frequency: bool = False, garch: bool = True,
                  progress: bool = False,
                  parity_symbols: int = 100, period: str = "test", start: str | None = None,
                  end: str | None = None, levels: Sequence[float] = conformal.LEVELS,
                  tails: Sequence[float] = conformal.TAILS,
                  gamma: float | Sequence[float] = conformal.GAMMA, scaling: str = "proportional",
                  regime_window: int = backtest.REGIME_WINDOW, method: str = conformal.METHOD,
                  pool: float = 0.0, window: float = pooled.WINDOW) -> dict:
    """Score the model and the baselines; returns the JSON-ready result (see module doc). ``levels``: the
    interval levels scored (coverage per level in every table, raw and ACI-calibrated in ``conformal``);
    ``tails``: the VaR / ES tail probabilities; ``gamma``: the ACI step, or several (the first makes the
    tables, every one gets a ``conformal.gamma_scan`` entry); ``scaling``: the steps per target
    (:class:`~.conformal.ConformalConfig`); ``regime_window``: the bars of the realised volatility that
    sorts origins into regimes (:mod:`.backtest`). ``pool``: the weight of the market-wide scale term the
    calibrated bands are issued with (:mod:`.pooled`, the job's ``--pool``; 0: off), over every symbol loaded
    (``symbols``: those only, as a job run on their files) from its first bar, in the release order of the job's
    ``--window`` ``window`` (s). ``progress``: plain lines on stderr once it runs 10 s.
    ``tcn``: a second model's outputs (:data:`TcnOutputs`), scored as ``tcn``."""
    gammas = [float(gamma)] if isinstance(gamma, (int, float)) else [float(g) for g in gamma]
    if not gammas:
        raise InputError("eval forecast: gamma: expected at least one ACI step, got none")
    cal_cfg = conformal.ConformalConfig(1, tuple(levels), tuple(tails), gammas[0], scaling, method)
    pool = check_weight(pool, [2.0])  # the weight now; the model's df once loaded (offline_multipliers)
    if isinstance(window, bool) or not isinstance(window, (int, float)) or not 0.001 <= window < 1e8:
        raise InputError(f"eval forecast: window: expected seconds in [0.001, 1e8) (the job's --window), got "
                         f"{window!r}")
    for g in gammas[1:]:
        conformal.ConformalConfig(1, gamma=g)
    if isinstance(regime_window, bool) or not isinstance(regime_window, int) or regime_window < 2:
        raise InputError(f"eval forecast: regime_window: expected an int >= 2, got {regime_window!r}")
    cov_levels = tuple(sorted({*COVERAGE_LEVELS, *cal_cfg.levels}))
    t0 = time.perf_counter()
    bar = Progress("eval forecast", enabled=progress)
    with bar:
        bar.update("loading the model and the bars")
        model = load(model_path, providers=["CPUExecutionProvider"])
        meta = forecast_meta(model)
        H = int(meta["horizons"])
        fcfg = FeatureConfig(**meta["features"])
        split = Split(**meta["split"])
        df_model = np.asarray(meta["df"], np.float64)
        data = load_data(bars, H, columns=columns, features=fcfg, symbols=symbols)
        missing = [s for s in dict.fromkeys(symbols or ()) if s not in {p.symbol for p in data}]
        if symbols is not None and not data:
            raise InputError(f"eval forecast: symbols: expected symbols that are in {bars}, got none of "
                             f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        interval = check_frequency(data, fcfg.bar_seconds, allow=allow_frequency)
        if start is not None or end is not None:
            if start is None:
                raise InputError("eval forecast: end: expected a start date with it, got none")
            start, end = _day(start, "start"), (_day(end, "end") if end is not None else None)
            if end is not None and not _secs(start) < _secs(end):
                raise InputError(f"eval forecast: end: expected a date after start {start}, got {end}")
            period = "custom"
        elif period not in ("test", "validation"):
            raise InputError(f"eval forecast: period: expected 'test' or 'validation', got {period!r}")
        else:
            start = split.test_start if period == "test" else split.fit_end
            end = None if period == "test" else split.val_end
        test_ts = _secs(start)
        bar.update("running the model over every symbol")
        whole = model_outputs(model, data)
        # the calibrated bands' scales: the model's times the pooled multiplier (1 with pool off)
        mult = pooled.offline_multipliers(pool, df_model, [p.series.ts for p in data], [p.y for p in data],
                                          [w[0] for w in whole], [np.exp(w[1]) for w in whole],
                                          [p.valid for p in data], window)
        parity, parity_n = streaming_parity(model, data[:parity_symbols], whole[:parity_symbols], fcfg, bar)
        tcn_out = tcn(data, H, meta) if tcn is not None else None
        cuts = backtest.yearly_origins(start, end, max(float(p.series.ts[-1]) for p in data if len(p.series)))
        preds: dict[str, list] = {m: [] for m in METHODS}
        ys, masks, groups, heldout, days, regimes = [], [], [], [], [], []
        scored: list[tuple[int, np.ndarray]] = []
        skipped = [(sym, "(not in the bars)") for sym in missing]
        fits: dict[str, list[dict]] = {}
        for k, p in enumerate(data):
            s = p.series
            n_train = int((s.ts < test_ts).sum())
            n_ret = int((~s.jump[1:n_train]).sum())
            window = p.window(start, end)
            origins = np.flatnonzero(window.any(axis=1))
            reason = _skip_reason(s.ts, n_ret, len(origins), start, end)
            if reason is not None:
                skipped.append((s.symbol, reason))
                continue
            bar.tick(k + 1, len(data), "symbols fitted and scored", s.symbol)
            loc, ls = whole[k]
            preds["lstm"].append((loc[origins], np.exp(ls[origins]), np.broadcast_to(df_model, (len(origins), H))))
            base, fits[s.symbol] = backtest.baseline_forecasts(s, origins, cuts, H, garch=garch)
            for m, f in base.items():
                preds[m].append(f)
            if tcn_out is not None:
                tl, ts_, tdf = tcn_out
                preds["tcn"].append((tl[k][origins], np.exp(ts_[k][origins]),
                                     np.broadcast_to(tdf, (len(origins), H))))
            regimes.append(backtest.regime_codes(s, origins, cuts, regime_window))
            days.append(s.ts[origins] // 86400)
            ys.append(p.y[origins])
            masks.append(window[origins])
            groups.append(np.full(len(origins), s.symbol, dtype=object))
            heldout.append(np.full(len(origins), split.held_out(s.symbol)))
            scored.append((k, origins))
        if not ys:
            why = "; ".join(f"{sym} {r}" for sym, r in skipped[:5]) + (f"; {len(skipped) - 5} more"
                                                                         if len(skipped) > 5 else "")
            raise InputError(f"eval forecast: period {start}..{end or 'end'}: expected symbols to score (>= "
                             f"{MIN_TRAIN} returns before {start} and a valid target in the period), got none of "
                             f"{len(data) + len(missing)} ({why})")
        Y, M = np.concatenate(ys), np.concatenate(masks)
        G, HO, D = np.concatenate(groups), np.concatenate(heldout), np.concatenate(days)
        R, YR = np.concatenate(regimes), backtest.year_of(D)
        cat = {m: tuple(np.concatenate([f[j] for f in v]) for j in range(3)) for m, v in preds.items() if v}
        bar.update(f"scoring {int(M.sum())} targets of {len(cat)} forecasters")
        Yf = np.where(M, Y, 0.0)  # unscored targets: any finite value (masked out of every table)
        pts = {m: backtest.point_scores(Yf, *cat[m]) for m in cat}
        codes = np.unique(G, return_inverse=True)[1]
        everything = np.ones(len(Y), bool)
        sels = (("all", everything), ("seen_symbols", ~HO), ("heldout_symbols", HO))
        bar.update(f"online calibration ({_METHOD_NAME[cal_cfg.method]}) of every symbol from its first bar")
        aci = _aci_alphas(data, whole, scored, df_model, cal_cfg, gammas[0], mult)
        mult_scored = np.concatenate([mult[k][o] for k, o in scored])  # the scored points' multipliers
        # the model's ACI-calibrated bands beside its raw ones in every table: hit iff the two-sided tail mass of
        # the outcome (under the pooled scale, if any) is at least the a issued at its origin (conformal.misses)
        p2_cal = pts["lstm"]["p2"] if not pool else conformal.pit(
            Yf, cat["lstm"][0], cat["lstm"][1] * mult_scored, cat["lstm"][2])[0]
        aci_in = {lv: p2_cal >= conformal.issued(aci[..., k]) for k, lv in enumerate(cal_cfg.levels)}

        def table(sel: np.ndarray) -> dict:
            return {m: backtest.aggregate(pts[m], Yf, M & sel[:, None], codes, cov_levels,
                                          aci=aci_in if m == "lstm" else None) if m in pts else {
                f"h{h + 1}": dict.fromkeys(("nll", "crps", "mae", "mase",
                                            *(backtest.coverage_key(x) for x in cov_levels)))
                for h in range(H)} for m in METHODS}

        def location(sel: np.ndarray) -> dict:
            return {m: {f"h{h + 1}": location_bias(Y[sel & M[:, h], h], *(a[sel & M[:, h], h] for a in cat[m]),
                                                   D[sel & M[:, h]])
                        for h in range(H)} for m in ("lstm", "tcn") if m in cat}

        bar.update("backtest tables and Diebold-Mariano tests")
        bt = _backtest_block(pts, table, M, D, YR, R, sels, cuts, regime_window, fits)
        dead = [d for p in data for d in p.series.dead]
        nus = {sym: f[0]["ewma_t_nu"] for sym, f in fits.items()}
        all_nus = [x["ewma_t_nu"] for f in fits.values() for x in f]
        return {
            "model": model_path, "bars": bars, "n_bars": int(sum(len(p.series) for p in data)),
            "n_symbols": len(data) - len(skipped) + len(missing), "n_symbols_heldout": len(set(G[HO])),
            "skipped_symbols": [sym for sym, _ in skipped],
            "skipped": [{"symbol": sym, "reason": r} for sym, r in skipped],
            "period": period, "start": start, "end": end, "horizons": H, "levels": list(cov_levels),
            # a chosen period that reaches into the bars the model was fitted or selected on is in-sample there
            "overlaps_training": _secs(start) < _secs(split.val_end), "model_split": split.to_dict(),
            "bar_interval_s": interval, "parity_max_abs": parity, "parity_bars": parity_n,
            "dead_letters": len(dead), "dead_letter_examples": [
                {"symbol": d.key, "ts": d.ts, "reason": d.reason} for d in dead[:5]],
            "jumps_flagged": int(sum(int(p.series.jump.sum()) for p in data)),
            # the shape at the first origin per symbol; every refit's in backtest.fits
            "ewma_t_nu": {"median": float(np.median(all_nus)), "min": float(min(all_nus)),
                          "max": float(max(all_nus)), "per_symbol": nus},
            "metrics": table(everything),
            "groups": {"seen_symbols": table(~HO), "heldout_symbols": table(HO)},
            "backtest": bt,
            "location": {"all": location(everything), "seen_symbols": location(~HO),
                         "heldout_symbols": location(HO)},
            # calibration over regimes (issue 15): h1 per calendar year, and the model on known-sd synthetic series
            "by_year": {grp: {m: calibration.by_year(Y[sel & M[:, 0], 0], *(a[sel & M[:, 0], 0] for a in cat[m]),
                                                     D[sel & M[:, 0]]) for m in cat}
                        for grp, sel in sels},
            "conformal": {**_conformal(data, whole, scored, df_model, Y, M, D, G, HO, cal_cfg, gammas, bar, aci, mult,
                                       mult_scored), "pool": pool},
            "known_sd": calibration.known_sd_table(model, meta),
            "shocks": calibration.shock_response(model, meta),
            "seconds": round(time.perf_counter() - t0, 1),
        }


def _backtest_block(pts: Mapping[str, Mapping[str, np.ndarray]], table, M: np.ndarray, D: np.ndarray,
                    YR: np.ndarray, R: np.ndarray, sels, cuts: Sequence[float], regime_window: int,
                    fits: Mapping[str, list[dict]]) -> dict:
    """The rolling-origin backtest's tables (:mod:`.backtest`): per group, per year and per regime; the
    Diebold-Mariano tests of the model against every baseline (and the TCN) overall, per year and per regime;
    the PIT histograms (h1); the best baseline (lowest h1 NLL over all symbols) and every refit."""
    others = {m: pts[m] for m in (*backtest.BASELINES, "tcn") if m in pts}
    h1 = M[:, 0]
    best = min((m for m in backtest.BASELINES if m in pts), key=lambda m: float(pts[m]["nll"][h1, 0].mean()))

    def dm(sel: np.ndarray) -> dict:
        return backtest.dm_table(pts["lstm"], others, M & sel[:, None], D)

    def parts(sel: np.ndarray, fn) -> dict:
        return {"by_year": {str(int(y)): fn(sel & (YR == y)) for y in np.unique(YR[sel])},
                "by_regime": {name: fn(sel & (R == i)) for i, name in enumerate(backtest.REGIMES)}}

    return {
        "refit": "yearly", "origins": [backtest.date_of(c) for c in cuts], "best_baseline": best,
        "regime": {"window": regime_window, "labels": list(backtest.REGIMES),
                   "share": {name: float((R[h1] == i).mean()) for i, name in enumerate(backtest.REGIMES)},
                   "unknown": int((R[h1] < 0).sum())},
        "groups": {g: parts(sel, table) for g, sel in sels},
        "dm": {g: {"overall": dm(sel), **parts(sel, dm)} for g, sel in sels},
        "pit": {"bins": backtest.PIT_BINS, "h1": {m: backtest.pit_histogram(p["pit"][h1, 0]) for m, p in pts.items()}},
        "fits": dict(fits),
    }


#: the calibrators' names in progress lines
_METHOD_NAME = {"aci": "ACI", "agaci": "AgACI", "none": "no calibration"}


def _conformal(data: list[Prepared], whole: list[tuple[np.ndarray, np.ndarray]], scored: list[tuple[int, np.ndarray]],
               df: np.ndarray, Y: np.ndarray, M: np.ndarray, D: np.ndarray, G: np.ndarray, HO: np.ndarray,
               cfg: conformal.ConformalConfig, gammas: list[float], bar: Progress, first: np.ndarray,
               mult: list[np.ndarray], mult_scored: np.ndarray) -> dict:
    """The model's intervals and VaR raw and ACI-calibrated (:mod:`.conformal`), per group and horizon
    (``first``: :func:`_aci_alphas` at ``gammas[0]``; every other gamma is run here for the scan; ``mult``: the
    pooled scale multipliers the calibrated bands are issued with, per symbol and at the scored points)."""
    H = len(df)
    loc = np.concatenate([whole[k][0][o] for k, o in scored])
    sc = np.concatenate([np.exp(whole[k][1][o]) for k, o in scored])
    sc_cal = sc * mult_scored
    Ym = np.where(M, Y, np.nan)
    sels = (("all", np.ones(len(Y), bool)), ("seen_symbols", ~HO), ("heldout_symbols", HO))
    codes = np.unique(G, return_inverse=True)[1]  # symbols as ints: the per-symbol Kupiec counts are bincounts

    def tables(a: np.ndarray, groups) -> dict:
        # widths, interval scores, VaR losses and ES at h1 only (each costs a quantile per point and target)
        p1 = calibration.conformal_points(cfg, df[:1], Ym[:, :1], loc[:, :1], sc[:, :1], a[:, :1],
                                          cal_scale=sc_cal[:, :1])
        pn = calibration.conformal_points(cfg, df, Ym, loc, sc, a, widths=False, cal_scale=sc_cal) if H > 1 else p1
        return {g: {f"h{h + 1}": calibration.conformal_table(cfg, p1 if h == 0 else pn, h, sel, Y, D, codes)
                    for h in range(H)} for g, sel in groups}

    scan, groups = [], {}
    for i, g in enumerate(gammas):
        bar.tick(i, len(gammas), f"{_METHOD_NAME[cfg.method]} runs", f"gamma {g:g}")
        if i == 0:
            groups = tables(first, sels)
            tabs = groups["all"]
        else:
            tabs = tables(_aci_alphas(data, whole, scored, df, cfg, g, mult), sels[:1])["all"]
        scan.append({"gamma": g, **{h: _scan_row(t) for h, t in tabs.items()}})
    return {**cfg.to_dict(), "horizons": H, "gamma": gammas[0], "warm_up": "each symbol's bars from its first",
            "groups": groups, "gamma_scan": scan}


def _aci_alphas(data: list[Prepared], whole: list[tuple[np.ndarray, np.ndarray]],
                scored: list[tuple[int, np.ndarray]], df: np.ndarray, cfg: conformal.ConformalConfig,
                gamma: float, mult: list[np.ndarray]) -> np.ndarray:
    """The ``a`` the online calibrator (:mod:`.conformal`, step ``gamma``) issued at every scored origin
    ``[N, H, K]``, in the order of the scored points. It runs over each scored symbol's whole history from its
    first bar (causal: the ``a`` at an origin has seen only the targets completed by then), as the job does, on
    the model's scales times the pooled multipliers ``mult`` (:mod:`.pooled`)."""
    syms = [data[k].symbol for k, _ in scored]
    ys = [np.where(data[k].valid, data[k].y, 0.0) for k, _ in scored]
    locs = [whole[k][0] for k, _ in scored]
    scales = [np.exp(whole[k][1]) * mult[k] for k, _ in scored]
    valids = [data[k].valid for k, _ in scored]
    cal = conformal.OnlineConformal(df, levels=cfg.levels, tails=cfg.tails, gamma=gamma, scaling=cfg.scaling,
                                    method=cfg.method)
    a = calibration.conformal_alphas(cal, syms, ys, locs, scales, valids)
    return np.concatenate([a[i][o] for i, (_, o) in enumerate(scored)])


def _scan_row(t: dict) -> dict:
    """The ACI summary of one horizon for the gamma scan: per target the coverage (rate), the worst year's
    deviation, and (where computed) the interval score or pinball loss and the width."""
    row = {}
    for lv, v in t.get("levels", {}).items():
        a = v["aci"]
        row[lv] = {"coverage": a["coverage"], "worst_year_dev": a["worst_year"]["dev"],
                   **{k: a[k] for k in ("interval_score", "width") if k in a}}
    for p, v in t.get("tails", {}).items():
        a = v["aci"]
        row[f"var{p}"] = {"rate": a["rate"], "worst_year_rate": a["worst_year"]["rate"],
                          **{k: a[k] for k in ("pinball",) if k in a}}
    return row


def location_bias(y: np.ndarray, loc: np.ndarray, scale: np.ndarray, df: np.ndarray, day: np.ndarray) -> dict:
    """The median's drift and whether it earns its keep: mean predicted location against the mean realised
    return (% log), the share of origins with a positive location, and the NLL / MAE of the same forecast
    with its location set to 0. ``nll_gain_t``: the mean of (NLL at zero location - NLL) over days, divided by
    its standard error over days (origins of one day are averaged first: they are not independent);
    ``location_skill`` is true when that t exceeds 2, i.e. the location beats zero drift by more than noise."""
    if len(y) == 0:
        return {"n": 0}
    gain = nll(y, 0.0, scale, df) - nll(y, loc, scale, df)
    u, inv = np.unique(day, return_inverse=True)
    per_day = np.bincount(inv, gain) / np.bincount(inv)
    se = float(per_day.std(ddof=1) / math.sqrt(len(u))) if len(u) > 1 else math.nan
    t = float(per_day.mean() / se) if se and se > 0 else math.nan
    return {"n": len(y), "mean_loc": float(loc.mean()), "mean_realised": float(y.mean()),
            "bias": float(loc.mean() - y.mean()), "share_loc_positive": float((loc > 0).mean()),
            "nll": float(nll(y, loc, scale, df).mean()), "nll_zero_loc": float(nll(y, 0.0, scale, df).mean()),
            "mae": float(np.abs(y - loc).mean()), "mae_zero_loc": float(np.abs(y).mean()),
            "nll_gain_t": t, "location_skill": bool(t > 2.0)}


def _secs(day: str) -> float:
    return float(np.datetime64(day, "s").astype(np.int64))


def _day(text: str, name: str) -> str:
    """A date ``YYYY-MM-DD`` (or a timestamp ``YYYY-MM-DDTHH:MM[:SS]``) as numpy reads it; InputError names
    ``name`` otherwise."""
    try:
        d = np.datetime64(str(text), "s")
    except ValueError:
        d = np.datetime64("NaT")
    if np.isnat(d):
        raise InputError(f"eval forecast: {name}: expected a date YYYY-MM-DD, got {text!r}")
    return str(d.astype("datetime64[D]")) if d == d.astype("datetime64[D]") else str(d)


def _skip_reason(ts: np.ndarray, n_train: int, n_origins: int, start: str, end: str | None) -> str | None:
    """Why a symbol cannot be scored in ``[start, end)`` (None: it can)."""
    if len(ts) == 0:
        return "(no valid bars)"
    first, last = (str(np.datetime64(int(t), "s").astype("datetime64[D]")) for t in (ts[0], ts[-1]))
    if ts[-1] < _secs(start):
        return f"(ends {last}, before the period)"
    if end is not None and ts[0] >= _secs(end):
        return f"(starts {first}, after the period)"
    if n_origins == 0:
        return f"(bars {first}..{last}: no target inside the period)"
    if n_train < MIN_TRAIN:
        return (f"(starts {first}: {n_train} returns before {start}, the baselines need {MIN_TRAIN})")
    return None


def _skipped_text(skipped: list[dict]) -> str:
    """Every skipped symbol with its reason, one line each (:func:`skipped_lines`)."""
    if not skipped:
        return "; skipped none"
    return f"; skipped {len(skipped)}:" + "".join(f"\n  {line}" for line in skipped_lines(skipped))


def skipped_lines(skipped: list[dict]) -> list[str]:
    """``skipped SYMBOL (reason)`` per symbol that was not scored (the CLI prints them on stderr with --json)."""
    return [f"skipped {k['symbol']} {k['reason']}" for k in skipped]


def _fmt(v, spec: str = ".4f", width: int = 7) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return f"{'-':>{width}s}"
    sign = spec[0] if spec[0] in "+-" else ""
    return f"{v:{sign}{width}{spec.lstrip('+-')}}"


def render_backtest(r: Mapping) -> list[str]:
    """Text lines of the rolling-origin backtest: the refits, the Diebold-Mariano tests (h1 and the last
    horizon, every group), and h1 per year and per regime (all symbols): the model against the best baseline."""
    bt = r.get("backtest")
    if not bt:
        return []
    H, levels = r["horizons"], r.get("levels") or [0.8, 0.95]
    best = bt["best_baseline"]
    reg = bt["regime"]
    share = " / ".join(f"{k} {100 * v:.0f}%" for k, v in reg["share"].items())
    lines = [f"\nbacktest: yearly origins {', '.join(bt['origins'])}; every baseline refitted on each symbol's bars "
             "before each origin, then filtered forward with those parameters",
             f"regimes: {reg['window']}-bar realised vol at the origin against the terciles of the symbol's own before "
             f"the origin's yearly refit (h1 points: {share}"
             + (f"; {reg['unknown']} unknown" if reg["unknown"] else "") + ")",
             *_garch_fit_lines(bt.get("fits", {})),
             "Diebold-Mariano, model minus baseline (loss per point, averaged per day; Newey-West t, p; negative: the "
             "model is better)",
             f"  {'group':16s} {'baseline':13s} h     dNLL       t       p     dCRPS       t       p   days"]
    for g, by in bt["dm"].items():
        for m, hs in by["overall"].items():
            for h in dict.fromkeys(("h1", f"h{H}")):
                v = hs[h]
                if not v["nll"].get("n"):
                    continue
                lines.append(f"  {g:16s} {NAMES.get(m, m):13s} {h:3s} " + " ".join(
                    f"{_fmt(v[k].get('mean_diff'), '+.4f', 8)} {_fmt(v[k].get('t'), '+.2f')} "
                    f"{_fmt(v[k].get('p'), '.3f')}" for k in ("nll", "crps")) + f" {v['nll']['days']:6d}")
    tabs = bt["groups"]["all"]
    dms = bt["dm"]["all"]
    first = next((t["lstm"]["h1"] for t in tabs["by_year"].values() if t["lstm"]["h1"]["n"]), {})
    covs = [(backtest.coverage_key(x), backtest.aci_coverage_key(x)) for x in levels]
    covs = [(k, a if a in first else None) for k, a in covs]

    def cov(v: Mapping) -> str:
        return " ".join(_fmt(None if v[k] is None else 100 * v[k], ".1f", 5)
                        + (f"/{_fmt(None if v[a] is None else 100 * v[a], '.1f', 5)}" if a else "") for k, a in covs)

    head = (f"n       NLL model {NAMES.get(best, best):>12s}  DM t   CRPS model {NAMES.get(best, best):>12s}   MASE "
            + " ".join(f"{'cov' + k.split('_')[1]:>{11 if a else 5}s}" for k, a in covs))
    what_cov = ("raw/ACI-calibrated bands of the model" if any(a for _, a in covs) else "the model's raw bands")
    for part, what in (("by_year", "year"), ("by_regime", "regime")):
        lines.append(f"h1 by {what}, all symbols (coverage %: {what_cov})")
        lines.append(f"  {what:7s} {head}")
        for key, t in tabs[part].items():
            a, b = t["lstm"]["h1"], t[best]["h1"]
            if not a["n"]:
                continue
            d = dms[part][key][best]["h1"]["nll"]
            lines.append(f"  {key:7s} {a['n']:<7d} {_fmt(a['nll'], '.4f', 9)} {_fmt(b['nll'], '.4f', 12)} "
                         f"{_fmt(d.get('t'), '+.1f', 5)}  {_fmt(a['crps'], '.4f', 10)} {_fmt(b['crps'], '.4f', 12)} "
                         f"{_fmt(a['mase'], '.3f', 6)} " + cov(a))
    return lines


def _garch_fit_lines(fits: Mapping[str, list[dict]]) -> list[str]:
    """One line per GARCH baseline that needed help: refits restarted, and those that kept an earlier refit's
    parameters (:func:`.baselines.garch`), with the symbols."""
    out = []
    for name in ("garch_normal", "garch_t"):
        infos = [(sym, f[f"{name}_fit"]) for sym, fs in fits.items() for f in fs if f"{name}_fit" in f]
        restarted = [sym for sym, i in infos if i["restarted"]]
        kept = sorted({sym for sym, i in infos if i["fallback"]})
        if restarted:
            out.append(f"{NAMES[name]}: {len(restarted)} of {len(infos)} refits looked failed and were restarted; "
                       f"{sum(i['fallback'] for _, i in infos)} kept the previous refit's parameters"
                       + (f" ({', '.join(kept[:8])}{' ...' if len(kept) > 8 else ''})" if kept else ""))
    return out


def render_table(r: dict) -> str:
    """A plain-text table of every group, method and horizon."""
    lines = [f"{r['n_bars']} bars, {r['period']} period {r['start']}..{r['end'] or 'end'}; scored "
             f"{r['n_symbols']} symbol{'s' * (r['n_symbols'] != 1)} ({r['n_symbols_heldout']} held out)"
             + _skipped_text(r.get("skipped", [])),
             f"streaming vs whole parity {r['parity_max_abs']:.2e} over {r['parity_bars']} bars; "
             f"{r['dead_letters']} dead letters, {r['jumps_flagged']} jumps flagged"]
    if r.get("ewma_t_nu"):
        nu = r["ewma_t_nu"]
        lines.append(f"EWMA-t shape fitted per symbol before {r['start']}: nu median {nu['median']:.2f} "
                     f"(range {nu['min']:.2f}..{nu['max']:.2f})")
    for gname, by in r.get("location", {}).get("all", {}).items():
        for h in ("h1", f"h{r['horizons']}"):
            v = by.get(h, {})
            if v.get("n"):
                lines.append(
                    f"location bias ({NAMES.get(gname, gname)} {h}): mean predicted {v['mean_loc']:+.4f}% vs realised "
                    f"{v['mean_realised']:+.4f}% (bias {v['bias']:+.4f}), positive on {v['share_loc_positive']:.0%} of "
                    f"origins; NLL {v['nll']:.4f}, with zero location {v['nll_zero_loc']:.4f} (gain t "
                    f"{v['nll_gain_t']:+.1f}: {'skill' if v['location_skill'] else 'no skill'} over zero drift)")
    if r.get("overlaps_training"):
        lines.append(f"note: the period starts before {r['model_split']['val_end']}, the end of the model's "
                     "training and validation period: on bars it was fitted or selected on, its scores there are "
                     "in-sample")

    def fmt(v) -> str:
        return "    -" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"

    if r.get("conformal"):
        lines += render_conformal(r["conformal"])
    years = (r.get("by_year") or {}).get("all", {})
    lines += calibration.render({"known_sd": r.get("known_sd"), "shocks": r.get("shocks"),
                                 "by_year": {NAMES.get(m, m): v for m, v in years.items()
                                             if m in ("lstm", "ewma_t", "garch_t")}})
    levels = r.get("levels") or (0.8, 0.95)
    covs = [backtest.coverage_key(x) for x in levels]
    lines += render_backtest(r)
    for gname, tab in (("all", r["metrics"]), *r["groups"].items()):
        lines.append(f"\n[{gname}]  method h   nll     crps    mae     mase    "
                     + " ".join(f"{'cov' + k.split('_')[1]:7s}" for k in covs))
        for m, hs in tab.items():
            if all(v["nll"] is None and v["mae"] is None for v in hs.values()):
                continue
            for h, v in hs.items():
                lines.append(f"  {NAMES.get(m, m):13s} {h:3s} " + " ".join(fmt(v[k]) for k in (
                    "nll", "crps", "mae", "mase", *covs)))
            if m == "lstm" and any(backtest.aci_coverage_key(x) in hs["h1"] for x in levels):
                # the bands the job serves: the model's recalibrated online (ACI); coverage only
                for h, v in hs.items():
                    lines.append(f"  {'lstm + ACI':13s} {h:3s} " + " ".join(
                        [f"{'-':>6s}"] * 4 + [fmt(v.get(backtest.aci_coverage_key(x))) for x in levels]))
    return "\n".join(lines) + "\n"


def render_conformal(c: Mapping, horizon: str = "h1") -> list[str]:
    """Text lines of the raw vs ACI-calibrated table (coverage per level, worst year and quarter, VaR
    exceedances and Kupiec's test, coverage by year) for one horizon, and the gamma scan."""
    method = c.get("method", "aci")
    method = {"aci": "ACI", "agaci": "AgACI", "none": "none (the raw bands)"}.get(method, method)
    lines = [f"\nonline calibration: {method} per symbol (gamma {c['gamma']:g} {c.get('scaling', '')}, from each "
             f"symbol's first bar), {horizon}, raw -> calibrated; coverage % (deviation from the level, points)"]

    def cov(x: Mapping) -> str:
        return f"{x['coverage']:6.2f} ({x['dev']:+5.2f})"

    def worst(x: Mapping, k: str) -> str:
        return f"{x[k]['period']} {x[k]['dev']:+6.2f}"

    def es(x: Mapping) -> str:
        return "-" if x.get("es_ratio") is None else f"{x['es_ratio']:.2f}"

    def var(x: Mapping) -> str:
        return (f"{x['rate']:5.2f}% (Kupiec p {x['kupiec_p']:.3f}; {x['symbols_rejected']:4.1f}% of symbols rejected;"
                f" worst year {x['worst_year']['period']} {x['worst_year']['rate']:5.2f}%; ES ratio {es(x)})")

    for g, by in c["groups"].items():
        t = by.get(horizon, {})
        if not t.get("n"):
            continue
        lines.append(f"[{g}] n {t['n']}  level: raw -> aci | worst year raw -> aci | worst quarter raw -> aci | "
                     "mean width aci/raw")
        for lv, v in t["levels"].items():
            raw, aci = v["raw"], v["aci"]
            ratio = f"{aci['width'] / raw['width']:.3f}" if raw.get("width") else "-"
            lines.append(f"  {lv:>5s}%: {cov(raw)} -> {cov(aci)} | {worst(raw, 'worst_year')} -> "
                         f"{worst(aci, 'worst_year')} | {worst(raw, 'worst_quarter')} -> "
                         f"{worst(aci, 'worst_quarter')} | {ratio}")
        for p, v in t["tails"].items():
            lines.append(f"  VaR {p}% exceedances: {var(v['raw'])}")
            lines.append(f"  {' ' * len(p)}     -> ACI: {var(v['aci'])}")
    t = c["groups"].get("all", {}).get(horizon, {})
    if t.get("by_year"):
        names = list(next(iter(t["by_year"].values()))["raw"])
        lines.append(f"coverage (levels) and exceedance rate (VaR tails) by year, {horizon}, raw/aci %: year n "
                     + " ".join(names))
        for yr, v in t["by_year"].items():
            lines.append(f"  {yr} {v['n']:7d} " + " ".join(f"{v['raw'][nm]:5.1f}/{v['aci'][nm]:5.1f}" for nm in names))
    if len(c.get("gamma_scan", [])) > 1:
        lines.append("gamma scan (all symbols; h1 interval score and pinball loss, the worst year's |deviation| "
                     "over every horizon)")
        for row in c["gamma_scan"]:
            h1 = row["h1"]
            hs = [h for h in row if h.startswith("h")]
            parts = []
            for k, v in h1.items():
                if k.startswith("var"):
                    parts.append(f"{k}: pinball {v['pinball']:.5f} rate {v['rate']:.2f}")
                else:
                    w = max(abs(row[h][k]["worst_year_dev"]) for h in hs)
                    parts.append(f"{k}%: IS {v['interval_score']:.4f} worst |dev| {w:.2f}")
            lines.append(f"  gamma {row['gamma']:<7g} " + "  ".join(parts))
    return lines
