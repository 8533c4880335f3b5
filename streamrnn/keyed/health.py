"""Carried-state health (issue 17): does a key's carried (h, c) still serve it better than a fresh state?

Per key, beside its state, the operator keeps plain numeric columns (:data:`streamrnn.keyed.slab.HEALTH_FILL`; a
snapshot carries them as ``health_*`` columns, exactly):

* **online loss** of the carried state, exponentially weighted: every scored event (an event whose token
  the key's previous output had predicted; a key's first event is not scored) adds its loss ``l`` (next-token:
  ``-logprob``, nats/char; forecasts: the bar's NLL; see the loss below) as ``num = d * num + a * l``,
  ``den = d * den + a`` with
  ``a = 1 - 2 ** (-1 / half_life)``, ``d = 1 - a``; the EW loss is ``num / den`` (bias-corrected: exact
  mean of the first events, then forgetting with the half-life).
* **watch rule**: after each call, a key that is not watched becomes watched when its EW loss exceeds
  ``reference * (1 + watch_margin)``; ``reference`` is the model's validation loss
  (``spec.metrics['val_nats_per_char']``). A model without one samples instead: a key is watched for one
  window in every ``sample_every`` (when ``steps // window % sample_every == sample_every - 1``). At most
  ``max_watch`` keys are watched at once.
* **shadow**: a watched key also runs a fresh state (zeros) over its next events, as extra rows of the
  same model calls as the carried states. Over a window of ``window`` shadow steps the carried and shadow
  losses are summed over the events both scored, leaving out the shadow's first ``warmup`` steps (default 0:
  the question is whether a reset would have helped, young state included). The window closes at its
  ``window``-th shadow step: a **strike** when the carried mean exceeds the shadow's by more than ``margin``
  nats (per event). A strike keeps the shadow running; no strike ends the watch (the rule above may start a
  new, fresh shadow at once, from the next event).
* **heal** (policy ``heal``): ``patience`` consecutive strikes reset the key's state to the initial state after
  the event that closed the window (its last output is kept: it predicts the next event, as after any
  reset); the shadow goes on as the state the key would have had without the reset. The key is then
  **healing** (column ``regime``): every ``reset_window`` events it compares its state (reset at the window's
  start) with that shadow, and resets again (the shadow again becoming the state without this reset) while
  the shadow's mean loss exceeds its own by more than ``stay_margin``; else it stops healing (the shadow
  ends; the watch rule may start a new one). Why reset rather than take the shadow's state: out of domain a
  young state predicts better than any state with context (docs/operator.md), so the gain is in serving
  young states while that keeps beating not resetting. The first event that runs from a reset state says
  ``reset="health"``. A healing key holds one of the ``max_watch`` watches.
* **splits**: every rule acts at an event, not at a call's end, so a key's verdicts, heals and outputs do
  not depend on how its events are split into calls (one call of 200 events or 200 calls of one; the
  floating-point EW sums may differ in the last bits). A call of several events per key runs the rule
  event by event (:func:`scan`): a heal within the call runs a fresh state over the key's later events of the
  call, and so does a watch that starts after an event, for its shadow (one extra model call for all such
  keys of a round). Only ``max_watch`` makes keys depend on each other: when it binds, which keys
  get a shadow depends on the order of the events of different keys.
* ``state_health`` of an event: the carried / shadow loss over the current window for a watched key with
  scored pairs, else the EW loss / reference (NaN without a reference); a key is in **bad health** when
  it exceeds ``1 + bad_margin`` (0.5: the gauge and the alert count these). The watch starts lower, at
  ``1 + watch_margin`` (0.3): a watch is cheap and its verdict decides, while bad health is what an operator
  is told. On charlm's validation text 6% of the keys are above 1.3 at any time (text varies in difficulty),
  0.1% are above 1.5; on out-of-domain text all of them are (docs/operator.md).

Policies: ``off`` (nothing kept, results as before), ``flag`` (EW loss, ``state_health``, bad-health counts;
no shadow, so nothing runs but a few vector operations), ``heal`` (the shadow, the strikes, the heals). The
default (``health=None``, :func:`default_policy`) is ``flag`` for a next-token model with a reference loss (the
shipped ``charlm``) and ``off`` for any other model: without a reference ``flag`` would only write unknown
``state_health``, and a task without a loss cannot flag at all (an explicit ``"flag"`` there is refused in one
line). ``max_watch`` (default: ``max_keys``, every key may be watched) caps ``heal``'s cost: at most that many
extra rows per call. The watch rule itself keeps the watched keys few while keys are in domain; when most keys
go out of domain at once, a lower cap leaves most of them unhealed (docs/operator.md).

**The loss, per task** (:func:`task_loss`, the one place the operator takes it from): a next-token model's is
``-logprob`` of the event's token under the previous output (nats/char); a forecaster's (task ``forecast`` with a
``training.forecast`` block) is the NLL of the realised bar's % log return under the previous bar's one-bar-ahead
Student-t forecast, the model's own location, the anchored scale recovered from the bar's features
(:func:`streamrnn.forecast.scale.previous_forecast`, the market job's rule) and the first horizon's df (nats/bar;
NaN, not scored, on a jump bar). A forecaster has no default reference: its spec's ``val_nll`` is a mean over
symbols whose level moves with each symbol's volatility (a 4%-sd symbol scores ~1.4 nats above a 1%-sd one
under a perfect forecast), so it would flag volatile keys rather than bad states; it samples its watches
instead (pass ``HealthConfig(reference=...)`` for a fleet of similar keys).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

import numpy as np

from ..errors import InputError
from ..forecast.distribution import nll
from ..forecast.scale import JUMP, previous_forecast

POLICIES = ("off", "flag", "heal")
HEALTH = "health"  #: ``reset`` of the first event a key runs from a state the health rule reset


@dataclass(frozen=True)
class HealthConfig:
    """How a :class:`~streamrnn.keyed.operator.KeyedOperator` watches and heals carried state (see the module doc)."""

    policy: str = "flag"
    half_life: float = 256.0      # events (bytes, bars) of the EW online loss
    window: int = 64              # shadow steps per verdict of a watch
    patience: int = 1             # consecutive strikes that heal
    warmup: int = 0               # a watch's fresh shadow's first steps are not compared
    margin: float = 0.05          # nats/event: carried mean above shadow mean by more than this is a strike
    reset_window: int = 32        # steps per verdict of a healing key (reset again, or stop)
    stay_margin: float = 0.0      # nats/event: a healing key resets again while resetting wins by more than this
    watch_margin: float = 0.3     # watch above reference * (1 + watch_margin)
    bad_margin: float = 0.5       # bad health (the gauge, the alert): state_health above 1 + bad_margin
    reference: float | None = None  # nats/event; None: a next-token model's val_nats_per_char, else sampling
    sample_every: int = 8         # without a reference: watch one window in this many
    max_watch: int | None = None  # most keys watched (or healing) at once (None: max_keys, every key may be)

    @property
    def alpha(self) -> float:
        return 1.0 - 2.0 ** (-1.0 / self.half_life)


def reference_loss(spec: Any) -> Any:
    """A model's own reference loss for ``state_health`` (nats/event), as its spec states it: a next-token model's
    validation ``val_nats_per_char``; None for any other model (module doc: a forecaster's ``val_nll`` is no
    reference)."""
    return (spec.metrics or {}).get("val_nats_per_char") if spec.task == "lm" else None


def _valid_reference(ref: Any) -> bool:
    return isinstance(ref, (int, float)) and not isinstance(ref, bool) and 0 < ref < math.inf


def default_policy(spec: Any) -> str:
    """The policy of ``health=None`` (the default): ``flag`` where it can judge a key's state by itself, a
    next-token model with a reference loss (:func:`reference_loss`; the shipped ``charlm``), else ``off``. Under
    ``flag`` a model without a reference (a forecaster, an LM without ``val_nats_per_char``) would only write
    unknown (NaN) ``state_health`` and count no key in bad health; a model of another task has no loss at all
    (:func:`task_loss`)."""
    return "flag" if _valid_reference(reference_loss(spec)) else "off"


def policy_of(health: Any, spec: Any) -> str:
    """The policy name that ``health=`` (None, a name or a :class:`HealthConfig`) means for a model of ``spec``."""
    if health is None:
        return default_policy(spec)
    return health.policy if isinstance(health, HealthConfig) else health


def resolve(health, model, max_keys: int) -> HealthConfig:
    """The operator's config from ``health=`` (None: :func:`default_policy`, ``flag`` for a next-token model with a
    reference loss, else ``off``)."""
    if health is None:
        health = default_policy(model.spec)
    if isinstance(health, str):
        if health not in POLICIES:
            raise InputError(f"KeyedOperator: health: expected one of {', '.join(POLICIES)}, got {health!r}")
        cfg = HealthConfig(policy=health)
    elif isinstance(health, HealthConfig):
        cfg = health
        if cfg.policy not in POLICIES:
            raise InputError(f"KeyedOperator: health.policy: expected one of {', '.join(POLICIES)}, "
                             f"got {cfg.policy!r}")
    else:
        raise InputError(f"KeyedOperator: health: expected 'off', 'flag', 'heal' or a HealthConfig, "
                         f"got {type(health).__name__}")
    if cfg.policy != "off":
        task_loss(model.spec, f"health={cfg.policy!r}")  # a task without a loss: one line, here
    for name, lo in (("half_life", 0.0), ("margin", -math.inf), ("watch_margin", -1.0), ("bad_margin", -1.0),
                     ("stay_margin", -math.inf)):
        v = getattr(cfg, name)
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > lo):
            raise InputError(f"KeyedOperator: health.{name}: expected a finite number > {lo}, got {v!r}")
    for name in ("window", "patience", "sample_every", "reset_window"):
        v = getattr(cfg, name)
        if not (isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1):
            raise InputError(f"KeyedOperator: health.{name}: expected an int >= 1, got {v!r}")
    ref = cfg.reference if cfg.reference is not None else reference_loss(model.spec)
    if cfg.policy == "off" and not _valid_reference(ref):  # unused: a spec's odd metric does not stop the operator
        ref = None
    if ref is not None and not _valid_reference(ref):
        raise InputError(f"KeyedOperator: health.reference: expected a positive number of nats, got {ref!r}")
    mw = cfg.max_watch if cfg.max_watch is not None else max_keys
    if not (isinstance(mw, (int, np.integer)) and not isinstance(mw, bool) and mw >= 0):
        raise InputError(f"KeyedOperator: health.max_watch: expected an int >= 0, got {mw!r}")
    return replace(cfg, reference=None if ref is None else float(ref), max_watch=int(mw))


#: a task's loss: ``loss(outputs, at, x)``, each event's loss ``[n]`` (float64 nats; NaN: not scored) from the
#: prediction ``{name: outputs[name][at]}`` made before it (``at`` a tuple of index arrays, e.g. ``(slots,)`` of the
#: store's last outputs, or ``(rows, cols)`` of a call's ``[B, T, ...]`` outputs) and the event's input ``x [n, ...]``
Loss = Callable[[Mapping[str, np.ndarray], tuple, np.ndarray], np.ndarray]


def lm_loss(outputs: Mapping[str, np.ndarray], at: tuple, x: np.ndarray) -> np.ndarray:
    """A next-token model's loss: ``-logprob`` of the token (nats/char)."""
    lp = outputs["logprobs"]
    if len(at) == 1 and lp.ndim == 2 and lp.flags.c_contiguous:  # rows of a [n, V] array: one flat take
        return np.negative(lp.reshape(-1).take(at[0] * lp.shape[1] + x), dtype=np.float64)
    return -lp[(*at, x)].astype(np.float64)


@dataclass(frozen=True)
class ForecastLoss:
    """A forecaster's loss: the NLL of the bar's realised % log return under the previous bar's one-bar-ahead
    Student-t forecast (module doc); NaN on a jump bar (never a target) and where no forecast came before."""

    df: float
    anchor: bool
    lam: float

    def __call__(self, outputs: Mapping[str, np.ndarray], at: tuple, x: np.ndarray) -> np.ndarray:
        ret, loc, log_scale = previous_forecast(x, outputs["mean"][(*at, 0)], outputs["log_scale"][(*at, 0)],
                                                anchor=self.anchor, lam=self.lam)
        with np.errstate(invalid="ignore", over="ignore"):
            out = nll(ret, loc, np.exp(log_scale), self.df)
        return np.where(np.asarray(x)[:, JUMP] > 0.5, np.nan, out)


def task_loss(spec: Any, what: str = "health") -> Loss:
    """The health loss of a model of this spec (module doc); InputError (one line) for a task without one."""
    if spec.task == "lm":
        return lm_loss
    meta = (spec.training or {}).get("forecast") if spec.task == "forecast" else None
    if isinstance(meta, Mapping) and meta.get("df"):
        feats = dict(meta.get("features") or {})
        return ForecastLoss(float(meta["df"][0]), bool(feats.get("anchor", False)), float(feats.get("lam", 0.94)))
    raise InputError(f"KeyedOperator: {what}: expected a next-token model (task 'lm') or a forecaster (task "
                     f"'forecast' with training.forecast), got task {spec.task!r}"
                     f"{' without training.forecast' if spec.task == 'forecast' else ''}; pass health='off'")


def ew_padded(num0: np.ndarray, den0: np.ndarray, loss: np.ndarray, alpha: float,
              half_life: float) -> tuple[np.ndarray, np.ndarray]:
    """EW numerator and denominator after each position of ``loss [B, T]`` (NaN: not scored, no change).

    The sequential recursion ``num = d*num + a*l`` in closed form per block of columns:
    ``num_t = d**k_t * (num0 + sum_{j<=t} a * l_j * d**-k_j)`` with ``k`` the scored events so far
    (blocks keep ``d**-k`` far from overflow)."""
    B, T = loss.shape
    d = 1.0 - alpha
    num_out = np.empty((B, T), np.float64)
    den_out = np.empty((B, T), np.float64)
    num, den = num0.astype(np.float64), den0.astype(np.float64)
    step = max(1, int(half_life * 400))
    for s in range(0, T, step):
        blk = loss[:, s:s + step]
        inv_k, d_k = _powers(d, blk.shape[1])
        v = ~np.isnan(blk)
        if v.all():  # every event scored (most calls): k = 1, 2, ... in every row, the same numbers as below
            inv, dk = inv_k[1:], d_k[1:]
            num_out[:, s:s + step] = dk * (num[:, None] + alpha * np.cumsum(inv * blk, axis=1))
            den_out[:, s:s + step] = dk * (den[:, None] + alpha * np.cumsum(inv))
        else:
            k = np.cumsum(v, axis=1)
            w = np.where(v, inv_k[k], 0.0)
            dk = d_k[k]
            num_out[:, s:s + step] = dk * (num[:, None] + alpha * np.cumsum(w * np.where(v, blk, 0.0), axis=1))
            den_out[:, s:s + step] = dk * (den[:, None] + alpha * np.cumsum(w, axis=1))
        num, den = num_out[:, s + blk.shape[1] - 1], den_out[:, s + blk.shape[1] - 1]
    return num_out, den_out


@lru_cache(maxsize=64)
def _powers(d: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``d ** -k`` and ``d ** k`` for ``k = 0 .. n`` (float64, read-only): :func:`ew_padded`'s weights, computed
    once per block width instead of per call."""
    k = np.arange(n + 1, dtype=np.float64)
    inv, dk = d ** -k, d ** k
    inv.flags.writeable = dk.flags.writeable = False
    return inv, dk


def ew_one(num0: np.ndarray, den0: np.ndarray, loss: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """:func:`ew_padded` for one event per key (``loss [B]``)."""
    d = 1.0 - alpha
    if not np.isnan(loss.sum()):  # every event scored (most calls): the same numbers, without the masks
        return d * num0 + alpha * loss, d * den0 + alpha
    v = ~np.isnan(loss)
    return (np.where(v, d * num0 + alpha * np.where(v, loss, 0.0), num0), np.where(v, d * den0 + alpha, den0))


#: run numbers of one call (:class:`Verdict`): the key's carried state, the shadow that ran from the call's
#: start; fresh runs started within the call (a watch's shadow, or a healing key's reset state) are 2, 3, ...
CARRIED, SHADOW = 0, 1
#: :attr:`Verdict.shadow` of a key that is not watched after the call, and of one whose fresh shadow starts with
#: its next event (the watch began at the call's last event)
UNWATCHED, NEXT = -1, -2


@dataclass
class Verdict:
    """What one call does to its keys' health (computed before anything changes).

    Runs: :data:`CARRIED` (the key's state through the call), :data:`SHADOW` (the shadow it had when the call
    began), 2, 3, ... (fresh runs that the call started after an event over the key's next events, as extra
    rows: a watch's shadow, or the reset state of a heal)."""

    cols: dict[str, np.ndarray]  # new column values of the call's keys [B]
    health: np.ndarray           # state_health of each position [B, T]
    last_health: np.ndarray      # of each key's last event [B]
    carried: np.ndarray          # [B] int: the run whose state and last output the key carries after the call
    shadow: np.ndarray           # [B] int: the run its shadow goes on as (UNWATCHED, NEXT, or a run)
    heals: list[tuple[int, int, int]]  # (key row, column, run): the state was reset after that column; the
    #                                    key's later events of the call are run's (NEXT: none in this call)
    zero: np.ndarray             # [B] bool: the state is reset after the call's last event (last output kept)
    marks: np.ndarray            # [B, T] bool: events that ran from a state reset by health (reset="health")

    @property
    def heal(self) -> np.ndarray:
        """[B] bool: keys healed (their state reset) in the call."""
        out = np.zeros(len(self.carried), bool)
        out[[b for b, _, _ in self.heals]] = True
        return out


def decide(cfg: HealthConfig, cols: dict[str, np.ndarray], lc: np.ndarray, ls: np.ndarray | None,
           counts: np.ndarray, steps_after: np.ndarray, watched: np.ndarray, room: int) -> Verdict:
    """Pure: the next health columns of ``B`` keys from this call's carried losses ``lc [B, T]`` and shadow
    losses ``ls [B, 1]`` (NaN: not scored or padding), ``watched [B]`` (a shadow ran), ``room`` free watches.

    Vectorised over keys, for calls where no rule can act before a key's last event: one event per key
    (``T == 1``), or no shadow (``flag``, or no key watched and none that may start). Everything else goes
    through :func:`scan`, event by event; both give what calls of one event each give."""
    B, T = lc.shape
    if T == 1:
        num, den = ew_one(cols["ew_num"], cols["ew_den"], lc[:, 0], cfg.alpha)
        nump, denp = num[:, None], den[:, None]
    else:
        nump, denp = ew_padded(cols["ew_num"], cols["ew_den"], lc, cfg.alpha, cfg.half_life)
        last = counts - 1
        num, den = nump[np.arange(B), last], denp[np.arange(B), last]
    ref = cfg.reference
    new = dict(cols)
    new["ew_num"], new["ew_den"] = num, den
    carried = np.zeros(B, np.int64)
    shadow = np.full(B, UNWATCHED, np.int64)
    zero = keep = release = np.zeros(B, bool)
    marks = np.zeros((B, T), bool)
    with np.errstate(invalid="ignore", divide="ignore"):
        health = nump / denp / ref if ref is not None else np.full((B, T), np.nan)
        ew_now = num / den
        if ls is not None and watched.any():
            if T != 1:
                raise ValueError("decide: a watched key over more than one event: use scan")
            rg = watched & (cols["regime"] != 0)  # healing keys: carried = the reset state, shadow = no reset
            marks = (rg & (cols["shadow_age"] == 0))[:, None]
            pair = watched & ~np.isnan(lc[:, 0]) & ~np.isnan(ls[:, 0]) & (rg | (cols["shadow_age"] + 1 > cfg.warmup))
            win_c = np.where(pair, lc[:, 0], 0.0) + cols["win_carried"]
            win_s = np.where(pair, ls[:, 0], 0.0) + cols["win_shadow"]
            win_p = pair + cols["win_pairs"]
            health = np.where((watched & (win_p > 0))[:, None], (win_c / win_s)[:, None], health)
            win_n = cols["win_steps"] + watched
            close = watched & (win_n >= np.where(rg, cfg.reset_window, cfg.window))
            if close.any():
                decisive = close & (win_p > 0)
                mc, ms = win_c / win_p, win_s / win_p
                strike = decisive & ~rg & (mc > ms + cfg.margin)       # a watch: the fresh shadow does better
                again = decisive & rg & (ms > mc + cfg.stay_margin)    # healing: the reset state does better
                strikes = np.where(close & ~rg, np.where(strike, cols["strikes"] + 1, 0), cols["strikes"])
                new["ratio"] = np.where(decisive, mc / ms, cols["ratio"])
                heal = close & ~rg & (strikes >= cfg.patience) if cfg.policy == "heal" else np.zeros(B, bool)
                zero = heal | again
                release = close & np.where(rg, ~again, ~heal & ~strike)
                keep = watched & ~release
                new["strikes"] = np.where(heal, 0, strikes)
                new["regime"] = np.where(heal, 1, np.where(release, 0, cols["regime"]))
                new["win_steps"] = np.where(close, 0, win_n)
                new["win_pairs"] = np.where(close, 0, win_p)
                new["win_carried"] = np.where(close, 0.0, win_c)
                new["win_shadow"] = np.where(close, 0.0, win_s)
            else:  # no window closes (most calls): no verdict, the sums go on
                keep = watched
                new["win_steps"], new["win_pairs"], new["win_carried"], new["win_shadow"] = win_n, win_p, win_c, win_s
            new["shadow_age"] = np.where(keep & ~zero, cols["shadow_age"] + 1, 0)
            shadow[keep] = SHADOW
            shadow[zero] = CARRIED  # the shadow goes on as the state that was not reset
    room += int(np.count_nonzero(release))  # a released shadow's slot serves a new watch at once
    if cfg.policy == "heal" and room > 0:
        start = want_watch(cfg, ew_now, steps_after) & ~keep
        idx = np.flatnonzero(start)
        if len(idx) > room:
            start[idx[room:]] = False
        if start.any():  # a new window: the sums start again (strikes too: no strike survives a restart)
            for n in ("win_steps", "win_pairs", "strikes", "shadow_age", "regime"):
                new[n] = np.where(start, 0, new[n])
            for n in ("win_carried", "win_shadow"):
                new[n] = np.where(start, 0.0, new[n])
            shadow[start] = NEXT
    last_health = health[np.arange(B), counts - 1] if T > 1 else health[:, 0]
    new["last_health"] = last_health
    heals = [(int(b), int(counts[b]) - 1, NEXT) for b in np.flatnonzero(zero)]
    return Verdict(new, health, last_health, carried, shadow, heals, zero, marks)


#: ``fresh(requests)`` of :func:`scan`: for each ``(key row, column, run)``, the losses ``[T]`` of a fresh run
#: started after that column over the key's later events (NaN up to and including its first event)
FreshRuns = Callable[[list[tuple[int, int, int]]], list[np.ndarray]]


def scan(cfg: HealthConfig, cols: dict[str, np.ndarray], lc: np.ndarray, ls: np.ndarray | None,
         counts: np.ndarray, steps_before: np.ndarray, watched: np.ndarray, room: int, fresh: FreshRuns) -> Verdict:
    """The rule event by event over a call of several events per key (policy ``heal``): a window closes at its
    last step wherever that falls in the call, a heal resets the key's state after that event (its later events
    of the call are a fresh run's, and its shadow goes on as the state that was not reset), and a watch that
    starts after an event runs a fresh shadow over the key's later events of the call (``fresh`` runs the
    fresh runs, batched over keys). So a key's verdicts, heals and outputs do not depend on how its events are
    split into calls.

    Keys that are not watched and whose EW loss (:func:`want_watch`) asks for no watch anywhere in the call
    take :func:`decide`'s vectorised update; the others are stepped in Python, a few microseconds an event."""
    B, T = lc.shape
    nump, denp = ew_padded(cols["ew_num"], cols["ew_den"], lc, cfg.alpha, cfg.half_life)
    cand = np.zeros(B, bool)
    if cfg.policy == "heal" and (room > 0 or watched.any()):
        with np.errstate(invalid="ignore", divide="ignore"):
            want = want_watch(cfg, nump / denp, steps_before[:, None] + np.arange(1, T + 1)[None, :])
        cand = (want & (np.arange(T)[None, :] < counts[:, None])).any(axis=1)
    active = np.flatnonzero(watched | cand)
    v = decide(cfg, cols, lc, None, counts, steps_before + counts, np.zeros(B, bool), 0)
    if not len(active):
        return v
    box = [room]
    gens, results, asks = {}, {}, []
    for b in active.tolist():
        c = {n: a[b] for n, a in cols.items()}
        gens[b] = _key_scan(cfg, c, lc[b], None if ls is None else ls[b], int(counts[b]), int(steps_before[b]),
                            bool(watched[b]), box)
        _advance(gens, results, asks, b, None)
    while asks:
        todo, asks = asks, []
        for (b, _, _), loss in zip(todo, fresh(todo), strict=True):
            _advance(gens, results, asks, b, loss)
    for b, (c, health, carried, shadow, heals, zero, marks) in results.items():
        for n, val in c.items():
            v.cols[n][b] = val
        v.health[b, :len(health)] = health
        v.marks[b, :len(marks)] = marks
        v.last_health[b] = health[-1]
        v.carried[b], v.shadow[b], v.zero[b] = carried, shadow, zero
        v.heals += [(b, t, r) for t, r in heals]
    return v


def _advance(gens: dict, results: dict, asks: list, b: int, value: Any) -> None:
    """Run key ``b``'s scan to its next request for a fresh run (queued in ``asks``) or to its end."""
    try:
        t, run = gens[b].send(value)
        asks.append((b, t, run))
    except StopIteration as e:
        results[b] = e.value
        del gens[b]


def _key_scan(cfg: HealthConfig, c: dict, lc: np.ndarray, ls: np.ndarray | None, n: int, steps_before: int,
              watched: bool, room: list[int]) -> Generator[tuple[int, int], np.ndarray, tuple]:
    """One key's rule over its ``n`` events of a call, in the operations (and so the bits) of ``n`` calls of one
    event through :func:`decide`. Yields ``(column, run)`` to ask for a fresh run after that column (and
    receives its losses); returns the key's new columns, per-event health, final carried and shadow runs,
    heals, whether the state is reset after the last event, and the events that ran from a reset state.
    ``room`` is the call's shared count of free watches."""
    alpha, ref = cfg.alpha, cfg.reference
    d = 1.0 - alpha
    heal_policy = cfg.policy == "heal"
    num, den = float(c["ew_num"]), float(c["ew_den"])
    ws, wp, wc, wsh = int(c["win_steps"]), int(c["win_pairs"]), float(c["win_carried"]), float(c["win_shadow"])
    strikes, age, ratio, regime = int(c["strikes"]), int(c["shadow_age"]), float(c["ratio"]), int(c["regime"])
    losses: dict[int, np.ndarray | None] = {CARRIED: lc, SHADOW: ls}
    carried, shadow, next_run = CARRIED, SHADOW if watched else UNWATCHED, SHADOW + 1
    health = np.empty(n)
    marks = np.zeros(n, bool)
    heals: list[tuple[int, int]] = []
    zero = False
    for t in range(n):
        just_reset = shadow >= 0 and regime and age == 0
        if just_reset:  # the first event from a reset state: predicted by the output before the reset, the shadow's
            marks[t] = True
            lcar = float(losses[shadow][t])
        else:
            lcar = float(losses[carried][t])
        if lcar == lcar:  # scored (as ew_one)
            num, den = d * num + alpha * lcar, d * den + alpha
        ew_now = num / den if den != 0 else math.nan
        h = ew_now / ref if ref is not None else math.nan
        if shadow >= 0:
            lsh = float(losses[shadow][t])
            age += 1
            ws += 1
            if lcar == lcar and lsh == lsh and (regime or age > cfg.warmup):
                wp += 1
                wc += lcar
                wsh += lsh
            if wp > 0:
                h = wc / wsh if wsh != 0 else math.copysign(math.inf, wc) if wc else math.nan
            if ws >= (cfg.reset_window if regime else cfg.window):
                strike = again = False
                if wp > 0:
                    mc, ms = wc / wp, wsh / wp
                    if regime:
                        again = ms > mc + cfg.stay_margin
                    else:
                        strike = mc > ms + cfg.margin
                    ratio = mc / ms if ms != 0 else (math.copysign(math.inf, mc) if mc else math.nan)
                if not regime:
                    strikes = strikes + 1 if strike else 0
                ws = wp = 0
                wc = wsh = 0.0
                healed = not regime and heal_policy and strikes >= cfg.patience
                if healed or again:  # reset the state after this event; the shadow goes on without the reset
                    strikes, regime, age = 0, 1, 0
                    shadow = carried
                    if t < n - 1:
                        heals.append((t, next_run))
                        losses[next_run] = yield t, next_run
                        carried, next_run = next_run, next_run + 1
                    else:
                        heals.append((t, NEXT))
                        zero = True
                elif regime or not strike:
                    shadow, age, regime = UNWATCHED, 0, 0
                    room[0] += 1
        health[t] = h
        if (shadow == UNWATCHED and heal_policy and room[0] > 0
                and want_watch(cfg, ew_now, steps_before + t + 1)):
            ws = wp = strikes = age = regime = 0
            wc = wsh = 0.0
            room[0] -= 1
            if t < n - 1:
                losses[next_run] = yield t, next_run
                shadow, next_run = next_run, next_run + 1
            else:
                shadow = NEXT
    new = {"ew_num": num, "ew_den": den, "win_steps": ws, "win_pairs": wp, "win_carried": wc, "win_shadow": wsh,
           "strikes": strikes, "shadow_age": age if shadow != NEXT else 0, "ratio": ratio, "regime": regime,
           "last_health": health[-1]}
    return new, health, carried, shadow, heals, zero, marks


def want_watch(cfg: HealthConfig, ew_now: np.ndarray, steps_after: np.ndarray) -> np.ndarray:
    """The watch rule: keys whose EW loss ``ew_now`` exceeds the reference by the watch margin, or without a
    reference, keys whose step count after this call ``steps_after`` falls in the sampled window."""
    if cfg.reference is not None:
        return ew_now > cfg.reference * (1.0 + cfg.watch_margin)
    return (steps_after // cfg.window) % cfg.sample_every == cfg.sample_every - 1


def bad(cfg: HealthConfig, last_health: np.ndarray) -> np.ndarray:
    """Keys in bad health: ``state_health > 1 + bad_margin``."""
    return last_health > 1.0 + cfg.bad_margin
