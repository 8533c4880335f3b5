"""A market-wide scale term for the market job's calibration (issue 15, ``--pool``): one multiplier per horizon,
shared by every symbol, learned from the cross-section's surprises.

Per-symbol ACI (:mod:`.conformal`) learns of a shock common to every symbol only from each symbol's own misses, so
a market-wide selloff is half over before a band widens. This term reads all symbols at once: after each *step*
(the rows of one release time and bar time, below) it moves ``u_h`` towards the log of how large the step's
horizon-``h`` surprises were against what the model's Student-t expects,

    u_h <- (1 - w_n) u_h + w_n log(mean |z| / E|T_df|),     w_n = w n / (n + N0),

over the ``n`` horizon-``h`` targets the step completes (``z = (y - loc) / scale``, the model's raw standardised
error; ``w`` the weight, ``--pool``; ``N0`` = :data:`POOL_N0`, so a step of few symbols moves it little). The
forecast each row issues is then the model's with its scale times ``exp(u_h)``; per-symbol ACI calibrates that
forecast as usual (its misses are of the band issued), so its long-run coverage guarantee holds, ``u`` being
bounded (``|u_h| <= ln 10``, :data:`POOL_BOUND`).

**Steps and order.** Rows are taken in order of ``(release time, bar time)``: the release time is the row's
timestamp upstream (``_rel``: when its next bar made it final; data-defined, the same in a bounded and a streaming
run; without the column, the bar time), so a symbol's row held back for its next bar joins a later step instead
of rewriting an earlier one. Within a step every target is learned first, then the step's rows are issued.

**No row sees a bar after its own.** The *clock* is the latest bar time any step has held. A step at or after the
clock issues its rows at the new ``u``. A row released late (a halted symbol's last bar before the halt, released
with its next bar after other symbols' later days were applied) is issued at the ``u`` in force when the clock
was at its bar time: the history keeps ``u`` at each clock value, the last :data:`HISTORY` of them; a row older
than that is issued at ``u = 0`` (the model's own scale). Its targets still move the current ``u`` (they are
in the past of every later step).

Rows reach the calibration step by release time; a row whose release time is not after the last step already
applied (a runner that delivers a row behind the watermark) is still applied, as a step of its own, and counted
(``late``): only then could a rerun differ.

The state is ``u`` per horizon, the steps taken, the last step's release time, the clock and the history: JSON
(floats by ``repr``, exact). A target whose surprise is not finite (a bad close) is left out of the term (the
symbol's own calibrator still sees it).
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError, SnapshotError

#: the step count at which a step's weight is half of ``w`` (module doc)
POOL_N0 = 20.0
#: the bound on ``|u_h|``: the pooled multiplier stays within [1/10, 10]
POOL_BOUND = math.log(10.0)
#: clock values whose ``u`` the state keeps for rows released late (module doc)
HISTORY = 512
#: the market job's default event-time window (s, ``--window``): its release times, and so the pooled term's steps
WINDOW = 7 * 86400.0


def expected_abs_t(df) -> np.ndarray:
    """``E|T|`` of a standard Student-t per ``df`` (> 1; Gaussian at inf)."""
    df = np.asarray(df, np.float64)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        lg = np.array([math.lgamma((d + 1) / 2) - math.lgamma(d / 2) if math.isfinite(d) else 0.0
                       for d in df.reshape(-1)]).reshape(df.shape)
        finite = 2.0 * np.sqrt(df / math.pi) * np.exp(lg) / (df - 1.0)
    return np.where(np.isfinite(df), finite, math.sqrt(2.0 / math.pi))


def check_weight(w: float, df) -> float:
    """The weight ``w`` in [0, 1] (0: off); InputError (one line) otherwise or for a ``df <= 1`` (no ``E|T|``)."""
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0.0 <= float(w) <= 1.0:
        raise InputError(f"calibration: pool: expected a weight in [0, 1] (0: off), got {w!r}")
    d = np.asarray(df, np.float64)
    if float(w) > 0 and not (d > 1).all():
        raise InputError(f"calibration: pool: expected a model whose Student-t df are all > 1, got {d.tolist()}")
    return float(w)


def _u_at(history: list, t: float, H: int) -> np.ndarray:
    """``u`` when the clock was at bar time ``t``: the history's last entry at or before it (0 before it)."""
    i = bisect.bisect_right([c for c, _ in history], t) - 1
    return history[i][1] if i >= 0 else np.zeros(H)


@dataclass
class MarketScale:
    """The pooled term's state and update (module doc)."""

    weight: float
    df: np.ndarray
    u: np.ndarray = field(default=None)  # type: ignore[assignment]
    steps: int = 0
    last_rel: int | None = None
    clock: float | None = None
    #: ``(clock, u at the end of the last step at that clock)``, oldest first, at most :data:`HISTORY`
    history: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.df = np.asarray(self.df, np.float64)
        self.weight = check_weight(self.weight, self.df)
        self.u = np.zeros(len(self.df)) if self.u is None else np.asarray(self.u, np.float64)
        self._eabs = expected_abs_t(self.df)

    def to_json(self) -> str:
        return json.dumps({"u": [float(x) for x in self.u], "steps": self.steps, "last_rel": self.last_rel,
                           "clock": self.clock, "history": [[c, [float(x) for x in u]] for c, u in self.history]})

    def _u(self, v, what: str) -> np.ndarray:
        H = len(self.df)
        if not (isinstance(v, list) and len(v) == H and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and abs(x) <= POOL_BOUND for x in v)):
            raise SnapshotError(f"pooled scale restore: {what}: expected {H} numbers within ±ln 10, got {v!r:.80}")
        return np.array(v, np.float64)

    def restore(self, text: str | bytes | None) -> None:
        """Replace the state by :meth:`to_json`'s (None: a fresh one); SnapshotError naming the field, the state
        then unchanged."""
        if text is None:
            self.u, self.steps, self.last_rel, self.clock, self.history = np.zeros(len(self.df)), 0, None, None, []
            return
        try:
            got = json.loads(text)
        except (TypeError, ValueError):
            raise SnapshotError(f"pooled scale restore: expected JSON, got {text!r:.60}") from None
        if not isinstance(got, dict):
            raise SnapshotError(f"pooled scale restore: expected a JSON object, got {got!r:.60}")
        missing = [k for k in ("u", "steps", "last_rel", "clock", "history") if k not in got]
        if missing:
            raise SnapshotError(f"pooled scale restore: {missing[0]}: expected a field of the state, got fields "
                                f"{sorted(got)}")
        u = self._u(got["u"], "u")
        steps, rel, clock, hist = got["steps"], got["last_rel"], got["clock"], got["history"]

        def count(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def time(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if not (count(steps) and steps >= 0 and (rel is None or count(rel))):
            raise SnapshotError(f"pooled scale restore: steps/last_rel: expected a count and a time, got {steps!r}, "
                                f"{rel!r}")
        if not (isinstance(hist, list) and len(hist) <= HISTORY and all(
                isinstance(e, list) and len(e) == 2 and time(e[0]) for e in hist)) \
                or [e[0] for e in hist] != sorted({e[0] for e in hist}):
            raise SnapshotError(f"pooled scale restore: history: expected at most {HISTORY} [bar time, u] pairs in "
                                f"time order, got {hist!r:.80}")
        # the clock is the last on-time step's bar time: the history's last entry (none before the first step)
        if not ((clock is None and not hist) or (time(clock) and hist and clock == hist[-1][0])):
            raise SnapshotError(f"pooled scale restore: clock: expected the history's last bar time "
                                f"{hist[-1][0] if hist else None!r}, got {clock!r}")
        history = [(float(c), self._u(v, "history")) for c, v in hist]
        self.u, self.steps, self.last_rel, self.clock, self.history = u, steps, rel, clock, history

    def advance(self, rel: np.ndarray, ts: np.ndarray, absz: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, int]:
        """Rows (any order) with their release times ``rel [n]`` (int), bar times ``ts [n]``, the ``|z|`` of the
        targets they complete ``absz [n, H]`` where ``valid [n, H]``: learn them step by step (module doc) and
        return each row's multiplier ``exp(u) [n, H]`` (after its step) and how many rows came late."""
        n = len(rel)
        factor = np.ones((n, len(self.df)))
        if not self.weight or not n:
            return factor, 0
        rel = np.asarray(rel, np.int64)
        late = int((rel <= self.last_rel).sum()) if self.last_rel is not None else 0
        order = np.lexsort((ts, rel))
        r, t = rel[order], np.asarray(ts, np.float64)[order]
        cut = np.flatnonzero((r[1:] != r[:-1]) | (t[1:] != t[:-1])) + 1
        bounds = np.concatenate([[0], cut, [n]])
        with np.errstate(invalid="ignore"):
            v = (np.asarray(valid, bool) & np.isfinite(absz))[order]
        z = np.where(v, np.asarray(absz, np.float64)[order], 0.0)
        cnt = np.add.reduceat(v, bounds[:-1], axis=0)
        tot = np.add.reduceat(z, bounds[:-1], axis=0)
        u = self.u.copy()
        clock, history = self.clock, list(self.history)
        out = np.empty((len(bounds) - 1, len(u)))
        for k in range(len(bounds) - 1):
            c = cnt[k]
            seen = c > 0
            if seen.any():
                wn = self.weight * c[seen] / (c[seen] + POOL_N0)
                mean = tot[k, seen] / c[seen]
                with np.errstate(divide="ignore"):
                    target = np.clip(np.log(mean / self._eabs[seen]), -POOL_BOUND, POOL_BOUND)
                u[seen] = np.clip((1.0 - wn) * u[seen] + wn * target, -POOL_BOUND, POOL_BOUND)
            tk = float(t[bounds[k]])
            if clock is None or tk >= clock:  # on time: the step's rows are issued at the new u
                out[k] = u
                if history and history[-1][0] == tk:
                    history[-1] = (tk, u.copy())
                else:
                    history.append((tk, u.copy()))
                    del history[:-HISTORY]
                clock = tk
            else:  # released late: the u in force when the clock was at its bar time
                out[k] = _u_at(history, tk, len(u))
        step_of = np.repeat(np.arange(len(bounds) - 1), np.diff(bounds))
        factor[order] = np.exp(out[step_of])
        self.u, self.steps, self.clock, self.history = u, self.steps + len(bounds) - 1, clock, history
        self.last_rel = int(r[-1]) if self.last_rel is None else max(self.last_rel, int(r[-1]))
        return factor, late


def offline_multipliers(weight: float, df, ts: list[np.ndarray], y: list[np.ndarray], loc: list[np.ndarray],
                        scale: list[np.ndarray], valid: list[np.ndarray], window: float = WINDOW,
                        end_micros: int = np.iinfo(np.int64).max) -> list[np.ndarray]:
    """The multiplier each origin of each series is issued at ``[n, H]``, as the market job computes it with the
    bars of every series from their first and ``--window window``: series ``k`` has bar times ``ts[k] [n]``
    (seconds) and origin-indexed targets ``y``, ``loc``, ``scale``, ``valid [n, H]``; the row of bar ``i``
    completes the horizon-``h`` target of origin ``i - h``. The job releases that row with its next bar's window
    (``[k window, (k + 1) window)`` from the epoch; plus a lateness, the same for every row, so it does not change
    the order), the last one at ``end_micros`` (the end of the input)."""
    if not weight:
        return [np.ones_like(np.asarray(s, np.float64)) for s in scale]
    H = len(np.asarray(df).reshape(-1))
    rel, bar_ts, absz, ok = [], [], [], []
    for t, yk, lk, sk, vk in zip(ts, y, loc, scale, valid, strict=True):
        n = len(t)
        r = np.full(n, end_micros, np.int64)
        size = round(window * 1e6)
        r[:-1] = np.round(np.asarray(t[1:], np.float64) * 1e6).astype(np.int64) // size
        z, v = np.zeros((n, H)), np.zeros((n, H), bool)
        for h in range(1, H + 1):
            o = np.arange(n) - h
            has = o >= 0
            oo = o[has]
            v[has, h - 1] = vk[oo, h - 1]
            with np.errstate(invalid="ignore", divide="ignore"):
                z[has, h - 1] = np.abs(yk[oo, h - 1] - lk[oo, h - 1]) / sk[oo, h - 1]
        rel.append(r)
        bar_ts.append(np.asarray(t, np.float64))
        absz.append(z)
        ok.append(v)
    f, _ = MarketScale(weight, df).advance(np.concatenate(rel), np.concatenate(bar_ts), np.concatenate(absz),
                                           np.concatenate(ok))
    return np.split(f, np.cumsum([len(t) for t in ts])[:-1])


__all__ = ["HISTORY", "POOL_BOUND", "POOL_N0", "WINDOW", "MarketScale", "check_weight", "expected_abs_t",
           "offline_multipliers"]
