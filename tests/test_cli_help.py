"""``--help`` of every subcommand shows that subcommand's own usage and flags (issue 16).

``streamrnn bench load --help`` used to print the ``bench`` group's usage. Every runnable subcommand, read
from the parsers (a new one cannot escape), with ``--help`` and ``-h``: the parser that printed is the
subcommand's own (its ``prog``), and every flag it has is in what was printed.
"""

from __future__ import annotations

import argparse

import pytest

from streamrnn.cli.commands import BENCHES, build_parser, main


def leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """``(path, parser)`` of every subcommand group and runnable subcommand under ``parser``."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    yield path, parser, bool(subs)
    for a in subs:
        for name, sub in a.choices.items():
            yield from leaves(sub, (*path, name))


PATHS = sorted((path, group) for path, _, group in leaves(build_parser()))


def test_the_walk_sees_every_command():
    names = {" ".join(p) for p, _ in PATHS}
    assert {"info", "generate", "train lm", "train forecast", "eval lm", "eval forecast",
            *(f"bench {b}" for b in BENCHES)} <= names
    assert {" ".join(p) for p, group in PATHS if group} == {"", "train", "eval", "bench"}


@pytest.fixture()
def printed(monkeypatch):
    """The parsers whose help was printed, in order."""
    seen: list[argparse.ArgumentParser] = []
    real = argparse.ArgumentParser.print_help

    def print_help(self, file=None):
        seen.append(self)
        real(self, file)

    monkeypatch.setattr(argparse.ArgumentParser, "print_help", print_help)
    return seen


@pytest.mark.parametrize("flag", ["--help", "-h"])
@pytest.mark.parametrize(("path", "group"), PATHS, ids=[" ".join(p) or "streamrnn" for p, _ in PATHS])
def test_help_is_the_subcommands_own(capsys, printed, path, group, flag):
    assert main([*path, flag]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert len(printed) == 1
    parser = printed[0]
    prog = " ".join(("streamrnn", *path))
    assert parser.prog == prog
    assert out.startswith(f"usage: {prog} ")
    options = [s for a in parser._actions if a.help != argparse.SUPPRESS for s in a.option_strings]
    assert all(s in out for s in options), [s for s in options if s not in out]
    if group:  # a group lists its subcommands
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        assert all(name in out for name in sub.choices)
    else:  # every runnable subcommand has flags of its own beyond -h
        assert set(options) - {"-h", "--help"}, out


@pytest.mark.parametrize(("bench", "flag"), [("load", "--keys"), ("beam", "--variants"), ("gpu", "--budget"),
                                             ("operator", "--zipf-s")])
def test_bench_help_shows_the_benchmarks_flags_after_other_flags(capsys, bench, flag):
    """--help after another flag still reaches the benchmark's parser (and runs nothing)."""
    assert main(["-v", "bench", bench, "--json", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: streamrnn bench {bench} ") and flag in out
