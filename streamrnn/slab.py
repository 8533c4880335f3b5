"""Per-key state storage of a :class:`~streamrnn.keyed.KeyedOperator`: slots in preallocated slabs.

Every state tensor is one ``[layers, capacity, *tail]`` float32 array; a key owns one
slot (a column). A batch is gathered and scattered with one fancy index per tensor.
Recency is a per-slot tick (no per-key linked list): the least recently used keys are
the smallest ticks, found with one ``argpartition`` when capacity must be freed. The
caller holds the operator's lock; nothing here locks.
"""

from __future__ import annotations

from collections.abc import Hashable

import numpy as np


class SlotStore:
    """Slabs for ``capacity`` keys (grown by doubling up to ``max_keys``)."""

    def __init__(self, state_tail: dict[str, tuple[int, ...]], out_tail: dict[str, tuple[int, ...]] | None,
                 capacity: int, max_keys: int):
        self.state_tail = state_tail
        self.out_tail = out_tail  # None: no last outputs kept
        self.max_keys = max_keys
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
        self.steps, self.seen, self.tick = widen(self.steps, 0), widen(self.seen, 0.0), widen(self.tick, 0)
        self.in_use, self.key_of = widen(self.in_use, False), widen(self.key_of, None)
        self.free.extend(range(cap - 1, old - 1, -1))
        self.cap = cap

    def release(self, slots: np.ndarray) -> None:
        """Drop the keys in ``slots`` (state zeroed, slots freed)."""
        if not len(slots):
            return
        for k in self.key_of[slots].tolist():
            del self.slots[k]
        for a in self.slab.values():
            a[:, slots] = 0.0
        for a in self.last.values():
            a[slots] = np.nan
        self.steps[slots] = 0
        self.in_use[slots] = False
        self.key_of[slots] = None
        self.free.extend(np.asarray(slots).tolist())

    def expire(self, limit: float) -> int:
        """Drop every key last seen before ``limit`` (any position in recency order); returns how many."""
        if not limit > self.min_seen:
            return 0
        old = np.flatnonzero(self.in_use & (self.seen < limit))
        self.release(old)
        self.min_seen = float(self.seen[self.in_use].min()) if self.slots else np.inf
        return len(old)

    def lru_order(self) -> list[Hashable]:
        used = np.flatnonzero(self.in_use)
        return self.key_of[used[np.argsort(self.tick[used], kind="stable")]].tolist()

    def touch(self, slots: np.ndarray, now: float) -> None:
        """Mark ``slots`` most recently used, in their order."""
        self.tick[slots] = np.arange(self.next_tick, self.next_tick + len(slots))
        self.next_tick += len(slots)
        self.seen[slots] = now
        self.min_seen = min(self.min_seen, now)

    def allocate(self, keys: list[Hashable]) -> tuple[np.ndarray, int]:
        """Slots for new ``keys``, evicting least recently used keys past ``max_keys``.

        Returns the slots and how many keys were evicted. The caller must have touched
        the slots of this call's held keys first (so they are never the ones evicted).
        """
        k = len(keys)
        evicted = 0
        if len(self.free) < k and self.cap < self.max_keys:
            self.grow(min(self.max_keys, max(2 * self.cap, self.cap + k - len(self.free), 16)))
        if len(self.free) < k:
            need = k - len(self.free)
            used = np.flatnonzero(self.in_use)
            victims = used[np.argpartition(self.tick[used], need - 1)[:need]] if need < len(used) else used
            self.release(victims)
            evicted = need
        slots = np.array(self.free[len(self.free) - k:][::-1], np.int64)
        del self.free[len(self.free) - k:]
        self.slots.update(zip(keys, slots.tolist(), strict=True))
        self.key_of[slots] = _object_array(keys)
        self.in_use[slots] = True
        return slots, evicted


def _object_array(items: list) -> np.ndarray:
    a = np.empty(len(items), object)
    a[:] = items
    return a
