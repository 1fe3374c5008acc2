"""Shared CLI plumbing: consoles, output formats, exit codes, error reporting."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Sequence
from enum import StrEnum
from typing import Annotated, Any, NoReturn, TypeVar

import typer
import yaml
from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from keybrake.cli._table import Grid, print_grid
from keybrake.proxy.redact import redact

__all__ = [
    "EXIT_REFUSED",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "BriefOutputOption",
    "Output",
    "OutputOption",
    "choice",
    "console",
    "err_console",
    "fail",
    "print_created",
    "print_data",
    "print_item",
    "print_rows",
    "show",
]

EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3


def console() -> Console:
    """Standard output, as it is when written to: its width (COLUMNS, else the terminal's) and
    whether it is a terminal are this command's, not those of when the CLI was imported."""
    return Console(highlight=False)


def err_console() -> Console:
    return Console(stderr=True, highlight=False)


S = TypeVar("S", bound=str)


def choice(*decls: str, values: Iterable[S], help: str) -> Any:
    """An option taking one of `values` (strings, or a StrEnum's members): any other is a usage
    error naming them all, before anything is sent."""
    valid = {str(value): value for value in values}

    def parse(text: str) -> S:
        if text not in valid:
            fail(f"{decls[0]} must be one of: {', '.join(valid)}", EXIT_USAGE)
        return valid[text]

    return typer.Option(*decls, help=help, parser=parse, autocompletion=lambda: list(valid))


class Output(StrEnum):
    table = "table"
    json = "json"
    yaml = "yaml"


OutputOption = Annotated[
    Output | None,
    choice("--output", "-o", values=Output, help="table (default on a terminal), json or yaml."),
]
# The same option, in the shorter words some commands' help has always given it.
BriefOutputOption = Annotated[
    Output | None, choice("--output", "-o", values=Output, help="table, json or yaml.")
]

M = TypeVar("M", bound=BaseModel)


def default_output(output: Output | None) -> Output:
    """Tables for people at a terminal, JSON when piped into another program."""
    if output is not None:
        return output
    return Output.table if sys.stdout.isatty() else Output.json


def print_data(data: Any, output: Output) -> None:
    if output is Output.yaml:
        sys.stdout.write(yaml.safe_dump(data, sort_keys=False))
    else:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")


def show(shown: Grid | str, *, wide: bool = False) -> None:
    """A table (printed as `keybrake.cli._table` says) or a line of rich markup, on stdout."""
    if isinstance(shown, Grid):
        print_grid(shown, console(), wide=wide)
    else:
        console().print(shown, soft_wrap=True)


def print_item(
    item: M,
    output: Output | None,
    render: Callable[[M], Grid | str],
    extra: dict[str, object] | None = None,
) -> Output:
    """One record: `render(item)` on a terminal, else its fields (and `extra`) as JSON or YAML.
    Returns the format chosen, for a line a table may want after it."""
    chosen = default_output(output)
    if chosen is Output.table:
        show(render(item))
    else:
        print_data({**item.model_dump(mode="json"), **(extra or {})}, chosen)
    return chosen


def print_created(
    item: M,
    output: Output | None,
    render: Callable[[M], Grid | str],
    *,
    quiet: bool,
    handle: str,
    extra: dict[str, object] | None = None,
) -> Output | None:
    """What a command that makes something prints: with `--quiet` only its `handle` (its id or
    token: what a script reads next), else the record as `print_item` prints it. Returns the
    format chosen (None when quiet), for a line a table may want after it."""
    if quiet:
        print(handle)
        return None
    return print_item(item, output, render, extra)


def fail(message: str, code: int = EXIT_REFUSED, hint: str | None = None) -> NoReturn:
    err = err_console()
    err.print(f"[red]error:[/red] {escape(redact(message))}", soft_wrap=True)
    if hint:
        err.print(escape(hint), soft_wrap=True)
    raise typer.Exit(code)


def print_rows(
    rows: Sequence[BaseModel],
    output: Output | None,
    *,
    empty: str,
    headers: str,
    right: str = "",
    cells: Callable[[Any], Sequence[str | Text]],
) -> None:
    """A listing as a table (columns `headers`, right-aligned those in `right`, as `Grid.of`
    takes them; one row of `cells(row)` each) on a terminal, else JSON or YAML."""
    chosen = default_output(output)
    if chosen is not Output.table:
        print_data([r.model_dump(mode="json") for r in rows], chosen)
    elif not rows:
        show(empty)
    else:
        table = Grid.of(headers, right)
        table.rows += [cells(row) for row in rows]
        show(table)
