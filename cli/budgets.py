"""`keybrake budgets`: a run's budget, shared by every key that draws on it, whatever its vendor."""

from __future__ import annotations

from typing import Annotated

import typer
from pydantic import ValidationError

from keybrake.cli._common import EXIT_USAGE, Output, console, default_output, fail, print_data
from keybrake.cli._connection import ApiKeyOption, IgnoreNotFoundOption, UrlOption, connect
from keybrake.cli._options import (
    ALERT_AT_HELP,
    caps_patch,
    dollars,
    metadata,
    percents,
    workflow_label,
)
from keybrake.cli._paging import AllOption, ContinueOption, ListOutput, collect, say_more
from keybrake.cli._render import budget_detail, budgets_table
from keybrake.proxy.client import DEFAULT_URL
from keybrake.proxy.models import BudgetCreate, BudgetInfo, describe_validation_error

app = typer.Typer(
    help="Create, list, show, patch and revoke budgets: caps a whole run shares.",
    no_args_is_help=True,
)

OutputOption = Annotated[
    Output | None,
    typer.Option("--output", "-o", help="table (default on a terminal), json or yaml."),
]


def _show(budget: BudgetInfo, output: Output | None) -> None:
    chosen = default_output(output)
    if chosen is Output.table:
        console.print(budget_detail(budget))
    else:
        print_data(budget.model_dump(), chosen)


@app.command(
    "create",
    epilog="Example: keybrake budgets create --label argo/billing-agent-x7k2p --total-usd-cap 500 "
    "--expires-in 6h -q",
)
def create(
    label: Annotated[str, typer.Option(help="Usually argo/<workflow name>.")],
    total_usd_cap: Annotated[
        str | None, typer.Option("--total-usd-cap", help="Dollars over the run's whole life.")
    ] = None,
    daily_usd_cap: Annotated[
        str | None, typer.Option("--daily-usd-cap", help="Dollars in any 24 hours.")
    ] = None,
    expires_in: Annotated[str, typer.Option("--expires-in", help="90s, 30m, 2h, 7d.")] = "1h",
    meta: Annotated[
        list[str] | None, typer.Option("--meta", help="key=value stored with it; repeatable.")
    ] = None,
    alert_at: Annotated[str | None, typer.Option("--alert-at", help=ALERT_AT_HELP)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the budget id.")] = False,
    output: OutputOption = None,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = "",
) -> None:
    """Create a budget; issue keys with --budget to draw on it. A call is admitted only if the
    key's caps and the budget's all hold."""
    try:
        spec = BudgetCreate(
            agent_run_label=label,
            total_usd_cap=dollars(total_usd_cap, "--total-usd-cap"),
            daily_usd_cap=dollars(daily_usd_cap, "--daily-usd-cap"),
            expires_in=expires_in,
            metadata=metadata(meta),
            alert_thresholds=percents(alert_at),
        )
    except ValidationError as exc:
        fail(describe_validation_error(exc), EXIT_USAGE)
    with connect(url, api_key) as client:
        budget = client.create_budget(spec)
    if quiet:
        print(budget.budget_id)
        return
    _show(budget, output)


@app.command("list", epilog="Example: keybrake budgets list --workflow billing-agent-x7k2p")
def list_budgets(
    label: Annotated[str | None, typer.Option(help="Only budgets with this label.")] = None,
    workflow: Annotated[
        str | None,
        typer.Option(
            "--workflow", "-w", help="Only budgets of this Argo workflow (NAME or argo/NAME)."
        ),
    ] = None,
    status: Annotated[str | None, typer.Option(help="active, revoked or expired.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=100_000, help="Budgets per page.")] = 500,
    cursor: ContinueOption = None,
    every_page: AllOption = False,
    output: Annotated[
        ListOutput | None,
        typer.Option("--output", "-o", help="table (on a terminal), name, json or yaml."),
    ] = None,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = "",
) -> None:
    """List budgets, newest first, with their spend in the last 24 hours and in all."""
    if status is not None and status not in {"active", "revoked", "expired"}:
        fail(f"--status {status!r}: use active, revoked or expired", EXIT_USAGE)
    if workflow:
        label = workflow_label(workflow)
    with connect(url, api_key) as client:
        budgets, token = collect(
            lambda page: client.budgets_page(label=label, status=status, limit=limit, cursor=page),
            cursor,
            every_page,
        )
    chosen = output or ListOutput(default_output(None).value)
    if chosen is ListOutput.name:
        for budget in budgets:
            print(budget.budget_id)
    elif chosen in (ListOutput.table, ListOutput.wide):
        console.print(budgets_table(budgets) if budgets else "No budgets match.")
    else:
        print_data([b.model_dump() for b in budgets], Output(chosen.value))
    say_more(token, "keybrake budgets list", "budgets")


@app.command("show", epilog="Example: keybrake budgets show bg_3f9c2a1b4d5e6f70")
def show(
    budget_id: Annotated[str, typer.Argument(help="The budget id (bg_...).")],
    ignore_not_found: IgnoreNotFoundOption = False,
    output: OutputOption = None,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = "",
) -> None:
    """Show one budget: caps, spend, remaining, its keys and every change made to it. A budget
    that does not exist exits 1."""
    with connect(url, api_key, ignore_not_found=ignore_not_found) as client:
        budget = client.get_budget(budget_id)
    _show(budget, output)


@app.command("revoke", epilog="Example: keybrake budgets revoke bg_3f9c2a1b4d5e6f70")
def revoke(
    budget_id: Annotated[str, typer.Argument(help="The budget id (bg_...).")],
    output: OutputOption = None,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = "",
) -> None:
    """Revoke a budget and every key drawing on it; effective on the next call."""
    with connect(url, api_key) as client:
        budget = client.revoke_budget(budget_id)
    _show(budget, output)


@app.command(
    "patch",
    epilog="Example: keybrake budgets patch bg_3f9c2a1b4d5e6f70 --total-usd-cap 400 "
    "--reason 'approved by finance'",
)
def patch(
    budget_id: Annotated[str, typer.Argument(help="The budget id (bg_...).")],
    reason: Annotated[str, typer.Option("--reason", help="Why: recorded with the change.")],
    total_usd_cap: Annotated[
        str | None, typer.Option("--total-usd-cap", help="New cap over the run's life.")
    ] = None,
    daily_usd_cap: Annotated[
        str | None, typer.Option("--daily-usd-cap", help="New cap for any 24 hours.")
    ] = None,
    expires_in: Annotated[
        str | None,
        typer.Option("--expires-in", help="New life, from now (never past the longest allowed)."),
    ] = None,
    output: OutputOption = None,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = "",
) -> None:
    """Raise or lower a live budget's caps, or extend or shorten its life; effective on the next
    call of any of its keys, on every replica."""
    spec = caps_patch(
        reason=reason,
        daily_usd_cap=daily_usd_cap,
        total_usd_cap=total_usd_cap,
        expires_in=expires_in,
    )
    with connect(url, api_key) as client:
        budget = client.patch_budget(budget_id, spec)
    _show(budget, output)
