"""Every option of every ``bus`` command says what it does: ``--help`` is the reference users read first, and a
new option without ``help=`` fails here rather than shipping blank."""

from __future__ import annotations

import click

from bus.cli import main


def commands(command: click.Command, path: tuple[str, ...] = ("bus",)):
    """``(path, command)`` for ``command`` and every command and subcommand under it."""
    yield path, command
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from commands(sub, (*path, name))


def test_every_option_of_every_command_has_help():
    walked = dict(commands(main))
    assert {("bus", "bench"), ("bus", "topic", "create"), ("bus", "group", "delete")} <= set(walked)  # it descends
    missing = [
        f"{' '.join(path)} {'/'.join(param.opts + param.secondary_opts)}"
        for path, command in walked.items()
        for param in command.params
        if isinstance(param, click.Option) and not (param.help or "").strip()
    ]
    assert missing == [], "options without help: " + ", ".join(missing)
    assert all(isinstance(p, (click.Option, click.Argument)) for c in walked.values() for p in c.params)


def test_bench_choices_are_the_bench_s_own():
    # bus/cli.py names them without importing the bench (its --help must work without the bench extra).
    from bench.runner import COMPRESSIONS
    from bench.values import VALUE_KINDS

    options = {p.name: p for p in main.commands["bench"].params}
    assert tuple(options["values"].type.choices) == VALUE_KINDS
    for name in COMPRESSIONS:
        assert name in options["compression"].help
