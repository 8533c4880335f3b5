"""Carried-state health (issue 17): does a key's carried (h, c) still serve it better than a fresh state?

Per key, beside its state, the operator keeps plain numeric columns (:data:`streamrnn.keyed.slab.HEALTH_FILL`; a
snapshot carries them as ``health_*`` columns, exactly):

* **online loss** of the carried state, exponentially weighted: every scored event (an event whose token
  the key's previous output had predicted; a key's first event is not scored) adds its loss
  ``l = -logprob`` (nats/byte) as ``num = d * num + a * l``, ``den = d * den + a`` with
  ``a = 1 - 2 ** (-1 / half_life)``, ``d = 1 - a``; the EW loss is ``num / den`` (bias-corrected: exact
  mean of the first events, then forgetting with the half-life).
* **watch rule**: after each call, a key that is not watched becomes watched when its EW loss exceeds
  ``reference * (1 + watch_margin)``; ``reference`` is the model's validation loss
  (``spec.metrics['val_nats_per_char']``). A model without one samples instead: a key is watched for one
  window in every ``sample_every`` (when ``steps // window % sample_every == sample_every - 1``). At most
  ``max_watch`` keys are watched at once.
* **shadow**: a watched key also runs a fresh state (zeros) over its next events, as extra rows of the
  same model calls as the carried states. Over a window of ``window`` shadow steps the carried and shadow
  losses are summed over the events both scored, leaving out the shadow's first ``warmup`` steps (the
  question is whether the shadow state, once it has some context, predicts better than the carried). The
  window closes at the end of the call in which it reached ``window`` steps: a **strike** when the
  carried mean exceeds the shadow's by more than ``margin`` nats/byte. A strike keeps the shadow running
  into the next window (it gains context); no strike ends the watch (the rule above may start a new,
  fresh shadow at once). ``patience`` consecutive strikes **heal** (policy ``heal``): the key's state and
  last output become the shadow's; its last event of that call says ``reset="health"``.
* ``state_health`` of an event: the carried / shadow loss over the current window for a watched key with
  scored pairs, else the EW loss / reference (NaN without a reference); a key is in **bad health** when
  it exceeds ``1 + watch_margin``.

Policies: ``off`` (nothing kept, results as before), ``flag`` (EW loss, ``state_health``, bad-health counts;
no shadow, so nothing runs but a few vector operations), ``heal`` (the shadow, the strikes, the heals).
Only next-token models (task ``lm``) have a loss here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from ..errors import InputError

POLICIES = ("off", "flag", "heal")
HEALTH = "health"  #: ``reset`` of the event after which a key's state was replaced by its shadow's


@dataclass(frozen=True)
class HealthConfig:
    """How a :class:`~streamrnn.keyed.operator.KeyedOperator` watches and heals carried state (see the module doc)."""

    policy: str = "flag"
    half_life: float = 256.0      # events (bytes) of the EW online loss
    window: int = 64              # shadow steps per verdict
    patience: int = 2             # consecutive strikes that heal
    warmup: int = 16              # a fresh shadow's first steps are not compared (it has no context yet)
    margin: float = 0.05          # nats/byte: carried mean above shadow mean by more than this is a strike
    watch_margin: float = 0.15    # watch (and bad health) above reference * (1 + watch_margin)
    reference: float | None = None  # nats/byte; None: the model's val_nats_per_char, else sampling
    sample_every: int = 8         # without a reference: watch one window in this many
    max_watch: int | None = None  # most keys watched at once (None: max_keys // 4, at least 1)

    @property
    def alpha(self) -> float:
        return 1.0 - 2.0 ** (-1.0 / self.half_life)


def resolve(health, model, max_keys: int) -> HealthConfig:
    """The operator's config from ``health=`` (None: ``off``, until flag's cost meets its goal)."""
    if health is None:
        health = "off"
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
    if cfg.policy != "off" and model.spec.task != "lm":
        raise InputError(f"KeyedOperator: health={cfg.policy!r}: expected a next-token model (task 'lm'), "
                         f"got task {model.spec.task!r}; pass health='off'")
    for name, lo in (("half_life", 0.0), ("margin", -math.inf), ("watch_margin", -1.0)):
        v = getattr(cfg, name)
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > lo):
            raise InputError(f"KeyedOperator: health.{name}: expected a finite number > {lo}, got {v!r}")
    for name in ("window", "patience", "sample_every"):
        v = getattr(cfg, name)
        if not (isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1):
            raise InputError(f"KeyedOperator: health.{name}: expected an int >= 1, got {v!r}")
    ref = cfg.reference
    if ref is None:
        ref = (model.spec.metrics or {}).get("val_nats_per_char")
    if ref is not None and not (isinstance(ref, (int, float)) and 0 < ref < math.inf):
        raise InputError(f"KeyedOperator: health.reference: expected a positive number of nats, got {ref!r}")
    mw = cfg.max_watch if cfg.max_watch is not None else max(1, max_keys // 4)
    if not (isinstance(mw, (int, np.integer)) and mw >= 0):
        raise InputError(f"KeyedOperator: health.max_watch: expected an int >= 0, got {mw!r}")
    return replace(cfg, reference=None if ref is None else float(ref), max_watch=int(mw))


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
        v = ~np.isnan(blk)
        k = np.cumsum(v, axis=1)
        inv = d ** -k.astype(np.float64)
        w = np.where(v, inv, 0.0)
        dk = d ** k.astype(np.float64)
        num_out[:, s:s + step] = dk * (num[:, None] + alpha * np.cumsum(w * np.where(v, blk, 0.0), axis=1))
        den_out[:, s:s + step] = dk * (den[:, None] + alpha * np.cumsum(w, axis=1))
        num, den = num_out[:, s + blk.shape[1] - 1], den_out[:, s + blk.shape[1] - 1]
    return num_out, den_out


def ew_one(num0: np.ndarray, den0: np.ndarray, loss: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """:func:`ew_padded` for one event per key (``loss [B]``)."""
    v = ~np.isnan(loss)
    d = 1.0 - alpha
    return (np.where(v, d * num0 + alpha * np.where(v, loss, 0.0), num0), np.where(v, d * den0 + alpha, den0))


def ew_scalar(num0: float, den0: float, loss: float, alpha: float) -> tuple[float, float]:
    """:func:`ew_one` for one key, in Python floats (the same operations, so the same bits)."""
    if loss != loss:  # NaN: not scored
        return num0, den0
    d = 1.0 - alpha
    return d * num0 + alpha * loss, d * den0 + alpha


@dataclass
class Verdict:
    """What one call does to its keys' health (computed before anything changes)."""

    cols: dict[str, np.ndarray]  # new column values of the call's keys [B]
    health: np.ndarray           # state_health of each position [B, T]
    last_health: np.ndarray      # of each key's last event [B]
    heal: np.ndarray             # [B] bool: state becomes the shadow's
    keep_shadow: np.ndarray      # [B] bool: watched, shadow goes on
    release: np.ndarray          # [B] bool: watched, shadow ends (heal included)
    start: np.ndarray            # [B] bool: a new (fresh) shadow starts after this call


def decide(cfg: HealthConfig, cols: dict[str, np.ndarray], lc: np.ndarray, ls: np.ndarray | None,
           counts: np.ndarray, steps_after: np.ndarray, watched: np.ndarray, room: int) -> Verdict:
    """Pure: the next health columns of ``B`` keys from this call's carried losses ``lc [B, T]`` and shadow
    losses ``ls [B, T]`` (NaN: not scored or padding), ``watched [B]`` (a shadow ran), ``room`` new watches."""
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
    heal = np.zeros(B, bool)
    keep = np.zeros(B, bool)
    release = np.zeros(B, bool)
    with np.errstate(invalid="ignore", divide="ignore"):
        health = nump / denp / ref if ref is not None else np.full((B, T), np.nan)
        ew_now = num / den
        if ls is not None and watched.any():
            if T == 1:  # the sums over one position (the cumulative sums below, without their passes)
                pair = watched & ~np.isnan(lc[:, 0]) & ~np.isnan(ls[:, 0]) & (cols["shadow_age"] + 1 > cfg.warmup)
                win_c = np.where(pair, lc[:, 0], 0.0) + cols["win_carried"]
                win_s = np.where(pair, ls[:, 0], 0.0) + cols["win_shadow"]
                win_p = pair + cols["win_pairs"]
                health = np.where((watched & (win_p > 0))[:, None], (win_c / win_s)[:, None], health)
            else:
                age = cols["shadow_age"][:, None] + np.arange(1, T + 1)[None, :]  # shadow steps after each position
                pair = watched[:, None] & ~np.isnan(lc) & ~np.isnan(ls) & (age > cfg.warmup)
                cc = np.cumsum(np.where(pair, lc, 0.0), axis=1) + cols["win_carried"][:, None]
                cs = np.cumsum(np.where(pair, ls, 0.0), axis=1) + cols["win_shadow"][:, None]
                cp = np.cumsum(pair, axis=1) + cols["win_pairs"][:, None]
                health = np.where(watched[:, None] & (cp > 0), cc / cs, health)
                win_c, win_s, win_p = cc[:, -1], cs[:, -1], cp[:, -1]
            win_n = cols["win_steps"] + np.where(watched, counts, 0)
            close = watched & (win_n >= cfg.window)
            if close.any():
                decisive = close & (win_p > 0)
                mc, ms = win_c / win_p, win_s / win_p
                strike = decisive & (mc > ms + cfg.margin)
                strikes = np.where(close, np.where(strike, cols["strikes"] + 1, 0), cols["strikes"])
                new["ratio"] = np.where(decisive, mc / ms, cols["ratio"])
                heal = close & (strikes >= cfg.patience) if cfg.policy == "heal" else np.zeros(B, bool)
                release = close & (heal | ~strike)
                keep = watched & ~release
                new["strikes"] = np.where(heal, 0, strikes)
                new["win_steps"] = np.where(close, 0, win_n)
                new["win_pairs"] = np.where(close, 0, win_p)
                new["win_carried"] = np.where(close, 0.0, win_c)
                new["win_shadow"] = np.where(close, 0.0, win_s)
            else:  # no window closes (most calls): no verdict, the sums go on
                keep = watched
                new["win_steps"], new["win_pairs"], new["win_carried"], new["win_shadow"] = win_n, win_p, win_c, win_s
            new["shadow_age"] = np.where(keep, cols["shadow_age"] + counts, 0)
    start = np.zeros(B, bool)
    if cfg.policy == "heal" and room > 0:
        start = want_watch(cfg, ew_now, steps_after) & ~keep
        idx = np.flatnonzero(start)
        if len(idx) > room:
            start[idx[room:]] = False
        if start.any():  # a new window: the sums start again (strikes too: no strike survives a restart)
            for n in ("win_steps", "win_pairs", "strikes", "shadow_age"):
                new[n] = np.where(start, 0, new[n])
            for n in ("win_carried", "win_shadow"):
                new[n] = np.where(start, 0.0, new[n])
    last_health = health[np.arange(B), counts - 1] if T > 1 else health[:, 0]
    new["last_health"] = last_health
    return Verdict(new, health, last_health, heal, keep, release, start)


def want_watch(cfg: HealthConfig, ew_now: np.ndarray, steps_after: np.ndarray) -> np.ndarray:
    """The watch rule: keys whose EW loss ``ew_now`` exceeds the reference by the watch margin, or without a
    reference, keys whose step count after this call ``steps_after`` falls in the sampled window."""
    if cfg.reference is not None:
        return ew_now > cfg.reference * (1.0 + cfg.watch_margin)
    return (steps_after // cfg.window) % cfg.sample_every == cfg.sample_every - 1


def bad(cfg: HealthConfig, last_health: np.ndarray) -> np.ndarray:
    """Keys in bad health: ``state_health > 1 + watch_margin``."""
    return last_health > 1.0 + cfg.watch_margin
