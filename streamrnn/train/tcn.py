"""A causal temporal CNN (dilated causal convolutions), the convolutional baseline for both tasks.

``out[t]`` depends on inputs ``0..t`` only: every convolution is left-padded by
``(kernel - 1) * dilation``. Residual blocks with dilations ``1, 2, 4, ...``
give a receptive field of ``1 + 2 (kernel - 1) (2^levels - 1)`` steps. Same
call signature as :class:`~streamrnn.train.nets.RecurrentNet` (``forward(x, state)
-> (out, None)``) so one training loop serves both; streaming a TCN means keeping
the last ``receptive_field - 1`` inputs per key instead of an ``(h, c)``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TCNConfig:
    input_kind: str = "features"
    n_features: int = 0
    vocab_size: int = 256
    embed_dim: int = 32
    channels: int = 32
    kernel: int = 3
    levels: int = 5
    dropout: float = 0.0
    out_dim: int = 2

    @property
    def receptive_field(self) -> int:
        return 1 + 2 * (self.kernel - 1) * (2 ** self.levels - 1)

    def to_dict(self) -> dict:
        return asdict(self)


class _Block(nn.Module):
    def __init__(self, c_in: int, c: int, kernel: int, dilation: int, dropout: float):
        super().__init__()
        self.pad = (kernel - 1) * dilation
        self.conv1 = nn.Conv1d(c_in, c, kernel, dilation=dilation)
        self.conv2 = nn.Conv1d(c, c, kernel, dilation=dilation)
        self.drop = nn.Dropout(dropout)
        self.skip = nn.Conv1d(c_in, c, 1) if c_in != c else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, T]
        y = self.drop(F.relu(self.conv1(F.pad(x, (self.pad, 0)))))
        y = self.drop(F.relu(self.conv2(F.pad(y, (self.pad, 0)))))
        return F.relu(y + self.skip(x))


class CausalTCN(nn.Module):
    """Dilated causal CNN. x: int64 ``[B, T]`` tokens or float32 ``[B, T, F]``; out ``[B, T, out_dim]``."""

    def __init__(self, config: TCNConfig):
        super().__init__()
        self.config = c = config
        self.embed = nn.Embedding(c.vocab_size, c.embed_dim) if c.input_kind == "tokens" else None
        c_in = c.embed_dim if self.embed is not None else c.n_features
        self.blocks = nn.ModuleList(
            _Block(c_in if i == 0 else c.channels, c.channels, c.kernel, 2 ** i, c.dropout) for i in range(c.levels))
        self.head = nn.Linear(c.channels, c.out_dim)

    def forward(self, x: torch.Tensor, state: object = None) -> tuple[torch.Tensor, None]:
        h = self.embed(x) if self.embed is not None else x
        h = h.transpose(1, 2)
        for b in self.blocks:
            h = b(h)
        return self.head(h.transpose(1, 2)), None
