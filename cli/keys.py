"""`keybrake keys`: issue, list and show vault keys."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Annotated

import typer
from pydantic import ValidationError

from keybrake.cli._common import EXIT_USAGE, Output, console, default_output, fail, print_data
from keybrake.cli._connection import ApiKeyOption, UrlOption, connect
from keybrake.cli._render import key_detail, keys_table
from keybrake.proxy.client import DEFAULT_URL
from keybrake.proxy.models import KeyCreate, describe_validation_error

app = typer.Typer(help="Issue, list and show vault keys.", no_args_is_help=True)

OutputOption = Annotated[
    Output | None,
    typer.Option("--output", "-o", help="table (default on a terminal), json or yaml."),
]


@app.command(
    "issue",
    epilog="Example: keybrake keys issue --vendor stripe --daily-usd-cap 300 "
    "--allow 'POST /v1/payment_intents' --expires-in 2h --label argo/billing-agent-x7k2p -q",
)
def issue(
    vendor: Annotated[str, typer.Option(help="stripe, twilio or resend.")],
    daily_usd_cap: Annotated[str, typer.Option("--daily-usd-cap", help="Dollars in any 24 hours.")],
    allow: Annotated[
        list[str], typer.Option("--allow", help="'METHOD /path' the key may call; repeatable.")
    ],
    label: Annotated[str, typer.Option(help="Usually argo/<workflow name>.")],
    expires_in: Annotated[str, typer.Option("--expires-in", help="90s, 30m, 2h, 7d.")] = "1h",
    max_usd_per_call: Annotated[
        str | None, typer.Option("--max-usd-per-call", help="Refuse single calls above this.")
    ] = None,
    metadata: Annotated[
        list[str] | None, typer.Option("--meta", help="key=value stored with the key; repeatable.")
    ] = None,
    dedupe_window: Annotated[
        str | None, typer.Option("--dedupe-window", help="Replay identical priced calls; 0 = off.")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the vault key.")] = False,
    output: Annotated[
        Output | None, typer.Option("--output", "-o", help="table, json or yaml.")
    ] = None,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = "",
) -> None:
    """Issue a vault key. The key is shown once; store it where the workload reads it."""
    meta: dict[str, str] = {}
    for item in metadata or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            fail(f"--meta {item!r}: expected key=value", EXIT_USAGE)
        meta[name] = value
    try:
        spec = KeyCreate(
            vendor=vendor,
            daily_usd_cap=_dollars(daily_usd_cap, "--daily-usd-cap"),
            allowed_endpoints=allow,
            expires_in=expires_in,
            agent_run_label=label,
            max_usd_per_call=(
                _dollars(max_usd_per_call, "--max-usd-per-call") if max_usd_per_call else None
            ),
            metadata=meta,
            dedupe_window=dedupe_window,
        )
    except ValidationError as exc:
        fail(describe_validation_error(exc), EXIT_USAGE)
    with connect(url, api_key) as client:
        issued = client.issue_key(spec)
    if quiet:
        print(issued.vault_key)
        return
    chosen = default_output(output)
    if chosen is Output.table:
        console.print(key_detail(issued))
        console.print(f"\n[bold]Vault key[/] (shown once): {issued.vault_key}", soft_wrap=True)
    else:
        print_data(issued.model_dump(), chosen)


def _dollars(text: str, flag: str) -> Decimal:
    try:
        return Decimal(text)
    except InvalidOperation:
        fail(f"{flag} {text!r}: not a dollar amount", EXIT_USAGE)


@app.command(
    "list", epilog="Example: keybrake keys list --label argo/billing-agent-x7k2p --status active"
)
def list_keys(
    label: Annotated[str | None, typer.Option(help="Only keys with this label.")] = None,
    workflow: Annotated[
        str | None, typer.Option(help="Only keys of this Argo workflow (label argo/NAME).")
    ] = None,
    vendor: Annotated[str | None, typer.Option(help="Only keys of this vendor.")] = None,
    status: Annotated[str | None, typer.Option(help="active, revoked or expired.")] = None,
    output: OutputOption = None,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = "",
) -> None:
    """List vault keys with today's spend."""
    if status is not None and status not in {"active", "revoked", "expired"}:
        fail(f"--status {status!r}: use active, revoked or expired", EXIT_USAGE)
    if workflow:
        label = f"argo/{workflow}"
    with connect(url, api_key) as client:
        keys = client.list_keys(label=label, vendor=vendor, status=status)
    chosen = default_output(output)
    if chosen is Output.table:
        if not keys:
            console.print("No vault keys match.")
        else:
            console.print(keys_table(keys))
    else:
        print_data([k.model_dump() for k in keys], chosen)


@app.command("show", epilog="Example: keybrake keys show vk_3f9c2a1b4d5e6f70")
def show(
    key_id: Annotated[str, typer.Argument(help="The key id (vk_...), not the vault key.")],
    output: OutputOption = None,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = "",
) -> None:
    """Show one key: spend today, reserved, remaining, calls, cap hits."""
    with connect(url, api_key) as client:
        key = client.get_key(key_id)
    chosen = default_output(output)
    if chosen is Output.table:
        console.print(key_detail(key))
    else:
        print_data(key.model_dump(), chosen)
