"""Online calibration under regime shift: adaptive conformal inference (ACI) per symbol (issue 15).

Gibbs and Candès (2021), "Adaptive conformal inference under distribution shift": for a target
miscoverage ``a`` (``1 - level``), each symbol carries its own ``a_t`` and, after each outcome,

    a_{t+1} = clip(a_t + gamma (a - err_t)),      err_t = 1 if the outcome fell outside, else 0.

The interval issued at ``t`` is the model's own Student-t central interval of level ``1 - a_t``
(quantiles ``a_t / 2`` and ``1 - a_t / 2`` of ``(loc, scale, df)``), so it keeps the model's shape
and centre and only widens (``a_t < a``) or narrows (``a_t > a``). A run of misses (a crisis)
widens it, a run of hits (a calm year) narrows it, and whatever the forecasts do the share of
misses tends to ``a``: ``|mean err - a| <= (max(a_1, 1 - a_1) + gamma) / (gamma T)`` over ``T``
outcomes (their Proposition 4.1), plus the share of steps where the clip bound.

The same update calibrates one-sided targets: the left tail at probability ``p`` (the value at
risk, VaR), with ``err_t = 1`` when the return fell below the issued ``a_t`` quantile. The
expected shortfall is then the model's ES at the calibrated ``a_t`` (the same correction).

**Conventions.** Returns are % log returns (the model's units). VaR and ES are **positive losses**:
``VaR_p = -q_p`` and ``ES_p = -E[Y | Y <= q_p]`` of the next-``h``-bar log return, so a 1% VaR of
2.5 means "a loss worse than 2.5% (log) on 1 day in 100" (:func:`~.distribution.expected_shortfall`).

**Targets.** ``levels`` (central intervals, default 0.5, 0.8, 0.95, 0.99) then ``tails`` (left tails,
default 0.01, 0.05); ``K = len(levels) + len(tails)``. The nominal ``a`` is ``1 - level`` or ``p``.

**Horizons.** Horizon ``h``'s outcome arrives ``h`` bars after its origin, so the update for
``(origin o, h)`` happens at bar ``o + h`` and compares the outcome with the ``a`` issued at ``o``
(kept in a ring of the last ``H`` issued values): each horizon is its own ACI with delay ``h``
and the same guarantee.

**Steps.** ``gamma`` trades reaction speed for stability: ``1 / gamma_k`` outcomes is roughly how
long a shift must last to be corrected. One step for every level (the paper's, ``scaling="constant"``)
is far too large in the tails: at gamma 0.005 one miss moves the 99% band's ``a`` from 0.01 to
0.005, and on the S&P training years it sat at the clip 4.4% of the time, the band 1.33x as wide on
average, its interval score 17% worse than the raw model's. So by default the step is proportional
to the target's miscoverage (``scaling="proportional"``): ``gamma_k = gamma * a_k / 0.2``, so
``gamma`` is the 80% level's step (the 50% level's is 2.5x it, the 99% level's and the 1% VaR's
1/20 of it) and ``a_t`` moves by about the same fraction of itself at every level.
:data:`GAMMA` = 0.01 was chosen on the S&P set's years before the test period (2014-02..2016,
``eval forecast --start 2014-02-10 --end 2017-01-01 --gamma 0.005,0.002,0.01,0.02,0.05,0.1``):
the largest step whose h1 interval score (pinball loss for the VaR) stayed within 0.5% of the best
step's, for every level and tail (docs/market.md, "Online calibration"). The price of a small step
in the tails: the 99% band and the 1% VaR need thousands of outcomes to correct a shift.

**Clip.** ACI lets ``a_t`` leave (0, 1), where the interval is infinite (``a_t <= 0``) or empty; the
state keeps the unclipped value (so a crisis that drove it below 0 is remembered and paid back
by hits, which is what the guarantee rests on), and the band issued uses
``clip(a_t, ALPHA_MIN, 1 - ALPHA_MIN)`` (1e-6): every band and VaR stays finite, at most the model's
1 - 1e-6 quantile (about 17 scales at df 5.5). Clipping the state itself instead was measured to
leave the 99% band and the 1% VaR short after a shift (98.4% and 1.6% in a synthetic wild regime,
against 99.0% and 1.0% unclipped): every clipped step forgets a miss. The state is bounded to
``STATE_BOUNDS`` (-1, 2) only as a guard; it moves past -gamma only when outcomes fall outside the
1 - 1e-6 band.

**State** (explicit, numpy, per key; :meth:`OnlineConformal.snapshot` / :meth:`~OnlineConformal.restore`,
also as an Arrow table):

* ``alpha``  float64 ``[S, H, K]``: the current ``a_t``;
* ``issued`` float64 ``[S, H, H, K]``: the ``a`` issued at origin ``o`` in slot ``o % H``;
* ``seq``    int64 ``[S]``: bars learned (origins opened) so far.

**Order per bar of a key:** :meth:`~OnlineConformal.learn` (the bar completes the horizon-``h``
targets of the origins ``h`` bars back; then the bar opens its own origin at the updated ``a``),
then :meth:`~OnlineConformal.predict` (pure: bands at the current ``a``). A failed call (a NaN
return, a wrong shape, an unknown key with a target) raises :class:`~streamrnn.errors.InputError`
naming the field and leaves the state as it was.

>>> cal = OnlineConformal(df=[5.0], levels=(0.8,), tails=(0.05,), gamma=0.1)
>>> [round(float(g), 12) for g in cal.config.steps]      # proportional: 0.1 at 80%, 0.1 * 0.05 / 0.2 at 5%
[0.1, 0.025]
>>> cal.learn_one("AAA")                                   # bar 0: no target yet; it opens origin 0
>>> bool(cal.predict_one("AAA", [0.0], [1.0])["hi80"][0] == std_quantiles(0.9, 5.0))  # a_t = a: the raw band
True
>>> cal.learn_one("AAA", y=[-9.0], loc=[0.0], scale=[1.0])  # bar 1: a 9-scale loss, outside both targets
>>> [round(float(a), 9) for a in cal.state_of("AAA")["alpha"][0]]  # 0.2 + 0.1 (0.2 - 1); 0.05 + 0.025 (0.05 - 1)
[0.12, 0.02625]
>>> bool(cal.predict_one("AAA", [0.0], [1.0])["hi80"][0] > std_quantiles(0.9, 5.0))  # wider now
True
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..errors import InputError, SnapshotError
from .distribution import expected_shortfall, std_quantiles, tail2

GAMMA = 0.01
ALPHA_MIN = 1e-6
STATE_BOUNDS = (-1.0, 2.0)
REFERENCE_ALPHA = 0.2
SCALINGS = ("proportional", "constant")
METHODS = ("aci", "agaci", "none")
METHOD = "aci"
#: AgACI's experts (80% steps): 4 steps geometric over the training-years scan's range 0.002..0.1 (module doc)
GAMMAS = (0.002, 0.007, 0.025, 0.1)
LEVELS = (0.5, 0.8, 0.95, 0.99)
TAILS = (0.01, 0.05)
STATE_FIELDS = ("alpha", "issued", "seq")
#: ``agaci``'s state per key (module doc, AgACI): the issued ring and the experts, float32 deviations from the nominal
AGACI_FIELDS = ("seq", "dissued", "dealpha", "ecount", "regret", "sq", "bound")


def label(x: float) -> str:
    """A level or tail as a column suffix: 0.8 -> '80', 0.995 -> '99.5', 0.01 -> '1'."""
    return f"{100 * x:.10g}"


@dataclass(frozen=True)
class ConformalConfig:
    """What the state's columns mean: the interval levels, the VaR/ES tails, the horizons and the step."""

    horizons: int = 1
    levels: tuple[float, ...] = LEVELS
    tails: tuple[float, ...] = TAILS
    gamma: float = GAMMA
    scaling: str = "proportional"  # or "constant" (module doc, Steps)
    method: str = METHOD  # "aci" (one step), "agaci" (experts at ``gammas``, aggregated online; module doc) or
    # "none" (the raw model's bands: ``a`` stays at the nominal; the state is the bar count only)
    gammas: tuple[float, ...] = GAMMAS  # the experts' 80% steps (``agaci`` only)

    def __post_init__(self) -> None:
        object.__setattr__(self, "levels", tuple(float(x) for x in self.levels))
        object.__setattr__(self, "tails", tuple(float(x) for x in self.tails))
        if self.method not in METHODS:
            raise InputError(f"conformal: method: expected one of {list(METHODS)}, got {self.method!r}")
        try:
            gs = tuple(float(g) for g in self.gammas)
        except (TypeError, ValueError):
            raise InputError(f"conformal: gammas: expected steps in (0, 1), got {self.gammas!r}") from None
        if (not gs or len(set(gs)) != len(gs) or not all(0.0 < g < 1.0 for g in gs)
                or any(isinstance(g, bool) for g in self.gammas)):
            raise InputError(f"conformal: gammas: expected distinct steps in (0, 1), got {list(self.gammas)}")
        object.__setattr__(self, "gammas", gs)
        if not isinstance(self.horizons, (int, np.integer)) or isinstance(self.horizons, bool) or self.horizons < 1:
            raise InputError(f"conformal: horizons: expected an int >= 1, got {self.horizons!r}")
        for name, vals, hi in (("levels", self.levels, 1.0), ("tails", self.tails, 0.5)):
            bad = [v for v in vals if not 0.0 < v < hi]
            if bad or len(set(vals)) != len(vals):
                raise InputError(f"conformal: {name}: expected distinct values in (0, {hi:g}), got {list(vals)}")
        if not self.levels and not self.tails:
            raise InputError("conformal: levels: expected at least one level or tail, got none")
        if not (isinstance(self.gamma, (int, float)) and 0.0 < self.gamma < 1.0):
            raise InputError(f"conformal: gamma: expected a step in (0, 1), got {self.gamma!r}")
        if self.scaling not in SCALINGS:
            raise InputError(f"conformal: scaling: expected one of {list(SCALINGS)}, got {self.scaling!r}")

    @property
    def nominal(self) -> np.ndarray:
        """The target miscoverage per target ``[K]``: ``1 - level`` for the intervals, then the tails."""
        return np.array([1.0 - x for x in self.levels] + list(self.tails), np.float64)

    @property
    def steps(self) -> np.ndarray:
        """The step of each target ``[K]``: ``gamma * a / 0.2`` (``proportional``: ``gamma`` is the 80% level's
        step) or ``gamma`` for every target (``constant``, as in the paper)."""
        if self.scaling == "constant":
            return np.full(len(self.nominal), float(self.gamma))
        return float(self.gamma) * self.nominal / REFERENCE_ALPHA

    @property
    def expert_steps(self) -> np.ndarray:
        """``agaci``: the step of each target and expert ``[K, E]`` (:attr:`steps` at each of ``gammas``)."""
        unit = np.ones(len(self.nominal)) if self.scaling == "constant" else self.nominal / REFERENCE_ALPHA
        return unit[:, None] * np.asarray(self.gammas)[None, :]

    @property
    def two_sided(self) -> np.ndarray:
        """Per target ``[K]``: a central interval (True) or a left tail (False)."""
        return np.array([True] * len(self.levels) + [False] * len(self.tails))

    def to_dict(self) -> dict:
        out = {"horizons": int(self.horizons), "levels": list(self.levels), "tails": list(self.tails),
               "gamma": float(self.gamma), "scaling": self.scaling, "method": self.method}
        if self.method == "agaci":
            out["gammas"] = list(self.gammas)
        return out

    @property
    def fields(self) -> tuple[str, ...]:
        """The state arrays per key: :data:`STATE_FIELDS` (``aci``) or :data:`AGACI_FIELDS` (``agaci``)."""
        return {"agaci": AGACI_FIELDS, "none": ("seq",)}.get(self.method, STATE_FIELDS)

    def shapes(self, n: int) -> dict[str, tuple[int, ...]]:
        """The shape of each state array for ``n`` keys."""
        H, K, E = self.horizons, len(self.nominal), len(self.gammas)
        if self.method == "none":
            return {"seq": (n,)}
        if self.method == "agaci":
            return {"seq": (n,), "dissued": (n, H, H, K), "dealpha": (n, H, K, E), "ecount": (n, H, H, K, E),
                    "regret": (n, H, K, E), "sq": (n, H, K, E), "bound": (n, H, K)}
        return {"alpha": (n, H, K), "issued": (n, H, H, K), "seq": (n,)}

    def dtype(self, field: str) -> np.dtype:
        """The dtype of a state array: ``seq`` int64; ACI's float64; AgACI's float32, its ``ecount`` the smallest
        unsigned int that holds ``H * H - 1``."""
        if field == "seq":
            return np.dtype(np.int64)
        if self.method != "agaci":
            return np.dtype(np.float64)
        return np.dtype(np.uint8 if self.horizons <= 16 else np.uint16) if field == "ecount" else np.dtype(np.float32)

    def fresh(self, n: int) -> dict[str, np.ndarray]:
        """The state of ``n`` new keys: every ``a`` (and every expert's) at the nominal, no regret."""
        out = {f: np.zeros(shape, self.dtype(f)) for f, shape in self.shapes(n).items()}
        if self.method == "aci":
            for f in ("alpha", "issued"):
                out[f][:] = self.nominal
        return out


def pit(y, loc, scale, df) -> tuple[np.ndarray, np.ndarray]:
    """The two scores an outcome is judged by, elementwise: the two-sided tail mass ``P(|T| >= |z|)`` (the
    outcome is outside the central interval of miscoverage ``a`` iff it is below ``a``) and the lower tail
    ``P(Y <= y)`` (below the ``a`` quantile iff it is below ``a``). Exact in the tails (no ``1 - cdf``)."""
    z = (np.asarray(y, np.float64) - loc) / scale
    p2 = tail2(z, df)
    return p2, np.where(z < 0, 0.5 * p2, 1.0 - 0.5 * p2)


def issued(alpha) -> np.ndarray:
    """The miscoverage a band is drawn at: ``clip(a_t, ALPHA_MIN, 1 - ALPHA_MIN)`` (module doc, Clip)."""
    return np.clip(alpha, ALPHA_MIN, 1.0 - ALPHA_MIN)


def misses(p2: np.ndarray, lower: np.ndarray, alpha: np.ndarray, two_sided: np.ndarray) -> np.ndarray:
    """Whether each outcome (scores ``[..., H]``) fell outside the bands issued at states ``alpha [..., H, K]``."""
    score = np.where(two_sided, p2[..., None], lower[..., None])
    return score < issued(alpha)


def _step(alpha: np.ndarray, miss: np.ndarray, valid: np.ndarray, cfg: ConformalConfig) -> np.ndarray:
    """One ACI step where ``valid [..., H]``: ``a_t + gamma (a - err_t)`` (within the guard bounds); unchanged
    elsewhere."""
    new = np.clip(alpha + cfg.steps * (cfg.nominal - miss), *STATE_BOUNDS)
    return np.where(valid[..., None], new, alpha)


#: the edge tables (:class:`EdgeTable`): nodes uniform in ``log p`` from ``ALPHA_MIN / 2`` to ``1/2`` (edges), and
#: uniform in ``log(edge + _EDGE_SHIFT)`` (the way back)
_TABLE_NODES = 1 << 13
_X0, _X1 = math.log(0.5 * ALPHA_MIN), math.log(0.5)
_EDGE_SHIFT = 0.05


class EdgeTable:
    """AgACI's map between a miscoverage ``a`` and its band edge in scale units, per horizon (Student-t ``df [H]``):
    the half-width ``t^-1(1 - a/2)`` of a central interval, the quantile ``t^-1(a)`` of a left tail; and back.

    Two tables of ``2^15`` nodes per horizon, linear in between, float32: the edge at tail masses uniform in
    ``log p`` (``p`` from ``ALPHA_MIN / 2`` to 1/2; exact quantiles, :func:`~.distribution.std_quantiles`), and
    ``log p`` at edges uniform in ``log(edge + 0.05)`` (exact tail masses, :func:`~.distribution.tail2`). Both agree
    with scipy to about 1e-6 relative (float32; the tests measure it). It replaces an iterative quantile per
    expert and bar and a CDF per target and bar by a gather; every path (learn, run, a restored state) uses the same
    tables, so they agree bit for bit."""

    def __init__(self, df: Sequence[float]):
        self.df = np.asarray(df, np.float64).reshape(-1)
        H, N = len(self.df), _TABLE_NODES
        self.dx = (_X1 - _X0) / (N - 1)
        v = -std_quantiles(np.exp(_X0 + self.dx * np.arange(N))[None, :], self.df[:, None])  # [H, N], decreasing
        v[:, -1] = 0.0
        self.v = v.astype(np.float32).reshape(-1)
        self.w0 = math.log(_EDGE_SHIFT)
        self.dw = (math.log(float(v.max()) + _EDGE_SHIFT) - self.w0) / (N - 1)
        edge = np.exp(self.w0 + self.dw * np.arange(N)) - _EDGE_SHIFT
        edge[0] = 0.0
        with np.errstate(divide="ignore"):
            logp = np.log(0.5 * tail2(edge[None, :], self.df[:, None]))  # [H, N]
        self.logp = np.maximum(logp, _X0 - 1.0).astype(np.float32).reshape(-1)
        self.base = (np.arange(H, dtype=np.int32) * N).reshape(1, -1, 1)

    def _lerp(self, tab: np.ndarray, u: np.ndarray) -> np.ndarray:
        """``tab`` (one row of nodes per horizon) at fractional node ``u [n, H, ...]`` (float32), linear."""
        u = np.clip(u, np.float32(0.0), np.float32(_TABLE_NODES - 1.001))
        i = u.astype(np.int32)
        f = u - i.astype(np.float32)
        i += self.base.reshape(self.base.shape + (1,) * (u.ndim - 3))
        lo = np.take(tab, i)
        return lo + f * (np.take(tab, i + 1) - lo)

    def edges(self, a: np.ndarray, two_sided: np.ndarray) -> np.ndarray:
        """Band edges (float32) at miscoverages ``a [n, H, K, ...]`` (drawn at the clip), ``two_sided [K]``."""
        a = np.clip(a, ALPHA_MIN, 1.0 - ALPHA_MIN, dtype=np.float32)
        ts = two_sided.reshape((1, 1, -1) + (1,) * (a.ndim - 3))
        p = np.where(ts, np.float32(0.5) * a, np.minimum(a, np.float32(1.0) - a))
        e = self._lerp(self.v, (np.log(p) - np.float32(_X0)) * np.float32(1.0 / self.dx))
        return np.where(ts | (a > 0.5), e, -e)

    def alphas(self, q: np.ndarray, two_sided: np.ndarray) -> np.ndarray:
        """The miscoverage (float32) whose band edge is ``q [n, H, K]`` (:meth:`edges` backwards)."""
        u = (np.log(np.abs(q) + np.float32(_EDGE_SHIFT)) - np.float32(self.w0)) * np.float32(1.0 / self.dw)
        p = np.exp(self._lerp(self.logp, u))
        return np.where(two_sided, np.float32(2.0) * p, np.where(q > 0, np.float32(1.0) - p, p))


def _advance(st: dict[str, np.ndarray], p2: np.ndarray, lower: np.ndarray, v: np.ndarray, cfg: ConformalConfig,
             table: EdgeTable | None) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """One bar of ``n`` keys: the state rows ``st`` (:meth:`ConformalConfig.shapes`) learn the targets whose
    scores (``p2``, ``lower [n, H]``) are ``valid [n, H]`` (horizon ``h``'s from the origin ``h + 1`` bars back,
    whose ``a`` is in the ring at slot ``(seq - 1 - h) % H``), then open this bar's origin. Returns the new
    rows (new arrays), the misses of the issued (aggregate) bands ``[n, H, K]`` and the ``a`` issued now."""
    if cfg.method == "agaci":
        return _advance_agaci(st, p2, lower, v, cfg, table)
    if cfg.method == "none":
        return {"seq": st["seq"] + 1}, misses(p2, lower, cfg.nominal, cfg.two_sided) & v[..., None], \
            np.broadcast_to(cfg.nominal, (*v.shape, len(cfg.nominal)))
    n, H = v.shape
    slot = (st["seq"][:, None] - 1 - np.arange(H)[None, :]) % H
    a_iss = st["issued"][np.arange(n)[:, None], slot, np.arange(H)[None, :]]
    miss = misses(p2, lower, a_iss, cfg.two_sided) & v[..., None]
    out = dict(st)
    out["alpha"] = _step(st["alpha"], miss, v, cfg)
    out["issued"] = st["issued"].copy()
    out["issued"][np.arange(n), st["seq"] % H] = out["alpha"]
    out["seq"] = st["seq"] + 1
    return out, miss, out["alpha"]


def _agaci_last(st: dict[str, np.ndarray], H: int) -> np.ndarray:
    """AgACI: the deviation from the nominal of the ``a`` each key issued last ``[n, H, K]`` (0 before its first
    bar), float32 as stored."""
    n = len(st["seq"])
    last = st["dissued"][np.arange(n), (st["seq"] - 1) % H]
    return np.where((st["seq"] > 0)[:, None, None], last, np.float32(0.0))


def _advance_agaci(st: dict[str, np.ndarray], p2: np.ndarray, lower: np.ndarray, v: np.ndarray,
                   cfg: ConformalConfig, table: EdgeTable) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """:func:`_advance` for ``agaci`` (module doc, AgACI): every array over keys, horizons, targets and experts at
    once, in float32 (the state's dtype; ``a`` kept as deviations from the nominal). The experts' ``a`` at a
    pending origin are rebuilt from their current ``a`` and the count of steps taken since (``ecount``)."""
    n, H = v.shape
    E = len(cfg.gammas)
    f32 = np.float32
    nom, nom32 = cfg.nominal, cfg.nominal.astype(f32)
    enom, steps = nom32[:, None], cfg.expert_steps.astype(f32)
    rows, hs = np.arange(n)[:, None], np.arange(H)[None, :]
    slot = (st["seq"][:, None] - 1 - hs) % H
    vv = v[..., None, None]
    score = np.where(cfg.two_sided, p2[..., None], lower[..., None])  # [n, H, K]
    d_iss = st["dissued"][rows, slot, hs]
    miss = (score < issued(nom + d_iss.astype(np.float64))) & v[..., None]  # the aggregate's, as ``issued`` reads it
    code = st["ecount"][rows, slot, hs]  # [n, H, K, E]: steps taken since the origin, H * taken + missed
    taken, missed = np.divmod(code, np.asarray(H, code.dtype))
    ea = enom + st["dealpha"]
    ea_o = ea - steps * (taken * enom - missed)  # each expert's a at the origin
    emiss = (score[..., None] < np.clip(ea_o, ALPHA_MIN, 1.0 - ALPHA_MIN)) & vv
    stepped = ea + steps * (enom - emiss)
    ok = vv & (stepped >= STATE_BOUNDS[0]) & (stepped <= STATE_BOUNDS[1])  # a step out of the guard is not taken
    dealpha = np.where(ok, stepped - enom, st["dealpha"])
    e = table.edges(np.concatenate([ea_o, (nom32 + d_iss)[..., None], enom + dealpha], -1), cfg.two_sided)
    q_e, q_a, e_new = e[..., :E], e[..., E:E + 1], e[..., E + 1:]
    # BOA with the gradient trick: the pinball loss of the aggregate edge, linearised there
    grad = np.where(cfg.two_sided, nom32 - miss, miss - nom32)[..., None]  # d pinball / d edge
    r = np.where(vv, grad * (q_a - q_e), f32(0.0))  # regret against each expert
    eta = _eta(st["sq"], st["bound"], E)
    r2 = r * r
    regret = st["regret"] + r - np.where(np.isfinite(eta), eta, f32(0.0)) * r2
    sq = st["sq"] + r2
    bound = np.maximum(st["bound"], _last(np.maximum, np.abs(r)))
    w = boa_weights(regret, sq, bound)
    agg = table.alphas(_last(np.add, w * e_new), cfg.two_sided)
    d = np.where(v[..., None], agg - nom32, _agaci_last(st, H))  # no target this bar: a as it was
    now = st["seq"] % H
    out = {"dealpha": dealpha, "regret": regret, "sq": sq, "bound": bound, "dissued": st["dissued"].copy(),
           "ecount": st["ecount"] + (ok * H + (ok & emiss)).astype(st["ecount"].dtype)[:, None],  # every pending one
           "seq": st["seq"] + 1}
    out["dissued"][np.arange(n), now] = d
    out["ecount"][np.arange(n), now] = 0
    return out, miss, nom + d.astype(np.float64)


def _eta(sq: np.ndarray, bound: np.ndarray, experts: int) -> np.ndarray:
    """BOA's learning rate per expert: ``min(1 / (2 B), sqrt(ln E / V))`` (``inf`` before any regret)."""
    with np.errstate(divide="ignore"):
        return np.minimum(1.0 / (2.0 * bound[..., None]), np.sqrt(math.log(max(experts, 2)) / sq))


def boa_weights(regret: np.ndarray, sq: np.ndarray, bound: np.ndarray) -> np.ndarray:
    """BOA's weights ``[..., E]`` from the regularised cumulative regrets, the sums of squared regrets and the
    largest |regret| (Wintenberger 2017; uniform prior): ``w_e ∝ eta_e exp(eta_e R_e)``; uniform before any
    regret (``bound`` 0)."""
    E = regret.shape[-1]
    eta = _eta(sq, bound, E)
    live = bound[..., None] > 0
    eta = np.where(live, eta, 1.0)
    logw = np.where(live, np.log(eta) + eta * regret, 0.0)
    w = np.exp(logw - _last(np.maximum, logw)[..., None])
    return w / _last(np.add, w)[..., None]


def _last(op: np.ufunc, a: np.ndarray) -> np.ndarray:
    """``op`` reduced over the last (short: the experts) axis, one slice at a time: numpy's own reduction over a
    short last axis costs several times more."""
    out = a[..., 0].copy()
    for e in range(1, a.shape[-1]):
        op(out, a[..., e], out=out)
    return out


def bands(alpha, loc, scale, df, cfg: ConformalConfig) -> dict[str, np.ndarray]:
    """Bands of the model's Student-t at miscoverages ``alpha [..., H, K]`` (``loc``, ``scale [..., H]``, ``df [H]``):
    ``lo{L}``/``hi{L}`` per level and ``var{p}``/``es{p}`` (positive losses) per tail, each ``[..., H]``.
    With ``alpha = cfg.nominal`` these are the raw model's bands; a state outside (0, 1) is drawn at the clip."""
    alpha = issued(np.asarray(alpha, np.float64))
    loc, scale = np.asarray(loc, np.float64), np.asarray(scale, np.float64)
    df = np.broadcast_to(np.asarray(df, np.float64), loc.shape)
    out: dict[str, np.ndarray] = {}
    for k, lv in enumerate(cfg.levels):
        half = std_quantiles(1.0 - 0.5 * alpha[..., k], df) * scale
        out[f"lo{label(lv)}"], out[f"hi{label(lv)}"] = loc - half, loc + half
    for j, p in enumerate(cfg.tails):
        a = alpha[..., len(cfg.levels) + j]
        out[f"var{label(p)}"] = -(loc + std_quantiles(a, df) * scale)
        out[f"es{label(p)}"] = expected_shortfall(a, loc, scale, df)
    return out


class OnlineConformal:
    """ACI over many keys at once (module doc). ``df``: the model's Student-t degrees of freedom per horizon
    (``inf`` for a Gaussian); ``H = len(df)``."""

    def __init__(self, df: Sequence[float], *, levels: Sequence[float] = LEVELS, tails: Sequence[float] = TAILS,
                 gamma: float = GAMMA, scaling: str = "proportional", method: str = METHOD,
                 gammas: Sequence[float] = GAMMAS):
        self.df = np.asarray(df, np.float64).reshape(-1)
        if not len(self.df) or not (self.df > 0).all():
            raise InputError(f"conformal: df: expected one value > 0 per horizon, got {list(self.df)}")
        self.config = ConformalConfig(len(self.df), tuple(levels), tuple(tails), gamma, scaling, method,
                                      tuple(gammas) if isinstance(gammas, (list, tuple)) else gammas)
        self.table = _edge_table(tuple(self.df.tolist())) if method == "agaci" else None
        self._keys: dict[str, int] = {}
        self._st = self._fresh(0)

    def _fresh(self, n: int) -> dict[str, np.ndarray]:
        return self.config.fresh(n)

    @property
    def alpha(self) -> np.ndarray:
        """The ``a`` each key's next band is drawn at ``[S, H, K]`` (``agaci``: the aggregate's, the one it issued
        last)."""
        return self._alpha_rows(self._st)

    def _alpha_rows(self, st: dict[str, np.ndarray]) -> np.ndarray:
        c = self.config
        if c.method == "none":
            return np.broadcast_to(c.nominal, (len(st["seq"]), c.horizons, len(c.nominal)))
        if self.config.method == "agaci":
            return self.config.nominal + _agaci_last(st, self.config.horizons).astype(np.float64)
        return st["alpha"]

    @property
    def issued(self) -> np.ndarray:
        """The ring of the ``a`` issued at the last ``H`` origins ``[S, H, H, K]`` (slot: origin mod ``H``)."""
        c = self.config
        if c.method == "none":
            return np.broadcast_to(c.nominal, (len(self), c.horizons, c.horizons, len(c.nominal)))
        if c.method == "agaci":
            return c.nominal + self._st["dissued"].astype(np.float64)
        return self._st["issued"]

    @property
    def seq(self) -> np.ndarray:
        """Bars learned per key ``[S]``."""
        return self._st["seq"]

    def weights(self, key: str) -> np.ndarray:
        """``agaci``: one key's experts' current weights ``[H, K, E]``."""
        st = self.state_of(key)
        if self.config.method != "agaci":
            raise InputError(f"conformal weights: method: expected 'agaci', got {self.config.method!r}")
        return boa_weights(st["regret"], st["sq"], st["bound"])

    # ---- keys ---------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def keys(self) -> list[str]:
        return list(self._keys)

    def state_of(self, key: str) -> dict[str, np.ndarray]:
        """Copies of one key's state arrays (``alpha [H, K]``, ``issued [H, H, K]``, ``seq``)."""
        if key not in self._keys:
            raise InputError(f"conformal: key: expected a key with state, got {key!r}")
        r = self._keys[key]
        return {f: (np.int64(a[r]) if f == "seq" else a[r].copy()) for f, a in self._st.items()}

    def _rows(self, keys: Sequence[str], what: str) -> tuple[np.ndarray, list[str]]:
        """Rows of ``keys`` (new keys at ``len(self) + i``, not yet added) and the new keys."""
        keys = [keys] if isinstance(keys, str) else list(keys)
        bad = [k for k in keys if not isinstance(k, str)]
        if bad:
            raise InputError(f"conformal {what}: keys: expected strings, got {bad[0]!r}")
        if len(set(keys)) != len(keys):
            dup = next(k for k in keys if keys.count(k) > 1)
            raise InputError(f"conformal {what}: keys: expected each key once per call, got {dup!r} twice")
        new, rows = [], []
        for k in keys:
            if k in self._keys:
                rows.append(self._keys[k])
            else:
                rows.append(len(self._keys) + len(new))
                new.append(k)
        return np.asarray(rows, np.int64), new

    def _grown(self, new: list[str]) -> dict[str, np.ndarray]:
        """The state arrays with fresh rows for ``new`` keys appended (copies; nothing committed)."""
        fresh = self._fresh(len(new))
        return {f: np.concatenate([a, fresh[f]]) for f, a in self._st.items()}

    def _commit(self, new: list[str], st: dict[str, np.ndarray]) -> None:
        for k in new:
            self._keys[k] = len(self._keys)
        self._st = st

    # ---- checks -------------------------------------------------------------------------------------------
    def _matrix(self, what: str, name: str, v, n: int, dtype=np.float64) -> np.ndarray:
        H = self.config.horizons
        try:
            a = np.asarray(v, dtype)
        except (TypeError, ValueError) as e:
            raise InputError(f"conformal {what}: {name}: expected numbers [{n}, {H}], got {type(v).__name__}") from e
        if a.shape != (n, H):
            raise InputError(f"conformal {what}: {name}: expected shape ({n}, {H}), got {a.shape}")
        return a

    # ---- the update ---------------------------------------------------------------------------------------
    def learn(self, keys: Sequence[str], y=None, loc=None, scale=None, valid=None) -> np.ndarray:
        """One new bar for each of ``keys`` (each once). ``y[i, h]`` is the realised return of key ``i``'s origin
        ``h + 1`` bars back (the horizon-``h + 1`` target this bar completes), ``loc``/``scale`` that origin's
        forecast, all ``[n, H]``; ``valid [n, H]`` (default all True) marks the targets that exist (False: not
        matured, or crossing a corporate-action jump; their values are not read). ``y=None``: a bar that
        completes no target. Then each key opens this bar's origin at its updated ``a``. Returns the misses
        ``[n, H, K]`` (False where not valid)."""
        rows, new = self._rows(keys, "learn")
        n, H = len(rows), self.config.horizons
        if y is None:
            if loc is not None or scale is not None or (valid is not None and np.any(valid)):
                raise InputError("conformal learn: y: expected the realised returns with loc/scale/valid, got none")
            valid_m = np.zeros((n, H), bool)
            y_m = loc_m = np.zeros((n, H))
            scale_m = np.ones((n, H))
        else:
            y_m = self._matrix("learn", "y", y, n)
            loc_m = self._matrix("learn", "loc", loc, n)
            scale_m = self._matrix("learn", "scale", scale, n)
            valid_m = np.ones((n, H), bool) if valid is None else self._matrix("learn", "valid", valid, n, bool)
        st = self._grown(new)
        seq = st["seq"]
        origin = seq[rows][:, None] - 1 - np.arange(H)[None, :]
        for name, arr, ok in (("y", y_m, np.isfinite(y_m)), ("loc", loc_m, np.isfinite(loc_m)),
                              ("scale", scale_m, np.isfinite(scale_m) & (scale_m > 0)), ("valid", origin, origin >= 0)):
            bad = valid_m & ~ok
            if bad.any():
                i, h = map(int, np.argwhere(bad)[0])
                key = keys[i] if not isinstance(keys, str) else keys
                if name == "valid":
                    raise InputError(f"conformal learn: valid: expected targets only of issued origins, got h{h + 1} "
                                     f"of key {key!r}, which has {int(seq[rows][i])} bar(s) learned")
                want = "a finite number > 0" if name == "scale" else "a finite number"
                raise InputError(f"conformal learn: {name}: expected {want} where valid, got {float(arr[i, h])!r} "
                                 f"(key {key!r}, h{h + 1})")
        z_ok = np.where(valid_m, y_m, 0.0), np.where(valid_m, loc_m, 0.0), np.where(valid_m, scale_m, 1.0)
        p2, lower = pit(*z_ok, self.df)
        got, miss, _ = _advance({f: a[rows] for f, a in st.items()}, p2, lower, valid_m, self.config, self.table)
        for f, a in got.items():
            st[f][rows] = a
        self._commit(new, st)
        return miss

    def predict(self, keys: Sequence[str], loc, scale) -> dict[str, np.ndarray]:
        """The calibrated bands of this bar's forecast (``loc``, ``scale [n, H]``) for each key at its current ``a``
        (a key never learned: the nominal ``a``, i.e. the raw model); pure. Also ``alpha [n, H, K]``."""
        rows, new = self._rows(keys, "predict")
        n = len(rows)
        loc_m, scale_m = self._matrix("predict", "loc", loc, n), self._matrix("predict", "scale", scale, n)
        alpha = np.concatenate([self.alpha, np.broadcast_to(self.config.nominal, (len(new), *self.alpha.shape[1:]))])
        a = alpha[rows]
        return {"alpha": a, **bands(a, loc_m, scale_m, self.df, self.config)}

    def learn_one(self, key: str, y=None, loc=None, scale=None, valid=None) -> None:
        """:meth:`learn` for one key, ``[H]`` vectors."""
        def row(v):
            return None if v is None else np.asarray(v)[None]
        self.learn([key], row(y), row(loc), row(scale), row(valid))

    def predict_one(self, key: str, loc, scale) -> dict[str, np.ndarray]:
        """:meth:`predict` for one key, ``[H]`` vectors."""
        return {k: v[0] for k, v in self.predict([key], np.asarray(loc)[None], np.asarray(scale)[None]).items()}

    def run(self, keys: Sequence[str], y, loc, scale, valid, lengths=None) -> np.ndarray:
        """Whole sequences at once: ``y``, ``loc``, ``scale``, ``valid [S, T, H]`` indexed by *origin* (``y[s, t, h]``
        the return from bar t to bar t + h + 1, as :func:`~.features.targets` gives it; ``lengths [S]`` bars per
        key, default T). Equal, bit for bit, to :meth:`learn` once per bar of each key, feeding at bar t the
        targets of origins t - 1 .. t - H; returns the ``a`` issued at every origin ``[S, T, H, K]``. Targets of
        origins before the run (a key with state) are not learned again."""
        rows, new = self._rows(keys, "run")
        S, H, K = len(rows), self.config.horizons, len(self.config.nominal)
        y, loc, scale = (np.asarray(v, np.float64) for v in (y, loc, scale))
        valid = np.asarray(valid, bool)
        T = y.shape[1] if y.ndim == 3 else -1
        for name, v in (("y", y), ("loc", loc), ("scale", scale), ("valid", valid)):
            if v.shape != (S, T, H):
                raise InputError(f"conformal run: {name}: expected shape ({S}, T, {H}), got {v.shape}")
        lengths = np.full(S, T, np.int64) if lengths is None else np.asarray(lengths, np.int64)
        if lengths.shape != (S,) or (lengths < 0).any() or (lengths > T).any():
            raise InputError(f"conformal run: lengths: expected {S} values in 0..{T}, got {lengths!r}")
        t_idx = np.arange(T)[None, :, None]
        h_idx = np.arange(H)[None, None, :]
        valid = valid & (t_idx + h_idx + 1 < lengths[:, None, None])  # the target's bar is in the run
        for name, arr, ok in (("y", y, np.isfinite(y)), ("loc", loc, np.isfinite(loc)),
                              ("scale", scale, np.isfinite(scale) & (scale > 0))):
            bad = valid & ~ok
            if bad.any():
                s, t, h = map(int, np.argwhere(bad)[0])
                raise InputError(f"conformal run: {name}: expected a finite number{' > 0' if name == 'scale' else ''} "
                                 f"where valid, got {float(arr[s, t, h])!r} (key {keys[s]!r}, origin {t}, h{h + 1})")
        st = self._grown(new)
        yv, lv, sv = np.where(valid, y, 0.0), np.where(valid, loc, 0.0), np.where(valid, scale, 1.0)
        p2, lower = pit(yv, lv, sv, self.df)
        # the scores each bar completes: horizon h's target of origin t - 1 - h, at bar t (none before its origin)
        pp, lw, vv = np.zeros((S, T, H)), np.zeros((S, T, H)), np.zeros((S, T, H), bool)
        for h in range(min(H, T - 1)):
            pp[:, h + 1:, h], lw[:, h + 1:, h], vv[:, h + 1:, h] = (a[:, :T - h - 1, h] for a in (p2, lower, valid))
        out = np.empty((S, T, H, K))
        cur = {f: a[rows] for f, a in st.items()}
        # every key steps every bar (a bar past a key's end completes nothing); its state is kept at its end
        ends, kept = np.unique(lengths), {}
        for t in range(T):
            if t in ends:
                kept[t] = {f: a[lengths == t].copy() for f, a in cur.items()}
            cur, _, out[:, t] = _advance(cur, pp[:, t], lw[:, t], vv[:, t], self.config, self.table)
        for t, part in kept.items():
            done = lengths == t
            for f, a in part.items():
                cur[f][done] = a
            out[done, t:] = self._alpha_rows(part)[:, None]
        for f, a in cur.items():
            st[f][rows] = a
        self._commit(new, st)
        return out

    # ---- snapshot / restore -------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, np.ndarray]:
        """The whole state as plain arrays (copies): ``keys`` (str), the :attr:`ConformalConfig.fields` (``alpha``,
        ``issued``, ``seq``; ``agaci``: :data:`AGACI_FIELDS`), and ``config`` (a JSON string:
        :meth:`ConformalConfig.to_dict`)."""
        return {"keys": np.array(list(self._keys), dtype=object), **{f: a.copy() for f, a in self._st.items()},
                "config": json.dumps(self.config.to_dict())}

    def to_arrow(self):
        """The state as an Arrow table, one row per key: ``key`` string, ``seq`` int64, every other state array a
        fixed-size list of its dtype (:meth:`ConformalConfig.dtype`; its per-key shape, row-major); the config in
        the schema metadata."""
        import pyarrow as pa

        cols = {"key": pa.array(list(self._keys), pa.string()), "seq": pa.array(self.seq, pa.int64())}
        for f, shape in self.config.shapes(len(self)).items():
            if f != "seq":
                cols[f] = pa.FixedSizeListArray.from_arrays(pa.array(self._st[f].reshape(-1),
                                                                     pa.from_numpy_dtype(self.config.dtype(f))),
                                                            math.prod(shape[1:]))
        return pa.table(cols).replace_schema_metadata({"streamrnn.conformal": json.dumps(self.config.to_dict())})

    def restore(self, snap) -> None:
        """Replace the state by a :meth:`snapshot` dict or a :meth:`to_arrow` table of the same levels, tails,
        horizons, method and (``agaci``) expert steps (gamma may differ: it is the step, not the state's meaning).
        A bad snapshot raises :class:`~streamrnn.errors.SnapshotError` naming the field; the state is then
        unchanged."""
        fields = self.config.fields
        if isinstance(snap, Mapping):
            cfg, keys = snap.get("config"), snap.get("keys")
            self._check_config(cfg)
            arrays = {f: snap.get(f) for f in fields}
        else:
            meta = (snap.schema.metadata or {}).get(b"streamrnn.conformal")
            cfg = meta.decode() if meta is not None else None
            self._check_config(cfg)  # before the columns: other settings show as other widths there
            names = set(snap.column_names)
            miss = [f for f in ("key", *fields) if f not in names]
            if miss:
                raise SnapshotError(f"conformal restore: {miss[0]}: expected a column, got columns {sorted(names)}")
            S = snap.num_rows
            keys = snap.column("key").to_pylist()
            arrays = {"seq": snap.column("seq").to_numpy()}
            for f, shape in self.config.shapes(S).items():
                if f == "seq":
                    continue
                width = math.prod(shape[1:])
                col = snap.column(f).combine_chunks()
                flat = col.flatten().to_numpy(zero_copy_only=False) if len(col) else np.empty(0)
                if len(flat) != S * width:
                    raise SnapshotError(f"conformal restore: {f}: expected {width} values per key, got "
                                        f"{len(flat) / max(S, 1):g}")
                arrays[f] = flat.reshape(shape)
        if keys is None:
            raise SnapshotError("conformal restore: keys: expected the key names, got none")
        keys = [str(k) for k in keys]
        S = len(keys)
        if len(set(keys)) != S:
            raise SnapshotError("conformal restore: keys: expected distinct keys, got a repeat")
        out = {}
        for f, shape in self.config.shapes(S).items():
            a = arrays.get(f)
            a = None if a is None else np.asarray(a)
            if a is None or a.shape != shape:
                raise SnapshotError(f"conformal restore: {f}: expected shape {shape}, got "
                                    f"{None if a is None else a.shape}")
            out[f] = a.astype(self.config.dtype(f), copy=True)
        absolute = {f: out[f] for f in ("alpha", "issued") if f in out}
        if "dealpha" in out:  # AgACI: deviations from the nominal
            nom = self.config.nominal
            absolute.update(issued=nom + out["dissued"].astype(np.float64),
                            ealpha=nom[:, None] + out["dealpha"].astype(np.float64))
            big = out["ecount"] >= self.config.horizons ** 2
            if big.any():
                raise SnapshotError(f"conformal restore: ecount: expected counts < {self.config.horizons ** 2}, got "
                                    f"{int(out['ecount'][big][0])}")
        for f, a in absolute.items():
            ok = np.isfinite(a) & (a >= STATE_BOUNDS[0]) & (a <= STATE_BOUNDS[1])
            if not ok.all():
                raise SnapshotError(f"conformal restore: {f}: expected values in [{STATE_BOUNDS[0]:g}, "
                                    f"{STATE_BOUNDS[1]:g}], got {float(a[~ok][0])!r}")
        for f in ("regret", "sq", "bound"):
            pos = f in ("sq", "bound")
            if f in out and not (np.isfinite(out[f]).all() and (not pos or (out[f] >= 0).all())):
                bad = out[f][~(np.isfinite(out[f]) & ((out[f] >= 0) | (not pos)))][0]
                want_v = "finite values" + (" >= 0" if pos else "")
                raise SnapshotError(f"conformal restore: {f}: expected {want_v}, got {float(bad)!r}")
        if (out["seq"] < 0).any():
            raise SnapshotError(f"conformal restore: seq: expected counts >= 0, got {int(out['seq'].min())}")
        self._keys = {k: i for i, k in enumerate(keys)}
        self._st = out


    def _check_config(self, cfg) -> None:
        """A snapshot's config (JSON) against this calibrator's: the same horizons, levels, tails and method
        (``agaci``: and expert steps), else :class:`~streamrnn.errors.SnapshotError` naming them."""
        try:
            got = json.loads(cfg) if cfg is not None else None
        except (TypeError, ValueError):
            got = cfg
        want = self.config.to_dict()
        if isinstance(got, dict):
            got = {"method": "aci", **got}  # snapshots from before the method field are ACI's
        for meaning in (("horizons", "levels", "tails"),
                        ("method", "gammas") if self.config.method == "agaci" else ("method",)):
            if not isinstance(got, dict) or any(got.get(k) != want[k] for k in meaning):
                shown = [got.get(k) for k in meaning] if isinstance(got, dict) else got
                raise SnapshotError(f"conformal restore: config: expected {'/'.join(meaning)} "
                                    f"{[want[k] for k in meaning]}, got {shown!r}")


def state_bytes(horizons: int, targets: int, experts: int = 0) -> int:
    """Bytes of one key's state. ACI (``experts`` 0): ``alpha``, ``issued`` (float64) and ``seq`` (int64). AgACI:
    ``seq``, and float32 ``dissued [H, H, K]``, ``dealpha``, ``regret``, ``sq [H, K, E]``, ``bound [H, K]``, and
    ``ecount [H, H, K, E]`` (one byte each up to H = 16)."""
    H, K, E = horizons, targets, experts
    if not E:
        return 8 * (H * K + H * H * K + 1)
    return 8 + 4 * (H * H * K + 3 * H * K * E + H * K) + (1 if H <= 16 else 2) * H * H * K * E


@lru_cache(maxsize=16)
def _edge_table(df: tuple[float, ...]) -> EdgeTable:
    return EdgeTable(df)


def kupiec(n: int, x: int, p: float) -> tuple[float, float]:
    """Kupiec's proportion-of-failures test: LR statistic and its chi2(1) p-value for ``x`` exceedances of a
    ``p`` VaR in ``n`` independent days."""
    if n <= 0:
        return math.nan, math.nan

    def ll(q: float) -> float:
        return (x * math.log(q) if x else 0.0) + ((n - x) * math.log1p(-q) if n - x else 0.0)

    lr = max(0.0, -2.0 * (ll(p) - ll(x / n)))
    return lr, math.erfc(math.sqrt(lr / 2.0))


__all__ = ["ALPHA_MIN", "GAMMA", "GAMMAS", "LEVELS", "METHOD", "METHODS", "STATE_BOUNDS", "TAILS", "ConformalConfig",
           "OnlineConformal", "bands", "boa_weights",
           "issued", "kupiec", "label", "misses", "pit", "state_bytes"]
