"""Group one call's events by key and pack the keys into padded batches whose cost follows events.

A call's events form one row per distinct key (that key's events, in order). Running
all rows as one ``[B, T]`` batch costs ``B * max(len)``: one busy key among many quiet
ones makes that ``keys x busiest key``. :func:`pack` instead sorts rows by length and
cuts them into a few groups, each one model call, such that every group's padded volume
stays within ``factor`` of its events (plus a small ``slack`` that keeps tiny groups
merged, since every call has a fixed cost).

>>> import numpy as np
>>> g = group(["a", "b", "a", "c", "a"])
>>> g.keys, g.rows.tolist(), g.cols.tolist(), g.counts.tolist()
(['a', 'b', 'c'], [0, 1, 0, 2, 0], [0, 0, 1, 0, 2], [3, 1, 1])
>>> [len(p) for p in pack(np.array([300] + [1] * 300), factor=1.5, slack=0)]  # the busy key alone
[1, 300]
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import InputError


@dataclass
class Grouping:
    """Events grouped by key: ``keys[r]`` is row r; event i is row ``rows[i]``, step ``cols[i]``."""

    keys: list
    rows: np.ndarray
    cols: np.ndarray
    counts: np.ndarray


def group(keys: Sequence[Hashable]) -> Grouping:
    """Rows in order of first appearance; one dict pass, the rest vectorised."""
    row_of: dict = {}
    try:
        rows = np.fromiter((row_of.setdefault(k, len(row_of)) for k in keys), np.int64, len(keys))
    except TypeError:
        for i, k in enumerate(keys):  # find the unhashable key for the message
            try:
                hash(k)
            except TypeError:
                raise InputError(f"process: keys[{i}]: expected str or bytes, got {type(k).__name__} {k!r}") from None
        raise
    distinct = list(row_of)
    for k in distinct:
        if not isinstance(k, (str, bytes)):
            i = keys.index(k) if isinstance(keys, list) else list(keys).index(k)
            raise InputError(f"process: keys[{i}]: expected str or bytes, got {type(k).__name__} {k!r}")
    counts = np.bincount(rows, minlength=len(distinct))
    order = np.argsort(rows, kind="stable")
    starts = np.cumsum(counts) - counts
    cols = np.empty(len(rows), np.int64)
    cols[order] = np.arange(len(rows)) - np.repeat(starts, counts)
    return Grouping(distinct, rows, cols, counts)


def pack(counts: np.ndarray, *, factor: float = 1.5, slack: int = 256) -> list[np.ndarray]:
    """Split rows (by their event ``counts``) into groups, longest first.

    Each group's padded volume ``len(group) * max(counts[group])`` is at most
    ``factor * events(group) + slack``. One group when the whole call already fits.
    """
    n = len(counts)
    total = int(counts.sum())
    if n * int(counts.max()) <= factor * total + slack:
        return [np.arange(n)]
    order = np.argsort(-counts, kind="stable")
    c = counts[order]
    cum = np.concatenate([[0], np.cumsum(c)])
    groups = []
    i = 0
    while i < n:
        T = c[i]
        j = np.arange(i, n)
        fits = (j - i + 1) * T <= factor * (cum[j + 1] - cum[i]) + slack
        end = i + (int(np.argmin(fits)) if not fits.all() else n - i)
        end = max(end, i + 1)
        groups.append(np.sort(order[i:end]))
        i = end
    return groups
