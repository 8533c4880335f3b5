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

import numpy as np

from ..errors import InputError, SnapshotError
from .distribution import expected_shortfall, std_quantiles, tail2

GAMMA = 0.01
ALPHA_MIN = 1e-6
STATE_BOUNDS = (-1.0, 2.0)
REFERENCE_ALPHA = 0.2
SCALINGS = ("proportional", "constant")
METHODS = ("aci", "agaci")
METHOD = "aci"
GAMMAS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
LEVELS = (0.5, 0.8, 0.95, 0.99)
TAILS = (0.01, 0.05)
STATE_FIELDS = ("alpha", "issued", "seq")
EXPERT_FIELDS = ("ealpha", "eedge", "regret", "sq", "bound")


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
    method: str = METHOD  # "aci" (one step) or "agaci" (experts at ``gammas``, aggregated online; module doc)
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
        """The state arrays per key: :data:`STATE_FIELDS`, plus :data:`EXPERT_FIELDS` for ``agaci``."""
        return STATE_FIELDS + (EXPERT_FIELDS if self.method == "agaci" else ())

    def shapes(self, n: int) -> dict[str, tuple[int, ...]]:
        """The shape of each state array for ``n`` keys."""
        H, K, E = self.horizons, len(self.nominal), len(self.gammas)
        out = {"alpha": (n, H, K), "issued": (n, H, H, K), "seq": (n,)}
        if self.method == "agaci":
            out.update(ealpha=(n, H, K, E), eedge=(n, H, H, K, E), regret=(n, H, K, E), sq=(n, H, K, E),
                       bound=(n, H, K))
        return out

    def fresh(self, n: int) -> dict[str, np.ndarray]:
        """The state of ``n`` new keys: every ``a`` (and every expert's) at the nominal, no regret."""
        out = {}
        for f, shape in self.shapes(n).items():
            if f == "seq":
                out[f] = np.zeros(shape, np.int64)
            elif f in ("regret", "sq", "bound"):
                out[f] = np.zeros(shape)
            elif f == "eedge":
                out[f] = np.zeros(shape)  # set with the df (OnlineConformal._fresh)
            else:
                nom = self.nominal[:, None] if f == "ealpha" else self.nominal
                out[f] = np.array(np.broadcast_to(nom, shape), np.float64)
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


def _edge(alpha: np.ndarray, two_sided: np.ndarray, df: np.ndarray) -> np.ndarray:
    """The band edge in scale units at miscoverage ``alpha [n, H, K, ...]`` (drawn at the clip): the half-width
    ``t^-1(1 - a/2)`` of a central interval, the quantile ``t^-1(a)`` of a left tail. ``df [H]``."""
    a = issued(alpha)
    ts = two_sided.reshape((1, 1, -1) + (1,) * (a.ndim - 3))
    d = np.broadcast_to(df.reshape((1, -1) + (1,) * (a.ndim - 2)), a.shape)
    return std_quantiles(np.where(ts, 1.0 - 0.5 * a, a), d)


def _advance(st: dict[str, np.ndarray], z: np.ndarray, p2: np.ndarray, lower: np.ndarray, v: np.ndarray,
             cfg: ConformalConfig, df: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One bar of ``n`` keys: the state rows ``st`` (:meth:`ConformalConfig.shapes`) learn the targets whose
    scores (``p2``, ``lower [n, H]``) are ``valid [n, H]`` (horizon ``h``'s from the origin ``h + 1`` bars back,
    whose ``a`` is in the ring at slot ``(seq - 1 - h) % H``), then open this bar's origin. Returns the new
    rows (new arrays) and the misses of the issued (aggregate) bands ``[n, H, K]``. ``z [n, H]``: the outcomes in
    scale units (``agaci``: an expert missed when ``|z|`` is beyond its interval's edge, ``z`` below its VaR's)."""
    n, H = v.shape
    slot = (st["seq"][:, None] - 1 - np.arange(H)[None, :]) % H
    ni, hi = np.arange(n)[:, None], np.arange(H)[None, :]
    a_iss = st["issued"][ni, slot, hi]
    miss = misses(p2, lower, a_iss, cfg.two_sided) & v[..., None]
    out = dict(st)
    if cfg.method == "aci":
        out["alpha"] = _step(st["alpha"], miss, v, cfg)
    else:
        vv = v[..., None, None]
        q_e = st["eedge"][ni, slot, hi]  # [n, H, K, E]: each expert's edge issued at the origin
        ts = cfg.two_sided[:, None]
        emiss = np.where(ts, np.abs(z)[..., None, None] > q_e, z[..., None, None] < q_e) & vv
        ealpha = np.clip(st["ealpha"] + cfg.expert_steps * (cfg.nominal[:, None] - emiss), *STATE_BOUNDS)
        out["ealpha"] = np.where(vv, ealpha, st["ealpha"])
        # BOA with the gradient trick: the pinball loss of the aggregate edge, linearised there
        grad = np.where(cfg.two_sided, cfg.nominal - miss, miss - cfg.nominal)  # d pinball / d edge
        q_a = _edge(a_iss, cfg.two_sided, df)
        r = np.where(vv, grad[..., None] * (q_a[..., None] - q_e), 0.0)  # regret against each expert
        eta = _eta(st["sq"], st["bound"], r.shape[-1])
        out["regret"] = st["regret"] + r - np.where(np.isfinite(eta), eta, 0.0) * r * r
        out["sq"] = st["sq"] + r * r
        out["bound"] = np.maximum(st["bound"], np.abs(r).max(-1))
        w = boa_weights(out["regret"], out["sq"], out["bound"])
        edges = _edge(out["ealpha"], cfg.two_sided, df)
        q = (w * edges).sum(-1)
        p2q, lowq = pit(q, 0.0, 1.0, df[None, :, None])
        agg = np.where(cfg.two_sided, p2q, lowq)
        out["alpha"] = np.where(v[..., None], agg, st["alpha"])
    out["issued"] = st["issued"].copy()
    out["issued"][np.arange(n), st["seq"] % H] = out["alpha"]
    if cfg.method == "agaci":
        out["eedge"] = st["eedge"].copy()
        out["eedge"][np.arange(n), st["seq"] % H] = edges
    out["seq"] = st["seq"] + 1
    return out, miss


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
    logw = logw - logw.max(-1, keepdims=True)
    w = np.exp(logw)
    return w / w.sum(-1, keepdims=True)


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
        self._keys: dict[str, int] = {}
        self._st = self._fresh(0)

    def _fresh(self, n: int) -> dict[str, np.ndarray]:
        """:meth:`ConformalConfig.fresh` with the experts' edges at the nominal ``a`` (``agaci``)."""
        st = self.config.fresh(n)
        if "eedge" in st:
            c = self.config
            nom = np.broadcast_to(c.nominal[:, None], (1, c.horizons, len(c.nominal), len(c.gammas)))
            st["eedge"][:] = _edge(nom, c.two_sided, self.df)[:, None]
        return st

    @property
    def alpha(self) -> np.ndarray:
        """The ``a`` each key's next band is drawn at ``[S, H, K]`` (``agaci``: the aggregate's)."""
        return self._st["alpha"]

    @property
    def issued(self) -> np.ndarray:
        """The ring of the ``a`` issued at the last ``H`` origins ``[S, H, H, K]``."""
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
        z = (z_ok[0] - z_ok[1]) / z_ok[2]
        got, miss = _advance({f: a[rows] for f, a in st.items()}, z, p2, lower, valid_m, self.config, self.df)
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
        alpha = np.concatenate([self.alpha, self._fresh(len(new))["alpha"]])
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
        zz = (yv - lv) / sv
        out = np.empty((S, T, H, K))
        cur = {f: a[rows] for f, a in st.items()}
        for t in range(T):
            live = t < lengths
            o = t - 1 - np.arange(H)  # the origin each horizon's target completes at bar t
            ok = o >= 0
            v = np.zeros((S, H), bool)
            pp, lw, zt = np.zeros((S, H)), np.zeros((S, H)), np.zeros((S, H))
            v[:, ok] = valid[:, o[ok], np.flatnonzero(ok)]
            zt[:, ok] = zz[:, o[ok], np.flatnonzero(ok)]
            pp[:, ok] = p2[:, o[ok], np.flatnonzero(ok)]
            lw[:, ok] = lower[:, o[ok], np.flatnonzero(ok)]
            v &= live[:, None]
            if live.all():
                cur, _ = _advance(cur, zt, pp, lw, v, self.config, self.df)
            else:
                got, _ = _advance({f: a[live] for f, a in cur.items()}, zt[live], pp[live], lw[live], v[live],
                                  self.config, self.df)
                for f, a in got.items():
                    cur[f] = cur[f].copy()
                    cur[f][live] = a
            out[:, t] = cur["alpha"]
        for f, a in cur.items():
            st[f][rows] = a
        self._commit(new, st)
        return out

    # ---- snapshot / restore -------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, np.ndarray]:
        """The whole state as plain arrays (copies): ``keys`` (str), the :attr:`ConformalConfig.fields` (``alpha``,
        ``issued``, ``seq``; ``agaci`` also ``ealpha``, ``eissued``, ``regret``, ``sq``, ``bound``), and ``config``
        (a JSON string: :meth:`ConformalConfig.to_dict`)."""
        return {"keys": np.array(list(self._keys), dtype=object), **{f: a.copy() for f, a in self._st.items()},
                "config": json.dumps(self.config.to_dict())}

    def to_arrow(self):
        """The state as an Arrow table, one row per key: ``key`` string, ``seq`` int64, every other state array a
        fixed-size list of float64 (its per-key shape, row-major); the config in the schema metadata."""
        import pyarrow as pa

        cols = {"key": pa.array(list(self._keys), pa.string()), "seq": pa.array(self.seq, pa.int64())}
        for f, shape in self.config.shapes(len(self)).items():
            if f != "seq":
                cols[f] = pa.FixedSizeListArray.from_arrays(pa.array(self._st[f].reshape(-1)), math.prod(shape[1:]))
        return pa.table(cols).replace_schema_metadata({"streamrnn.conformal": json.dumps(self.config.to_dict())})

    def restore(self, snap) -> None:
        """Replace the state by a :meth:`snapshot` dict or a :meth:`to_arrow` table of the same levels, tails,
        horizons, method and (``agaci``) expert steps (gamma may differ: it is the step, not the state's meaning).
        A bad snapshot raises :class:`~streamrnn.errors.SnapshotError` naming the field; the state is then
        unchanged."""
        fields = self.config.fields
        if isinstance(snap, Mapping):
            cfg, keys = snap.get("config"), snap.get("keys")
            arrays = {f: snap.get(f) for f in fields}
        else:
            meta = (snap.schema.metadata or {}).get(b"streamrnn.conformal")
            cfg = meta.decode() if meta is not None else None
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
            out[f] = a.astype(np.int64 if f == "seq" else np.float64, copy=True)
        for f in ("alpha", "issued", "ealpha"):
            if f not in out:
                continue
            a = out[f]
            ok = np.isfinite(a) & (a >= STATE_BOUNDS[0]) & (a <= STATE_BOUNDS[1])
            if not ok.all():
                raise SnapshotError(f"conformal restore: {f}: expected values in [{STATE_BOUNDS[0]:g}, "
                                    f"{STATE_BOUNDS[1]:g}], got {float(a[~ok][0])!r}")
        for f in ("regret", "eedge", "sq", "bound"):
            pos = f in ("sq", "bound")
            if f in out and not (np.isfinite(out[f]).all() and (not pos or (out[f] >= 0).all())):
                bad = out[f][~(np.isfinite(out[f]) & ((out[f] >= 0) | (not pos)))][0]
                want_v = "finite values" + (" >= 0" if pos else "")
                raise SnapshotError(f"conformal restore: {f}: expected {want_v}, got {float(bad)!r}")
        if (out["seq"] < 0).any():
            raise SnapshotError(f"conformal restore: seq: expected counts >= 0, got {int(out['seq'].min())}")
        self._keys = {k: i for i, k in enumerate(keys)}
        self._st = out


def state_bytes(horizons: int, targets: int, experts: int = 0) -> int:
    """Bytes of one key's state: ``alpha``, ``issued`` (float64) and ``seq`` (int64); with ``experts`` (``agaci``)
    also ``ealpha``, ``eissued``, ``regret``, ``sq`` per expert and ``bound``."""
    H, K, E = horizons, targets, experts
    agg = (H * K * E + H * H * K * E + 2 * H * K * E + H * K) if E else 0
    return 8 * (H * K + H * H * K + 1 + agg)


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
