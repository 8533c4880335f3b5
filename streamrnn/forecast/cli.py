"""``streamrnn train forecast`` and ``streamrnn eval forecast`` (hooked into :mod:`streamrnn.cli`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .bars import parse_columns

SP500 = "../shared/data/market/sp500_daily_2013_2018"


def _train(a: argparse.Namespace) -> int:
    from ..train.forecast import ForecastTrainConfig, export_forecast, save_tcn, train_forecast
    from . import dataset
    from .features import FeatureConfig

    cfg = ForecastTrainConfig(cell=a.cell, hidden=a.hidden, layers=a.layers, dropout=a.dropout, horizons=a.horizons,
                              batch=a.batch, steps=a.steps, lr=a.lr, eval_every=a.eval_every, seed=a.seed,
                              threads=a.threads, max_minutes=a.max_minutes,
                              features=FeatureConfig(bar_seconds=a.bar_seconds))
    data = dataset.load(a.bars, cfg.horizons, columns=parse_columns(a.columns), features=cfg.features)
    got = dataset.check_frequency(data, cfg.features.bar_seconds, allow=a.allow_frequency)
    out = Path(a.out)
    ckpt = Path(a.checkpoint) if a.checkpoint else out.with_suffix(".ckpt.pt")
    net, summary = train_forecast(data, cfg, checkpoint=ckpt, resume=not a.restart, log=print)
    desc = f"{Path(a.bars).name}: {len(data)} symbols, median bar interval {got:g} s"
    if cfg.cell == "tcn":
        save_tcn(net, out, cfg, summary, data_desc=desc)
        print(f"wrote {out} (torch checkpoint of the TCN baseline); checkpoint {ckpt}")
    else:
        spec = export_forecast(net, out, cfg, summary, data_desc=desc, name=a.name or out.stem, version=a.version)
        print(f"wrote {out} (weights sha256 {spec.fingerprint[:16]}; parity "
              f"{spec.metrics['export_parity_torch_vs_ort']:.2e}); checkpoint {ckpt}")
    print(f"best validation NLL {summary['val_nll']:.4f} at step {summary['best_step']} "
          f"({summary['train_seconds']:.0f} s, {summary['train_symbols']} training symbols)")
    return 0


def _eval(a: argparse.Namespace) -> int:
    from .evaluate import eval_forecast, render_table

    r = eval_forecast(a.model, a.bars, columns=parse_columns(a.columns), tcn=a.tcn, symbols=a.symbols,
                      allow_frequency=a.allow_frequency, garch=not a.no_garch, progress=not a.json,
                      period=a.period)
    if a.json:
        print(json.dumps(r))
    else:
        sys.stdout.write(render_table(r))
    return 0


def register(train_sub: argparse._SubParsersAction, eval_sub: argparse._SubParsersAction) -> None:
    """Add ``forecast`` to the ``train`` and ``eval`` sub-commands."""
    t = train_sub.add_parser("forecast", help="bar forecaster (Student-t over next-H returns) on OHLCV bars")
    t.add_argument("--bars", default=SP500, help=f"CSV file or directory of bars (default {SP500})")
    t.add_argument("--out", required=True, help="output .onnx (or .pt for --cell tcn)")
    t.add_argument("--checkpoint", help="checkpoint path (default: OUT with .ckpt.pt); resumed if present")
    t.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    t.add_argument("--cell", choices=["lstm", "gru", "rnn", "tcn"], default="lstm")
    t.add_argument("--hidden", type=int, default=32, help="state size (channels for tcn)")
    t.add_argument("--layers", type=int, default=2)
    t.add_argument("--dropout", type=float, default=0.0)
    t.add_argument("--horizons", type=int, default=5)
    t.add_argument("--batch", type=int, default=32, help="symbols per step")
    t.add_argument("--steps", type=int, default=1500)
    t.add_argument("--max-minutes", type=float, default=0.0)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--eval-every", type=int, default=100)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--bar-seconds", type=float, default=86400.0, help="the bar frequency trained for")
    t.add_argument("--allow-frequency", action="store_true", help="train on bars of another frequency anyway")
    t.add_argument("--columns", help="column mapping, e.g. ts=When,symbol=Ticker")
    t.add_argument("--name")
    t.add_argument("--version", default="1.0.0")
    t.set_defaults(fn=_train)

    e = eval_sub.add_parser("forecast", help="forecast metrics per horizon vs naive/EWMA/GARCH baselines")
    e.add_argument("--model", required=True, help="forecast .onnx model")
    e.add_argument("--bars", default=SP500, help="CSV file or directory of bars")
    e.add_argument("--tcn", help="also score a TCN baseline checkpoint (.pt from train forecast --cell tcn)")
    e.add_argument("--symbols", type=lambda s: s.split(","), help="comma-separated symbols (default: all)")
    e.add_argument("--columns", help="column mapping, e.g. ts=When,symbol=Ticker")
    e.add_argument("--allow-frequency", action="store_true", help="evaluate bars of another frequency anyway")
    e.add_argument("--period", choices=["test", "validation"], default="test",
                   help="test: from the model's test_start; validation: its [fit_end, val_end) (for model design)")
    e.add_argument("--no-garch", action="store_true", help="skip the GARCH baselines (faster)")
    e.add_argument("--json", action="store_true")
    e.set_defaults(fn=_eval)
