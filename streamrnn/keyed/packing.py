"""Group one call's events by key and pack the keys into padded batches whose cost follows events.

A call's events form one row per distinct key (that key's events, in order). Running
all rows as one ``[B, T]`` batch costs ``B * max(len)``: one busy key among many quiet
ones makes that ``keys x busiest key``. :func:`pack` instead sorts rows by length and
cuts them into a few groups, each one model call, minimising a cost model of padded
rows plus a fixed cost per sequential step.

>>> import numpy as np
>>> g = group(["a", "b", "a", "c", "a"])
>>> g.keys, g.rows.tolist(), g.cols.tolist(), g.counts.tolist()
(['a', 'b', 'c'], [0, 1, 0, 2, 0], [0, 0, 1, 0, 2], [3, 1, 1])
>>> [len(p) for p in pack(np.array([300] + [1] * 300))]  # the busy key alone
[1, 300]
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import InputError


@dataclass
class Grouping:
    """Events grouped by key: ``keys[r]`` is row r; event i is row ``rows[i]``, step ``cols[i]``."""

    keys: list
    rows: np.ndarray
    cols: np.ndarray
    counts: np.ndarray


def group(keys: Sequence[Hashable]) -> Grouping:
    """Rows in order of first appearance; C-speed passes (dict, map), the rest vectorised."""
    n = len(keys)
    try:
        first = dict.fromkeys(keys)
    except TypeError:
        first = None
    if first is None or not set(map(type, first)) <= {str, bytes}:
        _check_keys(keys)  # raises for the first key that is not a str or bytes (subclasses are fine)
    distinct = list(first)
    if len(distinct) == n:  # every key once: rows are the events
        return Grouping(distinct, np.arange(n), np.zeros(n, np.int64), np.ones(n, np.int64))
    index = {k: i for i, k in enumerate(distinct)}
    rows = np.fromiter(map(index.__getitem__, keys), np.int64, n)
    counts = np.bincount(rows, minlength=len(distinct))
    order = np.argsort(rows, kind="stable")
    starts = np.cumsum(counts) - counts
    cols = np.empty(n, np.int64)
    cols[order] = np.arange(n) - np.repeat(starts, counts)
    return Grouping(distinct, rows, cols, counts)


def _check_keys(keys: Sequence[Hashable]) -> None:
    for i, k in enumerate(keys):
        if not isinstance(k, (str, bytes)):
            raise InputError(f"process: keys[{i}]: expected str or bytes, got {type(k).__name__} {k!r}")


def pack(counts: np.ndarray, *, step_cost: float = 4.0) -> list[np.ndarray]:
    """Split rows (by their event ``counts``) into groups, one model call each, longest rows first.

    A group of B rows padded to T steps is costed ``T * (step_cost + B)`` key-steps:
    every step of a call has a fixed cost (``step_cost``, in units of one key-step, the
    latency of the recurrence at batch 1) plus one per padded row. The split minimising
    the total is found exactly by dynamic programming over the distinct counts (rows of
    equal length never gain from being split apart), so it is cheap: at most about
    ``sqrt(2 * events)`` distinct counts. ``step_cost=inf`` gives one padded call.
    """
    n = len(counts)
    c_max, c_min = int(counts.max()), int(counts.min())
    if c_max == c_min or not np.isfinite(step_cost):
        return [np.arange(n)]
    order = np.argsort(-counts, kind="stable")
    vals, first, mult = np.unique(-counts[order], return_index=True, return_counts=True)
    u = -vals.astype(np.float64)  # distinct counts, descending
    m = len(u)
    cum = np.concatenate([[0], np.cumsum(mult)]).astype(np.float64)
    best = np.empty(m + 1)
    best[0] = 0.0
    cut = np.zeros(m + 1, np.int64)
    for j in range(1, m + 1):  # best[j]: rows of the first j distinct counts, last group starting at i
        cand = best[:j] + u[:j] * (step_cost + cum[j] - cum[:j])
        i = int(np.argmin(cand))
        best[j], cut[j] = cand[i], i
    bounds = []
    j = m
    while j > 0:
        bounds.append((cut[j], j))
        j = cut[j]
    return [np.sort(order[first[i]:first[j - 1] + mult[j - 1]]) for i, j in reversed(bounds)]
