"""The known-keys path of KeyedOperator.process (issue 17): a call whose keys are all held, unexpired and each
once runs without grouping or planning. It must be indistinguishable from the general path: same results
(bit for bit), same state, recency, counters, health columns and snapshots, the same per-key outputs as
``Model.step`` key by key, and a failed call changes nothing."""

from __future__ import annotations

import threading
from unittest import mock

import numpy as np
import pytest
from conftest import FakeClock
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_atomic import Boom, _assert_same, _everything, _fail_on_call

import streamrnn.keyed.operator as keyed_operator
from streamrnn import InputError, KeyedOperator
from streamrnn.keyed.health import HealthConfig
from streamrnn.model.loaded import load
from streamrnn.model.runtime import CPU

KEYS = ["a", "b", "c", "d", "e"]
#: health settings that exercise every branch: off, flag, heal watching everything it may (2 at once, so some
#: keys stay unwatched and can take the known path), heal sampling (the test model has no reference loss)
HEALTH = {
    "off": "off",
    "flag": HealthConfig("flag", reference=2.0, half_life=3.0),
    "heal_ref": HealthConfig("heal", reference=1e-3, window=2, patience=1, margin=-1e9, warmup=0, max_watch=2),
    "heal_sampled": HealthConfig("heal", window=2, sample_every=2, patience=1, margin=-1e9, warmup=0),
}
calls_st = st.lists(st.tuples(st.lists(st.sampled_from(KEYS), min_size=1, max_size=5),
                              st.sampled_from([0.0, 0.5, 6.0, -3.0])), min_size=1, max_size=14)
#: (BIND_MAX_KEYS, BIND_SIZES): the default, and limits that send some known calls past the bound buffers and
#: make the operator drop and rebuild its bindings between calls of other sizes
BINDS = [(keyed_operator.BIND_MAX_KEYS, keyed_operator.BIND_SIZES), (3, 1), (0, 1)]


def _general_only(op: KeyedOperator) -> KeyedOperator:
    """The same operator with the known-keys path switched off: every call is grouped and planned."""
    op._process_known = lambda keys, x, now: None
    return op


def _spy(op: KeyedOperator) -> list[bool]:
    """Record, per call that tried it, whether the known-keys path served the call."""
    served, real = [], op._process_known

    def known(keys, x, now):
        r = real(keys, x, now)
        served.append(r is not None)
        return r

    op._process_known = known
    return served


def _assert_same_result(a, b) -> None:
    assert a.outputs.keys() == b.outputs.keys() and a.prev_outputs.keys() == b.prev_outputs.keys()
    for n in a.outputs:
        np.testing.assert_array_equal(a.outputs[n], b.outputs[n])
        assert a.outputs[n].dtype == b.outputs[n].dtype
    for n in a.prev_outputs:
        np.testing.assert_array_equal(a.prev_outputs[n], b.prev_outputs[n])
    for f in ("pos", "fresh", "reset"):
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype and x.tolist() == y.tolist(), f
    assert (a.state_health is None) == (b.state_health is None) and a.bad_health == b.bad_health
    if a.state_health is not None:
        assert a.state_health.dtype == b.state_health.dtype
        np.testing.assert_array_equal(a.state_health, b.state_health)


@given(calls=calls_st, max_keys=st.integers(2, 5), ttl=st.sampled_from([None, 10.0]),
       health=st.sampled_from(sorted(HEALTH)), keep=st.booleans(), seed=st.integers(0, 2**16),
       bind=st.sampled_from(BINDS))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_known_path_equals_the_general_path(lstm, calls, max_keys, ttl, health, keep, seed, bind):
    """Mixes of new, known, repeated, expired and evicted keys: the operator with the known-keys path and one
    without give equal results, snapshots (state, steps, last_seen, health columns, shadows), recency and
    counters after every call; with the known path's calls on bound buffers, past them, and with its bindings
    dropped and rebuilt between calls."""
    with mock.patch.multiple(keyed_operator, BIND_MAX_KEYS=bind[0], BIND_SIZES=bind[1]):
        _known_equals_general(lstm, calls, max_keys, ttl, health, keep, seed)


def _known_equals_general(lstm, calls, max_keys, ttl, health, keep, seed) -> None:
    clocks = FakeClock(100.0), FakeClock(100.0)
    a, b = (KeyedOperator(lstm, max_keys=max_keys, ttl=ttl, clock=c, keep_last_output=keep,
                          health=HEALTH[health], initial_capacity=1) for c in clocks)
    _general_only(b)
    rng = np.random.default_rng(seed)
    kept = []
    for keys, dt in calls:
        for c in clocks:
            c.advance(dt)
        if len(set(keys)) > max_keys:
            continue
        x = rng.integers(0, 256, len(keys))
        ra = a.process(keys, x)
        _assert_same_result(ra, b.process(keys, x))
        kept.append((ra, [{n: v.copy() for n, v in d.items()} for d in (ra.outputs, ra.prev_outputs)]))
        assert a.snapshot().equals(b.snapshot(), check_metadata=True)
        assert a.keys() == b.keys() and a.evictions == b.evictions and a.health_counts == b.health_counts
    for r, copies in kept:  # no result shares memory with a later call's (bound buffers are reused)
        for d, c in zip((r.outputs, r.prev_outputs), copies, strict=True):
            for n, v in d.items():
                np.testing.assert_array_equal(v, c[n])


def test_a_known_call_holding_every_slot_takes_the_models_new_state_as_the_slab(lstm, rng):
    """Calls of the same 64+ keys in first-seen order once they fill the operator: the slab arrays are replaced by
    the model's (no scatter) on every such call, and the results and snapshot equal the general path's."""
    keys = [f"k{i}" for i in range(128)]
    a, b = (KeyedOperator(lstm, max_keys=128, clock=FakeClock(100.0)) for _ in range(2))
    _general_only(b)
    for i in range(4):
        x = rng.integers(0, 256, len(keys))
        before = {n: id(v) for n, v in a._store.slab.items()}
        _assert_same_result(a.process(keys, x), b.process(keys, x))
        assert a.snapshot().equals(b.snapshot())
        if i:  # (the first call makes the keys)
            assert all(id(v) != before[n] for n, v in a._store.slab.items())


ORDERED = [f"k{i}" for i in range(8)]
#: calls of keys in the order they first came (held in consecutive slots: a wide known call copies by slice)
runs_st = st.lists(st.tuples(st.tuples(st.integers(0, 7), st.integers(2, 8)).map(lambda t: ORDERED[t[0]:t[0] + t[1]]),
                             st.sampled_from([0.0, 0.5, 6.0, -3.0])), min_size=1, max_size=14)


@given(calls=runs_st, max_keys=st.integers(4, 8), ttl=st.sampled_from([None, 10.0]),
       health=st.sampled_from(sorted(HEALTH)), keep=st.booleans(), seed=st.integers(0, 2**16),
       bind=st.sampled_from(BINDS[1:]))
@example(calls=[(ORDERED[:6], 0.0)] * 4, max_keys=6, ttl=None, health="off", keep=True, seed=1, bind=(0, 1))  # whole
@example(calls=[(ORDERED[:6], 0.0)] * 4, max_keys=6, ttl=10.0, health="flag", keep=False, seed=2, bind=(3, 1))  # slab
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_known_calls_of_consecutive_slots_equal_the_general_path(lstm, calls, max_keys, ttl, health, keep, seed,
                                                                 bind):
    """Wide known calls (past the bound buffers) whose keys hold consecutive slots in order, so their state and
    last outputs are copied by slice (the whole slab where the call has every slot), among evictions, expiries and
    health: equal to the general path, call for call, and no result shares memory with a later call's."""
    with mock.patch.multiple(keyed_operator, BIND_MAX_KEYS=bind[0], BIND_SIZES=bind[1]):
        _known_equals_general(lstm, calls, max_keys, ttl, health, keep, seed)


@given(calls=calls_st, seed=st.integers(0, 2**16))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_outputs_equal_model_step_key_by_key(lstm, calls, seed):
    """Reference: each key's events through ``Model.step`` one at a time, from the initial state."""
    op = KeyedOperator(lstm, keep_last_output=True)
    rng = np.random.default_rng(seed)
    state, last = {}, {}
    for keys, _ in calls:
        x = rng.integers(0, 256, len(keys))
        r = op.process(keys, x)
        for i, (k, t) in enumerate(zip(keys, x.tolist(), strict=True)):
            o, state[k] = lstm.step(np.array([[t]]), state.get(k))
            np.testing.assert_allclose(r.outputs["logprobs"][i], o["logprobs"][0, 0], atol=1e-5)
            if k in last:
                np.testing.assert_allclose(r.prev_outputs["logprobs"][i], last[k], atol=1e-5)
            else:
                assert np.isnan(r.prev_outputs["logprobs"][i]).all()
            last[k] = o["logprobs"][0, 0]
    for k, s in state.items():
        np.testing.assert_allclose(op.state_of(k)["h"], s["h"], atol=1e-5)
        np.testing.assert_allclose(op.state_of(k)["c"], s["c"], atol=1e-5)


@pytest.fixture(scope="module")
def models(nets_and_paths):
    return {ck: load(path, providers=[CPU]) for ck, (_, path) in nets_and_paths.items()}


@given(which=st.sampled_from([("lstm", "tokens"), ("gru", "tokens"), ("rnn", "tokens"), ("lstm", "features"),
                              ("gru", "features")]),
       B=st.integers(1, 4), T=st.integers(1, 3), seed=st.integers(0, 2**16))
@settings(max_examples=40, deadline=None)
def test_a_binding_runs_as_session_run(models, which, B, T, seed):
    """``Model.binding``: two runs on the same bound buffers, each with other inputs, rows of other lengths and
    a random state, give what ``run_unchecked`` (session.run on a feed dict) gives, bit for bit."""
    m = models[which]
    b = m.binding(B, T)
    rng = np.random.default_rng(seed)
    for _ in range(2):
        x = (rng.integers(0, 256, (B, T)) if which[1] == "tokens"
             else rng.standard_normal((B, T, 3)).astype(np.float32))
        lengths = rng.integers(1, T + 1, B).astype(np.int32)
        state = m.as_state({n: rng.standard_normal(a.shape).astype(np.float32)
                            for n, a in m.initial_state(B)._t.items()}, B)
        want_o, want_s = m.run_unchecked(x, lengths, state)
        o, s = m.run_unchecked(x, lengths, state, binding=b)
        assert o.keys() == want_o.keys() and s.names == want_s.names
        for n in want_o:
            np.testing.assert_array_equal(o[n], want_o[n])
        for n in want_s.names:
            np.testing.assert_array_equal(s[n], want_s[n])


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_known_path_of_a_feature_model_equals_the_general_path(models, cell, rng):
    """Feature inputs ``[N, F]`` on the bound buffers (one key, three, and a call past BIND_MAX_KEYS)."""
    m = models[(cell, "features")]
    clock = FakeClock()
    a, b = (KeyedOperator(m, keep_last_output=True, clock=clock) for _ in range(2))
    _general_only(b)
    served = _spy(a)
    keys = [f"k{i}" for i in range(70)]
    for ks in (keys, keys[:1], keys[3:6], keys[:1], keys, keys[5:2:-1]):
        x = rng.standard_normal((len(ks), 3)).astype(np.float32)
        _assert_same_result(a.process(ks, x), b.process(ks, x))
    assert served == [False, True, True, True, True, True] and len(keys) > keyed_operator.BIND_MAX_KEYS
    assert a.snapshot().equals(b.snapshot(), check_metadata=True)


def test_steady_state_calls_take_the_known_path(lstm):
    """The path is really taken (the equality tests above would pass vacuously otherwise), and only for
    calls whose keys are all held and unexpired, each once."""
    clock = FakeClock(0.0)
    op = KeyedOperator(lstm, ttl=10.0, clock=clock, health="flag")
    op.process(["a", "b", "c"], [1, 2, 3])  # new keys: not tried
    served = _spy(op)
    op.process(["c", "a"], [4, 5])
    op.process(["b"], [6])
    op.process(["a", "a"], [7, 8])  # a key twice
    op.process(["a", "z"], [1, 2])  # a new key
    clock.t = 9.0
    op.process(["a"], [3])  # b and c idle 9 s: nothing expired
    clock.t = 18.5
    op.process(["a"], [3])  # b, c and z idle past the TTL: the general path expires them
    assert served == [True, True, False, False, True, False]
    assert op.evictions.ttl == 3 and op.keys() == ["a"]  # b, c and z


@pytest.mark.parametrize("health", ["heal_ref", "heal_sampled"])
@pytest.mark.parametrize("n_keys", [1, 3])
def test_known_path_watches_and_heals_as_the_general_path(lstm, rng, health, n_keys):
    """One step per known key with shadows running, starting, striking and healing: the known-keys path
    serves every call (shadows as extra rows of its one model call) and equals the general path."""
    clock = FakeClock()
    a, b = (KeyedOperator(lstm, keep_last_output=True, clock=clock, health=HEALTH[health]) for _ in range(2))
    _general_only(b)
    keys = KEYS[:n_keys]
    for o in (a, b):
        o.process(keys, np.arange(n_keys))
    served, resets = _spy(a), []
    for _ in range(16):
        order = [keys[i] for i in rng.permutation(n_keys)]
        x = rng.integers(0, 256, n_keys)
        ra = a.process(order, x)
        _assert_same_result(ra, b.process(order, x))
        resets += ra.reset.tolist()
    assert all(served) and len(served) == 16
    assert a.health_counts == b.health_counts and a.health_counts.heals > 0 and "health" in resets
    assert a.snapshot().equals(b.snapshot(), check_metadata=True)


@pytest.mark.parametrize("health", ["off", "flag"])
@pytest.mark.parametrize("keys", [["a"], ["c", "a", "b"]])
def test_a_failed_known_call_changes_nothing(lstm, monkeypatch, health, keys):
    """An ONNX Runtime failure, a token out of the vocabulary or a NaN clock in a call the known-keys path
    would serve: nothing changes, and the operator then goes on exactly as a twin that never saw the call."""
    clock = FakeClock(0.0)
    cfg = HEALTH[health]
    op = KeyedOperator(lstm, keep_last_output=True, ttl=100.0, clock=clock, health=cfg)
    twin = KeyedOperator(lstm, keep_last_output=True, ttl=100.0, clock=clock, health=cfg)
    for o in (op, twin):
        o.process(["a", "b", "c"], [1, 2, 3])
        o.process(["a", "b", "c"], [4, 5, 6])
    served = _spy(op)
    before = _everything(op)
    calls = _fail_on_call(monkeypatch, op.model, 1)
    with pytest.raises(Boom):
        op.process(keys, np.arange(len(keys)) + 7)
    assert calls == [1] and served == []  # the failure was in the known path's model call
    _assert_same(before, _everything(op))
    with pytest.raises(InputError, match="x token: expected 0 <= token < 256, got 256"):
        op.process(keys, np.full(len(keys), 256))
    with pytest.raises(InputError, match="x token: expected 0 <= token < 256, got -1"):
        op.process(keys, np.full(len(keys), -1))
    clock.t = float("nan")
    with pytest.raises(InputError, match="process: clock: expected a finite time in seconds, got nan"):
        op.process(keys, np.zeros(len(keys), np.int64))
    clock.t = 1.0
    _assert_same(before, _everything(op))
    x = np.arange(len(keys)) + 9
    _assert_same_result(op.process(keys, x), twin.process(keys, x))
    assert served == [True]
    assert op.snapshot().equals(twin.snapshot(), check_metadata=True)


def test_keys_of_other_types_take_the_checked_path(lstm):
    """str subclasses (numpy strings) are keys like the str they equal; anything else is refused as before."""
    clock = FakeClock()
    op, ref = KeyedOperator(lstm, clock=clock), KeyedOperator(lstm, clock=clock)
    for o in (op, ref):
        o.process(["a", "b"], [1, 2])
    _assert_same_result(op.process(np.array(["b", "a"]), np.array([3, 4])), ref.process(["b", "a"], [3, 4]))
    assert op.snapshot().equals(ref.snapshot(), check_metadata=True)
    _assert_same_result(op.process({"a"}, np.array([5])), ref.process(["a"], [5]))  # any sized iterable
    _assert_same_result(op.process({"a": 0, "b": 1}.keys(), np.array([6, 7])), ref.process(["a", "b"], [6, 7]))
    with pytest.raises(InputError, match=r"process: keys\[1\]: expected str or bytes, got int 7"):
        op.process(["a", 7], [1, 2])
    with pytest.raises(InputError, match=r"process: keys\[0\]: expected str or bytes, got list"):
        op.process([["a"]], [1])


# -- side calls: the long, narrow groups of a skewed call run on a thread of their own ------------------------
def _skewed(rng, busy: int = 120, quiet: int = 150) -> tuple[list[str], np.ndarray]:
    """One busy key among many quiet ones, interleaved (the busy key's events spread through the call)."""
    keys = ["busy"] * busy + [f"q{i % quiet}" for i in range(2 * quiet)]
    order = rng.permutation(len(keys))
    return [keys[i] for i in order], rng.integers(0, 256, len(keys))


def _no_side(op: KeyedOperator) -> KeyedOperator:
    op._side_groups = lambda groups, counts: 0
    return op


def _spy_side(op: KeyedOperator) -> list[int]:
    seen, real = [], op._side_groups

    def side(groups, counts):
        n = real(groups, counts)
        seen.append(n)
        return n

    op._side_groups = side
    return seen


@pytest.mark.parametrize("health", sorted(HEALTH))
def test_side_calls_equal_calls_in_turn_and_each_key_alone(lstm, rng, health):
    """A skewed call with its busy key's group on the side thread: the same results, bit for bit, as every
    group in turn, for every health policy; and each key's state equals Model.step over its events."""
    clock = FakeClock()
    a, b = (KeyedOperator(lstm, keep_last_output=True, clock=clock, health=HEALTH[health]) for _ in range(2))
    _no_side(b)
    side = _spy_side(a)
    events: dict[str, list[int]] = {}
    for _ in range(2):
        keys, x = _skewed(rng)
        _assert_same_result(a.process(keys, x), b.process(keys, x))
        for k, t in zip(keys, x.tolist(), strict=True):
            events.setdefault(k, []).append(t)
    assert side[0] >= 1 and side[1] >= 1  # the busy key's group ran beside the others
    assert a.snapshot().equals(b.snapshot(), check_metadata=True)
    if health == "off":  # (health replaces some states by their shadow's: no single Model.step reference)
        for k in ("busy", "q0", "q7"):
            _, want = lstm.step(np.array([events[k]]))
            for n in ("h", "c"):
                np.testing.assert_allclose(a.state_of(k)[n], want[n], atol=2e-5)


@given(n_side=st.integers(1, 4), rest=st.integers(0, 6), turns=st.lists(st.booleans(), max_size=12),
       stop_at=st.integers(0, 12))
@settings(max_examples=60, deadline=None)
def test_shared_groups_are_each_taken_once(n_side, rest, turns, stop_at):
    """The side thread takes its groups, then the rest from the front, the main thread from the back: in any
    interleaving of their takes, every group is taken exactly once (by one of them), until a stop."""
    q = keyed_operator._Shared(n_side, n_side + rest)
    front, back = q.front(), q.back()
    taken: dict[str, list[int]] = {"side": [], "main": []}
    for i, side_turn in enumerate([*turns, *[True] * (n_side + rest), *[False] * (n_side + rest)]):
        if i == stop_at:
            q.stop()
        gi = next(front if side_turn else back, None)
        if gi is not None:
            taken["side" if side_turn else "main"].append(gi)
    every = sorted(taken["side"] + taken["main"])
    assert len(every) == len(set(every))  # nothing twice
    if stop_at >= len(turns) + 2 * (n_side + rest):  # never stopped: everything, the side's own groups by the side
        assert every == list(range(n_side + rest)) and taken["side"][:n_side] == list(range(n_side))
    assert all(gi >= n_side for gi in taken["main"]) and taken["main"] == sorted(taken["main"], reverse=True)


def _fail_beside(monkeypatch, op: KeyedOperator, where: str) -> list[str]:
    """Make the side thread's call (``side``: the busy key's, 100+ steps) or a main-thread call made while the
    side runs (``main``: a wide one) raise. For ``main`` the side call waits until that call has failed, so
    that it is surely still running then."""
    hits, failed, real = [], threading.Event(), op.model.run_unchecked

    def run(x, lengths, state):
        if x.shape[1] >= 100:  # the side's call
            if where == "side":
                hits.append("side")
                raise Boom("injected ONNX Runtime failure")
            failed.wait(30)
        elif where == "main" and x.shape[0] > 16:
            hits.append("main")
            failed.set()
            raise Boom("injected ONNX Runtime failure")
        return real(x, lengths, state)

    monkeypatch.setattr(op.model, "run_unchecked", run)
    return hits


@pytest.mark.parametrize("where", ["side", "main"])
def test_a_failed_side_or_main_call_changes_nothing(lstm, monkeypatch, rng, where):
    """A failure in the side thread's call, or in a main-thread call while the side runs: the error comes up
    from process, nothing changes, and the operator goes on as a twin that never saw the call."""
    clock = FakeClock()
    op, ref = (KeyedOperator(lstm, keep_last_output=True, clock=clock, health="flag") for _ in range(2))
    keys, x = _skewed(rng)
    for o in (op, ref):
        o.process(keys, x)
    before = _everything(op)
    side = _spy_side(op)
    hits = _fail_beside(monkeypatch, op, where)
    with pytest.raises(Boom):
        op.process(*_skewed(rng))
    assert side == [1] and hits == [where]
    _assert_same(before, _everything(op))
    monkeypatch.undo()
    keys, x = _skewed(rng)
    _assert_same_result(op.process(keys, x), ref.process(keys, x))
    assert op.snapshot().equals(ref.snapshot(), check_metadata=True)


def test_groups_run_in_turn_with_state_on_the_device_or_one_padded_call(lstm, rng):
    """No side call with device state (its slabs are scattered in turn) or unpacked calls, nor where the rest
    of the call is too small to overlap with; results as before."""
    keys, x = _skewed(rng)
    ref = KeyedOperator(lstm).process(keys, x)
    for op in (KeyedOperator(lstm, state_on_device=True), KeyedOperator(lstm, pack_step_cost=float("inf"))):
        side = _spy_side(op)
        np.testing.assert_allclose(op.process(keys, x).outputs["logprobs"], ref.outputs["logprobs"], atol=2e-6)
        assert side == [0]
    op = KeyedOperator(lstm)
    side = _spy_side(op)
    op.process(["busy"] * 100 + [f"q{i}" for i in range(100)], rng.integers(0, 256, 200))  # rest: 100 key-steps
    assert side == [0]
