"""`keybrake events`: the record of admin actions: every issue, patch and revoke, issuer changes,
refusals and refused logins, with who, what, when and from where."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from keybrake.cli._common import Output, console, default_output, print_data
from keybrake.cli._connection import ApiKeyOption, UrlOption, connect
from keybrake.cli._paging import AllOption, ContinueOption, collect, say_more
from keybrake.proxy.client import DEFAULT_URL
from keybrake.proxy.models import EventInfo


def events(
    action: Annotated[
        str | None, typer.Option(help="key.issue, key.patch, key.revoke, label.revoke, ...")
    ] = None,
    issuer: Annotated[str | None, typer.Option(help="Only this issuer's (is_...).")] = None,
    target: Annotated[
        str | None, typer.Option(help="Only about this key, budget or issuer.")
    ] = None,
    refused: Annotated[
        bool | None, typer.Option("--refused/--ok", help="Only refusals, or only successes.")
    ] = None,
    since: Annotated[str | None, typer.Option(help="A duration (1h) or an ISO time.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=100_000, help="Events per page.")] = 100,
    cursor: ContinueOption = None,
    every_page: AllOption = False,
    output: Annotated[
        Output | None, typer.Option("--output", "-o", help="table, json or yaml.")
    ] = None,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = "",
) -> None:
    """Show the record of admin actions, newest first (needs the admin token).

    Example: keybrake events --refused --since 1h
    """
    with connect(url, api_key) as client:
        rows, token = collect(
            lambda page: client.events_page(
                action=action,
                issuer_id=issuer,
                target=target,
                refused=refused,
                since=since,
                limit=limit,
                cursor=page,
            ),
            cursor,
            every_page,
        )
    _show(rows, output)
    say_more(token, "keybrake events", "events")


def _show(rows: list[EventInfo], output: Output | None) -> None:
    chosen = default_output(output)
    if chosen is not Output.table:
        print_data([r.model_dump() for r in rows], chosen)
        return
    if not rows:
        console.print("No events match.")
        return
    table = Table(box=None, header_style="bold")
    for column in ("TIME", "ACTION", "ACTOR", "TARGET", "OUTCOME", "SOURCE"):
        table.add_column(column, overflow="fold")
    for row in rows:
        style = "green" if row.outcome == "ok" else "red"
        table.add_row(
            row.ts[:19].replace("T", " "),
            row.action,
            row.actor,
            row.target or "-",
            f"[{style}]{row.outcome}[/]",
            row.source or "-",
        )
    console.print(table)
