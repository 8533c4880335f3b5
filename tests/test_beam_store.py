"""The shard store: the delta log replays to exactly the live store; the cache is used only on a token match."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamrnn.beam.step import store as st_mod
from streamrnn.beam.step.clock import NEVER
from streamrnn.beam.step.stateful import Ctrl, ShardStep
from streamrnn.errors import InputError
from streamrnn.model.loaded import load
from streamrnn.model.runtime import CPU


def _snapshot_dict(store):
    t = store.op.snapshot()
    keys = [k.decode() for k in t.column("key").to_pylist()]
    out = {}
    for i, k in enumerate(keys):
        out[k] = {c: t.column(c)[i].as_py() for c in t.column_names if c != "key"}
    return out


def _held_dict(store):
    return {k: t.to_pylist() for k, t in store.held.items()}


@given(ops=st.lists(st.tuples(st.sampled_from(["step", "expire", "forget", "held", "unheld", "flush"]),
                              st.integers(0, 7), st.integers(1, 4)), min_size=1, max_size=60),
       compact_every=st.integers(1, 6))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_log_replays_to_the_live_store(lstm_path, ops, compact_every):
    model = load(lstm_path, providers=[CPU])
    store = st_mod.ShardStore.new(model, str(lstm_path), keep_last_output=True)
    log: list[bytes] = []
    rng = np.random.default_rng(len(ops))
    t = 0
    flushes = 0
    for op, k, n in ops:
        key = f"k{k}"
        t += 1_000_000
        if op == "step":
            store.op.process([key] * n, rng.integers(0, 256, n))
            store.set_meta(key, st_mod.KeyMeta(t / 1e6, t + 5_000_000, "", True))
            store.add_ids([key] * n, np.arange(t, t + n), np.full(n, t))
        elif op == "expire" and key in store.op:
            store.op.evict(key)
            m = store.meta[key]
            store.set_meta(key, st_mod.KeyMeta(m.last_ts, m.expiry, "expired", False))
        elif op == "forget" and key not in store.op:
            store.forget(key)
        elif op == "held":
            store.set_held(key, pa.table({"key": [key], "ts": [t / 1e6], "v": [float(n)]}))
        elif op == "unheld":
            store.set_held(key, None)
        elif op == "flush":
            flushes += 1
            store.forget_old(t, 20_000_000)
            blob, full = store.delta(compact=flushes % compact_every == 0)
            if full:
                log.clear()
            log.append(blob)
    blob, full = store.delta(compact=False)
    if full:
        log.clear()
    log.append(blob)
    back, change = st_mod.ShardStore.from_log(list(reversed(log)), lambda p: model, keep_last_output=True,
                                              default_path=str(lstm_path))
    assert change is None
    assert _snapshot_dict(back) == _snapshot_dict(store)
    assert back.lasting() == store.lasting()  # ids the horizon forgot stay forgotten; the sweep mark too


def test_delta_size_follows_the_keys_touched(lstm_path):
    model = load(lstm_path, providers=[CPU])
    store = st_mod.ShardStore.new(model, str(lstm_path), keep_last_output=False)
    keys = [f"k{i}" for i in range(2000)]
    store.op.process(keys, np.zeros(len(keys), np.int64))
    for k in keys:
        store.set_meta(k, st_mod.KeyMeta(1.0, NEVER, "", True))
    full, _ = store.delta(compact=True)
    store.op.process(keys[:10], np.ones(10, np.int64))
    for k in keys[:10]:
        store.set_meta(k, st_mod.KeyMeta(2.0, NEVER, "", True))
    small, is_full = store.delta(compact=False)
    assert not is_full
    assert len(small) * 50 < len(full), (len(small), len(full))


def test_the_cache_is_used_only_when_the_token_matches(lstm_path):
    model = load(lstm_path, providers=[CPU])
    s = st_mod.ShardStore.new(model, str(lstm_path), keep_last_output=False)
    s.token = "t1"
    cache = st_mod.ShardCache()
    cache.put("x", 3, s, 1 << 20)
    assert cache.take("x", 3, "t0") is None  # a failed bundle left the old token in state: rebuild
    cache.put("x", 3, s, 1 << 20)
    assert cache.take("x", 3, "t1") is s
    assert cache.take("x", 3, "t1") is None  # taken: owned by one flush at a time
    cache.put("x", 3, s, 0)
    assert len(cache) == 0  # a budget of 0: no cache, every flush rebuilds


def test_the_cache_is_bounded_by_bytes_least_recently_used_first(lstm_path):
    model = load(lstm_path, providers=[CPU])
    cache = st_mod.ShardCache()
    stores = []
    for i in range(4):
        s = st_mod.ShardStore.new(model, str(lstm_path), keep_last_output=False)
        s.op.process([f"k{j}" for j in range(50)], np.zeros(50, np.int64))
        s.token = f"t{i}"
        stores.append(s)
    one = stores[0].nbytes()
    assert one > 0
    for i, s in enumerate(stores):
        cache.put("x", i, s, int(2.5 * one))
    assert len(cache) == 2 and cache.bytes <= 2.5 * one
    assert cache.take("x", 0, "t0") is None and cache.take("x", 1, "t1") is None  # the oldest went first
    assert cache.take("x", 3, "t3") is stores[3]


class _State:
    def __init__(self, v=None):
        self.v = v

    def read(self):
        return self.v


def test_a_changed_shard_count_is_refused(lstm_path):
    step = ShardStep.__new__(ShardStep)
    step.model_path, step.num_shards = str(lstm_path), 16
    state = _State(Ctrl(None, str(lstm_path)).to_json().replace('"num_shards": null', '"num_shards": 8'))
    with pytest.raises(InputError, match=r"num_shards: expected 8 .*got 16"):
        step._ctrl(state)
    assert step._ctrl(_State(None)).num_shards == 16


@pytest.mark.parametrize("other", ["other_lstm_path", "wide_lstm_path"])
def test_a_model_file_changed_under_the_state_path_carries_or_ends_each_stream(lstm_path, other, request):
    """State written under one model, rebuilt after the file at its path changed (a retrained shipped:NAME, an
    overwritten bucket file): same state shapes carry on under the new weights; other shapes end every
    key's stream (reason model_update), never a failed shard that retries forever."""
    model = load(lstm_path, providers=[CPU])
    new = load(request.getfixturevalue(other), providers=[CPU])
    store = st_mod.ShardStore.new(model, "shipped:x", keep_last_output=False)
    keys = ["a", "b", "c"]
    store.op.process(keys * 3, np.arange(9, dtype=np.int64))
    for k in keys:
        store.set_meta(k, st_mod.KeyMeta(1.0, 9_000_000, "", True))
    store.op.evict("c")
    store.set_meta("c", st_mod.KeyMeta(1.0, 9_000_000, "expired", False))
    blob, _ = store.delta(compact=False)
    same, change = st_mod.ShardStore.from_log([blob], lambda p: model, keep_last_output=False,
                                              default_path="shipped:x")
    assert change is None and not same.log.full and same.lasting() == store.lasting()
    back, change = st_mod.ShardStore.from_log([blob], lambda p: new, keep_last_output=False, default_path="shipped:x")
    assert back.log.full  # the next write records the new model's state in full
    if other == "other_lstm_path":
        assert change == st_mod.ModelChange("carried")
        got, want = _snapshot_dict(back), _snapshot_dict(store)
        assert got.keys() == want.keys() == {"a", "b"}
        assert sum(c.startswith("state_") for c in got["a"]) == 2  # h and c
        for k in got:  # the same (h, c) and step counts, now under the new weights
            assert {c: v for c, v in got[k].items() if c.startswith("state_") or c == "steps"} == {
                c: v for c, v in want[k].items() if c.startswith("state_") or c == "steps"}
    else:
        assert change == st_mod.ModelChange("reset", ("a", "b")) and len(back.op) == 0
        assert {k: (m.reason, m.live) for k, m in back.meta.items()} == {
            "a": ("model_update", False), "b": ("model_update", False), "c": ("expired", False)}
        assert back.next_expiry() is None or back.next_expiry() >= NEVER  # no expiry of ended streams
