"""Listings as kubectl pages them: `--limit` rows, `--continue TOKEN` for the next page, `--all`
for every page, and a line on stderr when more rows exist (never silently cut short)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Protocol, TypeVar

import typer
from pydantic import BaseModel

from keybrake.cli._common import Output, choice, default_output, err_console, print_data, show
from keybrake.cli._table import Grid
from keybrake.proxy.money import parse_ts

__all__ = [
    "AllOption",
    "ContinueOption",
    "ListOutput",
    "ListOutputOption",
    "age",
    "collect",
    "limit_option",
    "print_listing",
    "say_more",
]

T_co = TypeVar("T_co", covariant=True)
T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


class ListOutput(StrEnum):
    table = "table"
    wide = "wide"  # the table with more columns
    name = "name"  # kind/id, one per line, for the next command (key/vk_..., budget/bg_...)
    json = "json"
    yaml = "yaml"


ListOutputOption = Annotated[
    ListOutput | None,
    choice(
        "--output",
        "-o",
        values=ListOutput,
        help="table (on a terminal), wide, name (kind/id: key/vk_..., budget/bg_...), json "
        "or yaml.",
    ),
]

ContinueOption = Annotated[
    str | None,
    typer.Option("--continue", help="The token a previous page printed: the next page."),
]
AllOption = Annotated[bool, typer.Option("--all", help="Every page, however many rows.")]


def limit_option(help: str) -> Any:
    """`--limit`: rows per page, at most what the proxy returns in one (MAX_LIST_LIMIT)."""
    return typer.Option(min=1, max=100_000, help=help)


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
    id_field: str,
    table: Callable[[list[M], bool], Grid],
    *,
    empty: str,
) -> None:
    """A listing as `-o` asks: names as kubectl's (`key/vk_...`: the kind is `id_field` less its
    `_id`), `table(rows, wide)` (`empty` when there are none), JSON or YAML; a table on a
    terminal, else JSON."""
    chosen = output or ListOutput(default_output(None).value)
    if chosen is ListOutput.name:
        kind = id_field.removesuffix("_id")
        for row in rows:
            print(f"{kind}/{getattr(row, id_field)}")
    elif chosen in (ListOutput.table, ListOutput.wide):
        wide = chosen is ListOutput.wide
        show(table(rows, wide) if rows else empty, wide=wide)
    else:
        print_data([r.model_dump(mode="json") for r in rows], Output(chosen.value))


def say_more(token: str | None, command: str, noun: str) -> None:
    """Tell the user (on stderr, so piped output stays clean) that the listing goes on."""
    if token:
        err_console().print(
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
