"""Shared CLI plumbing: consoles, output formats, exit codes, error reporting."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from enum import StrEnum
from typing import Annotated, Any, NoReturn, TypeVar

import typer
import yaml
from pydantic import BaseModel
from rich.console import Console, RenderableType
from rich.markup import escape
from rich.table import Table

from keybrake.proxy.redact import redact

__all__ = [
    "EXIT_REFUSED",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "BriefOutputOption",
    "Output",
    "OutputOption",
    "console",
    "err_console",
    "fail",
    "print_data",
    "print_item",
    "print_rows",
]

EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


class Output(StrEnum):
    table = "table"
    json = "json"
    yaml = "yaml"


OutputOption = Annotated[
    Output | None,
    typer.Option("--output", "-o", help="table (default on a terminal), json or yaml."),
]
# The same option, in the shorter words some commands' help has always given it.
BriefOutputOption = Annotated[
    Output | None, typer.Option("--output", "-o", help="table, json or yaml.")
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


def print_item(
    item: M,
    output: Output | None,
    render: Callable[[M], RenderableType],
    extra: dict[str, object] | None = None,
) -> Output:
    """One record: `render(item)` on a terminal, else its fields (and `extra`) as JSON or YAML.
    Returns the format chosen, for a line a table may want after it."""
    chosen = default_output(output)
    if chosen is Output.table:
        console.print(render(item))
    else:
        print_data({**item.model_dump(), **(extra or {})}, chosen)
    return chosen


def fail(message: str, code: int = EXIT_REFUSED, hint: str | None = None) -> NoReturn:
    err_console.print(f"[red]error:[/red] {escape(redact(message))}", soft_wrap=True)
    if hint:
        err_console.print(escape(hint), soft_wrap=True)
    raise typer.Exit(code)


def print_rows(
    rows: Sequence[BaseModel],
    output: Output | None,
    *,
    empty: str,
    columns: Sequence[str],
    cells: Callable[[Any], Sequence[str]],
) -> None:
    """A listing as a table (one row of `cells(row)` each) on a terminal, else JSON or YAML."""
    chosen = default_output(output)
    if chosen is not Output.table:
        print_data([r.model_dump() for r in rows], chosen)
        return
    if not rows:
        console.print(empty)
        return
    table = Table(box=None, header_style="bold")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*cells(row))
    console.print(table)
