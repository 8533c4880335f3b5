"""The split (by time and by symbol) and per-symbol arrays shared by training and evaluation.

Time: training fits on origins whose targets end before ``fit_end``; validation
(model selection, early stopping) uses origins in ``[fit_end, val_end)`` whose
targets end before ``val_end``; the test period starts at ``test_start``
(nothing in it is read while training). Symbols: a ticker is held out (never
trained or validated on) when ``sha256(ticker) mod holdout_mod == 0``, a
fixed rule independent of the seed.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import InputError
from .bars import read_bars
from .features import FeatureConfig, SymbolSeries, median_interval, offline_features, targets


def _secs(day: str) -> float:
    return float(np.datetime64(day, "s").astype(np.int64))


@dataclass(frozen=True)
class Split:
    fit_end: str = "2016-01-01"
    val_end: str = "2017-01-01"
    test_start: str = "2017-01-01"
    holdout_mod: int = 5

    def held_out(self, symbol: str) -> bool:
        return int(hashlib.sha256(symbol.encode()).hexdigest(), 16) % self.holdout_mod == 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Prepared:
    """One symbol: features, cumulative-return targets ``y [n, H]``, validity ``valid [n, H]``, target end times."""

    series: SymbolSeries
    y: np.ndarray
    valid: np.ndarray
    end_ts: np.ndarray  # [n, H] timestamp of bar t+h (inf past the end)

    @property
    def symbol(self) -> str:
        return self.series.symbol

    def window(self, start: str | None, end: str | None) -> np.ndarray:
        """Valid targets whose origin is in ``[start, end)`` and whose last bar is before ``end``."""
        ts = self.series.ts[:, None]
        m = self.valid.copy()
        if start is not None:
            m &= ts >= _secs(start)
        if end is not None:
            m &= self.end_ts < _secs(end)
        return m


def prepare(series: SymbolSeries, horizons: int) -> Prepared:
    y, valid = targets(series.ret, series.jump, horizons)
    n = len(series)
    end = np.full((n, horizons), np.inf)
    for h in range(1, horizons + 1):
        end[:n - h, h - 1] = series.ts[h:]
    return Prepared(series, y, valid, end)


def load(path: str, horizons: int, *, columns: Mapping[str, str] | None = None,
         features: FeatureConfig | None = None, symbols=None) -> list[Prepared]:
    """Read bars (a file or a directory) and prepare every symbol."""
    cfg = features or FeatureConfig()
    return [prepare(offline_features(b, cfg), horizons)
            for b in read_bars(path, columns=columns, symbols=symbols)]


def check_frequency(data: list[Prepared], bar_seconds: float, *, allow: bool = False) -> float:
    """Refuse bars of another frequency than the model's (median interval outside 0.5x..4x)."""
    got = median_interval([p.series for p in data])
    if math.isnan(got):
        raise InputError("bars: expected at least two valid bars of one symbol, got none")
    if not (0.5 * bar_seconds <= got <= 4 * bar_seconds) and not allow:
        raise InputError(f"bars: frequency: expected bars every {bar_seconds:g} s (the model's training "
                         f"frequency), got a median interval of {got:g} s (pass --allow-frequency to run anyway)")
    return got
