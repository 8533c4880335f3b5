"""Simulated markets (labelled as simulated), for tests, demos and checks: GARCH(1,1) Student-t daily bars
(:func:`simulate`), i.i.d. bars with a known sd (:func:`known_sd`), issue 15's regime switch (:func:`regime_switch`),
and bars with given returns (:func:`with_returns`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np

from ..errors import InputError
from .bars import Bars


def simulate(symbols: list[str], *, start: str = "2014-01-01", end: str = "2017-07-01", seed: int = 0,
             omega: float = 0.05, alpha: float = 0.08, beta: float = 0.9, nu: float = 5.0) -> list[Bars]:
    """Business-day OHLCV bars per symbol; % log returns follow GARCH(1,1) with t(nu) shocks."""
    rng = np.random.default_rng(seed)
    days = np.arange(np.datetime64(start, "D"), np.datetime64(end, "D"))
    days = days[np.is_busday(days)]
    ts = days.astype("datetime64[s]").astype(np.int64).astype(np.float64)
    out = []
    for sym in symbols:
        n = len(days)
        z = rng.standard_t(nu, n) * np.sqrt((nu - 2) / nu)
        r = np.empty(n)
        v = omega / (1 - alpha - beta)
        for i in range(n):
            r[i] = np.sqrt(v) * z[i]
            v = omega + alpha * r[i] ** 2 + beta * v
        close = 50.0 * np.exp(np.cumsum(r) / 100.0)
        prev = np.concatenate([[50.0], close[:-1]])
        opn = prev * np.exp(rng.normal(0, 0.2, n) / 100.0)
        wig = np.abs(rng.normal(0, 0.5, (2, n))) / 100.0
        high = np.maximum(opn, close) * np.exp(wig[0])
        low = np.minimum(opn, close) * np.exp(-wig[1])
        vol = np.round(rng.lognormal(13, 0.3, n))
        out.append(Bars(sym, ts.copy(), opn, high, low, close, vol, source="simulated"))
    return out


def write_sp500_layout(bars: list[Bars], folder: str | os.PathLike) -> list[Path]:
    """One ``<SYM>_data.csv`` per symbol in the S&P 500 set's layout (``date,open,high,low,close,volume,Name``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for b in bars:
        lines = ["date,open,high,low,close,volume,Name"]
        for i in range(len(b)):
            d = str(np.datetime64(int(b.ts[i]), "s").astype("datetime64[D]"))
            lines.append(f"{d},{b.open[i]:.4f},{b.high[i]:.4f},{b.low[i]:.4f},{b.close[i]:.4f},"
                         f"{int(b.volume[i])},{b.symbol}")
        p = folder / f"{b.symbol}_data.csv"
        p.write_text("\n".join(lines) + "\n")
        paths.append(p)
    return paths


def known_sd(sd: float, n: int = 1000, *, seed: int = 0, nu: float = 5.0, symbol: str = "SYN",
             start: str = "2000-01-03") -> Bars:
    """Business-day bars whose % log returns are i.i.d. unit-variance t(``nu``) times ``sd`` (a known daily sd).

    Open, high and low scale with ``sd`` too (an overnight gap of 0.3 sd, wicks of 0.5 sd), so every
    feature of the series is ``sd`` times that of the ``sd = 1`` series drawn with the same seed.
    """
    days = np.busday_offset(np.datetime64(start, "D"), np.arange(n), roll="forward")
    return _bars_with_sd(np.random.default_rng(seed), days, sd, nu, symbol)


def _bars_with_sd(rng: np.random.Generator, days: np.ndarray, sd: float | np.ndarray, nu: float,
                  symbol: str) -> Bars:
    """Bars on ``days`` whose % log returns are unit-variance t(``nu``) times ``sd`` (a number, or one per day),
    with an overnight gap of 0.3 sd and wicks of 0.5 sd of the same day."""
    n = len(days)
    ts = days.astype("datetime64[s]").astype(np.int64).astype(np.float64)
    r = sd * rng.standard_t(nu, n) * np.sqrt((nu - 2) / nu)
    close = 50.0 * np.exp(np.cumsum(r) / 100.0)
    prev = np.concatenate([[50.0], close[:-1]])
    opn = prev * np.exp(0.3 * sd * rng.standard_normal(n) / 100.0)
    wig = 0.5 * sd * np.abs(rng.standard_normal((2, n))) / 100.0
    high = np.maximum(opn, close) * np.exp(wig[0])
    low = np.minimum(opn, close) * np.exp(-wig[1])
    return Bars(symbol, ts, opn, high, low, close, np.round(rng.lognormal(13, 0.3, n)), source="simulated")


@dataclass(frozen=True)
class Segment:
    """One regime of a :class:`RegimeSwitch`: the bars dated ``[start, end)`` have daily % log returns of sd ``sd``."""

    name: str
    start: str
    end: str
    sd: float

    def window(self) -> tuple[str, str]:
        """``eval forecast --start/--end`` dates whose h1 targets are exactly this segment's returns: the origins
        from the last business day before ``start`` (its next-day return is the segment's first) to the day
        before ``end``."""
        return str(np.busday_offset(np.datetime64(self.start, "D"), -1, roll="forward")), self.end


@dataclass(frozen=True)
class RegimeSwitch:
    """A simulated regime-switching market (:func:`regime_switch`): the bars and the regimes they were drawn in."""

    bars: list[Bars]
    segments: tuple[Segment, ...]

    def segment(self, name: str) -> Segment:
        return next(s for s in self.segments if s.name == name)


REGIME_SYMBOLS = tuple(f"RS{i}" for i in range(1, 9))


def regime_switch(symbols: Sequence[str] = REGIME_SYMBOLS, *, seed: int = 0, calm_sd: float = 0.5,
                  wild_sd: float = 4.0, start: str = "2000-01-03", wild_start: str = "2002-01-01",
                  wild_end: str = "2002-04-01", end: str = "2003-04-01", nu: float = 5.0) -> RegimeSwitch:
    """Issue 15's regime switch: calm (daily sd ``calm_sd`` %) from ``start`` to ``wild_start`` (2 years), wild
    (``wild_sd`` %) to ``wild_end`` (one quarter), calm again to ``end``. Business-day bars per symbol, each drawn
    like :func:`known_sd` with that day's sd (unit-variance t(``nu``) returns; gap and wicks scale with the sd),
    independently per symbol from one seeded generator. Labelled simulated."""
    bounds = [np.datetime64(d, "D") for d in (start, wild_start, wild_end, end)]
    if not all(a < b for a, b in pairwise(bounds)):
        raise InputError(f"regime_switch: dates: expected start < wild_start < wild_end < end, got "
                         f"{start}, {wild_start}, {wild_end}, {end}")
    segments = (Segment("calm_before", start, wild_start, calm_sd), Segment("wild", wild_start, wild_end, wild_sd),
                Segment("calm_after", wild_end, end, calm_sd))
    days = np.arange(bounds[0], bounds[-1])
    days = days[np.is_busday(days)]
    sd = np.where((days >= bounds[1]) & (days < bounds[2]), wild_sd, calm_sd)
    rng = np.random.default_rng(seed)
    return RegimeSwitch([_bars_with_sd(rng, days, sd, nu, sym) for sym in symbols], segments)


def with_returns(returns: np.ndarray, *, seed: int = 0, symbol: str = "SYN", start: str = "2000-01-03") -> Bars:
    """Business-day bars with the given % log close-to-close returns (open at the previous close, wicks of
    0.5 |return|): for shock tests."""
    rng = np.random.default_rng(seed)
    r = np.asarray(returns, np.float64)
    n = len(r)
    days = np.busday_offset(np.datetime64(start, "D"), np.arange(n), roll="forward")
    ts = days.astype("datetime64[s]").astype(np.int64).astype(np.float64)
    close = 50.0 * np.exp(np.cumsum(r) / 100.0)
    opn = np.concatenate([[50.0], close[:-1]])
    wig = 0.5 * np.abs(r)[None] * np.abs(rng.standard_normal((2, n))) / 100.0
    high = np.maximum(opn, close) * np.exp(wig[0])
    low = np.minimum(opn, close) * np.exp(-wig[1])
    return Bars(symbol, ts, opn, high, low, close, np.round(rng.lognormal(13, 0.3, n)), source="simulated")
