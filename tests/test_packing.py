"""Skew-proof packing: groups cover every key once and bound padding; packed process == each key alone."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamrnn import InputError, KeyedOperator
from streamrnn.model import load
from streamrnn.packing import group, pack
from streamrnn.runtime import CPU


def zipf_keys(rng: np.random.Generator, n: int, s: float = 1.1, universe: int = 200) -> list[str]:
    p = 1.0 / np.arange(1, universe + 1) ** s
    return [f"k{i}" for i in rng.choice(universe, n, p=p / p.sum())]


@given(counts=st.lists(st.integers(1, 400), min_size=1, max_size=300),
       factor=st.floats(1.0, 3.0), slack=st.integers(0, 512))
@settings(max_examples=200, deadline=None)
def test_pack_covers_each_row_once_and_bounds_padding(counts, factor, slack):
    c = np.array(counts)
    groups = pack(c, factor=factor, slack=slack)
    assert sorted(np.concatenate(groups).tolist()) == list(range(len(c)))
    for g in groups:
        assert len(g) * c[g].max() <= factor * c[g].sum() + slack + 1e-9
    total = sum(len(g) * c[g].max() for g in groups)
    assert total <= factor * c.sum() + slack * len(groups) + 1e-9


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
       keep=st.booleans(), factor=st.sampled_from([1.0, 1.5, 1e9]))
@settings(max_examples=25, deadline=None)
def test_packed_process_equals_one_padded_call_and_each_key_alone(lstm_path, seed, n, split, keep, factor):
    """Zipf-skewed keys: packed (several model calls) == unpacked (one call), bit for bit, and == offline."""
    m = load(lstm_path, providers=[CPU])
    rng = np.random.default_rng(seed)
    keys = zipf_keys(rng, n)
    x = rng.integers(0, 256, n)
    s = min(split, n)
    packed = KeyedOperator(m, keep_last_output=keep, pack_factor=factor, pack_slack=0)
    single = KeyedOperator(m, keep_last_output=keep, pack_factor=1e12)
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
