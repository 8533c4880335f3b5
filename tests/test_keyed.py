"""KeyedOperator: batching across keys, eviction, snapshot/restore, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FakeClock
from hypothesis import given, settings
from hypothesis import strategies as st

from streamrnn import InputError, KeyedOperator, SnapshotError
from streamrnn.model.loaded import load
from streamrnn.model.runtime import CPU

keys_st = st.lists(st.sampled_from(["a", "b", "c", b"d", "é"]), min_size=1, max_size=40)


def _offline(model, keys, x):
    """Each key's events run alone, in order, from the initial state."""
    out = np.empty((len(keys), 256), np.float32)
    for k in set(keys):
        idx = [i for i, kk in enumerate(keys) if kk == k]
        o, _ = model.step(np.asarray(x)[idx][None])
        out[idx] = o["logprobs"][0]
    return out


@given(keys=keys_st, seed=st.integers(0, 2**16), split=st.integers(0, 40))
@settings(max_examples=30, deadline=None)
def test_interleaved_keys_equal_each_key_alone(lstm_path, keys, seed, split):
    m = load(lstm_path, providers=[CPU])
    x = np.random.default_rng(seed).integers(0, 256, len(keys))
    op = KeyedOperator(m)
    s = min(split, len(keys))
    r1 = op.process(keys[:s], x[:s])
    r2 = op.process(keys[s:], x[s:])
    got = np.concatenate([r1.outputs["logprobs"], r2.outputs["logprobs"]])
    np.testing.assert_allclose(got, _offline(m, keys, x), atol=1e-5, rtol=0)
    pos = np.concatenate([r1.pos, r2.pos])
    fresh = np.concatenate([r1.fresh, r2.fresh])
    for k in set(keys):
        idx = [i for i, kk in enumerate(keys) if kk == k]
        assert pos[idx].tolist() == list(range(len(idx)))
        assert fresh[idx].tolist() == [True] + [False] * (len(idx) - 1)
        assert op.steps_of(k) == len(idx)


@given(keys=keys_st, seed=st.integers(0, 2**16), cut=st.integers(0, 40), keep=st.booleans())
@settings(max_examples=20, deadline=None)
def test_snapshot_restore_round_trip_is_bit_exact(lstm_path, keys, seed, cut, keep):
    m = load(lstm_path, providers=[CPU])
    x = np.random.default_rng(seed).integers(0, 256, len(keys))
    c = min(cut, len(keys))
    a = KeyedOperator(m, keep_last_output=keep)
    a.process(keys[:c], x[:c])
    b = KeyedOperator(m, keep_last_output=keep)
    assert b.restore(a.snapshot()) == len(set(keys[:c]))
    ra, rb = a.process(keys[c:], x[c:]), b.process(keys[c:], x[c:])
    assert (ra.outputs["logprobs"] == rb.outputs["logprobs"]).all()
    assert (ra.pos == rb.pos).all() and (ra.fresh == rb.fresh).all()
    for n in ra.prev_outputs:
        np.testing.assert_array_equal(ra.prev_outputs[n], rb.prev_outputs[n])
    for k in set(keys):
        assert (a.state_of(k)["c"] == b.state_of(k)["c"]).all()
        assert type(k) is type(b.keys()[b.keys().index(k)])


def test_parquet_snapshot(lstm, tmp_path, rng):
    keys = ["x", "y", b"z"] * 5
    x = rng.integers(0, 256, len(keys))
    a = KeyedOperator(lstm)
    a.process(keys, x)
    a.save(tmp_path / "snap.parquet")
    b = KeyedOperator(lstm)
    b.restore(tmp_path / "snap.parquet")
    for k in ("x", "y", b"z"):
        np.testing.assert_array_equal(a.state_of(k)["h"], b.state_of(k)["h"])
    with pytest.raises(SnapshotError, match="expected a Parquet snapshot"):
        b.restore(tmp_path / "missing.parquet")


def test_snapshot_from_another_model_is_refused(lstm, other_lstm_path, wide_lstm_path, rng):
    a = KeyedOperator(lstm)
    a.process(["k"], [5])
    snap = a.snapshot()
    other = KeyedOperator(load(other_lstm_path, providers=[CPU]))
    with pytest.raises(SnapshotError, match=r"model: expected a snapshot of tiny-other .* got one of tiny-lstm"):
        other.restore(snap)
    assert other.restore(snap, allow_other_model=True) == 1  # same shapes: allowed when asked
    wide = KeyedOperator(load(wide_lstm_path, providers=[CPU]))
    with pytest.raises(SnapshotError, match="state shapes: expected"):
        wide.restore(snap, allow_other_model=True)
    import pyarrow as pa

    with pytest.raises(SnapshotError, match="not a streamrnn snapshot"):
        a.restore(pa.table({"key": [b"k"]}))


def test_ttl_eviction_with_fake_clock(lstm):
    clock = FakeClock()
    op = KeyedOperator(lstm, ttl=10.0, clock=clock)
    op.process(["a", "b"], [1, 2])
    clock.advance(6)
    op.process(["b"], [3])
    clock.advance(5)  # a idle 11 s, b idle 5 s
    assert op.expire() == 1
    assert "a" not in op and "b" in op and op.evictions.ttl == 1
    r = op.process(["a", "b"], [4, 5])
    assert r.fresh.tolist() == [True, False] and r.pos.tolist() == [0, 2]
    # the evicted key restarts from the initial state: same as a brand-new key
    np.testing.assert_array_equal(r.outputs["logprobs"][0], lstm.step(np.array([[4]]))[0]["logprobs"][0, 0])


def test_capacity_eviction_is_lru(lstm):
    clock = FakeClock()
    op = KeyedOperator(lstm, max_keys=3, clock=clock, initial_capacity=1)
    for k in ("a", "b", "c"):
        op.process([k], [1])
        clock.advance(1)
    op.process(["a"], [2])  # a is now most recent; b is the LRU
    op.process(["d"], [3])
    assert sorted(op.keys()) == ["a", "c", "d"] and op.evictions.capacity == 1
    with pytest.raises(InputError, match="distinct keys in one call: expected <= max_keys=3, got 4"):
        op.process(["p", "q", "r", "s"], [1, 2, 3, 4])


def test_explicit_evict(lstm):
    op = KeyedOperator(lstm)
    op.process(["a"], [1])
    assert op.evict("a") and not op.evict("a")
    assert op.evictions.explicit == 1 and len(op) == 0


@pytest.mark.parametrize(
    ("keys", "x", "match"),
    [
        ([1, "b"], [1, 2], r"keys\[0\]: expected str or bytes, got int 1"),
        ([None], [1], r"keys\[0\]: expected str or bytes, got NoneType"),
        (["a", ["b"]], [1, 2], r"keys\[1\]: expected str or bytes, got list"),
        (["a"], [1, 2], "keys: expected 2 keys"),
        (["a"], [[1, 2]], r"x rank: expected \[N\] \(one step per event\)"),
        (["a", "b"], [1, 999], "x token: expected 0 <= token < 256, got 999"),
        (["a"], [1.5], "x dtype: expected integer tokens, got float64"),
    ],
)
def test_bad_input_leaves_state_untouched(lstm, keys, x, match):
    op = KeyedOperator(lstm)
    op.process(["a"], [7])
    before = op.state_of("a")["h"].copy()
    with pytest.raises(InputError, match=match):
        op.process(keys, x)
    assert (op.state_of("a")["h"] == before).all() and op.steps_of("a") == 1 and len(op) == 1


def test_bad_config(lstm):
    with pytest.raises(InputError, match="ttl: expected a positive number"):
        KeyedOperator(lstm, ttl=0)
    with pytest.raises(InputError, match="max_keys: expected an int >= 1, got 0"):
        KeyedOperator(lstm, max_keys=0)


def test_features_keyed(nets_and_paths, rng):
    m = load(nets_and_paths[("gru", "features")][1], providers=[CPU])
    op = KeyedOperator(m)
    x = rng.normal(size=(6, 3)).astype(np.float32)
    keys = ["a", "b", "a", "a", "b", "c"]
    r = op.process(keys, x)
    o, _ = m.step(x[[0, 2, 3]][None])
    np.testing.assert_allclose(r.outputs["mean"][[0, 2, 3]], o["mean"][0], atol=1e-6)
    x[4, 1] = np.nan
    with pytest.raises(InputError, match=r"feature f1 at \[4, 0\]"):
        op.process(keys, x)
