"""`keybrake events`: the record of admin actions: every issue, patch and revoke, issuer changes,
refusals and refused logins, with who, what, when and from where."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.text import Text

from keybrake.cli._common import BriefOutputOption, Output, choice, print_rows
from keybrake.cli._connection import ApiKeyOption, UrlOption, connect
from keybrake.cli._paging import AllOption, ContinueOption, collect, limit_option, say_more
from keybrake.proxy.client import DEFAULT_URL
from keybrake.proxy.models import EventInfo

# What the proxy records (keybrake.proxy.vault, .admin and .access write them, each where it acts;
# tests/test_cli_output.py keeps this list equal to theirs).
ACTIONS = (
    "key.issue",
    "key.patch",
    "key.revoke",
    "label.revoke",
    "budget.create",
    "budget.patch",
    "budget.revoke",
    "issuer.create",
    "issuer.delete",
    "audit.prune",
    "login.refused",
)


def events(
    action: Annotated[
        str | None, choice("--action", values=ACTIONS, help=f"One of {', '.join(ACTIONS)}.")
    ] = None,
    issuer: Annotated[str | None, typer.Option(help="Only this issuer's (is_...).")] = None,
    target: Annotated[
        str | None, typer.Option(help="Only about this key, budget or issuer.")
    ] = None,
    refused: Annotated[
        bool | None, typer.Option("--refused/--ok", help="Only refusals, or only successes.")
    ] = None,
    since: Annotated[str | None, typer.Option(help="A duration (1h) or an ISO time.")] = None,
    limit: Annotated[int, limit_option("Events per page.")] = 100,
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
    def cells(row: EventInfo) -> list[str | Text]:
        return [
            row.ts[:19].replace("T", " "),
            row.action,
            row.actor,
            row.target or "-",
            Text(row.outcome, style="green" if row.outcome == "ok" else "red"),
            row.source or "-",
        ]

    print_rows(
        rows,
        output,
        empty="No events match.",
        headers="TIME,ACTION,ACTOR,TARGET,OUTCOME,SOURCE",
        cells=cells,
    )
