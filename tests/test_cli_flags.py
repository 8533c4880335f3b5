"""Every CLI mistake is one line on stderr and exit code 2 (issue 19).

The issue's cases one by one, then a walk over every flag of every subcommand, read from the parsers
themselves (a new flag cannot escape), with zero, negative, NaN, huge, empty, missing and wrong-kind
values. The expensive actions (training, evaluation, generation, benchmarks) are replaced by a stub that
stops the run once every check before them has passed, so only parsing and validation run.
"""

from __future__ import annotations

import argparse
import os

import pytest

from streamrnn.cli.args import OneLineParser
from streamrnn.cli.commands import build_parser, main

MARKET = "exported/market.onnx"


def one_error_line(capsys, argv: list[str]) -> str:
    """Run the CLI; it must exit 2 with exactly one stderr line (no traceback, no provider line first)."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("streamrnn"), err
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    (d / "empty.txt").write_bytes(b"")
    (d / "one.txt").write_bytes(b"x")
    (d / "ok.txt").write_text("ROMEO:\nBut soft, what light through yonder window breaks?\n" * 20)
    (d / "bars.bin").write_bytes(bytes(range(256)) * 8)  # NUL bytes and stray carriage returns
    return d


@pytest.mark.parametrize(("argv", "want"), [
    (["generate", "--seed", "-1"], "argument --seed: expected an int in 0..4294967295, got '-1'"),
    (["generate", "--prompt", os.fsdecode(b"RO\xff\xfeMEO")],
     r"argument --prompt: expected UTF-8 text, got bytes that are not UTF-8: b'RO\xff\xfeMEO'"),
    (["generate", "--model", MARKET, "--top-k", "3"],
     "--model: expected a language model (task 'lm'), got task 'forecast' (exported/market.onnx)"),
    (["eval", "lm", "--model", MARKET, "--text", "{ok.txt}"],
     "--model: expected a language model (task 'lm'), got task 'forecast'"),
    (["eval", "lm", "--text", "{empty.txt}"], "--text: expected at least 2 bytes in the file, got 0"),
    (["eval", "lm", "--text", "{one.txt}"], "--text: expected at least 2 bytes in the file, got 1"),
    (["eval", "forecast", "--model", MARKET, "--bars", "{bars.bin}", "--no-garch"],
     "--bars: expected CSV bars, got '{bars.bin}', which the CSV reader refuses: "),
    *[(["train", "forecast", "--out", "{o.onnx}", flag, value], f"argument {flag}: expected {want}")
      for flag, value, want in [("--hidden", "0", "an int >= 1, got '0'"), ("--layers", "-1", "an int >= 1"),
                                ("--dropout", "nan", "a finite number, got 'nan'"),
                                ("--dropout", "1.5", "a fraction in [0, 1), got '1.5'"),
                                ("--lr", "nan", "a finite number"), ("--steps", "0", "an int >= 1"),
                                ("--threads", "-1", "an int >= 0"), ("--batch", "0", "an int >= 1, got '0'")]],
])
def test_the_issues_cases_are_one_line_exit_2(capsys, files, argv, want):
    """generate and eval lm load with providers 'auto': the provider line used to come first."""
    def filled(a: str) -> str:
        for name in ("empty.txt", "one.txt", "ok.txt", "bars.bin", "o.onnx"):
            a = a.replace("{" + name + "}", str(files / name))
        return a

    assert filled(want) in one_error_line(capsys, [filled(a) for a in argv])
    assert not (files / "o.onnx").exists()


def test_a_command_that_passes_its_checks_still_logs_the_provider_line(capsys, files):
    assert main(["generate", "-n", "3", "--seed", "1", "--prompt", "RO"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("RO") and "runs on CPUExecutionProvider" in captured.err


# -- the walk --------------------------------------------------------------------------------------------------
class Reached(Exception):
    """A stubbed expensive action was reached: every check before it passed (what exit 0 would be)."""


def _stop(*args, **kwargs):
    raise Reached


#: what a flag gets when it is not the one under test: required ones a valid value (a new required flag must be
#: added here), and the model and providers cheap ones (the tiny test model on the CPU, not the 13 MB charlm)
GIVEN = {"text": "{text}", "out": "{out}", "model": "{model}", "providers": "cpu"}
VALUES = ["0", "-1", "nan", "1e400", str(10**30), "abc", "", ".", "/"]


@pytest.fixture()
def stubbed(monkeypatch):
    import streamrnn.cli.commands
    import streamrnn.forecast.dataset
    import streamrnn.forecast.evaluate
    import streamrnn.lm
    import streamrnn.lm.evaluate
    import streamrnn.train.forecast
    import streamrnn.train.lm

    for module, name in [(streamrnn.train.lm, "train_lm"), (streamrnn.train.forecast, "train_forecast"),
                         (streamrnn.forecast.dataset, "load"), (streamrnn.forecast.evaluate, "eval_forecast"),
                         (streamrnn.lm.evaluate, "eval_lm"), (streamrnn.lm, "generate")]:
        monkeypatch.setattr(module, name, _stop)
    bench_parsers: dict[str, argparse.ArgumentParser] = {}
    real = OneLineParser.parse_args

    def parse_args(self, args=None, namespace=None):  # a benchmark stops once its own flags parsed
        ns = real(self, args, namespace)
        if self.prog.startswith("streamrnn bench"):
            bench_parsers.setdefault(self.prog, self)
            raise Reached
        return ns

    monkeypatch.setattr(OneLineParser, "parse_args", parse_args)
    parser = build_parser()  # ~14 ms each (argparse); parsing does not change it, so the walk reuses one
    monkeypatch.setattr(streamrnn.cli.commands, "build_parser", lambda: parser)
    return bench_parsers


def leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """``(subcommand path, parser)`` of every runnable subcommand."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
    for a in subs:
        for name, sub in a.choices.items():
            yield from leaves(sub, (*path, name))


def numeric(a: argparse.Action) -> bool:
    return a.type in (int, float) or getattr(a.type, "__name__", "").startswith(("at_least", "fraction", "int_range"))


def cases(path: tuple[str, ...], parser: argparse.ArgumentParser, fill: dict[str, str]):
    """``(argv, must_refuse)``: each flag with each bad value (and with none), the other flags as ``GIVEN``; a
    number flag must refuse NaN and infinity (``type=float`` takes both)."""
    actions = [a for a in parser._actions
               if not isinstance(a, argparse._HelpAction) and (a.option_strings or a.dest not in ("cmd", "task"))]
    for a in actions:
        if a.required and a.option_strings:
            assert a.dest in GIVEN, f"{' '.join(path)} {a.option_strings[-1]}: a new required flag; add it to GIVEN"

    def given(but: argparse.Action) -> list[str]:
        out = []
        for a in actions:
            if a is not but and a.dest in GIVEN and (a.required or a.dest in ("model", "providers")):
                out += [*a.option_strings[-1:], GIVEN[a.dest].format(**fill)]
        return out

    for a in actions:
        base = given(a)
        if not a.option_strings:  # a positional: each value in its place
            for v in VALUES:
                yield [*path, v, *base], False
            continue
        flag = a.option_strings[-1]
        if a.nargs == 0:  # a switch: alone, and given a value it does not take
            yield [*path, *base, flag], False
            yield [*path, *base, flag, "1"], True
            continue
        for v in VALUES:
            argv = [*path, *base, *([f"{flag}={v}"] if v.startswith("-") else [flag, v])]
            yield argv, numeric(a) and v in ("nan", "1e400")
        yield [*path, *base, flag], True  # the value missing


def run_case(capsys, argv: list[str], refuse: bool = False) -> str | None:
    """What is wrong with running ``argv`` (None: exit 0 unless ``refuse``, or exit 2 with one stderr line)."""
    try:
        code = main(argv)
    except Reached:
        code = 0
    except Exception as e:  # what a user would see as a traceback
        capsys.readouterr()
        return f"{argv}: traceback {type(e).__name__}: {e}"
    err = capsys.readouterr().err
    if code not in (0, 2) or "Traceback" in err or (code == 2 and len(err.strip().splitlines()) != 1):
        return f"{argv}: exit {code}, stderr {err!r}"
    if refuse and code != 2:
        return f"{argv}: accepted (exit {code})"
    return None


def test_every_flag_of_every_subcommand(capsys, stubbed, lstm_path, files, tmp_path):
    fill = {"text": str(files / "ok.txt"), "out": str(tmp_path / "out.onnx"), "model": str(lstm_path)}
    walked, problems = [], []
    root = build_parser()
    for path, parser in [((), root), *leaves(root)]:
        for argv, refuse in cases(path, parser, fill):
            problems.append(run_case(capsys, argv, refuse))
        walked.append(" ".join(path))
    bench = next(a for a in root._actions if isinstance(a, argparse._SubParsersAction)).choices["bench"]
    what = next(a for a in bench._actions if a.dest == "what").choices
    for w in what:
        problems.append(run_case(capsys, ["bench", w]))  # records the benchmark's own parser
    assert sorted(stubbed) == sorted(f"streamrnn bench {w}" for w in what)
    for prog, parser in stubbed.items():
        for argv, refuse in cases(tuple(prog.split()[1:]), parser, fill):
            problems.append(run_case(capsys, argv, refuse))
        walked.append(prog)
    assert {"info", "train lm", "train forecast", "eval lm", "eval forecast", "generate", "bench load",
            "streamrnn bench operator"} <= set(walked)
    problems = [p for p in problems if p]
    assert not problems, "\n".join(problems)
