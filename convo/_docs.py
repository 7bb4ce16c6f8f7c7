"""The CLI reference (``docs/cli.md``), generated from the click commands so it cannot drift.

Regenerate with ``python -m convo._docs > docs/cli.md`` (``scripts/docs`` does it);
a test fails when the file is out of date.
"""

from __future__ import annotations

from collections.abc import Iterator

import click

from ._cli import cli

WIDTH = 88


def _walk(
    command: click.Command, parent: click.Context | None, name: str
) -> Iterator[tuple[str, click.Context]]:
    settings = {**command.context_settings, "terminal_width": WIDTH, "max_content_width": WIDTH}
    context = click.Context(command, info_name=name, parent=parent, **settings)
    yield context.command_path, context
    if isinstance(command, click.Group):
        for sub_name in command.list_commands(context):
            sub = command.get_command(context, sub_name)
            if sub is not None and not sub.hidden:
                yield from _walk(sub, context, sub_name)


def commands() -> list[str]:
    """Every command path, e.g. ``convo db upgrade``."""
    return [path for path, _ in _walk(cli, None, "convo")]


def cli_reference() -> str:
    """The Markdown reference of every command's ``--help``."""
    parts = [
        "# convo command reference",
        "",
        "Generated from the code by `scripts/docs`; do not edit by hand.",
        "",
    ]
    for path, context in _walk(cli, None, "convo"):
        parts += [f"## `{path}`", "", "```", context.get_help().rstrip(), "```", ""]
    return "\n".join(parts)


if __name__ == "__main__":
    print(cli_reference(), end="")
