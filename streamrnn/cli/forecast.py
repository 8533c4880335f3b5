"""``streamrnn train forecast`` and ``streamrnn eval forecast`` (hooked into :mod:`streamrnn.cli.commands`)."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import InputError
from ..forecast.bars import parse_columns
from ..forecast.pooled import WINDOW
from .args import at_least, fraction, fractions, inputs_checked, out_file, seed, utf8

SP500 = "../shared/data/market/sp500_daily_2013_2018"


@contextmanager
def _csv_bars(path: str) -> Iterator[None]:
    """The CSV reader's own error (a binary file: NUL bytes, a stray carriage return) as a user's mistake."""
    try:
        yield
    except csv.Error as e:
        raise InputError(f"--bars: expected CSV bars, got {path!r}, which the CSV reader refuses: {e}") from e


def _train(a: argparse.Namespace) -> int:
    from ..forecast import dataset
    from ..forecast.features import FeatureConfig
    from ..train.forecast import ForecastTrainConfig, export_forecast, save_tcn, train_forecast

    cfg = ForecastTrainConfig(cell=a.cell, hidden=a.hidden, layers=a.layers, dropout=a.dropout, horizons=a.horizons,
                              batch=a.batch, steps=a.steps, lr=a.lr, eval_every=a.eval_every, seed=a.seed,
                              threads=a.threads, max_minutes=a.max_minutes,
                              features=FeatureConfig(bar_seconds=a.bar_seconds, anchor=a.anchor))
    with _csv_bars(a.bars):
        data = dataset.load(a.bars, cfg.horizons, columns=parse_columns(a.columns), features=cfg.features)
    got = dataset.check_frequency(data, cfg.features.bar_seconds, allow=a.allow_frequency)
    inputs_checked()
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


def _symbols(s: str) -> list[str]:
    """An argparse ``type``: a comma-separated list of at least one symbol (repeats dropped)."""
    out = list(dict.fromkeys(x.strip() for x in s.split(",") if x.strip()))
    if not out:
        raise argparse.ArgumentTypeError(f"expected comma-separated symbols, got {s!r}")
    return out


def _date(s: str) -> str:
    """An argparse ``type``: a date ``YYYY-MM-DD`` (as numpy reads it), kept as given."""
    import numpy as np

    try:
        ok = len(s) >= 10 and not np.isnat(np.datetime64(s, "s"))
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"expected a date YYYY-MM-DD, got {s!r}")
    return s


def _tcn(path: str | None):
    """``--tcn``: the checkpoint's outputs for eval forecast (torch is imported only when one is given)."""
    if path is None:
        return None
    from functools import partial

    from ..train.forecast import tcn_outputs

    return partial(tcn_outputs, path)


def _eval(a: argparse.Namespace) -> int:
    from ..forecast.evaluate import eval_forecast, render_table, skipped_lines

    if a.report:
        from ..forecast.report import check_report

        check_report(a.report)  # before any work: a missing extra must not end a long run
    if a.period is not None and (a.start or a.end):
        raise InputError(f"--period: expected either --period or --start/--end, got --period {a.period} "
                         f"and --{'start' if a.start else 'end'}")
    if a.end and not a.start:
        raise InputError(f"--end: expected --start with it, got --end {a.end} alone")
    if a.gamma is not None and a.calibration != "aci":
        raise InputError(f"--gamma: expected it with --calibration aci (the steps it sets and scans), got "
                         f"--calibration {a.calibration}")
    if a.start and a.end and not np_secs(a.start) < np_secs(a.end):
        raise InputError(f"--end: expected a date after --start {a.start}, got {a.end}")

    columns = parse_columns(a.columns)
    with _csv_bars(a.bars):
        r = eval_forecast(a.model, a.bars, columns=columns, tcn=_tcn(a.tcn), symbols=a.symbols,
                          allow_frequency=a.allow_frequency, garch=not a.no_garch, progress=True,
                          period=a.period or "test", start=a.start, end=a.end,
                          scaling=a.gamma_scaling, regime_window=a.regime_window, method=a.calibration,
                          pool=a.pool, window=a.window,
                          **{k: v for k, v in (("levels", a.levels), ("tails", a.var), ("gamma", a.gamma))
                             if v is not None})
    if a.json:
        for line in skipped_lines(r["skipped"]):  # stdout is the JSON; a skipped symbol is never silent
            print(line, file=sys.stderr)
        print(json.dumps(r))
    else:
        sys.stdout.write(render_table(r))
    if a.report:
        from ..forecast.report import NAMES, write_report

        d = write_report(r, a.report)
        print(f"wrote {a.report} (h1 coverage by year {d['years'][0]}..{d['years'][-1]}, PIT histogram, NLL by year "
              f"against {NAMES[d['best']]})", file=sys.stderr if a.json else sys.stdout)
    return 0


def np_secs(day: str) -> float:
    import numpy as np

    return float(np.datetime64(day, "s").astype(np.int64))


def register(train_sub: argparse._SubParsersAction, eval_sub: argparse._SubParsersAction) -> None:
    """Add ``forecast`` to the ``train`` and ``eval`` sub-commands."""
    t = train_sub.add_parser("forecast", help="bar forecaster (Student-t over next-H returns) on OHLCV bars")
    t.add_argument("--bars", default=SP500, help=f"CSV file or directory of bars (default {SP500})")
    t.add_argument("--out", type=out_file, required=True, help="output .onnx (or .pt for --cell tcn)")
    t.add_argument("--checkpoint", type=out_file,
                   help="checkpoint path (default: OUT with .ckpt.pt); resumed if present")
    t.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    t.add_argument("--cell", choices=["lstm", "gru", "rnn", "tcn"], default="lstm")
    # the same value checks as train lm: a bad value is one line at parse time, never a traceback mid-run or
    # (--batch 0) a model that trained on nothing
    t.add_argument("--hidden", type=at_least(1), default=32, help="state size (channels for tcn)")
    t.add_argument("--layers", type=at_least(1), default=2)
    t.add_argument("--dropout", type=fraction(0, 1, hi_open=True), default=0.0)
    t.add_argument("--horizons", type=at_least(1), default=5)
    t.add_argument("--batch", type=at_least(1), default=32, help="symbols per step")
    t.add_argument("--steps", type=at_least(1), default=1500)
    t.add_argument("--max-minutes", type=at_least(0.0), default=0.0)
    t.add_argument("--lr", type=at_least(0.0, open_=True), default=3e-3)
    t.add_argument("--eval-every", type=at_least(1), default=100)
    t.add_argument("--seed", type=seed, default=0)
    t.add_argument("--threads", type=at_least(0), default=1, help="torch threads (0: torch's default)")
    t.add_argument("--bar-seconds", type=at_least(0.0, open_=True), default=86400.0,
                   help="the bar frequency trained for")
    t.add_argument("--allow-frequency", action="store_true", help="train on bars of another frequency anyway")
    t.add_argument("--anchor", action="store_true",
                   help="volatility-anchored model: inputs in running-sd units, scale relative to the EWMA sd "
                        "(docs/market.md); the market job serves it only through ForecastPostprocess.for_model")
    t.add_argument("--columns", help="column mapping, e.g. ts=When,symbol=Ticker (checked before any work)")
    t.add_argument("--name", type=utf8, help="model name in its spec (default: OUT's stem)")
    t.add_argument("--version", type=utf8, default="1.0.0", help="model version in its spec")
    t.set_defaults(fn=_train)

    e = eval_sub.add_parser(
        "forecast", help="rolling-origin backtest: the model vs naive/EWMA/GARCH baselines refitted yearly",
        description="Score the forecaster against naive, EWMA-normal, EWMA-t, GARCH-normal and GARCH-t over a period "
                    "(--start/--end, or the model's test or validation split). The baselines are refitted at the "
                    "start and every 1 January after it on the bars before, then filtered forward. Tables: overall, "
                    "per year and per realised-volatility regime (NLL, CRPS, MAE, MASE, coverage of every --levels "
                    "level), day-clustered Diebold-Mariano tests of the model against each baseline, online (ACI) "
                    "calibration; every skipped symbol is named with its reason (docs/market.md).")
    e.add_argument("--model", required=True, help="forecast .onnx model")
    e.add_argument("--bars", default=SP500, help="CSV file or directory of bars")
    e.add_argument("--tcn", help="also score a TCN baseline checkpoint (.pt from train forecast --cell tcn)")
    e.add_argument("--symbols", type=_symbols, help="comma-separated symbols (default: all)")
    e.add_argument("--columns", help="column mapping, e.g. ts=When,symbol=Ticker (checked before any work)")
    e.add_argument("--allow-frequency", action="store_true", help="evaluate bars of another frequency anyway")
    e.add_argument("--period", choices=["test", "validation"], default=None,
                   help="test (default): from the model's test_start; validation: its [fit_end, val_end) (for model "
                        "design)")
    e.add_argument("--start", type=_date, help="score the period from this date (YYYY-MM-DD) instead of --period; "
                                                "baselines are refitted here and every 1 January after, each time on "
                                                "the bars before")
    e.add_argument("--end", type=_date, help="with --start: the period ends before this date (default: the end of "
                                              "the bars); every target ends before it")
    # defaults: streamrnn.forecast.conformal's LEVELS, TAILS and GAMMA (not imported here: the CLI starts without numpy)
    e.add_argument("--levels", type=fractions(0, 1, "interval levels"),
                   help="central interval levels scored, raw and ACI-calibrated (default 0.5,0.8,0.95,0.99)")
    e.add_argument("--var", type=fractions(0, 0.5, "tail probabilities"),
                   help="VaR / expected-shortfall tail probabilities, left tail (default 0.01,0.05)")
    e.add_argument("--gamma", type=fractions(0, 1, "ACI steps"),
                   help="ACI step of the 80%% level (default 0.01); several: the first makes the tables, each gets a "
                        "gamma-scan line")
    e.add_argument("--calibration", choices=["aci", "agaci", "none"], default="aci",
                   help="online calibration of the model's bands per symbol (conformal.METHODS): aci (default), agaci "
                        "(ACI experts at several steps aggregated online) or none (the calibrated columns are the raw "
                        "bands)")
    e.add_argument("--pool", type=fraction(0, 1), default=0.0, metavar="W",
                   help="weight of the market-wide scale term the calibrated bands are issued with, as the market "
                        "job's --pool (pooled over the symbols loaded, from their first bar; with --symbols those "
                        "only); 0: off (default)")
    e.add_argument("--window", type=at_least(0.001, below=1e8), default=WINDOW,
                   help="with --pool: the market job's --window (s), whose release order the term follows "
                        "(default: %(default)s, the job's)")
    e.add_argument("--gamma-scaling", choices=["proportional", "constant"], default="proportional",
                   help="ACI step per target: proportional to its miscoverage (default) or gamma for every target")
    e.add_argument("--regime-window", type=at_least(2), default=21,
                   help="bars of the realised volatility that sorts origins into low/mid/high regimes (terciles of "
                        "the symbol's own before each yearly origin; default 21)")
    e.add_argument("--no-garch", action="store_true", help="skip the GARCH baselines (faster)")
    e.add_argument("--json", action="store_true", help="the whole result as one JSON object on stdout (skipped "
                                                       "symbols and progress on stderr)")
    e.add_argument("--report", type=out_file, metavar="PNG",
                   help="also draw h1 coverage by year against the nominal band, a PIT histogram and NLL by year "
                        "against the best baseline (needs matplotlib: pip install 'streamrnn[plot]')")
    e.set_defaults(fn=_eval)
