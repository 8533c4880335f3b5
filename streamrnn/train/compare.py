"""RNN vs LSTM vs GRU vs causal TCN: quality and streaming cost per event, for both tasks.

``python -m streamrnn.train.compare lm --text T --steps N --hidden H`` trains the four
byte LMs with one schedule (small, CPU) and prints JSON rows. ``... cost`` times one
streaming step (B = 1, one event, one thread) of each forecast net: a recurrent net
advances its carried state by one step; a TCN without activation caching recomputes
its output over the last receptive-field inputs it keeps per key.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

from ..cli.args import OneLineParser, at_least, seed
from .lm import LMTrainConfig, train_lm
from .nets import NetConfig, RecurrentNet
from .tcn import CausalTCN, TCNConfig, train_tcn_lm


def n_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@torch.no_grad()
def cost_per_event_us(net: torch.nn.Module, x_one: torch.Tensor, rounds: int = 300) -> float:
    """Median microseconds of one streaming event. ``x_one``: one event ``[1, 1, ...]``."""
    net.eval()
    if isinstance(net, CausalTCN):
        rf = net.config.receptive_field
        window = x_one.expand(1, rf, *x_one.shape[2:]).contiguous()

        def step() -> None:
            net(window)
    else:
        state = net.initial_state(1)

        def step() -> None:
            nonlocal state
            _, state = net(x_one, state)
    for _ in range(20):
        step()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def lm_rows(text: Path, *, steps: int, hidden: int, layers: int, channels: int, levels: int, seed: int,
            log=print) -> list[dict]:
    data = text.read_bytes()
    base = dict(hidden=hidden, layers=layers, embed_dim=32, dropout=0.0, batch=32, bptt=128, steps=steps, lr=3e-3,
                warmup=50, weight_decay=0.01, eval_every=steps, seed=seed, threads=1)
    rows = []
    one = torch.zeros(1, 1, dtype=torch.long)
    for cell in ("rnn", "lstm", "gru"):
        cfg = LMTrainConfig(cell=cell, **base)
        net, summary = train_lm(text, cfg, checkpoint=Path(f"/tmp/streamrnn_compare_{cell}.pt"), resume=False,
                                log=log)
        rows.append({"task": "next-byte", "model": f"{cell} {layers}x{hidden}", "params": n_params(net),
                     "steps": steps, "train_seconds": summary["train_seconds"],
                     "val_nats_per_byte": summary["val_loss_streams16"],
                     "us_per_event": round(cost_per_event_us(net, one), 1)})
        log(json.dumps(rows[-1]))
    tcfg = TCNConfig(input_kind="tokens", vocab_size=256, embed_dim=32, channels=channels, kernel=3, levels=levels,
                     out_dim=256)
    net, summary = train_tcn_lm(data, tcfg, LMTrainConfig(**base), log=log)
    rows.append({"task": "next-byte", "model": f"tcn {levels} blocks x{channels} ch (rf {tcfg.receptive_field})",
                 "params": n_params(net), "steps": steps, "train_seconds": summary["train_seconds"],
                 "val_nats_per_byte": round(summary["val_loss"], 4),
                 "us_per_event": round(cost_per_event_us(net, one), 1)})
    log(json.dumps(rows[-1]))
    return rows


def forecast_cost_rows(hidden: int, layers: int, levels: int, n_features: int = 8, horizons: int = 5) -> list[dict]:
    x = torch.zeros(1, 1, n_features)
    rows = []
    for cell in ("rnn", "lstm", "gru"):
        net = RecurrentNet(NetConfig(cell=cell, input_kind="features", n_features=n_features, hidden=hidden,
                                     layers=layers, task="forecast", n_targets=horizons))
        rows.append({"model": f"{cell} {layers}x{hidden}", "params": n_params(net),
                     "us_per_event": round(cost_per_event_us(net, x), 1)})
    net = CausalTCN(TCNConfig(n_features=n_features, channels=hidden, levels=levels, out_dim=2 * horizons))
    rows.append({"model": f"tcn {levels} blocks x{hidden} ch (rf {net.config.receptive_field})",
                 "params": n_params(net), "us_per_event": round(cost_per_event_us(net, x), 1)})
    return rows


def main(argv: list[str] | None = None) -> int:
    # the validators every other command uses: a bad value is one line, exit 2
    p = OneLineParser(prog="python -m streamrnn.train.compare")
    p.add_argument("what", choices=["lm", "cost"])
    p.add_argument("--text", type=Path, default=Path("../shared/data/text/tinyshakespeare.txt"))
    p.add_argument("--steps", type=at_least(1), default=600)
    p.add_argument("--hidden", type=at_least(1), default=128)
    p.add_argument("--layers", type=at_least(1), default=2)
    p.add_argument("--levels", type=at_least(1), default=6)
    p.add_argument("--channels", type=at_least(1), default=96, help="TCN channels (lm)")
    p.add_argument("--seed", type=seed, default=0)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    if a.what == "lm":
        rows = lm_rows(a.text, steps=a.steps, hidden=a.hidden, layers=a.layers, channels=a.channels, levels=a.levels,
                       seed=a.seed, log=lambda m: print(m, file=sys.stderr))
    else:
        rows = forecast_cost_rows(a.hidden, a.layers, a.levels)
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
