"""Online forecasting: bars in, per-bar forecasts (returns and price levels) out, state carried per symbol.

>>> import streamrnn
>>> from streamrnn.forecast.serve import ForecastOperator
>>> op = ForecastOperator(streamrnn.load("exported/market.onnx", providers=["CPUExecutionProvider"]))
>>> rows, dead = op.process([{"symbol": "ABC", "ts": 1.6e9, "open": 10.0, "high": 10.4, "low": 9.9,
...                           "close": 10.2, "volume": 1e6}])
>>> sorted(rows[0])[:4], len(dead)
(['close', 'flags', 'h1_hi80', 'h1_hi95'], 0)

Each bar first goes through :class:`~streamrnn.forecast.features.OnlineFeatures`
(a bad bar becomes a dead letter and touches no state), then one
:class:`~streamrnn.keyed.operator.KeyedOperator` call advances every symbol in the batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..dead_letters import DeadLetter
from ..keyed.operator import KeyedOperator
from ..model.loaded import Model
from .distribution import quantile
from .evaluate import forecast_meta
from .features import FeatureConfig, FeatureRow, OnlineFeatures
from .scale import absolute

LEVELS = {"80": (0.10, 0.90), "95": (0.025, 0.975)}


def price_bands(close: float, loc: np.ndarray, scale: np.ndarray, df: np.ndarray) -> dict[str, float]:
    """Median and 80%/95% interval prices per horizon: ``close * exp(q / 100)`` of return quantiles ``q``."""
    out: dict[str, float] = {}
    for h in range(len(loc)):
        out[f"h{h + 1}_median"] = float(close * np.exp(loc[h] / 100.0))
        for name, (lo, hi) in LEVELS.items():
            out[f"h{h + 1}_lo{name}"] = float(close * np.exp(quantile(lo, loc[h], scale[h], df[h]) / 100.0))
            out[f"h{h + 1}_hi{name}"] = float(close * np.exp(quantile(hi, loc[h], scale[h], df[h]) / 100.0))
    return out


class ForecastOperator:
    """Per-symbol online features + the forecaster's carried state, in one object."""

    def __init__(self, model: Model, *, max_keys: int = 1_000_000, ttl: float | None = None):
        meta = forecast_meta(model)
        self.model = model
        self.meta = meta
        self.df = np.asarray(meta["df"], np.float64)
        self.features = OnlineFeatures(FeatureConfig(**meta["features"]))
        self.keyed = KeyedOperator(model, max_keys=max_keys, ttl=ttl)

    def process(self, bars: Sequence[Mapping]) -> tuple[list[dict], list[DeadLetter]]:
        """Forecast after each accepted bar (in order); rejected bars come back as dead letters."""
        rows: list[FeatureRow] = []
        dead: list[DeadLetter] = []
        for b in bars:
            r = self.features.update(b)
            (rows if isinstance(r, FeatureRow) else dead).append(r)
        if not rows:
            return [], dead
        res = self.keyed.process([r.symbol for r in rows], np.stack([r.x for r in rows]).astype(np.float32))
        out = []
        for i, r in enumerate(rows):
            loc, log_scale = absolute(self.meta, res.outputs["mean"][i], res.outputs["log_scale"][i], r.x)
            scale = np.exp(log_scale)
            out.append({"symbol": r.symbol, "ts": r.ts, "close": r.close, "flags": ",".join(r.flags),
                        **{f"h{h + 1}_ret_loc": float(loc[h]) for h in range(len(loc))},
                        **{f"h{h + 1}_ret_scale": float(scale[h]) for h in range(len(loc))},
                        **price_bands(r.close, loc, scale, self.df)})
        return out, dead
