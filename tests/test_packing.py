"""Skew-proof packing: groups cover every key once and bound padding; packed process == each key alone."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamrnn import InputError, KeyedOperator
from streamrnn.keyed.packing import group, pack
from streamrnn.model.loaded import load
from streamrnn.model.runtime import CPU


def zipf_keys(rng: np.random.Generator, n: int, s: float = 1.1, universe: int = 200) -> list[str]:
    p = 1.0 / np.arange(1, universe + 1) ** s
    return [f"k{i}" for i in rng.choice(universe, n, p=p / p.sum())]


def _cost(counts: np.ndarray, groups, step_cost: float) -> float:
    return sum(float(counts[g].max()) * (step_cost + len(g)) for g in groups)


@given(counts=st.lists(st.integers(1, 60), min_size=1, max_size=40), step_cost=st.floats(0.0, 50.0))
@settings(max_examples=120, deadline=None)
def test_pack_is_optimal_against_brute_force(counts, step_cost):
    """Every row exactly once; the cost equals the best of ALL partitions into length-sorted runs."""
    c = np.array(counts)
    groups = pack(c, step_cost=step_cost)
    assert sorted(np.concatenate(groups).tolist()) == list(range(len(c)))
    got = _cost(c, groups, step_cost)
    longest = sorted(counts, reverse=True)  # a run's cost: its first (longest) row x (step_cost + its rows)
    n, free = len(c), min(len(c) - 1, 11)  # cut points between sorted rows (first 12 rows free, rest one run)
    best = np.inf
    for mask in range(2 ** free):
        cuts = [0, *(i + 1 for i in range(free) if mask >> i & 1), n]
        best = min(best, sum(longest[a] * (step_cost + b - a) for a, b in pairwise(cuts)))
    assert got <= best + 1e-6
    assert got <= _cost(c, [np.arange(n)], step_cost) + 1e-6


@given(keys=st.lists(st.sampled_from(["a", "b", b"a", "é", "z"]), max_size=60))
def test_group_matches_a_plain_loop(keys):
    g = group(keys)
    seen: dict = {}
    for i, k in enumerate(keys):
        r = seen.setdefault(k, len(seen))
        assert g.rows[i] == r and g.cols[i] == sum(1 for kk in keys[:i] if kk == k and type(kk) is type(k))
    assert g.keys == list(seen) and g.counts.tolist() == [sum(1 for kk in keys if kk == k) for k in seen]


@pytest.mark.parametrize("bad", [[["x"]], [{"a": 1}], [1.5]])
def test_group_names_the_bad_key(bad):
    with pytest.raises(InputError, match=r"keys\[0\]: expected str or bytes"):
        group(bad)


@given(seed=st.integers(0, 2**16), n=st.integers(1, 300), split=st.integers(0, 300),
       keep=st.booleans(), step_cost=st.sampled_from([0.0, 4.0, 100.0]))
@settings(max_examples=25, deadline=None)
def test_packed_process_equals_one_padded_call_and_each_key_alone(lstm_path, seed, n, split, keep, step_cost):
    """Zipf-skewed keys: packed (several model calls) == unpacked (one call), bit for bit, and == offline."""
    m = load(lstm_path, providers=[CPU])
    rng = np.random.default_rng(seed)
    keys = zipf_keys(rng, n)
    x = rng.integers(0, 256, n)
    s = min(split, n)
    packed = KeyedOperator(m, keep_last_output=keep, pack_step_cost=step_cost)
    single = KeyedOperator(m, keep_last_output=keep, pack_step_cost=float("inf"))
    for part in (slice(0, s), slice(s, n)):
        rp = packed.process(keys[part], x[part])
        rs = single.process(keys[part], x[part])
        np.testing.assert_allclose(rp.outputs["logprobs"], rs.outputs["logprobs"], atol=2e-6, rtol=0)
        assert (rp.pos == rs.pos).all() and (rp.fresh == rs.fresh).all()
        for k in rp.prev_outputs:
            np.testing.assert_allclose(rp.prev_outputs[k], rs.prev_outputs[k], atol=2e-6, rtol=0)
    assert packed.keys() == single.keys()
    for k in set(keys):
        idx = [i for i, kk in enumerate(keys) if kk == k]
        _, st_ = m.step(x[idx][None])
        np.testing.assert_allclose(packed.state_of(k)["c"], st_["c"], atol=2e-5, rtol=0)
        assert packed.steps_of(k) == len(idx)
