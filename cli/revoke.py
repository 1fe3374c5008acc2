"""`keybrake revoke`: one key by id, or every active key and budget of an Argo workflow."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated

import typer

from keybrake.cli._common import EXIT_USAGE, Output, console, default_output, fail, print_data
from keybrake.cli._connection import ApiKeyOption, UrlOption, connect
from keybrake.cli._render import caps
from keybrake.proxy.client import DEFAULT_URL
from keybrake.proxy.models import BudgetInfo, KeyInfo


def revoke(
    key_id: Annotated[str | None, typer.Argument(help="Key id (vk_...) to revoke.")] = None,
    workflow: Annotated[
        str | None, typer.Option("--workflow", "-w", help="Revoke every key of this workflow.")
    ] = None,
    namespace: Annotated[
        str | None,
        typer.Option("--namespace", "-n", help="Only the workflow's keys in this namespace."),
    ] = None,
    output: Annotated[
        Output | None, typer.Option("--output", "-o", help="table, json or yaml.")
    ] = None,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = "",
) -> None:
    """Revoke vault keys (and a workflow's budgets); effective on the next vendor call.

    Examples: keybrake revoke vk_3f9c2a1b4d5e6f70 ·
    keybrake revoke --workflow billing-agent-x7k2p --namespace argo
    """
    if (key_id is None) == (workflow is None):
        fail("give a KEY_ID or --workflow NAME (one of them)", EXIT_USAGE)
    if namespace and not workflow:
        fail("--namespace goes with --workflow", EXIT_USAGE)
    budgets: list[BudgetInfo] = []
    with connect(url, api_key) as client:
        if key_id is not None:
            before = client.get_key(key_id)
            after = client.revoke_key(key_id)
            revoked = [after] if before.status == "active" else []
            subject = key_id
            if not revoked:
                _report([], [], f"{key_id} was already {before.status}; nothing to revoke", output)
                return
        else:
            label = f"argo/{workflow}"
            subject = f"workflow {workflow}" + (f" in namespace {namespace}" if namespace else "")
            result = client.revoke_label(label, namespace=namespace)
            revoked, budgets = result.keys, result.budgets
    if not revoked and not budgets:
        _report([], [], f"no active vault keys or budgets for {subject}; nothing revoked", output)
        return
    spent = sum((Decimal(k.spent_usd) for k in revoked), Decimal(0))
    what = _count(len(revoked), "key") + (
        f" and {_count(len(budgets), 'budget')}" if budgets else ""
    )
    _report(
        revoked,
        budgets,
        f"revoked {what} of {subject}; spent ${spent:.2f} in the last 24 h",
        output,
    )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _report(
    keys: list[KeyInfo], budgets: list[BudgetInfo], message: str, output: Output | None
) -> None:
    chosen = default_output(output)
    if chosen is Output.table:
        console.print(message, soft_wrap=True)
        for key in keys:
            console.print(
                f"  {key.key_id}  {key.agent_run_label}  spent ${key.spent_usd} "
                f"({caps(key.daily_usd_cap, key.total_usd_cap, key.budget_id)})  "
                f"calls {key.calls}  cap hits {key.cap_hits}",
                soft_wrap=True,
            )
        for budget in budgets:
            console.print(
                f"  {budget.budget_id}  {budget.agent_run_label}  spent "
                f"${budget.total_spent_usd} of {caps(budget.daily_usd_cap, budget.total_usd_cap)}",
                soft_wrap=True,
            )
    else:
        print_data(
            {
                "message": message,
                "revoked": len(keys),
                "keys": [k.model_dump() for k in keys],
                "budgets": [b.model_dump() for b in budgets],
            },
            chosen,
        )
