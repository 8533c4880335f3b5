"""The ``streamrnn`` command line: info, train lm, eval lm, generate, bench."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ..errors import InputError, StreamRNNError
from .args import (
    Heartbeat,
    HeldLog,
    OneLineParser,
    at_least,
    fraction,
    inputs_checked,
    out_file,
    read_file,
    seed,
    utf8,
)
from .logs import cli_logging, kept_logging


def _info(a: argparse.Namespace) -> int:
    from ..model.loaded import load
    from ..model.spec import describe

    m = load(a.model, providers=a.providers)
    if a.json:
        print(json.dumps({**json.loads(m.spec.to_json()), "provider": m.provider}, indent=2))
    else:
        print(describe(m.spec))
        print(f"provider  {m.provider}")
    return 0


def _train_lm(a: argparse.Namespace) -> int:
    from ..train.export import export
    from ..train.lm import LMTrainConfig, train_lm

    cfg = LMTrainConfig(cell=a.cell, hidden=a.hidden, layers=a.layers, embed_dim=a.embed, dropout=a.dropout,
                        batch=a.batch, bptt=a.bptt, steps=a.steps, lr=a.lr, weight_decay=a.weight_decay,
                        val_frac=a.val_frac, eval_every=a.eval_every, seed=a.seed, threads=a.threads,
                        max_minutes=a.max_minutes)
    out = Path(a.out)
    ckpt = Path(a.checkpoint) if a.checkpoint else out.with_suffix(".ckpt.pt")
    net, summary = train_lm(a.text, cfg, checkpoint=ckpt, resume=not a.restart,
                            log=lambda m: print(m, file=sys.stderr, flush=True))
    metrics = {k: summary.pop(k) for k in ("train_loss", "val_loss_streams16")}
    spec = export(net, out, name=a.name or out.stem, version=a.version, training=summary, metrics=metrics)
    print(f"wrote {out} (weights sha256 {spec.fingerprint[:16]}; parity "
          f"{spec.metrics['export_parity_torch_vs_ort']:.2e}); checkpoint {ckpt}")
    print(f"train loss {metrics['train_loss']:.4f}  val loss {metrics['val_loss_streams16']:.4f} nats/char")
    return 0


def _language_model(a: argparse.Namespace):
    """``--model`` loaded, and checked to be a language model (before any flag that reads its vocabulary)."""
    from ..model.loaded import load

    m = load(a.model, providers=a.providers)
    if m.spec.task != "lm":
        raise InputError(f"--model: expected a language model (task 'lm'), got task {m.spec.task!r} ({a.model})")
    return m


def _eval_lm(a: argparse.Namespace) -> int:
    from ..lm.evaluate import eval_lm

    data = read_file("--text", a.text)
    if a.last_frac:
        data = data[int(len(data) * (1 - a.last_frac)):]
    if len(data) < 2:  # a prediction needs a byte to predict from and one to score
        what = "the last fraction of the file" if a.last_frac else "the file"
        raise InputError(f"--text: expected at least 2 bytes in {what}, got {len(data)}")
    m = _language_model(a)
    inputs_checked()
    with Heartbeat("streamrnn eval lm") as progress:
        r = eval_lm(m, data, chunk=a.chunk, reset_every=a.reset_every, parity_bytes=a.parity_bytes,
                    progress=progress.update)
    if a.json:
        print(json.dumps({"model": a.model, "text": a.text, "last_frac": a.last_frac, **r.to_dict()}))
    else:
        print(f"{r.n_bytes} bytes, state carried in chunks of {r.chunk}: "
              f"{r.bits_per_char:.4f} bits/char ({r.nats_per_char:.4f} nats/char)")
        print(f"state reset every {r.reset_every} bytes:      "
              f"{r.bits_per_char_reset:.4f} bits/char ({r.nats_per_char_reset:.4f} nats/char)")
        print(f"chunked vs whole-sequence parity over {r.parity_bytes} bytes: max |dlogprob| {r.parity_max_abs:.2e}")
    return 0


def _heal_config(a: argparse.Namespace):
    """The ``heal`` policy's config from ``--health-*`` (HealthConfig's defaults where not given)."""
    from ..keyed.health import HealthConfig

    given = {k: getattr(a, f"health_{k}") for k in ("window", "margin", "patience", "sample_every")}
    return HealthConfig("heal", **{k: v for k, v in given.items() if v is not None})


def _eval_health(a: argparse.Namespace) -> int:
    from .. import DEFAULT_MODEL
    from ..lm.evaluate import eval_health, out_of_domain_text
    from ..model.loaded import load

    if a.task == "forecast" and a.model == DEFAULT_MODEL:
        from ..model.shipped import resolve

        a.model = resolve("shipped:market")
    m = load(a.model, providers=a.providers)
    task = a.task or m.spec.task
    if task != m.spec.task:
        raise InputError(f"--model: expected a model of task {task!r} (--task), got task {m.spec.task!r} ({a.model})")
    if task == "forecast":
        return _eval_forecast_health(a, m)
    if a.text is None:
        raise InputError("--text: expected the language model's training text (its validation part is scored), "
                         "got none")
    data = read_file("--text", a.text)
    if a.last_frac:
        data = data[int(len(data) * (1 - a.last_frac)):]
    if a.ood_bytes > 1 << 28:
        raise InputError(f"--ood-bytes: expected at most {1 << 28} (256 MiB), got {a.ood_bytes}")
    if len(data) < 2 * a.streams:
        raise InputError(f"--text: expected at least {2 * a.streams} bytes (2 per stream), got {len(data)}")
    m = _language_model(a)
    inputs_checked()
    step = a.step or 4
    texts = {"validation": data, "out_of_domain": out_of_domain_text(a.ood_bytes or len(data), seed=a.seed)}
    res = {}
    with Heartbeat("streamrnn eval health") as progress:
        for name, d in texts.items():
            res[name] = eval_health(m, d, text=name, streams=a.streams, step=step, reset_every=a.reset_every,
                                    heal=_heal_config(a), progress=progress.update).to_dict()
    v, o = res["validation"]["bits_per_char"], res["out_of_domain"]["bits_per_char"]
    reset = f"reset{a.reset_every}"
    goals = {"heal_le_min_carried_reset_plus_0.02_out_of_domain": {
                 "value": o["heal"] - min(o["carried"], o[reset]),
                 "met": o["heal"] <= min(o["carried"], o[reset]) + 0.02},
             "heal_le_carried_plus_0.005_validation": {
                 "value": v["heal"] - v["carried"], "met": v["heal"] <= v["carried"] + 0.005}}
    if a.json:
        print(json.dumps({"model": a.model, "text": a.text, "last_frac": a.last_frac, **res, "goals": goals}))
    else:
        for name, r in res.items():
            b = r["bits_per_char"]
            print(f"{name}: {r['scored_bytes']} bytes in {r['streams']} streams, "
                  f"bits/char: carried {b['carried']:.4f}, "
                  f"{reset} {b[reset]:.4f}, flag {b['flag']:.4f}, heal {b['heal']:.4f} ({r['heals']} heals)")
        for k, g in goals.items():
            print(f"goal {k}: {g['value']:+.4f} bits/char {'MET' if g['met'] else 'MISSED'}")
    return 0


def _eval_forecast_health(a: argparse.Namespace, m) -> int:
    """``eval health`` of a forecaster: simulated symbols with a volatility break (streamrnn.forecast.health_eval)."""
    from ..forecast.health_eval import eval_forecast_health

    inputs_checked()
    with Heartbeat("streamrnn eval health") as progress:
        r = eval_forecast_health(m, streams=a.streams, calm_bars=a.calm_bars, break_bars=a.break_bars,
                                 calm_sd=a.calm_sd, break_sd=a.break_sd, step=a.step or 1,
                                 reset_every=a.reset_every, seed=a.seed, heal=_heal_config(a),
                                 progress=progress.update).to_dict()
    if a.json:
        print(json.dumps({"model": a.model, "task": "forecast", **r}))
        return 0
    print(f"{r['streams']} simulated symbols x {r['bars_per_stream']} bars (daily sd {r['calm_sd']:g}%, then "
          f"{r['break_sd']:g}% over bars {r['parts']['break'][0]}..{r['parts']['break'][1] - 1}, then "
          f"{r['calm_sd']:g}%), {r['scored_bars']} scored; mean NLL (nats/bar):")
    parts = ("calm", "calm_before", "break", "calm_after", "all")
    print(f"  {'policy':<10}" + "".join(f"{p:>13}" for p in parts))
    for k, v in r["nll"].items():
        print(f"  {k:<10}" + "".join(f"{v[p]:>13.4f}" for p in parts))
    print(f"heal: {r['heals']} heals ({', '.join(f'{p} {n}' for p, n in r['heals_by_part'].items())})")
    g = r["target"]
    print(f"goal heal_le_carried_plus_{g['limit']:g}_calm: {g['heal_minus_carried_calm']:+.4f} nats/bar "
          f"{'MET' if g['met'] else 'MISSED'}")
    return 0


def _generate(a: argparse.Namespace) -> int:
    from .. import lm

    m = _language_model(a)
    V = m.spec.input.vocab_size
    if a.top_k is not None and not 1 <= a.top_k <= V:
        raise InputError(f"--top-k: expected an int in 1..{V} (the vocabulary size), got {a.top_k}")
    inputs_checked()
    prompt = lm.encode(a.prompt)
    if len(prompt) == 0:
        prompt = lm.encode("\n")
    o, st = m.step(prompt[None])
    text = lm.generate(m, st, o["logprobs"][0, -1], a.n, temperature=a.temperature, top_k=a.top_k,
                       greedy=a.greedy, seed=a.seed)
    sys.stdout.write(a.prompt + text + "\n")
    return 0


def _bench(a: argparse.Namespace, rest: list[str]) -> int:
    if a.what == "operator":
        from ..bench.operator import main
    elif a.what == "gpu":
        from ..bench.gpu import main
    elif a.what == "load":
        from ..bench.load import main
    else:
        from ..bench.beam import main
    return main(rest)


#: ``streamrnn bench NAME``: each runs ``streamrnn.bench.NAME.main`` with the arguments after NAME
BENCHES = {"operator": "operator overhead against raw ONNX Runtime and torch eager",
           "beam": "the Beam transform against Beam's stateless answer and two ceilings",
           "gpu": "does the CUDA path really run, and what does it buy?",
           "load": "StatefulInference under key churn, 1 vs 2 workers; memory bounded by the TTL"}


def build_parser() -> argparse.ArgumentParser:
    from .. import DEFAULT_MODEL

    p = OneLineParser(prog="streamrnn", description="Stateful recurrent models in streams.")
    p.add_argument("-v", "--verbose", action="store_true", help="also show other libraries' INFO logs")
    sub = p.add_subparsers(dest="cmd", required=True)

    def model_args(q: argparse.ArgumentParser, positional: bool = False) -> None:
        if positional:
            q.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                           help="path to a streamrnn .onnx model (default: the shipped charlm)")
        else:
            q.add_argument("--model", default=DEFAULT_MODEL, help="streamrnn .onnx model (default: shipped charlm)")
        q.add_argument("--providers", default="auto",
                       help="'auto' (CUDA if it loads, else CPU), 'cpu', 'cuda', 'cuda:N', or a comma-separated "
                            "list of those or ORT provider names")

    q = sub.add_parser("info", help="show a model's spec")
    model_args(q, positional=True)
    q.add_argument("--json", action="store_true")
    q.set_defaults(fn=_info)

    q = sub.add_parser("train", help="train a model")
    tsub = q.add_subparsers(dest="task", required=True)
    t = tsub.add_parser("lm", help="byte-level language model with truncated BPTT")
    t.add_argument("--text", required=True, help="UTF-8 text file; first 1-val_frac trains, the rest validates")
    t.add_argument("--out", type=out_file, required=True, help="output .onnx path")
    t.add_argument("--checkpoint", help="checkpoint path (default: OUT with .ckpt.pt); resumed if present")
    t.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    t.add_argument("--cell", choices=["lstm", "gru", "rnn"], default="lstm")
    t.add_argument("--hidden", type=at_least(1), default=512)
    t.add_argument("--layers", type=at_least(1), default=2)
    t.add_argument("--embed", type=at_least(1), default=64)
    t.add_argument("--dropout", type=fraction(0, 1, hi_open=True), default=0.25)
    t.add_argument("--batch", type=at_least(1), default=64)
    t.add_argument("--bptt", type=at_least(1), default=128)
    t.add_argument("--steps", type=at_least(1), default=5000)
    t.add_argument("--max-minutes", type=at_least(0.0), default=0.0, help="also stop (and finish the schedule) by time")
    t.add_argument("--lr", type=at_least(0.0, open_=True), default=2e-3)
    t.add_argument("--weight-decay", type=at_least(0.0), default=0.05)
    t.add_argument("--val-frac", type=fraction(0, 1, lo_open=True, hi_open=True), default=0.1)
    t.add_argument("--eval-every", type=at_least(1), default=200)
    t.add_argument("--seed", type=seed, default=1337)
    t.add_argument("--threads", type=at_least(0), default=0)
    t.add_argument("--name", help="model name in the metadata (default: OUT's stem)")
    t.add_argument("--version", default="1.0.0")
    t.set_defaults(fn=_train_lm)

    q = sub.add_parser("eval", help="evaluate a model")
    esub = q.add_subparsers(dest="task", required=True)
    e = esub.add_parser("lm", help="bits/char with carried state vs reset-every-N, and streaming parity")
    model_args(e)
    e.add_argument("--text", required=True)
    e.add_argument("--last-frac", type=fraction(0, 1), default=0.0,
                   help="evaluate only the last fraction of the file (0.1 = the validation split)")
    e.add_argument("--chunk", type=at_least(1), default=1024, help="bytes per call with carried state")
    e.add_argument("--reset-every", type=at_least(1), default=64)
    e.add_argument("--parity-bytes", type=at_least(2), default=100_000, help="prefix length for the whole-sequence run")
    e.add_argument("--json", action="store_true")
    e.set_defaults(fn=_eval_lm)

    e = esub.add_parser("health", help="carried state, reset-every-N and the health policies (flag, heal): an LM's "
                                       "bits/char on validation and out-of-domain text, a forecaster's NLL on "
                                       "simulated symbols with a volatility break")
    model_args(e)
    e.add_argument("--task", choices=("lm", "forecast"), default=None,
                   help="lm or forecast (default: the model's task; forecast without --model: the shipped market "
                        "model)")
    e.add_argument("--text", help="lm: the model's training text (its validation part is scored)")
    e.add_argument("--last-frac", type=fraction(0, 1), default=0.1,
                   help="score only the last fraction of the file (0.1 = the validation split)")
    e.add_argument("--streams", type=at_least(1), default=32, help="keys (text streams, or simulated symbols)")
    e.add_argument("--step", type=at_least(1), default=None, help="events per key per call (default: 4 bytes, 1 bar)")
    e.add_argument("--reset-every", type=at_least(1), default=64)
    e.add_argument("--ood-bytes", type=at_least(0), default=0,
                   help="size of the out-of-domain text built at run time (0: as the validation text)")
    e.add_argument("--seed", type=seed, default=0, help="seed of the out-of-domain text, or of the simulated symbols")
    e.add_argument("--calm-bars", type=at_least(1), default=500, help="forecast: calm bars before and after the break")
    e.add_argument("--break-bars", type=at_least(1), default=250, help="forecast: bars of the high-volatility regime")
    e.add_argument("--calm-sd", type=at_least(0.01), default=1.0, help="forecast: calm daily sd, %% (default: 1)")
    e.add_argument("--break-sd", type=at_least(0.01), default=4.0,
                   help="forecast: the break's daily sd, %% (default: 4)")
    e.add_argument("--health-window", type=at_least(1), default=None, help="heal: shadow steps per verdict")
    e.add_argument("--health-margin", type=float, default=None, help="heal: nats/event a strike needs")
    e.add_argument("--health-patience", type=at_least(1), default=None, help="heal: consecutive strikes that heal")
    e.add_argument("--health-sample-every", type=at_least(1), default=None,
                   help="heal without a reference loss: watch one window in this many")
    e.add_argument("--json", action="store_true")
    e.set_defaults(fn=_eval_health)

    q = sub.add_parser("generate", help="generate text from a prompt")
    model_args(q)
    q.add_argument("--prompt", type=utf8, default="")
    q.add_argument("-n", type=at_least(0), default=200)
    q.add_argument("--temperature", type=at_least(0.0, open_=True), default=0.8)
    q.add_argument("--top-k", type=at_least(1))
    q.add_argument("--greedy", action="store_true")
    q.add_argument("--seed", type=seed)
    q.set_defaults(fn=_generate)

    q = sub.add_parser("bench", help="benchmarks (print JSON with --json); see --help of each")
    bsub = q.add_subparsers(dest="what", required=True, metavar="{" + ",".join(BENCHES) + "}")
    for name, text in BENCHES.items():
        # no flags and no -h of its own: every argument after the name, --help included, goes to the
        # benchmark's own parser (so `bench load --help` shows bench load's flags, not this group's usage)
        bsub.add_parser(name, help=text, add_help=False, prefix_chars="\0")
    q.set_defaults(fn=None)
    from .forecast import register as register_forecast
    register_forecast(tsub, esub)  # train forecast / eval forecast
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; a user's mistake prints one line ``streamrnn CMD: error: ...`` and returns 2.

    The provider line (logged when a model loads) is held until the command has checked its inputs
    (:func:`~streamrnn.cli.args.inputs_checked`), so that such a mistake is that one line alone.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    p = build_parser()
    try:
        a, rest = p.parse_known_args(argv)
        if rest and a.cmd != "bench":
            p.error(f"unrecognized arguments: {' '.join(rest)}")
    except SystemExit as e:  # argparse: --help (0) or a usage error (2, already printed in one line)
        return int(e.code or 0)
    with kept_logging():  # an in-process call leaves the caller's logging as it was
        return _run(a, rest)


def _run(a: argparse.Namespace, rest: list[str]) -> int:
    cli_logging(verbose=a.verbose)  # Beam's import-time noise ("apitools not found") dropped on a run without GCP
    logging.getLogger("streamrnn").setLevel(logging.INFO)  # the one provider line, and progress
    with HeldLog() as held:
        try:
            if a.cmd == "bench":
                inputs_checked()  # each benchmark checks its own flags
                return _bench(a, rest)
            code = a.fn(a)
            inputs_checked()
            return code
        except SystemExit as e:  # a bench sub-command's own argument parser
            return int(e.code or 0) if not isinstance(e.code, str) else 2
        except StreamRNNError as e:
            held.drop()
            print(f"streamrnn {a.cmd}: error: {e}", file=sys.stderr)
            return 2
        except OSError as e:  # a path given on the command line cannot be read or written
            held.drop()
            print(f"streamrnn {a.cmd}: error: {e.filename or ''}: expected a usable path, got {e.strerror or e}",
                  file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
