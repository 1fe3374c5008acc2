"""Listings as kubectl pages them: `--limit` rows, `--continue TOKEN` for the next page, `--all`
for every page, and a line on stderr when more rows exist (never silently cut short)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Protocol, TypeVar

import typer
from pydantic import BaseModel
from rich.console import RenderableType

from keybrake.cli._common import Output, console, default_output, err_console, print_data
from keybrake.proxy.money import parse_ts

__all__ = [
    "AllOption",
    "ContinueOption",
    "ListOutput",
    "age",
    "collect",
    "print_listing",
    "say_more",
]

T_co = TypeVar("T_co", covariant=True)
T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


class ListOutput(StrEnum):
    table = "table"
    wide = "wide"  # the table with more columns
    name = "name"  # ids only, one per line, for the next command
    json = "json"
    yaml = "yaml"


ContinueOption = Annotated[
    str | None,
    typer.Option("--continue", help="The token a previous page printed: the next page."),
]
AllOption = Annotated[bool, typer.Option("--all", help="Every page, however many rows.")]


class _Page(Protocol[T_co]):
    @property
    def data(self) -> Sequence[T_co]: ...

    @property
    def continue_(self) -> str | None: ...


def collect(
    fetch: Callable[[str | None], _Page[T]], cursor: str | None, every_page: bool
) -> tuple[list[T], str | None]:
    """The rows of one page (or of every page from `cursor` on), and the next page's token."""
    rows: list[T] = []
    token = cursor
    while True:
        page = fetch(token)
        rows += page.data
        token = page.continue_
        if not every_page or token is None:
            return rows, token


def print_listing(
    rows: list[M],
    output: ListOutput | None,
    *,
    name: Callable[[M], str],
    table: Callable[[list[M], bool], RenderableType],
    empty: str,
) -> None:
    """A listing as `-o` asks: ids (`name`), `table(rows, wide)` (`empty` when there are none),
    JSON or YAML; a table on a terminal, else JSON."""
    chosen = output or ListOutput(default_output(None).value)
    if chosen is ListOutput.name:
        for row in rows:
            print(name(row))
    elif chosen in (ListOutput.table, ListOutput.wide):
        console.print(table(rows, chosen is ListOutput.wide) if rows else empty)
    else:
        print_data([r.model_dump() for r in rows], Output(chosen.value))


def say_more(token: str | None, command: str, noun: str) -> None:
    """Tell the user (on stderr, so piped output stays clean) that the listing goes on."""
    if token:
        err_console.print(
            f"more {noun}: {command} with the same options and --continue {token}   "
            "(or --all for every page)",
            soft_wrap=True,
        )


def age(created_at: str, now: datetime | None = None) -> str:
    """kubectl's AGE: 45s, 12m, 5h, 3d."""
    seconds = int(((now or datetime.now(UTC)) - parse_ts(created_at)).total_seconds())
    seconds = max(seconds, 0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size * (2 if unit == "d" else 1):
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
