"""All-or-nothing state changes: a failed process/restore/expire changes nothing; keys and clocks."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from conftest import FakeClock

from streamrnn import InputError, KeyedOperator, NextTokenOperator, SnapshotError, StateError


def _everything(op: KeyedOperator) -> tuple:
    """All observable state: snapshot (incl. recency order), counters."""
    return op.snapshot(), op.keys(), len(op), (op.evictions.ttl, op.evictions.capacity, op.evictions.explicit)


def _assert_same(before: tuple, after: tuple) -> None:
    assert after[0].equals(before[0], check_metadata=True)
    assert after[1:] == before[1:]


class Boom(RuntimeError):
    pass


def _fail_on_call(monkeypatch, model, n: int) -> list[int]:
    """Make the model's n-th run (1-based) from now raise, like an ORT failure mid-process."""
    real = model.run_unchecked
    calls = [0]

    def run(*a, **kw):
        calls[0] += 1
        if calls[0] == n:
            raise Boom("injected ONNX Runtime failure")
        return real(*a, **kw)

    monkeypatch.setattr(model, "run_unchecked", run)
    return calls


def test_failed_process_evicts_nothing(lstm, monkeypatch):
    """max_keys=2 holding a and b: a failing process(['c']) must not evict a (it did before)."""
    clock = FakeClock()
    op = KeyedOperator(lstm, max_keys=2, clock=clock, keep_last_output=True)
    op.process(["a"], [1])
    clock.advance(1)
    op.process(["b", "b"], [2, 3])
    before = _everything(op)
    _fail_on_call(monkeypatch, lstm, 1)
    with pytest.raises(Boom):
        op.process(["c"], [4])
    _assert_same(before, _everything(op))
    monkeypatch.undo()
    r = op.process(["c"], [4])  # works afterwards, and now evicts the LRU key a
    assert r.fresh.tolist() == [True] and op.keys() == ["b", "c"] and op.evictions.capacity == 1


def test_failure_in_a_later_packed_call_changes_nothing(lstm, monkeypatch, rng):
    """A skewed call runs as several packed model calls; a failure in the 2nd leaves the 1st uncommitted."""
    clock = FakeClock()
    op = KeyedOperator(lstm, max_keys=50, ttl=10.0, clock=clock, pack_step_cost=0.0)
    op.process(["old"], [1])
    clock.advance(20)  # "old" is now past its TTL: expiring it is part of the next process
    op_keys = ["busy"] * 40 + [f"k{i}" for i in range(30)]
    before = _everything(op)
    calls = _fail_on_call(monkeypatch, lstm, 2)
    with pytest.raises(Boom):
        op.process(op_keys, rng.integers(0, 256, len(op_keys)))
    assert calls[0] == 2
    _assert_same(before, _everything(op))
    # the TTL expiry was not committed either: reads answer as if it ran, but the slot is still held
    assert "old" not in op and op._store.slots.get("old") is not None


def test_nan_clock_is_an_error_and_changes_nothing(lstm):
    clock = FakeClock()
    op = KeyedOperator(lstm, ttl=5.0, clock=clock)
    op.process(["a", "b"], [1, 2])
    before = _everything(op)
    for bad in (float("nan"), float("inf"), None):
        clock.t = bad
        with pytest.raises(InputError, match="clock: expected a finite time in seconds, got"):
            op.process(["a"], [3])
        with pytest.raises(InputError, match="clock: expected a finite time"):
            op.expire()
    clock.t = 1000.0  # reads answer at the clock's time (expiry included): read back at a valid one
    _assert_same(before, _everything(op))


def test_ttl_expires_every_idle_key_not_only_the_lru_head(lstm):
    """B seen at 50 sits behind A seen at 100 in recency order (event-time clock went back)."""
    clock = FakeClock(100.0)
    op = KeyedOperator(lstm, ttl=10.0, clock=clock)
    op.process(["A"], [1])
    clock.t = 50.0
    op.process(["B"], [2])
    assert op.keys() == ["A", "B"]  # A is the least recently used
    clock.t = 105.0
    assert op.expire() == 1
    assert op.keys() == ["A"] and op.evictions.ttl == 1
    # the same through process, and through a restored snapshot whose order disagrees with last_seen
    clock.t = 50.0
    op.process(["B"], [2])
    snap = op.snapshot()
    other = KeyedOperator(lstm, ttl=10.0, clock=clock)
    other.restore(snap)
    clock.t = 105.0
    r = other.process(["C"], [3])
    assert r.fresh.tolist() == [True] and other.keys() == ["A", "C"] and other.evictions.ttl == 1


@pytest.mark.parametrize("keys", ["alice", b"alice"])
def test_a_single_str_is_not_a_list_of_keys(lstm, keys):
    op = KeyedOperator(lstm)
    with pytest.raises(InputError, match="keys: expected a sequence of str/bytes keys .* got a single"):
        op.process(keys, [1, 2, 3, 4, 5])
    assert len(op) == 0


def test_restore_with_duplicate_keys_keeps_previous_state(lstm):
    a = KeyedOperator(lstm)
    a.process(["x", "y"], [1, 2])
    good = a.snapshot()
    b = KeyedOperator(lstm)
    b.process(["p", "q"], [3, 4])
    before = _everything(b)
    dup = pa.concat_tables([good, good.slice(0, 1)])
    with pytest.raises(SnapshotError, match="key: expected each key once, got 'x' more than once"):
        b.restore(dup)
    _assert_same(before, _everything(b))


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_state_is_rejected(lstm, value):
    a = KeyedOperator(lstm)
    a.process(["x", "y"], [1, 2])
    t = a.snapshot()
    c = np.array(t.column("state_c").combine_chunks().flatten().to_numpy(zero_copy_only=False))
    c[3] = value
    bad = t.set_column(t.column_names.index("state_c"), "state_c",
                       pa.FixedSizeListArray.from_arrays(pa.array(c), t.column("state_c").type.list_size))
    b = KeyedOperator(lstm)
    b.process(["p"], [3])
    before = _everything(b)
    with pytest.raises(StateError, match="state_c of key 'x': expected finite values"):
        b.restore(bad)
    _assert_same(before, _everything(b))
    st = lstm.initial_state(2).numpy()
    h, c0 = st["h"], st["c"].copy()
    c0[1, 1, 5] = value
    with pytest.raises(StateError, match=r"state 'c' at \[1, 1, 5\]: expected finite values"):
        lstm.step(np.array([[1], [2]]), {"h": h, "c": c0})


@pytest.mark.parametrize("k", [0, -1, 257, 2.5, True])
def test_next_token_k_is_checked_at_construction(lstm, k):
    with pytest.raises(InputError, match=r"k: expected an int in 1..256"):
        NextTokenOperator(lstm, k=k)
