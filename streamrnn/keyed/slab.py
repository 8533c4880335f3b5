"""Per-key state storage of a :class:`~streamrnn.keyed.operator.KeyedOperator`: slots in preallocated slabs.

Every state tensor is one ``[layers, capacity, *tail]`` float32 array; a key owns one
slot (a column). A batch is gathered and scattered with one fancy index per tensor.
Recency is a per-slot tick (no per-key linked list): the least recently used keys are
the smallest ticks, found with one ``argpartition`` when capacity must be freed. The
caller holds the operator's lock; nothing here locks.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np


class SlotStore:
    """Slabs for ``capacity`` keys (grown by doubling up to ``max_keys``)."""

    def __init__(self, state_tail: dict[str, tuple[int, ...]], out_tail: dict[str, tuple[int, ...]] | None,
                 capacity: int, max_keys: int, health: bool = False):
        self.state_tail = state_tail
        self.out_tail = out_tail  # None: no last outputs kept
        self.max_keys = max_keys
        # per-key health columns (HEALTH_FILL below), and the shadow pool: state of watched keys only
        self.health: dict[str, np.ndarray] = {}
        self.health_fill = dict(HEALTH_FILL) if health else {}
        self.shadow = ShadowPool(state_tail, out_tail or {}) if health else None
        self.cap = 0
        self.slab: dict[str, np.ndarray] = {}
        self.last: dict[str, np.ndarray] = {}
        self.steps = np.zeros(0, np.int64)
        self.seen = np.zeros(0, np.float64)
        self.tick = np.zeros(0, np.int64)
        self.in_use = np.zeros(0, bool)
        self.key_of = np.empty(0, object)
        self.slots: dict[Hashable, int] = {}
        self.free: list[int] = []
        self.next_tick = 0
        self.min_seen = np.inf  # a lower bound of seen[in_use]: nothing older can exist
        self.grow(max(1, min(capacity, max_keys)))

    def grow(self, cap: int) -> None:
        old = self.cap
        if cap <= old:
            return

        def widen(a: np.ndarray, fill, axis: int = 0) -> np.ndarray:
            shape = list(a.shape)
            shape[axis] = cap - old
            return np.concatenate([a, np.full(shape, fill, a.dtype)], axis=axis)

        for n, tail in self.state_tail.items():
            self.slab[n] = widen(self.slab.get(n, np.zeros((tail[0], 0, *tail[1:]), np.float32)), 0.0, axis=1)
        for n, tail in (self.out_tail or {}).items():
            self.last[n] = widen(self.last.get(n, np.zeros((0, *tail), np.float32)), np.nan)
        self.steps, self.seen, self.tick = widen(self.steps, 0), widen(self.seen, -np.inf), widen(self.tick, 0)
        for n, (dtype, fill) in self.health_fill.items():
            self.health[n] = widen(self.health.get(n, np.zeros(0, dtype)), fill)
        self.in_use, self.key_of = widen(self.in_use, False), widen(self.key_of, None)
        self.free.extend(range(cap - 1, old - 1, -1))
        self.cap = cap

    def _drop(self, slots: np.ndarray) -> None:
        """Forget the keys in ``slots`` (state zeroed); the caller decides where the slots go."""
        if not len(slots):
            return
        for k in self.key_of[slots].tolist():
            del self.slots[k]
        for a in self.slab.values():
            a[:, slots] = 0.0
        for a in self.last.values():
            a[slots] = np.nan
        self.steps[slots] = 0
        if self.shadow is not None:
            watch = self.health["shadow_slot"][slots]
            self.shadow.release(watch[watch >= 0])
        for n, (_, fill) in self.health_fill.items():
            self.health[n][slots] = fill
        self.seen[slots] = -np.inf  # a slot's next key starts its own last_seen (touch keeps the max)
        self.in_use[slots] = False
        self.key_of[slots] = None

    def release(self, slots: np.ndarray) -> None:
        """Drop the keys in ``slots`` and free the slots."""
        self._drop(slots)
        self.free.extend(np.asarray(slots).tolist())

    def expire(self, limit: float) -> list[Hashable]:
        """Drop every key last seen before ``limit`` (any position in recency order); returns them."""
        p = self.plan(np.zeros(0, np.int64), 0, limit)
        keys = self.key_of[p.expired].tolist()
        self.apply(p, [])
        return keys

    def expired_slots(self, limit: float | None) -> np.ndarray:
        """Slots of keys last seen before ``limit`` (none for None)."""
        if limit is None or not limit > self.min_seen:
            return np.zeros(0, np.int64)
        return np.flatnonzero(self.in_use & (self.seen < limit))

    def none_expired(self, limit: float) -> bool:
        """Whether no held key was last seen before ``limit`` (tightening ``min_seen`` when so, so that the
        next calls answer without a scan until ``limit`` passes the oldest key)."""
        if not limit > self.min_seen:
            return True
        seen = self.seen[self.in_use]
        oldest = float(seen.min()) if len(seen) else np.inf
        if oldest < limit:
            return False
        self.min_seen = oldest
        return True

    def lru_order(self) -> list[Hashable]:
        used = np.flatnonzero(self.in_use)
        return self.key_of[used[np.argsort(self.tick[used], kind="stable")]].tolist()

    def touch(self, slots: np.ndarray, now: float) -> None:
        """Mark ``slots`` most recently used, in their order; ``last_seen = max(last_seen, now)`` (a clock
        going back never moves a key's expiry earlier)."""
        self.tick[slots] = np.arange(self.next_tick, self.next_tick + len(slots))
        self.next_tick += len(slots)
        self.seen[slots] = np.maximum(self.seen[slots], now)
        self.min_seen = min(self.min_seen, now)

    def touch_one(self, slot: int, now: float) -> None:
        """:meth:`touch` for one slot, with scalar writes."""
        self.tick[slot] = self.next_tick
        self.next_tick += 1
        if not self.seen[slot] >= now:
            self.seen[slot] = now
        if now < self.min_seen:
            self.min_seen = now

    def plan(self, keep: np.ndarray, n_new: int, limit: float | None) -> Plan:
        """Where ``n_new`` new keys will go, without changing anything.

        Keys last seen before ``limit`` expire; then free slots are used, then the slabs
        grow (up to ``max_keys``), then the least recently used keys not in ``keep``
        (this call's held slots) are evicted.
        """
        expired = self.expired_slots(limit)
        from_free = min(n_new, len(self.free))
        pool = self.free[len(self.free) - from_free:][::-1]
        from_expired = min(n_new - len(pool), len(expired))
        pool += expired[:from_expired].tolist()
        grow_to = self.cap
        if len(pool) < n_new and self.cap < self.max_keys:
            grow_to = min(self.max_keys, max(2 * self.cap, self.cap + n_new - len(pool), 16))
        from_grown = min(n_new - len(pool), grow_to - self.cap)
        pool += list(range(self.cap, self.cap + from_grown))
        victims = np.zeros(0, np.int64)
        if len(pool) < n_new:
            need = n_new - len(pool)
            mask = self.in_use.copy()
            mask[expired] = False
            mask[keep] = False
            cand = np.flatnonzero(mask)
            victims = cand[np.argpartition(self.tick[cand], need - 1)[:need]] if need < len(cand) else cand
            pool += victims.tolist()
        return Plan(np.array(pool, np.int64), expired, from_free, from_expired, grow_to, from_grown, victims)

    def apply(self, p: Plan, keys: list[Hashable]) -> None:
        """Carry out a :meth:`plan` made on this unchanged store, giving ``keys`` its new slots."""
        del self.free[len(self.free) - p.from_free:]
        self._drop(p.expired)
        self.free.extend(p.expired[p.from_expired:].tolist())
        if p.grow_to > self.cap:
            old = self.cap
            self.grow(p.grow_to)  # pushes the new slots; take back the ones used
            used = set(range(old, old + p.from_grown))
            self.free = [s for s in self.free if s not in used] if used else self.free
        self._drop(p.victims)
        if len(p.expired):
            self.min_seen = float(self.seen[self.in_use].min()) if self.in_use.any() else np.inf
        if len(p.new_slots):
            self.slots.update(zip(keys, p.new_slots.tolist(), strict=True))
            self.key_of[p.new_slots] = _object_array(keys)
            self.in_use[p.new_slots] = True

    def allocate(self, keys: list[Hashable]) -> np.ndarray:
        """Slots for new ``keys`` (evicting the least recently used past ``max_keys``)."""
        p = self.plan(np.zeros(0, np.int64), len(keys), None)
        self.apply(p, keys)
        return p.new_slots


#: per-key health columns: dtype and the value of a key with no history (see :mod:`streamrnn.keyed.health`);
#: ``shadow_slot`` is the key's row in the :class:`ShadowPool` (-1: not watched)
HEALTH_FILL = {
    "ew_num": (np.float64, 0.0), "ew_den": (np.float64, 0.0),
    "win_steps": (np.int64, 0), "win_pairs": (np.int64, 0),
    "win_carried": (np.float64, 0.0), "win_shadow": (np.float64, 0.0),
    "strikes": (np.int64, 0), "shadow_age": (np.int64, 0), "regime": (np.int64, 0),
    "ratio": (np.float64, np.nan), "last_health": (np.float64, np.nan),
    "shadow_slot": (np.int64, -1),
}


class ShadowPool:
    """State and last output of the fresh "shadow" runs of watched keys: a slab of its own, grown by
    doubling, so that memory follows the watched keys, not all keys."""

    def __init__(self, state_tail: dict[str, tuple[int, ...]], out_tail: dict[str, tuple[int, ...]]):
        self.state_tail, self.out_tail = state_tail, out_tail
        self.cap = 0
        self.slab: dict[str, np.ndarray] = {n: np.zeros((t[0], 0, *t[1:]), np.float32) for n, t in state_tail.items()}
        self.last: dict[str, np.ndarray] = {n: np.zeros((0, *t), np.float32) for n, t in out_tail.items()}
        self.free: list[int] = []

    @property
    def used(self) -> int:
        return self.cap - len(self.free)

    def allocate(self, n: int) -> np.ndarray:
        """``n`` slots holding the initial state (zeros) and no last output (NaN)."""
        if n > len(self.free):
            old, cap = self.cap, max(16, 2 * self.cap, self.cap + n - len(self.free))
            for k, a in self.slab.items():
                self.slab[k] = np.concatenate([a, np.zeros((a.shape[0], cap - old, *a.shape[2:]), np.float32)], 1)
            for k, a in self.last.items():
                self.last[k] = np.concatenate([a, np.full((cap - old, *a.shape[1:]), np.nan, np.float32)])
            self.free.extend(range(cap - 1, old - 1, -1))
            self.cap = cap
        out = np.array(self.free[len(self.free) - n:][::-1], np.int64)
        del self.free[len(self.free) - n:]
        return out

    def release(self, slots: np.ndarray) -> None:
        if not len(slots):
            return
        for a in self.slab.values():
            a[:, slots] = 0.0
        for a in self.last.values():
            a[slots] = np.nan
        self.free.extend(np.asarray(slots).tolist())


@dataclass
class Plan:
    """The outcome of admitting new keys: their slots, and the keys expired / evicted to make room."""

    new_slots: np.ndarray
    expired: np.ndarray
    from_free: int
    from_expired: int
    grow_to: int
    from_grown: int
    victims: np.ndarray


def _object_array(items: list) -> np.ndarray:
    a = np.empty(len(items), object)
    a[:] = items
    return a
