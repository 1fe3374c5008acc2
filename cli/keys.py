"""`keybrake keys`: issue, list, show and patch vault keys."""

from __future__ import annotations

from typing import Annotated

import typer

from keybrake.cli import _options as options
from keybrake.cli._common import (
    EXIT_USAGE,
    BriefOutputOption,
    Output,
    OutputOption,
    console,
    fail,
    print_created,
    print_item,
)
from keybrake.cli._connection import (
    ApiKeyOption,
    IgnoreNotFoundOption,
    UrlOption,
    ask_proxy,
    connect,
)
from keybrake.cli._paging import (
    AllOption,
    ContinueOption,
    ListOutputOption,
    collect,
    limit_option,
    print_listing,
    say_more,
)
from keybrake.cli._render import key_detail, keys_table
from keybrake.proxy.client import DEFAULT_URL
from keybrake.proxy.models import KeyCreate

app = typer.Typer(help="Issue, list, show and patch vault keys.", no_args_is_help=True)


@app.command(
    "issue",
    epilog="Example: keybrake keys issue --vendor stripe --daily-usd-cap 300 "
    "--allow 'POST /v1/payment_intents' --expires-in 2h --label argo/billing-agent-x7k2p -q",
)
def issue(
    vendor: Annotated[str, typer.Option(help="stripe, twilio or resend.")],
    allow: Annotated[
        list[str], typer.Option("--allow", help="'METHOD /path' the key may call; repeatable.")
    ],
    label: options.LabelOption,
    daily_usd_cap: options.DailyCapOption = None,
    total_usd_cap: options.TotalCapOption = None,
    budget: Annotated[
        str | None, typer.Option("--budget", help="A budget (bg_...) the key also draws on.")
    ] = None,
    expires_in: Annotated[
        str | None,
        options.expires_in_option("90s, 30m, 2h, 7d. Default 1h; with --budget, until it ends."),
    ] = None,
    max_usd_per_call: Annotated[
        str | None, typer.Option("--max-usd-per-call", help="Refuse single calls above this.")
    ] = None,
    max_usd_per_caller: Annotated[
        str | None,
        typer.Option(
            "--max-usd-per-caller",
            help="Dollars per caller tag (<vault_key>.<tag>) over the key's life: one runaway pod "
            "cannot spend it all.",
        ),
    ] = None,
    meta: Annotated[
        list[str] | None, options.meta_option("key=value stored with the key; repeatable.")
    ] = None,
    dedupe_window: Annotated[
        str | None, typer.Option("--dedupe-window", help="Replay identical priced calls; 0 = off.")
    ] = None,
    alert_at: options.AlertAtOption = None,
    constraint: options.ConstraintOption = None,
    constraint_mode: options.ConstraintModeOption = None,
    quiet: Annotated[bool, options.quiet_option("Print only the vault key.")] = False,
    output: BriefOutputOption = None,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = "",
) -> None:
    """Issue a vault key. The key is shown once; store it where the workload reads it. It needs
    --daily-usd-cap or --total-usd-cap, unless it draws on a --budget."""
    with options.usage_on_invalid():
        spec = KeyCreate(
            vendor=vendor,
            daily_usd_cap=options.dollars(daily_usd_cap, "--daily-usd-cap"),
            total_usd_cap=options.dollars(total_usd_cap, "--total-usd-cap"),
            budget_id=budget,
            allowed_endpoints=allow,
            expires_in=expires_in,
            agent_run_label=label,
            max_usd_per_call=options.dollars(max_usd_per_call, "--max-usd-per-call"),
            max_usd_per_caller=options.dollars(max_usd_per_caller, "--max-usd-per-caller"),
            metadata=options.metadata(meta),
            dedupe_window=dedupe_window,
            alert_thresholds=options.percents(alert_at),
            constraints=options.constraints(constraint, constraint_mode),
        )
    issued = ask_proxy(url, api_key, lambda client: client.issue_key(spec))
    shown = print_created(issued, output, key_detail, quiet=quiet, handle=issued.vault_key)
    if shown is Output.table:
        console().print(f"\n[bold]Vault key[/] (shown once): {issued.vault_key}", soft_wrap=True)


@app.command(
    "list", epilog="Example: keybrake keys list --label argo/billing-agent-x7k2p --status active"
)
def list_keys(
    label: Annotated[str | None, options.label_filter("keys")] = None,
    workflow: Annotated[str | None, options.workflow_filter("keys")] = None,
    vendor: Annotated[str | None, options.vendor_option("Only keys of this vendor.")] = None,
    status: Annotated[
        str | None, options.status_option("active (the default), revoked or expired.")
    ] = None,
    all_statuses: Annotated[
        bool, typer.Option("--all-statuses", help="Revoked and expired keys too.")
    ] = False,
    budget: Annotated[
        str | None, typer.Option("--budget", help="Only keys drawing on this budget.")
    ] = None,
    limit: Annotated[int, limit_option("Keys per page.")] = 500,
    cursor: ContinueOption = None,
    every_page: AllOption = False,
    output: ListOutputOption = None,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = "",
) -> None:
    """List vault keys, newest first, with their spend in the last 24 hours and their caps: the
    active ones unless --status or --all-statuses says otherwise."""
    if status is not None and all_statuses:
        fail("--status and --all-statuses: give one of them", EXIT_USAGE)
    if not all_statuses:
        status = status or "active"
    if workflow:
        label = options.workflow_label(workflow)
    with connect(url, api_key) as client:
        keys, token = collect(
            lambda page: client.keys_page(
                label=label,
                vendor=vendor,
                status=status,
                budget_id=budget,
                limit=limit,
                cursor=page,
            ),
            cursor,
            every_page,
        )
    empty = f"No {status} vault keys match." if status else "No vault keys match."
    print_listing(keys, output, "key_id", keys_table, empty=empty)
    say_more(token, "keybrake keys list", "keys")


@app.command("show", epilog="Example: keybrake keys show vk_3f9c2a1b4d5e6f70")
def show(
    key_id: Annotated[str, options.id_argument("key", "The key id (vk_...), not the vault key.")],
    ignore_not_found: IgnoreNotFoundOption = False,
    output: OutputOption = None,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = "",
) -> None:
    """Show one key: its caps, spend in the last 24 hours and in all, reserved, remaining, calls,
    cap hits, and every change made to it. A key that does not exist exits 1."""
    key = ask_proxy(
        url, api_key, lambda client: client.get_key(key_id), ignore_not_found=ignore_not_found
    )
    print_item(key, output, key_detail)


@app.command(
    "patch",
    epilog="Example: keybrake keys patch vk_3f9c2a1b4d5e6f70 --daily-usd-cap 400 "
    "--reason 'month-end batch is larger'",
)
def patch(
    key_id: Annotated[str, options.id_argument("key", "The key id (vk_...).")],
    reason: options.ReasonOption,
    daily_usd_cap: options.NewDailyCapOption = None,
    total_usd_cap: options.NewTotalCapOption = None,
    max_usd_per_caller: Annotated[
        str | None, typer.Option("--max-usd-per-caller", help="New cap per caller tag.")
    ] = None,
    expires_in: options.NewExpiresInOption = None,
    constraint: options.NewConstraintOption = None,
    constraint_mode: options.ConstraintModeOption = None,
    no_constraints: options.NoConstraintsOption = False,
    output: OutputOption = None,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = "",
) -> None:
    """Raise or lower a live key's caps, extend or shorten its life, or replace its constraints;
    effective on the next call on every replica. Lowering below what is spent makes the next
    priced call a cap hit."""
    spec = options.caps_patch(
        reason=reason,
        daily_usd_cap=daily_usd_cap,
        total_usd_cap=total_usd_cap,
        max_usd_per_caller=max_usd_per_caller,
        expires_in=expires_in,
        constraint=constraint,
        constraint_mode=constraint_mode,
        no_constraints=no_constraints,
    )
    key = ask_proxy(url, api_key, lambda client: client.patch_key(key_id, spec))
    print_item(key, output, key_detail)
