"""A causal temporal CNN (dilated causal convolutions), the convolutional baseline for both tasks.

``out[t]`` depends on inputs ``0..t`` only: every convolution is left-padded by
``(kernel - 1) * dilation``. Residual blocks with dilations ``1, 2, 4, ...``
give a receptive field of ``1 + 2 (kernel - 1) (2^levels - 1)`` steps. Same
call signature as :class:`~streamrnn.train.nets.RecurrentNet` (``forward(x, state)
-> (out, None)``) so one training loop serves both; streaming a TCN means keeping
the last ``receptive_field - 1`` inputs per key instead of an ``(h, c)``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .lm import LMTrainConfig, lr_at, split_bytes


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


def train_tcn_lm(data: bytes, tcn: TCNConfig, cfg: LMTrainConfig, log=print) -> tuple[CausalTCN, dict]:
    """Byte LM with the TCN: random ``cfg.bptt``-byte windows of the training split, same split/schedule as the LM.

    Every position is trained (early positions see less than the receptive field, as at a stream's start).
    """
    train, val = split_bytes(data, cfg.val_frac)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    net = CausalTCN(tcn)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    t0 = time.perf_counter()
    tokens = torch.from_numpy(train.astype(np.int64))
    net.train()
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        starts = torch.from_numpy(rng.integers(0, len(train) - cfg.bptt - 1, cfg.batch))
        idx = starts[:, None] + torch.arange(cfg.bptt + 1)[None]
        seq = tokens[idx]
        out, _ = net(seq[:, :-1])
        loss = F.cross_entropy(out.reshape(-1, tcn.out_dim), seq[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.clip)
        opt.step()
        if (step + 1) % cfg.eval_every == 0:
            log(f"tcn lm step {step + 1}/{cfg.steps} loss {loss.item():.4f}")
    seconds = time.perf_counter() - t0
    return net.eval(), {"train_seconds": round(seconds, 1), "val_loss": eval_tcn_lm(net, val), "steps": cfg.steps}


@torch.no_grad()
def eval_tcn_lm(net: CausalTCN, val: np.ndarray, chunk: int = 16384) -> float:
    """Mean nats/byte over ``val``: every byte predicted with its full receptive field of context."""
    net.eval()
    rf = net.config.receptive_field
    x = torch.from_numpy(val.astype(np.int64))
    total, count = 0.0, 0
    for s in range(0, len(x) - 1, chunk):
        lo = max(0, s - rf + 1)
        seg = x[lo:min(s + chunk + 1, len(x))]
        out, _ = net(seg[None, :-1])
        skip = s - lo
        total += F.cross_entropy(out[0, skip:], seg[1 + skip:], reduction="sum").item()
        count += len(seg) - 1 - skip
    return total / count
