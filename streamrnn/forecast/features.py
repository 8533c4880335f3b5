"""Per-symbol bar features, online (one bar at a time, carried state) and offline (whole arrays).

Features of bar t (prices in % log units, so 1.0 = a 1% move):

* ``ret``   100 ln(C_t / C_{t-1})   close-to-close return;
* ``gap``   100 ln(O_t / C_{t-1})   overnight gap;
* ``body``  100 ln(C_t / O_t)       open-to-close move;
* ``range`` 100 ln(H_t / L_t)       high-low range;
* ``dvol``  ln((V_t + 1) / (V_{t-1} + 1)), clipped to +-5;
* ``log_vol`` 0.5 ln(v_t), v_t the RiskMetrics EWMA variance of ``ret``
  (``v_t = lam v_{t-1} + (1 - lam) ret_t^2``, ``v_0 = prior_var``);
* ``days``  time since the previous bar in bar intervals (1 for the first bar), clipped to 0..10;
* ``jump``  1.0 on a corporate-action-sized bar (below).

**Volatility-anchored mode** (``FeatureConfig(anchor=True)``, what the shipped model uses since
issue 15): ``ret``, ``gap``, ``body`` and ``range`` are divided by ``sd_t = exp(log_vol)``, the
EWMA sd *after* bar t (carried state plus this bar, nothing later), so the network sees moves in
units of the symbol's own running volatility; ``log_vol`` stays absolute, and the model's outputs
are relative to it (:mod:`.scale`: ``log_scale = log_vol + net``, ``mean = sd_t * net``). The raw
return is ``x[0] * exp(x[5])`` exactly. No state is added: the EWMA variance was already carried.

Only the carried state (previous close, volume, timestamp, EWMA variance) is
used: never a future bar.

**Corporate-action rule.** A bar whose close-to-close simple return is beyond
``+-jump`` (40%) is a split, spin-off or data error, not a return (EBAY
-57% at the PayPal spin-off, LNT -49% then +101%). Such a bar is kept and
flagged ``jump``: its ``ret`` and ``gap`` are set to 0, the EWMA variance is
not updated, and the reference close is rebased to its close, so the next
bar's return is measured from the new level. Its return is never a training
or scoring target (:func:`targets`). Within-bar features (``body``,
``range``) are clipped to ``+-clip`` (100 ln 1.4).

**Missing days / gaps.** A bar that is absent (or a dead letter, e.g. an empty
price cell) simply is not there: the next bar's return spans the gap, ``days``
says how long it was, and a bar more than ``gap_bars`` intervals after the
previous one is flagged ``gap``. Nothing is reset.

**Bad bars** become :class:`~streamrnn.dead_letters.DeadLetter` rows (:func:`bar_dead_letter`)
with a reason and leave the symbol's state exactly as it was: a missing field, a NaN, zero or
negative price, negative volume, high < low, a duplicated or older timestamp, an unknown symbol
format.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from ..dead_letters import DeadLetter, event_json
from .bars import PRICE_COLUMNS, Bars

FEATURE_NAMES = ("ret", "gap", "body", "range", "dvol", "log_vol", "days", "jump")
SYMBOL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-/^=]{0,31}$")
_CLIP = 100.0 * math.log(1.4)


@dataclass(frozen=True)
class FeatureConfig:
    """Feature settings; stored in the model's metadata so serving uses the training values."""

    bar_seconds: float = 86400.0
    lam: float = 0.94
    prior_var: float = 1.0
    jump: float = 0.40
    gap_bars: float = 4.0
    anchor: bool = False  # moves in running-sd units and outputs relative to the EWMA sd (module doc)

    def ewma(self, var: float, r2: float) -> float:
        """One step of the variance EWMA, ``lam var + (1 - lam) r2``: the one rule, online and offline."""
        return self.lam * var + (1.0 - self.lam) * r2

    def to_dict(self) -> dict:
        return {"bar_seconds": self.bar_seconds, "lam": self.lam, "prior_var": self.prior_var,
                "jump": self.jump, "gap_bars": self.gap_bars,
                **({"anchor": True} if self.anchor else {})}


@dataclass
class SymbolState:
    """What the online engine carries per symbol between bars."""

    n: int = 0
    last_ts: float = -math.inf
    last_close: float = math.nan
    last_volume: float = math.nan
    var: float = math.nan


@dataclass
class FeatureRow:
    """Features of one accepted bar. ``ret`` is the cleaned return (0 on a jump); ``var`` the EWMA after it."""

    symbol: str
    ts: float
    close: float
    x: np.ndarray
    ret: float
    var: float
    flags: tuple[str, ...] = ()


def bar_dead_letter(bar: object, reason: str, kind: str = "invalid") -> DeadLetter:
    """A rejected bar as a :class:`~streamrnn.dead_letters.DeadLetter` (the symbol's state was not touched):
    ``key`` is its symbol (None when it has no str one), ``ts`` its time as given, ``event`` the bar as JSON."""
    if not isinstance(bar, Mapping):
        return DeadLetter(None, None, None, None, kind, reason, event_json({"bar": repr(bar)}))
    sym = bar.get("symbol")
    return DeadLetter(sym if isinstance(sym, str) else None, bar.get("ts"), None, None, kind, reason,
                      event_json(dict(bar)))


def bar_problem(bar: Mapping, last_ts: float) -> str | None:
    """The reason a bar must be rejected, or None. ``last_ts``: the symbol's last accepted timestamp."""
    for c in ("symbol", "ts", *PRICE_COLUMNS):
        if c not in bar:
            return f"{c}: expected a column {c!r}, got a bar without it"
    sym = bar["symbol"]
    if not isinstance(sym, str) or not SYMBOL_RE.match(sym):
        return f"symbol: expected a ticker like 'AAPL' or 'BRK.B' ({SYMBOL_RE.pattern}), got {sym!r}"
    vals = {}
    for c in ("ts", *PRICE_COLUMNS):
        try:
            v = float(bar[c])
        except (TypeError, ValueError):
            return f"{c}: expected a number, got {bar[c]!r}"
        if not math.isfinite(v):
            return f"{c}: expected a finite number, got {v}"
        vals[c] = v
    for c in ("open", "high", "low", "close"):
        if vals[c] <= 0:
            return f"{c}: expected a price > 0, got {vals[c]}"
    if vals["volume"] < 0:
        return f"volume: expected >= 0, got {vals['volume']}"
    if vals["high"] < vals["low"]:
        return f"high/low: expected high >= low, got high {vals['high']} < low {vals['low']}"
    if vals["ts"] == last_ts:
        return f"ts: duplicated timestamp {vals['ts']} (the previous bar has it)"
    if vals["ts"] < last_ts:
        return f"ts: expected after the previous bar's {last_ts}, got {vals['ts']} (out of order)"
    return None


class OnlineFeatures:
    """Incremental per-symbol features: ``update(bar)`` -> :class:`FeatureRow` or :class:`DeadLetter`."""

    def __init__(self, config: FeatureConfig | None = None):
        self.config = config or FeatureConfig()
        self.states: dict[str, SymbolState] = {}

    def update(self, bar: Mapping) -> FeatureRow | DeadLetter:
        sym = bar.get("symbol") if isinstance(bar, Mapping) else None
        if not isinstance(bar, Mapping):
            return bar_dead_letter(bar, f"bar: expected a mapping of columns, got {type(bar).__name__}")
        st = self.states.get(sym) if isinstance(sym, str) else None
        problem = bar_problem(bar, st.last_ts if st is not None else -math.inf)
        if problem is not None:
            return bar_dead_letter(bar, problem)
        row, new = step_features(st or SymbolState(), {c: float(bar[c]) for c in ("ts", *PRICE_COLUMNS)},
                                 self.config, sym)
        self.states[sym] = new
        return row


def step_features(st: SymbolState, b: Mapping[str, float], cfg: FeatureConfig, symbol: str
                  ) -> tuple[FeatureRow, SymbolState]:
    """One validated bar: the features and the new state (``st`` is not modified)."""
    o, h, lo, c, v, ts = b["open"], b["high"], b["low"], b["close"], b["volume"], b["ts"]
    flags: list[str] = []
    body = min(_CLIP, max(-_CLIP, 100.0 * math.log(c / o)))
    rng = min(_CLIP, 100.0 * math.log(h / lo))
    if st.n == 0:
        ret = gap = dvol = 0.0
        days, var, jump = 1.0, cfg.prior_var, False
        flags.append("first")
    else:
        jump = abs(c / st.last_close - 1.0) > cfg.jump
        ret = 0.0 if jump else 100.0 * math.log(c / st.last_close)
        gap = 0.0 if jump else 100.0 * math.log(o / st.last_close)
        dvol = min(5.0, max(-5.0, math.log((v + 1.0) / (st.last_volume + 1.0))))
        days = (ts - st.last_ts) / cfg.bar_seconds
        var = st.var if jump else cfg.ewma(st.var, ret * ret)
        if jump:
            flags.append("jump")
        if days > cfg.gap_bars:
            flags.append("gap")
        days = min(10.0, max(0.0, days))
    u = 1.0 / math.sqrt(var) if cfg.anchor else 1.0
    x = np.array([ret * u, gap * u, body * u, rng * u, dvol, 0.5 * math.log(var), days, float(jump)], np.float64)
    new = replace(st, n=st.n + 1, last_ts=ts, last_close=c, last_volume=v, var=var)
    return FeatureRow(symbol, ts, c, x, ret, var, tuple(flags)), new


@dataclass
class SymbolSeries:
    """Offline features of one symbol's accepted bars, plus the dead letters of its rejected ones."""

    symbol: str
    ts: np.ndarray
    close: np.ndarray
    x: np.ndarray          # [n, len(FEATURE_NAMES)]
    ret: np.ndarray        # cleaned % log return (0 on jumps and the first bar)
    var: np.ndarray        # EWMA variance after each bar
    jump: np.ndarray       # bool
    gap: np.ndarray        # bool
    dead: list[DeadLetter] = field(default_factory=list)
    raw: dict[str, np.ndarray] = field(default_factory=dict)  # open/high/low/volume of the accepted bars

    def __len__(self) -> int:
        return len(self.ts)


def offline_features(bars: Bars, config: FeatureConfig | None = None) -> SymbolSeries:
    """The same features as :class:`OnlineFeatures`, computed on whole arrays (vectorised)."""
    cfg = config or FeatureConfig()
    n = len(bars)
    cols = {c: getattr(bars, c) for c in ("ts", *PRICE_COLUMNS)}
    finite = np.ones(n, bool)
    for a in cols.values():
        finite &= np.isfinite(a)
    with np.errstate(invalid="ignore"):
        ok = finite & (cols["open"] > 0) & (cols["high"] > 0) & (cols["low"] > 0) & (cols["close"] > 0)
        ok &= (cols["volume"] >= 0) & (cols["high"] >= cols["low"])
    if not SYMBOL_RE.match(bars.symbol or ""):
        ok[:] = False
    # timestamps: accepted iff later than every earlier bar that passed the value checks
    ts_ok = np.where(ok, cols["ts"], -np.inf)
    prev_max = np.concatenate([[-np.inf], np.maximum.accumulate(ts_ok)[:-1]])
    acc = ok & (cols["ts"] > prev_max)
    dead = []
    for i in np.flatnonzero(~acc):
        row = bars.row(int(i))
        dead.append(bar_dead_letter(row, bar_problem(row, prev_max[i]) or "rejected"))
    ts, o, h, lo, c, v = (cols[k][acc] for k in ("ts", *PRICE_COLUMNS))
    m = len(ts)
    prev_c = np.concatenate([[np.nan], c[:-1]])
    prev_v = np.concatenate([[np.nan], v[:-1]])
    first = np.arange(m) == 0
    with np.errstate(all="ignore"):  # prev_c is NaN on the first bar (masked below)
        jump = ~first & (np.abs(c / np.where(first, 1.0, prev_c) - 1.0) > cfg.jump)
        clean = ~first & ~jump
        ret = np.where(clean, 100.0 * np.log(c / prev_c), 0.0)
        gap = np.where(clean, 100.0 * np.log(o / prev_c), 0.0)
        dvol = np.where(first, 0.0, np.clip(np.log((v + 1.0) / (prev_v + 1.0)), -5.0, 5.0))
        days_raw = np.where(first, 1.0, (ts - np.concatenate([[np.nan], ts[:-1]])) / cfg.bar_seconds)
    body = np.clip(100.0 * np.log(c / o), -_CLIP, _CLIP)
    rng = np.minimum(_CLIP, 100.0 * np.log(h / lo))
    # EWMA over the returns that update it (not the first bar, not jumps), held constant across the rest
    upd = np.flatnonzero(clean)
    var = np.full(m, cfg.prior_var)
    if len(upd):
        v_upd = _ewma(ret[upd] ** 2, cfg)
        idx = np.searchsorted(upd, np.arange(m), side="right") - 1  # last update at or before each bar
        var = np.where(idx >= 0, v_upd[np.maximum(idx, 0)], cfg.prior_var)
    u = 1.0 / np.sqrt(var) if cfg.anchor else 1.0
    x = np.stack([ret * u, gap * u, body * u, rng * u, dvol, 0.5 * np.log(var), np.clip(days_raw, 0.0, 10.0),
                  jump.astype(np.float64)], axis=1)
    return SymbolSeries(bars.symbol, ts, c, x, ret, var, jump, ~first & (days_raw > cfg.gap_bars), dead,
                        {"open": o, "high": h, "low": lo, "volume": v})


def _ewma(r2: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """The variance EWMA over ``r2`` from ``prior_var``, step by step as the online features do it."""
    out = np.empty(len(r2))
    v = cfg.prior_var
    for i, x in enumerate(r2.tolist()):
        v = out[i] = cfg.ewma(v, x)
    return out


def targets(ret: np.ndarray, jump: np.ndarray, horizons: int) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative next-h returns ``Y[t, h-1] = ret[t+1] + ... + ret[t+h]`` and their validity mask.

    A target is invalid past the end of the series or when any bar in t+1..t+h is a jump.
    """
    n = len(ret)
    Y = np.zeros((n, horizons))
    M = np.zeros((n, horizons), bool)
    cs = np.concatenate([[0.0], np.cumsum(ret)])
    cj = np.concatenate([[0], np.cumsum(jump.astype(np.int64))])
    for h in range(1, horizons + 1):
        t = np.arange(n - h)
        Y[t, h - 1] = cs[t + h + 1] - cs[t + 1]
        M[t, h - 1] = (cj[t + h + 1] - cj[t + 1]) == 0
    return Y, M


def median_interval(series: list[SymbolSeries]) -> float:
    """Median seconds between consecutive accepted bars, over all symbols (NaN with none)."""
    d = [np.diff(s.ts) for s in series if len(s) > 1]
    return float(np.median(np.concatenate(d))) if d else math.nan
