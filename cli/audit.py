"""`keybrake audit`: the audit log as a table, JSON or CSV; `keybrake audit prune`: retention."""

from __future__ import annotations

import json
import sys
import time
from enum import StrEnum
from typing import Annotated

import typer

from keybrake.cli._common import (
    EXIT_USAGE,
    BriefOutputOption,
    Output,
    choice,
    console,
    fail,
    print_data,
    print_item,
    show,
)
from keybrake.cli._connection import ApiKeyOption, UrlOption, ask_proxy, connect
from keybrake.cli._options import vendor_option, workflow_label
from keybrake.cli._paging import AllOption, ContinueOption, collect, limit_option, say_more
from keybrake.cli._render import audit_line, audit_table
from keybrake.proxy.client import DEFAULT_URL, KeybrakeClient
from keybrake.proxy.models import AuditRow, PruneResult
from keybrake.proxy.money import parse_duration

app = typer.Typer(no_args_is_help=False, invoke_without_command=True)


class AuditOutput(StrEnum):
    table = "table"
    json = "json"
    yaml = "yaml"
    csv = "csv"


@app.callback(invoke_without_command=True)
def audit(
    context: typer.Context,
    workflow: Annotated[
        str | None, typer.Option("--workflow", "-w", help="Rows of this Argo workflow.")
    ] = None,
    key: Annotated[str | None, typer.Option("--key", help="Rows of this key id.")] = None,
    vendor: Annotated[str | None, vendor_option("Rows of this vendor.")] = None,
    since: Annotated[
        str | None, typer.Option(help="How far back (1h, 30m) or an ISO time.")
    ] = None,
    limit: Annotated[int, limit_option("Rows per page.")] = 100,
    cursor: ContinueOption = None,
    every_page: AllOption = False,
    follow: Annotated[
        bool,
        typer.Option(
            "--follow", "-f", help="Then print new rows as they come, until Ctrl-C (JSON: lines)."
        ),
    ] = False,
    interval: Annotated[
        float, typer.Option(min=0.05, help="With --follow: seconds between looks.")
    ] = 1.0,
    output: Annotated[
        AuditOutput | None,
        choice(
            "--output",
            "-o",
            values=AuditOutput,
            help="table (default on a terminal), json, yaml or csv.",
        ),
    ] = None,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = "",
) -> None:
    """Show what vault keys did: one row per vendor call (`audit prune` deletes old rows).

    Example: keybrake audit --workflow billing-agent-x7k2p --since 1h -o csv > calls.csv
    """
    if context.invoked_subcommand is not None:
        return
    if since is not None:
        _check_when(since, "--since", "1h")
    label = workflow_label(workflow) if workflow else None
    chosen = output or (AuditOutput.table if sys.stdout.isatty() else AuditOutput.json)
    if follow and (every_page or cursor or chosen in (AuditOutput.csv, AuditOutput.yaml)):
        fail("--follow prints the newest rows, then new ones: as a table or JSON lines", EXIT_USAGE)
    with connect(url, api_key) as client:
        if chosen is AuditOutput.csv:
            sys.stdout.write(
                client.audit_csv(key_id=key, label=label, vendor=vendor, since=since, limit=limit)
            )
            return
        rows, token = collect(
            lambda page: client.audit_page(
                key_id=key, label=label, vendor=vendor, since=since, limit=limit, cursor=page
            ),
            cursor,
            every_page,
        )
        if follow:
            _follow(client, rows, chosen, key, label, vendor, interval)
            return
    if chosen in (AuditOutput.json, AuditOutput.yaml):
        print_data([r.model_dump() for r in rows], Output(chosen.value))
    else:
        show(audit_table(list(reversed(rows))) if rows else "No audit rows match.")
    say_more(token, "keybrake audit", "audit rows")


def _follow(
    client: KeybrakeClient,
    newest: list[AuditRow],
    chosen: AuditOutput,
    key: str | None,
    label: str | None,
    vendor: str | None,
    interval: float,
) -> None:
    """`--follow`: the newest rows oldest first, then every new one as it comes (like
    `kubectl logs -f`), until Ctrl-C."""

    def emit(rows: list[AuditRow]) -> None:
        for row in rows:
            if chosen is AuditOutput.json:
                print(json.dumps(row.model_dump()), flush=True)
            else:
                console().print(audit_line(row), soft_wrap=True)

    emit(list(reversed(newest)))
    last = max((r.id for r in newest), default=0)
    try:
        while True:
            time.sleep(interval)  # the polling period of a follow, not synchronisation
            page = client.audit_page(
                key_id=key, label=label, vendor=vendor, after_id=last, limit=1000
            )
            fresh = sorted(page.data, key=lambda r: r.id)
            emit(fresh)
            last = max((r.id for r in fresh), default=last)
    except KeyboardInterrupt:
        return


@app.command()
def prune(
    before: Annotated[
        str,
        typer.Option(
            "--before",
            help="Delete rows older than this: a duration back from now (90d) or an ISO time.",
        ),
    ],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count what would be deleted; delete nothing.")
    ] = False,
    output: BriefOutputOption = None,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = "",
) -> None:
    """Delete old audit rows; no cap changes, spend never depends on them.

    Kept whatever their age: rows of active keys, of keys that ended less than a day ago (still
    inside their window), and of calls in flight.

    Example: keybrake audit prune --before 90d --dry-run
    """
    _check_when(before, "--before", "90d")
    result = ask_proxy(url, api_key, lambda client: client.prune_audit(before, dry_run=dry_run))
    print_item(result, output, _pruned)


def _pruned(result: PruneResult) -> str:
    verb = "would delete" if result.dry_run else "deleted"
    rows = "row" if result.removed == 1 else "rows"
    return f"{verb} {result.removed:,} audit {rows} older than {result.before}"


def _check_when(text: str, flag: str, example: str) -> None:
    """A duration back from now (`example`) or an ISO time: a usage error if it is neither."""
    if not text[:1].isdigit():
        fail(f"{flag} {text!r}: use a duration such as {example} or an ISO time", EXIT_USAGE)
    if "-" not in text:
        try:
            parse_duration(text)
        except ValueError as exc:
            fail(f"{flag}: {exc}", EXIT_USAGE)
