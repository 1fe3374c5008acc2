"""`keybrake audit`: the audit log as a table, JSON or CSV."""

from __future__ import annotations

import sys
from enum import StrEnum
from typing import Annotated

import typer

from keybrake.cli._common import EXIT_USAGE, Output, console, fail, print_data
from keybrake.cli._connection import ApiKeyOption, UrlOption, connect
from keybrake.cli._render import audit_table
from keybrake.proxy.client import DEFAULT_URL
from keybrake.proxy.money import parse_duration


class AuditOutput(StrEnum):
    table = "table"
    json = "json"
    yaml = "yaml"
    csv = "csv"


def audit(
    workflow: Annotated[
        str | None, typer.Option("--workflow", "-w", help="Rows of this Argo workflow.")
    ] = None,
    key: Annotated[str | None, typer.Option("--key", help="Rows of this key id.")] = None,
    vendor: Annotated[str | None, typer.Option(help="Rows of this vendor.")] = None,
    since: Annotated[
        str | None, typer.Option(help="How far back (1h, 30m) or an ISO time.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=100_000, help="Newest N rows.")] = 100,
    output: Annotated[
        AuditOutput | None,
        typer.Option("--output", "-o", help="table (default on a terminal), json, yaml or csv."),
    ] = None,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = "",
) -> None:
    """Show what vault keys did: one row per vendor call.

    Example: keybrake audit --workflow billing-agent-x7k2p --since 1h -o csv > calls.csv
    """
    if since is not None and not since[:1].isdigit():
        fail(f"--since {since!r}: use a duration such as 1h or an ISO time", EXIT_USAGE)
    if since is not None and "-" not in since:
        try:
            parse_duration(since)
        except ValueError as exc:
            fail(f"--since: {exc}", EXIT_USAGE)
    label = f"argo/{workflow}" if workflow else None
    chosen = output or (AuditOutput.table if sys.stdout.isatty() else AuditOutput.json)
    with connect(url, api_key) as client:
        if chosen is AuditOutput.csv:
            sys.stdout.write(
                client.audit_csv(key_id=key, label=label, vendor=vendor, since=since, limit=limit)
            )
            return
        rows = client.audit(key_id=key, label=label, vendor=vendor, since=since, limit=limit)
    if chosen in (AuditOutput.json, AuditOutput.yaml):
        print_data([r.model_dump() for r in rows], Output(chosen.value))
    elif not rows:
        console.print("No audit rows match.")
    else:
        console.print(audit_table(list(reversed(rows))))
