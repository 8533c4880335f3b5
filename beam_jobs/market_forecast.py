"""Market forecast job: per-bar forecasts (median, 80%/95% price bands) for many symbols, on Apache Beam.

    python -m beam_jobs.market_forecast --input BARS --output DIR [--replay] [--plot PNG] [Beam options]
    python -m beam_jobs.market_forecast --demo --output DIR [--plot PNG]   # a SIMULATED market
    python -m beam_jobs.market_forecast --input 'gs://b/bars/*.csv' --watch --output DIR   # new files, live
    python -m beam_jobs.market_forecast --input projects/P/subscriptions/S --output DIR    # JSON bars, live

``BARS``: CSV or Parquet bar files, directories of them or globs (comma-separated), on any Beam filesystem,
with columns symbol, ts (date or timestamp), open, high, low, close, volume; the layouts of
``shared/data/market`` are recognised, others take ``--columns ts=When,symbol=Ticker``. Each symbol's bars go
through online features (state: last close, volume, time, EWMA variance; applied in time order at each
window's release) and then the forecaster's carried LSTM state in ``StatefulInference``. Outputs:
``DIR/forecasts-*.parquet`` (one row per bar: symbol, ts, close, per-horizon median and interval prices,
return distribution, and the realised next-bar return, error, NLL and interval hits once the next bar
arrives), ``DIR/dead_letters-*.parquet`` (bad bars with the reason), ``DIR/summary.json`` (live NLL and
coverage per symbol). ``--health flag|heal`` adds ``state_health`` to the forecasts (default off). A missing input, a
missing model, an unwritable output or ``--plot`` file, or a bad flag (a value out of range, a flag neither
this job nor Beam knows, a model of another task, ``--replay`` off the DirectRunner) is a one-line error with
exit code 2, found before any pipeline runs. ``--replay`` plays the bars as an unbounded stream. ``--watch``,
a Pub/Sub subscription or a Kafka topic (JSON rows with the same columns) read live input (streaming;
:mod:`streamrnn.beam.job.live`): the same bars, dead letters and outputs.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from streamrnn.cli.logs import guard_imports, imports_done, quiet_job_logging

guard_imports()  # before apache_beam: no import-time warnings on the user's terminal

import apache_beam as beam  # noqa: E402

from streamrnn.beam import StatefulInference  # noqa: E402
from streamrnn.beam.job import (  # noqa: E402
    CPU,
    DEAD_LETTER_SCHEMA,
    SUMMARY,
    InputError,
    JobError,
    LiveRun,
    ModelLoadError,
    Output,
    ReadLive,
    WriteParquet,
    add_live_args,
    at_least,
    fraction,
    fractions,
    launcher,
    live_source,
    load_model,
    read_summary,
)
from streamrnn.cli.args import add_health_args, health_arg  # noqa: E402
from streamrnn.forecast.bars import parse_columns  # noqa: E402
from streamrnn.forecast.beam import (  # noqa: E402
    LOCATIONS,
    BarParser,
    Features,
    ForecastPostprocess,
    ReadBars,
    ReplayBars,
    bar_files,
    check_bar_frequency,
)
from streamrnn.forecast.beam_output import (  # noqa: E402
    Calibration,
    WriteMarketSummary,
    job_columns,
    output_schema,
    print_market_summary,
)
from streamrnn.forecast.calibrate_step import Calibrate  # noqa: E402
from streamrnn.forecast.conformal import GAMMA, LEVELS, METHOD, METHODS, SCALINGS, TAILS, label  # noqa: E402
from streamrnn.forecast.evaluate import forecast_meta  # noqa: E402
from streamrnn.forecast.features import FeatureConfig  # noqa: E402
from streamrnn.forecast.pooled import WINDOW  # noqa: E402
from streamrnn.keyed.health import policy_of  # noqa: E402

FORECASTS, DEAD_LETTERS = "forecasts", "dead_letters"
DEFAULT_MODEL = os.environ.get("STREAMRNN_MARKET_MODEL", "shipped:market")

imports_done()  # the placeholder goes: a program importing this module configures logging itself


def _parse(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The job's flags and Beam's; JobError (one line) for a bad value, an unknown flag or runner."""
    ap = launcher.JobParser("market_forecast", description=__doc__.split("\n")[0])
    non_negative = at_least(0.0)
    ap.add_argument("--input", help="bar files: CSV/Parquet files, directories or globs, comma-separated; or live: a "
                                    "glob or directory with --watch, projects/P/subscriptions/S (Pub/Sub) or "
                                    "kafka://BROKERS/TOPIC (JSON rows)")
    ap.add_argument("--output", required=True, help="output directory (any Beam filesystem)")
    ap.add_argument("--demo", action="store_true",
                    help="simulate a market (GARCH-t bars, labelled SIMULATED) into DIR/simulated_bars and use it")
    ap.add_argument("--model", default=DEFAULT_MODEL,
                    help="forecast model: a path on any Beam filesystem, or shipped:NAME for a model shipped in the "
                         "package, found by each worker in its own install (default: %(default)s)")
    ap.add_argument("--columns", help="column mapping for other layouts, e.g. ts=When,symbol=Ticker")
    ap.add_argument("--replay", action="store_true",
                    help="play the bars as an unbounded stream in time order (DirectRunner --streaming)")
    ap.add_argument("--window", type=at_least(0.001, below=1e8), default=WINDOW,
                    help="event-time window (s): bars are applied when the watermark passes a window's end plus "
                         "the allowed lateness (default: %(default)s, a week)")
    ap.add_argument("--step", type=non_negative, default=0.0, help="replay: event-time seconds per watermark step, "
                                                             "at most the window (default: the window)")
    ap.add_argument("--allowed-lateness", type=non_negative, default=0.0,
                    help="seconds a window's bars may still arrive out of order (default: %(default)s)")
    ap.add_argument("--ttl", type=non_negative, default=0.0,
                    help="idle seconds (event time) that end a symbol's stream; 0: never (default: %(default)s)")
    ap.add_argument("--shards", type=at_least(1), default=16, help="state shards (default: %(default)s)")
    ap.add_argument("--providers", default="cpu", help="'auto', 'cpu' or 'cuda' (default: %(default)s)")
    ap.add_argument("--plot", metavar="PNG", help="draw price, forecast bands and live error to this PNG")
    ap.add_argument("--plot-symbols", type=lambda s: [x for x in s.split(",") if x],
                    help="symbols to plot, comma-separated (default: the 3 symbols with the most output bars, ties "
                         "in alphabetical order)")
    ap.add_argument("--plot-last", type=at_least(1), default=None,
                    help="plot each symbol's last N bars (default: all, so each panel's coverage is the summary's)")
    ap.add_argument("--location", choices=LOCATIONS, default="zero",
                    help="the forecasts' location: zero (default: the median price is the last close; eval forecast "
                         "finds no skill in the model's drift, see docs/market.md) or model")
    ap.add_argument("--allow-frequency", action="store_true",
                    help="run on bars of another frequency than the model's (checked at launch on the first files)")
    # defaults: streamrnn.forecast.conformal's LEVELS, TAILS and GAMMA (as eval forecast's flags)
    ap.add_argument("--levels", type=fractions(0, 1, "interval levels"), default=list(LEVELS),
                    help="central interval levels calibrated online per symbol (ACI) and scored, raw and calibrated, "
                         "at every horizon (default: 0.5,0.8,0.95,0.99)")
    ap.add_argument("--var", type=fractions(0, 0.5, "tail probabilities"), default=list(TAILS),
                    help="value-at-risk / expected-shortfall tail probabilities, calibrated like the levels "
                         "(default: 0.01,0.05)")
    ap.add_argument("--gamma", type=fraction(0, 1, lo_open=True, hi_open=True),
                    help=f"the ACI step of the 80%% level: about 1/gamma bars to correct a shift; --calibration aci "
                         f"only (default: {GAMMA})")
    ap.add_argument("--calibration", choices=METHODS, default=METHOD,
                    help="online calibration of the bands per symbol: aci (one step), agaci (ACI experts at several "
                         "steps aggregated online: reacts faster to a regime shift) or none (the calibrated columns "
                         "are the raw model's bands); docs/market.md (default: %(default)s)")
    ap.add_argument("--gamma-scaling", choices=SCALINGS, default=SCALINGS[0],
                    help="each level's step: proportional to its miscoverage, or the same constant step for all "
                         "(default: %(default)s)")
    ap.add_argument("--pool", type=fraction(0, 1), default=0.0, metavar="W",
                    help="weight of a market-wide scale term learned from every symbol's surprises at once, so a "
                         "shock common to all symbols widens every band within days; 0: off. With it on, the "
                         "calibration runs as one Beam key (docs/market.md, pooled; default: %(default)s)")
    add_health_args(ap, "symbols", "off: a forecaster has no reference loss to flag against, docs/operator.md")
    ap.add_argument("--quiet", action="store_true", help="no progress line")
    ap.add_argument("--verbose", action="store_true", help="Beam's INFO log lines too")
    add_live_args(ap)
    launcher.add_metrics_args(ap, "market_forecast")
    args, beam_args = ap.parse_known_args(argv)
    if not args.input and not args.demo and not args.watch:  # --watch without a glob: live_source names it
        ap.error("--input: expected bar files (or --demo), got neither")
    beam_args = launcher.beam_flags(ap, beam_args, replay="--replay" if args.replay else None)
    for flag, vals in (("--levels", args.levels), ("--var", args.var)):
        if len({label(v) for v in vals}) != len(vals):
            ap.error(f"{flag}: expected values distinct in their column names, got {','.join(map(str, vals))}")
    if args.gamma is not None and args.calibration != "aci":
        ap.error(f"--gamma: expected it with --calibration aci (the one step it sets), got --calibration "
                 f"{args.calibration}" + (": its experts run fixed steps (docs/market.md, AgACI)"
                                          if args.calibration == "agaci" else ""))
    args.gamma = GAMMA if args.gamma is None else args.gamma
    args.live = live_source(args, beam_args)
    args.health_arg = health_arg(ap, args)
    return args, beam_args


def _inference(args: argparse.Namespace) -> tuple[StatefulInference, dict]:
    launcher.require_model(args.model, "a streamrnn forecast model", " (pass --model)")
    try:
        model = load_model(args.model, [CPU])
        launcher.require_task(args.model, model.spec, "forecast", "a forecast model")
        meta = forecast_meta(model)
        inf = StatefulInference(
            model=args.model, num_shards=args.shards, window_size=args.window,
            # the feature step releases a window at its end + lateness; one more window keeps those events on time
            allowed_lateness=args.allowed_lateness + args.window, ttl=args.ttl or None,
            dedupe_horizon=max(3600.0, 3 * args.window + args.allowed_lateness),
            # df, and for a volatility-anchored model its EWMA anchor: absolute scales, as eval forecast's
            postprocess=ForecastPostprocess.for_model(meta, location=args.location), next_fields=("ret", "jump"),
            output="arrow",
            providers=args.providers, health=args.health_arg)
    except (InputError, ModelLoadError) as e:
        raise JobError(str(e).splitlines()[0]) from None
    args.health = policy_of(inf.health, model.spec)  # the policy taken (the default: off for a forecaster)
    return inf, meta


def build(p: beam.Pipeline, args: argparse.Namespace, files: list[str], inference: StatefulInference,
          meta: dict, temp_dir: str) -> None:
    """bars -> per-symbol features -> StatefulInference (Student-t -> quantiles, next bar's return paired)
    -> Parquet forecasts and dead letters (Beam file sinks), and the live summary."""
    columns = parse_columns(args.columns)
    if args.live is not None:
        bars, unread = p | "ReadLive" >> ReadLive(
            args.live, BarParser(columns), watermark_step=args.window,
            drain=2 * args.window + args.allowed_lateness)  # the features step holds a bar until then
    elif args.replay:
        bars, unread = p | "ReplayBars" >> ReplayBars(files, columns, step=args.step or args.window,
                                                      window=args.window, lateness=args.allowed_lateness)
    else:
        bars, unread = p | "ReadBars" >> ReadBars(files, columns)
    cfg = FeatureConfig(**meta["features"])
    events, bad_bars = bars | "Features" >> Features(cfg, window=args.window, lateness=args.allowed_lateness)
    out, dead = events | "Forecast" >> inference
    df, gap_bars = [float(d) for d in meta["df"]], cfg.gap_bars
    cal = Calibration(int(meta["horizons"]), tuple(args.levels), tuple(args.var), float(args.gamma), args.gamma_scaling,
                      args.calibration, float(args.pool))
    rows = (out | "JobColumns" >> beam.Map(job_columns, df, gap_bars)
            | "Calibrate" >> Calibrate(df, levels=cal.levels, tails=cal.tails, gamma=cal.gamma, scaling=cal.scaling,
                                       method=cal.method, num_shards=args.shards, pool=cal.pool))
    dead_all = (unread, bad_bars, dead) | "AllDeadLetters" >> beam.Flatten()
    schema = output_schema(cal.horizons, cal.levels, cal.tails, health=args.health != "off")
    rows | "WriteForecasts" >> WriteParquet(args.output, prefix=FORECASTS, schema=schema, temp_directory=temp_dir)
    dead_all | "WriteDeadLetters" >> WriteParquet(args.output, prefix=DEAD_LETTERS, schema=DEAD_LETTER_SCHEMA,
                                                  temp_directory=temp_dir)
    (rows, dead_all) | "Summary" >> WriteMarketSummary(args.output, simulated=bool(args.demo), calibration=cal)


def _demo_input(output: str) -> str:
    from streamrnn.forecast.synthetic import simulate, write_sp500_layout

    if not launcher.is_local(output):
        raise JobError(f"--demo: expected a local --output folder, got {output!r}")
    folder = Path(output) / "simulated_bars"
    bars = simulate(["SIMA", "SIMB", "SIMC", "SIMD"], start="2016-01-01", end="2017-07-01", seed=7)
    paths = write_sp500_layout(bars, folder)
    with open(paths[0], "a") as f:  # what real feeds do: a repeated bar and a broken one (dead letters)
        f.write(f"2017-06-30,{bars[0].open[-1]:.4f},{bars[0].high[-1]:.4f},{bars[0].low[-1]:.4f},"
                f"{bars[0].close[-1]:.4f},{int(bars[0].volume[-1])},SIMA\n")
        f.write("2017-07-03,10.0,9.0,11.0,10.0,1000,SIMA\n")
    return str(folder)


def _run(args: argparse.Namespace, beam_args: list[str], out: Output) -> int:
    if args.plot:  # before the pipeline runs, not when it ends
        from streamrnn.forecast.plot import check_plotting

        try:
            check_plotting(args.plot)
        except InputError as e:
            raise JobError(str(e)) from None
        launcher.require_writable_file("--plot", args.plot)
    inference, meta = _inference(args)  # the model's checks before the demo writes its bars
    if args.demo:
        args.input = _demo_input(args.output)
    try:
        files = bar_files(args.input) if args.live is None else []
        columns = parse_columns(args.columns)
        if files:  # a daily model on 1-minute bars would give a day's band per minute, silently
            check_bar_frequency(files, columns, float(meta["bar_seconds"]), allow=args.allow_frequency)
    except InputError as e:
        raise JobError(str(e)) from None
    label = " [SIMULATED market]" if args.demo else ""
    source = f"{args.input}{label} ({len(files)} file(s))" if args.live is None else args.live.describe()
    with LiveRun(args.live) as run:
        seconds = launcher.execute(
            "market_forecast", args, beam_args, out, source=source, live=run.status,
            outputs={FORECASTS: "forecasts", DEAD_LETTERS: "dead letters"},
            build=lambda p: build(p, args, files, inference, meta, out.temp))
    summary = read_summary(args.output)
    if summary is None:
        raise JobError(f"input: expected bars in {args.input!r}, got none that could be used (see dead letters)")
    print_market_summary(summary)
    print(f"wrote {launcher.join(args.output, FORECASTS + '-*.parquet')}, {DEAD_LETTERS}-*.parquet, {SUMMARY} in "
          f"{seconds:.1f} s",
          file=sys.stderr)
    if args.plot:
        from streamrnn.forecast.plot import plot_forecasts

        try:
            drawn = plot_forecasts(args.output, args.plot, symbols=args.plot_symbols, simulated=bool(args.demo),
                                   last=args.plot_last)
        except InputError as e:
            raise JobError(str(e)) from None
        print(f"wrote {args.plot} ({', '.join(drawn)})", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args, beam_args = _parse(argv)
    except JobError as e:
        return launcher.refuse("market_forecast", e)
    quiet_job_logging("market_forecast", verbose=args.verbose)
    out = Output(args.output, (FORECASTS, DEAD_LETTERS), (SUMMARY,))
    return launcher.run("market_forecast", out, lambda: _run(args, beam_args, out))


if __name__ == "__main__":
    sys.exit(main())
