"""Torch recurrent networks (training side): the seed cells, stacked, with a task head.

The cells are torch's own ``nn.RNN`` (tanh), ``nn.LSTM`` and ``nn.GRU``, so training
gets cuDNN on a GPU and the fused kernels on a CPU:

* tanh RNN: ``h_t = tanh(W_x x_t + b_x + W_h h_{t-1} + b_h)``;
* LSTM: gates ``i, f, o = sigmoid(.)``, candidate ``C~ = tanh(.)``,
  ``C_t = f * C_{t-1} + i * C~``, ``h_t = o * tanh(C_t)``;
* GRU: torch's formulation (reset gate applied after the hidden matmul).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from .graph import LayerWeights, NetWeights

_CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


@dataclass(frozen=True)
class NetConfig:
    """Architecture of a :class:`RecurrentNet`.

    ``input_kind="tokens"`` embeds int tokens (``vocab_size``, ``embed_dim``);
    ``"features"`` feeds ``n_features`` floats per step. ``task="lm"`` predicts
    the next token (``vocab_size`` logits); ``"forecast"`` predicts a Gaussian
    (mean, log-scale) over ``n_targets`` values.
    """

    cell: str = "lstm"
    input_kind: str = "tokens"
    vocab_size: int = 256
    embed_dim: int = 64
    n_features: int = 0
    hidden: int = 512
    layers: int = 2
    dropout: float = 0.0
    task: str = "lm"
    n_targets: int = 0

    def __post_init__(self) -> None:
        if self.cell not in _CELLS:
            raise ValueError(f"cell: expected one of {sorted(_CELLS)}, got {self.cell!r}")
        if self.input_kind not in ("tokens", "features"):
            raise ValueError(f"input_kind: expected 'tokens' or 'features', got {self.input_kind!r}")
        if self.task not in ("lm", "forecast"):
            raise ValueError(f"task: expected 'lm' or 'forecast', got {self.task!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class RecurrentNet(nn.Module):
    """Stacked recurrent net. ``forward(x, state) -> (out, new_state)``.

    Shapes (batch first, like the ONNX contract):
      x: int64 ``[B, T]`` or float32 ``[B, T, F]``;
      state: tuple of ``[layers, B, hidden]`` tensors, ``(h, c)`` for an LSTM, ``(h,)`` otherwise;
      out: logits ``[B, T, vocab]`` for ``lm``; ``[B, T, 2 * n_targets]`` (mean, log-scale) for ``forecast``.
    """

    def __init__(self, config: NetConfig):
        super().__init__()
        self.config = config
        c = config
        in_dim = c.embed_dim if c.input_kind == "tokens" else c.n_features
        self.embed = nn.Embedding(c.vocab_size, c.embed_dim) if c.input_kind == "tokens" else None
        self.rnn = _CELLS[c.cell](in_dim, c.hidden, num_layers=c.layers, batch_first=True,
                                  dropout=c.dropout if c.layers > 1 else 0.0)
        self.drop = nn.Dropout(c.dropout)
        out_dim = c.vocab_size if c.task == "lm" else 2 * c.n_targets
        self.head = nn.Linear(c.hidden, out_dim)

    def initial_state(self, batch: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
        c = self.config
        z = torch.zeros(c.layers, batch, c.hidden, device=device)
        return (z, z.clone()) if c.cell == "lstm" else (z,)

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, ...] | None = None):
        if state is None:
            state = self.initial_state(x.shape[0], x.device)
        inp = self.drop(self.embed(x)) if self.embed is not None else x
        rnn_state = state if self.config.cell == "lstm" else state[0]
        y, new = self.rnn(inp, rnn_state)
        new = tuple(new) if self.config.cell == "lstm" else (new,)
        return self.head(self.drop(y)), new

    def net_weights(self) -> NetWeights:
        """Weights as numpy arrays, torch layout, for the ONNX graph builder."""

        def a(t: torch.Tensor) -> np.ndarray:
            return t.detach().cpu().float().numpy().copy()

        layers = []
        for i in range(self.config.layers):
            p = {n: getattr(self.rnn, f"{n}_l{i}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
            layers.append(LayerWeights(a(p["weight_ih"]), a(p["weight_hh"]), a(p["bias_ih"]), a(p["bias_hh"])))
        return NetWeights(
            cell=self.config.cell, layers=layers, head_w=a(self.head.weight), head_b=a(self.head.bias),
            embed=a(self.embed.weight) if self.embed is not None else None,
        )
