"""Every `--help` is complete: the top level and each command (and sub-command) has a description
that ends a sentence, every option and argument has a help text, and `--help` exits 0."""

from __future__ import annotations

import argparse

import pytest

from hcnr_jax.cli import build_parser, main


def _parsers(parser: argparse.ArgumentParser, argv: tuple[str, ...] = ()):
    yield argv, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*argv, name))


PARSERS = dict(_parsers(build_parser()))


def test_every_command_is_listed():
    from hcnr_jax.cli import COMMANDS

    assert {argv[0] for argv in PARSERS if argv} == set(COMMANDS)


@pytest.mark.parametrize("argv", list(PARSERS), ids=lambda a: " ".join(a) or "hcnr")
def test_help_is_complete(argv, capsys):
    parser = PARSERS[argv]
    text = (parser.description or "").strip()
    assert text and text[-1] in ".)", f"hcnr {' '.join(argv)}: description missing or cut: {text[-60:]!r}"
    assert not parser.epilog or parser.epilog.strip()[-1] in ".)"
    bare = [a.option_strings or a.dest for a in parser._actions if not a.help]
    assert not bare, f"hcnr {' '.join(argv)}: no help text for {bare}"
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--help"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.startswith("usage: hcnr")
