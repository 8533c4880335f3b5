"""ONNX Runtime execution vs the reference maths: torch nn.LSTM/GRU/RNN and the seed equations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import CELLS
from hypothesis import given, settings
from hypothesis import strategies as st

from streamrnn.model.loaded import load
from streamrnn.model.runtime import CPU

TOL = 1e-5


def torch_reference(net, x: np.ndarray, state: tuple[np.ndarray, ...]):
    """Run fresh torch nn.LSTM/GRU/RNN modules loaded with the net's weights (not the net itself)."""
    c = net.config
    mod = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[c.cell]
    in_dim = c.embed_dim if c.input_kind == "tokens" else c.n_features
    rnn = mod(in_dim, c.hidden, num_layers=c.layers, batch_first=True)
    rnn.load_state_dict(net.rnn.state_dict())
    head = torch.nn.Linear(c.hidden, net.head.out_features)
    head.load_state_dict(net.head.state_dict())
    with torch.no_grad():
        inp = torch.from_numpy(x)
        if c.input_kind == "tokens":
            inp = torch.nn.functional.embedding(inp, net.embed.weight)
        st_t = tuple(torch.from_numpy(s) for s in state)
        y, new = rnn(inp, st_t if c.cell == "lstm" else st_t[0])
        out = head(y)
    new = tuple(new) if c.cell == "lstm" else (new,)
    return out.numpy(), tuple(s.numpy() for s in new)


def _inputs(net, rng, B, T):
    c = net.config
    if c.input_kind == "tokens":
        x = rng.integers(0, 256, (B, T))
    else:
        x = rng.normal(size=(B, T, c.n_features)).astype(np.float32)
    n_state = 2 if c.cell == "lstm" else 1
    state = tuple(rng.normal(scale=0.7, size=(c.layers, B, c.hidden)).astype(np.float32) for _ in range(n_state))
    return x, state




@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("kind", ["tokens", "features"])
@given(B=st.integers(1, 5), T=st.integers(1, 20), seed=st.integers(0, 2**16))
@settings(max_examples=8, deadline=None)
def test_ort_matches_torch(nets_and_paths, cell, kind, B, T, seed):
    net, path = nets_and_paths[(cell, kind)]
    m = load(path, providers=[CPU])
    rng = np.random.default_rng(seed)
    x, state = _inputs(net, rng, B, T)
    out, new = m.step(x, state)
    ref_out, ref_new = torch_reference(net, x, state)
    if kind == "tokens":
        ref = torch.log_softmax(torch.from_numpy(ref_out), -1).numpy()
        np.testing.assert_allclose(out["logprobs"], ref, atol=TOL, rtol=0)
    else:
        K = net.config.n_targets
        np.testing.assert_allclose(out["mean"], ref_out[..., :K], atol=TOL, rtol=0)
        np.testing.assert_allclose(out["log_scale"], ref_out[..., K:], atol=TOL, rtol=0)
    for a, b in zip(new, ref_new, strict=True):
        np.testing.assert_allclose(a, b, atol=TOL, rtol=0)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def seed_equations(net, x_emb: np.ndarray, state):
    """The seed's cell equations in numpy, one layer and one step at a time (float64)."""
    c = net.config
    H = c.hidden
    hs = [s.astype(np.float64).copy() for s in state]
    seq = x_emb.astype(np.float64)
    for layer in range(c.layers):
        W = getattr(net.rnn, f"weight_ih_l{layer}").detach().double().numpy()
        U = getattr(net.rnn, f"weight_hh_l{layer}").detach().double().numpy()
        b = (getattr(net.rnn, f"bias_ih_l{layer}") + getattr(net.rnn, f"bias_hh_l{layer}")).detach().double().numpy()
        h = hs[0][layer]
        C = hs[1][layer] if c.cell == "lstm" else None
        ys = []
        for t in range(seq.shape[1]):
            z = seq[:, t] @ W.T + h @ U.T + b
            if c.cell == "rnn":
                h = np.tanh(z)  # h_t = tanh(W_x x_t + W_h h_{t-1} + b)
            else:
                i, f, g, o = (z[:, k * H:(k + 1) * H] for k in range(4))
                i, f, o, g = _sigmoid(i), _sigmoid(f), _sigmoid(o), np.tanh(g)
                C = f * C + i * g  # C_t = f * C_{t-1} + i * C~_t
                h = o * np.tanh(C)  # h_t = o * tanh(C_t)
            ys.append(h)
        seq = np.stack(ys, axis=1)
        hs[0][layer] = h
        if C is not None:
            hs[1][layer] = C
    return seq, hs


@pytest.mark.parametrize("cell", ["lstm", "rnn"])
def test_ort_matches_seed_equations(nets_and_paths, cell, rng):
    net, path = nets_and_paths[(cell, "features")]
    m = load(path, providers=[CPU])
    x, state = _inputs(net, rng, 3, 9)
    out, new = m.step(x, state)
    top, ref_state = seed_equations(net, x, state)  # features model: x feeds the first layer directly
    head_w = net.head.weight.detach().double().numpy()
    head_b = net.head.bias.detach().double().numpy()
    ref = top @ head_w.T + head_b
    K = net.config.n_targets
    np.testing.assert_allclose(out["mean"], ref[..., :K], atol=TOL, rtol=0)
    for a, b in zip(new, ref_state, strict=True):
        np.testing.assert_allclose(a, b, atol=TOL, rtol=0)
