"""`keybrake budgets`: a run's budget, shared by every key that draws on it, whatever its vendor."""

from __future__ import annotations

from typing import Annotated

import typer

from keybrake.cli import _options as options
from keybrake.cli._common import OutputOption, print_created, print_item
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
from keybrake.cli._render import budget_detail, budgets_table
from keybrake.proxy.client import DEFAULT_URL
from keybrake.proxy.models import BudgetCreate

app = typer.Typer(
    help="Create, list, show, patch and revoke budgets: caps a whole run shares.",
    no_args_is_help=True,
)

BudgetIdArgument = Annotated[str, options.id_argument("budget", "The budget id (bg_...).")]


@app.command(
    "create",
    epilog="Example: keybrake budgets create --label argo/billing-agent-x7k2p --total-usd-cap 500 "
    "--expires-in 6h -q",
)
def create(
    label: options.LabelOption,
    total_usd_cap: options.TotalCapOption = None,
    daily_usd_cap: options.DailyCapOption = None,
    expires_in: Annotated[str, options.expires_in_option("90s, 30m, 2h, 7d.")] = "1h",
    meta: Annotated[
        list[str] | None, options.meta_option("key=value stored with it; repeatable.")
    ] = None,
    alert_at: options.AlertAtOption = None,
    constraint: options.ConstraintOption = None,
    constraint_mode: options.ConstraintModeOption = None,
    quiet: Annotated[bool, options.quiet_option("Print only the budget id.")] = False,
    output: OutputOption = None,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = "",
) -> None:
    """Create a budget; issue keys with --budget to draw on it. A call is admitted only if the
    key's caps and the budget's all hold."""
    with options.usage_on_invalid():
        spec = BudgetCreate(
            agent_run_label=label,
            total_usd_cap=options.dollars(total_usd_cap, "--total-usd-cap"),
            daily_usd_cap=options.dollars(daily_usd_cap, "--daily-usd-cap"),
            expires_in=expires_in,
            metadata=options.metadata(meta),
            alert_thresholds=options.percents(alert_at),
            constraints=options.constraints(constraint, constraint_mode),
        )
    budget = ask_proxy(url, api_key, lambda client: client.create_budget(spec))
    print_created(budget, output, budget_detail, quiet=quiet, handle=budget.budget_id)


@app.command("list", epilog="Example: keybrake budgets list --workflow billing-agent-x7k2p")
def list_budgets(
    label: Annotated[str | None, options.label_filter("budgets")] = None,
    workflow: Annotated[str | None, options.workflow_filter("budgets")] = None,
    status: Annotated[str | None, options.status_option("active, revoked or expired.")] = None,
    limit: Annotated[int, limit_option("Budgets per page.")] = 500,
    cursor: ContinueOption = None,
    every_page: AllOption = False,
    output: ListOutputOption = None,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = "",
) -> None:
    """List budgets, newest first, with their spend in the last 24 hours and in all."""
    if workflow:
        label = options.workflow_label(workflow)
    with connect(url, api_key) as client:
        budgets, token = collect(
            lambda page: client.budgets_page(label=label, status=status, limit=limit, cursor=page),
            cursor,
            every_page,
        )
    print_listing(budgets, output, "budget_id", budgets_table, empty="No budgets match.")
    say_more(token, "keybrake budgets list", "budgets")


@app.command("show", epilog="Example: keybrake budgets show bg_3f9c2a1b4d5e6f70")
def show(
    budget_id: BudgetIdArgument,
    ignore_not_found: IgnoreNotFoundOption = False,
    output: OutputOption = None,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = "",
) -> None:
    """Show one budget: caps, spend, remaining, its keys and every change made to it. A budget
    that does not exist exits 1."""
    budget = ask_proxy(
        url, api_key, lambda client: client.get_budget(budget_id), ignore_not_found=ignore_not_found
    )
    print_item(budget, output, budget_detail)


@app.command("revoke", epilog="Example: keybrake budgets revoke bg_3f9c2a1b4d5e6f70")
def revoke(
    budget_id: BudgetIdArgument,
    output: OutputOption = None,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = "",
) -> None:
    """Revoke a budget and every key drawing on it; effective on the next call."""
    budget = ask_proxy(url, api_key, lambda client: client.revoke_budget(budget_id))
    print_item(budget, output, budget_detail)


@app.command(
    "patch",
    epilog="Example: keybrake budgets patch bg_3f9c2a1b4d5e6f70 --total-usd-cap 400 "
    "--reason 'approved by finance'",
)
def patch(
    budget_id: BudgetIdArgument,
    reason: options.ReasonOption,
    total_usd_cap: options.NewTotalCapOption = None,
    daily_usd_cap: options.NewDailyCapOption = None,
    expires_in: options.NewExpiresInOption = None,
    constraint: options.NewConstraintOption = None,
    constraint_mode: options.ConstraintModeOption = None,
    no_constraints: options.NoConstraintsOption = False,
    output: OutputOption = None,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = "",
) -> None:
    """Raise or lower a live budget's caps, extend or shorten its life, or replace its
    constraints; effective on the next call of any of its keys, on every replica."""
    spec = options.caps_patch(
        reason=reason,
        daily_usd_cap=daily_usd_cap,
        total_usd_cap=total_usd_cap,
        expires_in=expires_in,
        constraint=constraint,
        constraint_mode=constraint_mode,
        no_constraints=no_constraints,
    )
    budget = ask_proxy(url, api_key, lambda client: client.patch_budget(budget_id, spec))
    print_item(budget, output, budget_detail)
