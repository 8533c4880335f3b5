"""The volatility anchor (issue 15): a model's outputs relative to the EWMA sd of the key's own returns.

A model trained with ``FeatureConfig(anchor=True)`` emits, per horizon, a log-scale *correction*
``f`` and a location in running-sd units ``g``; the forecast is

    log_scale = log_vol + f,    loc = exp(log_vol) * g,

with ``log_vol = 0.5 ln v_t`` the RiskMetrics EWMA sd after the origin bar (feature 5, carried in
the per-symbol feature state). The level therefore follows the data without bound, and the
network (whose outputs are bounded by its tanh/sigmoid cells) learns only the shape and the
corrections. Models without the flag (the pre-issue-15 ones) emit absolute outputs, unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .features import FEATURE_NAMES

LOG_VOL = FEATURE_NAMES.index("log_vol")
RET = FEATURE_NAMES.index("ret")


def anchored(meta: Mapping) -> bool:
    """Whether a model's ``training.forecast`` block says its outputs are relative to the EWMA sd."""
    return bool(dict(meta.get("features") or {}).get("anchor", False))


def absolute(meta: Mapping, mean, log_scale, x) -> tuple[np.ndarray, np.ndarray]:
    """Absolute (loc, log_scale) in % log return from the model outputs and the raw features ``x [..., F]``."""
    mean = np.asarray(mean, np.float64)
    log_scale = np.asarray(log_scale, np.float64)
    if not anchored(meta):
        return mean, log_scale
    lv = anchor_log_vol(x)[..., None]
    return mean * np.exp(lv), log_scale + lv


def anchor_log_vol(x) -> np.ndarray:
    """The anchor ``log_vol`` of features ``x [..., F]`` as the model reads it: rounded to float32 (the
    graph's input dtype), so offline float64 features and a job's float32 events give the same forecast."""
    return np.asarray(x)[..., LOG_VOL].astype(np.float32).astype(np.float64)


def bar_return(meta: Mapping, x) -> np.ndarray:
    """This bar's cleaned % log return from its features ``x [..., F]`` (feature 0, in sd units when anchored)."""
    x = np.asarray(x, np.float64)
    return x[..., RET] * np.exp(x[..., LOG_VOL]) if anchored(meta) else x[..., RET]


JUMP = FEATURE_NAMES.index("jump")


def previous_forecast(x, prev_mean, prev_log_scale, *, anchor: bool, lam: float
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """This bar's % log return and the previous bar's one-bar-ahead ``(loc, log_scale)``, absolute, from this bar's
    features ``x [N, F]`` and the previous outputs' first horizon ``prev_mean, prev_log_scale [N]``.

    With ``anchor`` the previous bar's sd, which anchored that forecast, is recovered exactly from this bar's
    features by inverting one EWMA step (``v_prev = v (1 - (1 - lam) z^2) / lam``, ``z = x[:, 0]``; unchanged on a
    jump bar). The one rule of the market job's :class:`~streamrnn.forecast.beam.ForecastPostprocess` and the
    forecaster's carried-state health loss (:mod:`streamrnn.keyed.health`)."""
    x = np.asarray(x, np.float64)
    prev_mean = np.asarray(prev_mean, np.float64)
    prev_ls = np.asarray(prev_log_scale, np.float64)
    if not anchor:
        return x[:, RET], prev_mean, prev_ls
    lv = anchor_log_vol(x)  # float32, as the model reads it (eval forecast and ForecastOperator alike)
    ret = x[:, RET] * np.exp(x[:, LOG_VOL])
    with np.errstate(invalid="ignore", divide="ignore"):
        shrink = np.maximum(1.0 - (1.0 - lam) * x[:, RET] ** 2, 1e-300) / lam
        prev_lv = np.where(x[:, JUMP] > 0.5, lv, lv + 0.5 * np.log(shrink))
    return ret, prev_mean * np.exp(prev_lv), prev_ls + prev_lv
