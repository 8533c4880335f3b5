"""KeyedOperator semantics (issue 19, items 4-8): recency follows each key's last event, TTL expiry holds on
every read path, ``last_seen`` is the max of the times a key was touched, results say why a key restarted, and a
snapshot is one file. The reference is a plain-Python model of the documented rules, driven by hypothesis."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import FakeClock
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamrnn import InputError, KeyedOperator, NextTokenOperator, SnapshotError
from streamrnn.model.loaded import load
from streamrnn.model.runtime import CPU


class Reference:
    """The documented rules, key by key: LRU by each key's last event, TTL on ``last_seen = max``, reasons."""

    def __init__(self, max_keys: int, ttl: float | None, now: float):
        self.max_keys, self.ttl, self.now = max_keys, ttl, now
        self.held: OrderedDict[str, list] = OrderedDict()  # key -> [last_seen, steps], least recent first
        self.ended: dict[str, str] = {}
        self.counts = {"ttl": 0, "capacity": 0, "explicit": 0}

    def expired(self, k: str) -> bool:
        return self.ttl is not None and self.held[k][0] < self.now - self.ttl

    def live(self) -> list[str]:
        return [k for k in self.held if not self.expired(k)]

    def drop_expired(self) -> None:
        for k in [k for k in self.held if self.expired(k)]:
            del self.held[k]
            self.ended[k] = "expired"
            self.counts["ttl"] += 1

    def process(self, keys: list[str]) -> tuple[list[bool], list[str], list[int]]:
        distinct = list(dict.fromkeys(keys))
        why = {}
        for k in distinct:
            if k not in self.held:
                why[k] = self.ended.get(k, "new")
            elif self.expired(k):
                why[k] = "expired"
        steps = {k: 0 if k in why else self.held[k][1] for k in distinct}
        self.drop_expired()
        need = len(self.held) + len(why) - self.max_keys
        for k in [k for k in self.held if k not in distinct][:max(need, 0)]:
            del self.held[k]
            self.ended[k] = "evicted"
            self.counts["capacity"] += 1
        fresh, reset, pos, seen = [], [], [], {}
        for k in keys:
            first = k not in seen
            seen[k] = seen.get(k, -1) + 1
            fresh.append(first and k in why)
            reset.append(why[k] if first and k in why else "")
            pos.append(steps[k] + seen[k])
        last = {k: i for i, k in enumerate(keys)}
        for k in sorted(distinct, key=last.__getitem__):  # recency: by each key's last event
            old = self.held.pop(k, [-np.inf, 0])
            self.held[k] = [max(old[0], self.now), steps[k] + seen[k] + 1]
            self.ended.pop(k, None)
        return fresh, reset, pos

    def evict(self, k: str) -> bool:
        self.drop_expired()
        if k not in self.held:
            return False
        del self.held[k]
        self.ended[k] = "evicted"
        self.counts["explicit"] += 1
        return True


KEYS = ["a", "b", "c", "d"]
ops_st = st.lists(st.one_of(
    st.tuples(st.just("process"), st.lists(st.sampled_from(KEYS), min_size=1, max_size=6)),
    st.tuples(st.just("advance"), st.sampled_from([-12.0, -4.0, 0.5, 4.0, 9.5, 12.0])),  # ttl 10: either side
    st.tuples(st.just("evict"), st.sampled_from(KEYS)),
    st.tuples(st.just("expire"), st.none()),
), min_size=1, max_size=24)


@given(ops=ops_st, max_keys=st.integers(2, 4), ttl=st.sampled_from([None, 10.0]))
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_operator_follows_the_reference_rules(lstm, ops, max_keys, ttl):
    clock = FakeClock(100.0)
    op = KeyedOperator(lstm, max_keys=max_keys, ttl=ttl, clock=clock, initial_capacity=1)
    ref = Reference(max_keys, ttl, clock.t)
    for kind, arg in ops:
        if kind == "process":
            if len(set(arg)) > max_keys:
                continue
            r = op.process(arg, np.arange(len(arg)) % 256)
            fresh, reset, pos = ref.process(arg)
            assert r.fresh.tolist() == fresh and r.reset.tolist() == reset and r.pos.tolist() == pos, (kind, arg)
        elif kind == "advance":
            clock.t = ref.now = clock.t + arg
        elif kind == "evict":
            assert op.evict(arg) == ref.evict(arg)
        else:
            before = ref.counts["ttl"]
            ref.drop_expired()
            assert op.expire() == ref.counts["ttl"] - before
        live = ref.live()
        assert op.keys() == live and len(op) == len(live)
        for k in KEYS:
            assert (k in op) == (k in live)
            assert op.steps_of(k) == (ref.held[k][1] if k in live else 0)
        t = op.snapshot()
        assert t.column("key").to_pylist() == [k.encode() for k in live]
        assert t.column("last_seen").to_pylist() == [ref.held[k][0] for k in live]
        ev = op.evictions
        assert (ev.ttl, ev.capacity, ev.explicit) == (ref.counts["ttl"], ref.counts["capacity"],
                                                      ref.counts["explicit"])


# -- the cases, one by one --------------------------------------------------------------------------
def test_recency_follows_each_keys_last_event(lstm):
    """max_keys=2 holding a and b: process(['a', 'b', 'a']) left a least recently used, so c evicted a."""
    op = KeyedOperator(lstm, max_keys=2)
    op.process(["a", "b"], [1, 2])
    op.process(["a", "b", "a"], [3, 4, 5])
    assert op.keys() == ["b", "a"]
    r = op.process(["c"], [6])
    assert op.keys() == ["a", "c"] and r.reset.tolist() == ["new"]
    assert op.process(["b"], [7]).reset.tolist() == ["evicted"]


def test_every_read_path_honours_the_ttl(lstm):
    clock = FakeClock(0.0)
    nt = NextTokenOperator(lstm, ttl=10.0, clock=clock)
    op = nt.keyed
    nt.observe(["a", "a"], [72, 105])
    clock.t = 5.0
    nt.observe(["b"], [66])
    clock.t = 12.0  # a idle 12 s (expired), b idle 7 s
    assert "a" not in op and "b" in op and len(op) == 1 and op.keys() == ["b"]
    assert op.steps_of("a") == 0 and op.last_output("a") is None
    assert not op.state_of("a")["h"].any() and not op.state_of("a")["c"].any()
    assert op.snapshot().column("key").to_pylist() == [b"b"]
    assert op.snapshot(keys=["a", "b"]).column("key").to_pylist() == [b"b"]
    with pytest.raises(InputError, match="key 'a': expected a key with history or a prompt, got neither"):
        nt.generate("a", 5, seed=0)
    assert op.evictions.ttl == 0  # reads change nothing: the state goes at the next write
    r = nt.observe(["a"], [72])
    assert r.fresh.tolist() == [True] and r.reset.tolist() == ["expired"] and op.evictions.ttl == 1


def test_a_clock_going_back_never_moves_expiry_earlier(lstm):
    """Touched at t=100 then t=50 with ttl 10: last_seen stays 100, so the key lives until t=110."""
    clock = FakeClock(100.0)
    op = KeyedOperator(lstm, ttl=10.0, clock=clock)
    op.process(["k"], [1])
    clock.t = 50.0
    op.process(["k"], [2])
    assert op.snapshot().column("last_seen").to_pylist() == [100.0]
    clock.t = 65.0
    assert "k" in op and op.process(["k"], [3]).fresh.tolist() == [False]
    clock.t = 110.5
    assert "k" not in op and op.process(["k"], [4]).reset.tolist() == ["expired"]


def test_reset_reasons_new_expired_evicted(lstm):
    clock = FakeClock(0.0)
    op = KeyedOperator(lstm, max_keys=2, ttl=10.0, clock=clock)
    assert op.process(["a", "b", "a"], [1, 2, 3]).reset.tolist() == ["new", "new", ""]
    assert op.evict("a") and op.process(["a"], [4]).reset.tolist() == ["evicted"]
    clock.t = 20.0
    assert op.process(["b"], [5]).reset.tolist() == ["expired"]
    assert op.process([], np.zeros(0, np.int64)).reset.tolist() == []


@pytest.mark.parametrize("on_device", [False, True])
def test_model_update_carries_state_or_ends_every_stream(lstm, other_lstm_path, wide_lstm_path, nets_and_paths, rng,
                                                          on_device):
    op = KeyedOperator(lstm, keep_last_output=True, state_on_device=on_device)
    x = rng.integers(0, 256, 6)
    op.process(["a", "b", "a", "b", "a", "c"], x)
    other = load(other_lstm_path, providers=[CPU])
    before = {k: op.state_of(k) for k in ("a", "b")}
    assert op.update_model(other) == [] and op.model is other and op.keys() == ["b", "a", "c"]
    r = op.process(["a", "b"], [7, 8])
    assert r.fresh.tolist() == [False, False] and r.pos.tolist() == [3, 2]
    for i, k in enumerate(("a", "b")):  # reference: the new model stepped from the carried state
        o, _ = other.step(np.array([[7 + i]]), before[k])
        np.testing.assert_allclose(r.outputs["logprobs"][i], o["logprobs"][0, 0], atol=1e-6)
    wide = load(wide_lstm_path, providers=[CPU])
    assert op.update_model(wide) == ["c", "a", "b"] and len(op) == 0 and op.evictions.model_update == 3
    r = op.process(["a", "z"], [1, 2])
    assert r.reset.tolist() == ["model_update", "new"]
    with pytest.raises(InputError, match="update_model: model: expected a streamrnn Model"):
        op.update_model("wide.onnx")
    with pytest.raises(InputError, match=r"model input: expected tokens \(vocab 256\) \(what this operator serves\), "
                                         r"got features \(3\)"):
        op.update_model(load(nets_and_paths[("lstm", "features")][1], providers=[CPU]))
    assert op.model is wide and op.keys() == ["a", "z"]


@pytest.mark.parametrize("health", [None, "off", "flag"])
def test_a_failed_model_update_leaves_the_operator_as_it_was(lstm, other_lstm_path, rng, monkeypatch, health):
    """update_model fails after the new model was set up (the state restore runs out of memory): every attribute
    is the object it was (the policy the new model would have had by default, its output tails, its store), and
    the operator then gives exactly what a twin that never saw the update gives, call for call."""
    other = load(other_lstm_path, providers=[CPU])
    monkeypatch.setitem(other.spec.metrics, "val_nats_per_char", 2.0)
    assert other.spec.metrics["val_nats_per_char"] == 2.0  # (the new model's default policy: flag)
    op, twin = KeyedOperator(lstm, health=health), KeyedOperator(lstm, health=health)
    x = rng.integers(0, 256, 6)
    for o in (op, twin):
        o.process(["a", "b", "a", "b", "a", "c"], x)
    before = dict(vars(op))

    def fail(*a, **k):
        raise MemoryError("restore")
    with monkeypatch.context() as m:
        m.setattr(KeyedOperator, "_restore_locked", fail)
        with pytest.raises(MemoryError):
            op.update_model(other)
    assert {k for k, v in vars(op).items() if before.get(k) is not v} == set()
    for keys in (["a", "b"], ["c"], ["a", "z", "a"]):
        xs = rng.integers(0, 256, len(keys))
        r, t = op.process(keys, xs), twin.process(keys, xs)
        assert r.pos.tolist() == t.pos.tolist() and r.reset.tolist() == t.reset.tolist()
        assert np.array_equal(r.outputs["logprobs"], t.outputs["logprobs"])


# -- item 4: a snapshot is one file --------------------------------------------------------------------------
def test_restore_of_a_directory_is_refused(lstm, other_lstm_path, tmp_path):
    """A folder with a valid snapshot and one of another model restored both (only one file was checked)."""
    mine = KeyedOperator(lstm)
    mine.process(["x", "y"], [1, 2])
    theirs = KeyedOperator(load(other_lstm_path, providers=[CPU]))
    theirs.process(["z"], [3])
    folder = tmp_path / "snaps"
    folder.mkdir()
    pq.write_table(mine.snapshot(), folder / "a.parquet")
    pq.write_table(theirs.snapshot(), folder / "b.parquet")
    target = KeyedOperator(lstm)
    target.process(["p"], [4])
    before = target.snapshot()
    with pytest.raises(SnapshotError, match=r"source: expected one Parquet snapshot file, got a directory .*snaps' "
                                            r"\(2 files\)"):
        target.restore(folder)
    with pytest.raises(SnapshotError, match="model: expected a snapshot of tiny-lstm-tokens"):
        target.restore(folder / "b.parquet")
    assert target.snapshot().equals(before, check_metadata=True)
    assert target.restore(folder / "a.parquet") == 2 and target.keys() == ["x", "y"]
