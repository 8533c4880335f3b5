"""``streamrnn eval health`` for a forecaster (issue 17): carried state, reset-every-N and the health policies on
simulated symbols whose volatility breaks (calm, a high-volatility regime, calm again).

Every symbol's % log returns are i.i.d. unit-variance Student-t(``nu``) times ``calm_sd`` for ``calm_bars`` bars,
``break_sd`` for ``break_bars`` bars, then ``calm_sd`` for ``calm_bars`` bars (:func:`break_returns`; bars by
:func:`~streamrnn.forecast.synthetic.with_returns`, labelled simulated). Each symbol is one key of a
:class:`~streamrnn.keyed.operator.KeyedOperator`, ``step`` bars per key per call, fed the model's own features;
each policy is scored by the health loss itself (:func:`streamrnn.keyed.health.task_loss`: the NLL of the realised
bar under the previous bar's one-bar-ahead forecast, nats/bar) on the same bars (a symbol's first bar and jump bars
are not scored). ``reset{N}`` restarts the LSTM state every N bars (the features, and so the volatility anchor,
carry on), a window's first bar scored by the previous window's last forecast.

The issue's target: on the calm parts, ``heal`` raises the mean NLL by at most 0.005 nats/bar over carried state.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import InputError
from ..keyed.health import HealthConfig, resolve, task_loss
from ..lm.evaluate import Progress, _quiet, policy_run
from ..model.loaded import Model
from .evaluate import forecast_meta
from .features import FeatureConfig, offline_features
from .synthetic import with_returns

PARTS = ("calm_before", "break", "calm_after")
TARGET = 0.005  #: nats/bar: heal's most over carried on the calm parts


@dataclass
class ForecastHealthEval:
    """Result of :func:`eval_forecast_health`: mean NLL (nats/bar) per policy and part, the same bars for each."""

    streams: int
    bars_per_stream: int
    parts: dict  # part -> [first bar, end)
    calm_sd: float
    break_sd: float
    step: int
    scored_bars: int
    nll: dict  # policy (carried, reset{N}, flag, heal) -> part (calm, calm_before, break, calm_after, all) -> mean
    heals: int
    heals_by_part: dict
    heal_config: dict
    max_bad_share: float
    target: dict
    seed: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def break_returns(rng: np.random.Generator, calm_bars: int, break_bars: int, calm_sd: float, break_sd: float,
                  nu: float = 5.0) -> np.ndarray:
    """% log returns: unit-variance t(``nu``) shocks times ``calm_sd``, ``break_sd``, ``calm_sd`` over the parts."""
    sd = np.concatenate([np.full(calm_bars, calm_sd), np.full(break_bars, break_sd), np.full(calm_bars, calm_sd)])
    return sd * rng.standard_t(nu, len(sd)) * math.sqrt((nu - 2) / nu)


def _reset_losses(model: Model, segs: np.ndarray, every: int, loss_of) -> np.ndarray:
    """Per-bar loss with the LSTM state restarted every ``every`` bars (``segs [S, L, F]``)."""
    S, L, F = segs.shape
    W = math.ceil(L / every)
    pad = np.zeros((S, W * every, F), segs.dtype)
    pad[:, :L] = segs
    lengths = np.full((S, W), every, np.int32)
    lengths[:, -1] = L - (W - 1) * every
    o, _ = model.step(pad.reshape(S * W, every, F), lengths=lengths.reshape(-1))
    out = {n: v.reshape(S, W * every, *v.shape[2:])[:, :L] for n, v in o.items()}
    prev = {n: np.concatenate([np.full_like(v[:, :1], np.nan), v[:, :-1]], axis=1).reshape(S * L, *v.shape[2:])
            for n, v in out.items()}  # the forecast made at the bar before (its own window, or the previous one)
    return loss_of(prev, (np.arange(S * L),), segs.reshape(S * L, F)).reshape(S, L)


def eval_forecast_health(model: Model, *, streams: int = 32, calm_bars: int = 500, break_bars: int = 250,
                         calm_sd: float = 1.0, break_sd: float = 4.0, step: int = 1, reset_every: int = 64,
                         seed: int = 0, heal: HealthConfig | str = "heal",
                         progress: Progress = _quiet) -> ForecastHealthEval:
    """Mean NLL of carried state, reset-every-N, ``flag`` and ``heal`` (the policy, or ``heal``'s own
    :class:`~streamrnn.keyed.health.HealthConfig`) on ``streams`` simulated symbols with a volatility break (module
    doc), per part."""
    meta = forecast_meta(model)
    for name, v in (("calm_bars", calm_bars), ("break_bars", break_bars)):
        if not (isinstance(v, int) and v >= 1):
            raise InputError(f"eval health: {name}: expected an int >= 1, got {v!r}")
    for name, v in (("calm_sd", calm_sd), ("break_sd", break_sd)):
        if not (isinstance(v, (int, float)) and 0 < v < 100):
            raise InputError(f"eval health: {name}: expected a daily sd in % in (0, 100), got {v!r}")
    t = time.perf_counter()
    cfg = FeatureConfig(**meta["features"])
    rng = np.random.default_rng(seed)
    segs = np.stack([offline_features(with_returns(break_returns(rng, calm_bars, break_bars, calm_sd, break_sd),
                                                   seed=seed + i, symbol=f"SIM{i}"), cfg).x
                     for i in range(streams)]).astype(np.float32)
    L = segs.shape[1]
    bounds = {"calm_before": (0, calm_bars), "break": (calm_bars, calm_bars + break_bars),
              "calm_after": (calm_bars + break_bars, L)}
    losses, heals, heal_at, worst = {}, 0, None, 0.0
    for policy in ("off", "flag", "heal"):
        loss, h, w, healed = policy_run(model, segs, step, heal if policy == "heal" else policy, progress,
                                        f"forecast, health={policy}", heal_mask=True)
        losses["carried" if policy == "off" else policy] = loss
        if policy == "heal":
            heals, worst, heal_at = h, w, healed
    progress(f"forecast, state reset every {reset_every} bars")
    losses[f"reset{reset_every}"] = _reset_losses(model, segs, min(reset_every, L), task_loss(model.spec))
    scored = np.isfinite(losses["carried"])
    for k, v in losses.items():
        if not np.array_equal(np.isfinite(v), scored):
            raise RuntimeError(f"eval health: policy {k} scored other bars than carried state")
    calm = np.zeros(L, bool)
    for p in ("calm_before", "calm_after"):
        calm[slice(*bounds[p])] = True
    masks = {"calm": calm}
    for p, (a, b) in bounds.items():
        m = np.zeros(L, bool)
        m[a:b] = True
        masks[p] = m
    masks["all"] = np.ones(L, bool)
    nll = {k: {p: float(v[:, m][scored[:, m]].mean()) for p, m in masks.items()} for k, v in losses.items()}
    gap = nll["heal"]["calm"] - nll["carried"]["calm"]
    by_part = {p: int(heal_at[:, a:b].sum()) for p, (a, b) in bounds.items()}
    return ForecastHealthEval(
        streams=streams, bars_per_stream=L, parts={p: list(b) for p, b in bounds.items()}, calm_sd=float(calm_sd),
        break_sd=float(break_sd), step=step, scored_bars=int(scored.sum()), nll=nll, heals=heals,
        heals_by_part=by_part, heal_config=asdict(resolve(heal, model, streams)), max_bad_share=worst,
        target={"heal_minus_carried_calm": gap, "limit": TARGET, "met": bool(gap <= TARGET)},
        seed=seed, seconds=time.perf_counter() - t)
