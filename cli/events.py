"""`keybrake events`: the record of admin actions: every issue, patch and revoke, issuer changes,
refusals and refused logins, with who, what, when and from where."""

from __future__ import annotations

from typing import Annotated

import typer

from keybrake.cli._common import BriefOutputOption, Output, print_rows
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
    output: BriefOutputOption = None,
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
    def cells(row: EventInfo) -> list[str]:
        style = "green" if row.outcome == "ok" else "red"
        return [
            row.ts[:19].replace("T", " "),
            row.action,
            row.actor,
            row.target or "-",
            f"[{style}]{row.outcome}[/]",
            row.source or "-",
        ]

    print_rows(
        rows,
        output,
        empty="No events match.",
        columns=("TIME", "ACTION", "ACTOR", "TARGET", "OUTCOME", "SOURCE"),
        cells=cells,
    )
