"""`keybrake revoke`: one key by id, or every active key and budget of an Argo workflow."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated

import typer

from keybrake.cli._common import (
    EXIT_REFUSED,
    EXIT_USAGE,
    BriefOutputOption,
    Output,
    console,
    default_output,
    fail,
    print_data,
)
from keybrake.cli._connection import ApiKeyOption, UrlOption, connect
from keybrake.cli._options import id_argument, workflow_label
from keybrake.cli._render import caps
from keybrake.proxy.client import DEFAULT_URL, KeybrakeClient
from keybrake.proxy.errors import ApiError
from keybrake.proxy.models import BudgetInfo, KeyInfo


def revoke(
    key_id: Annotated[str | None, id_argument("key", "Key id (vk_...) to revoke.")] = None,
    workflow: Annotated[
        str | None, typer.Option("--workflow", "-w", help="Revoke every key of this workflow.")
    ] = None,
    namespace: Annotated[
        str | None,
        typer.Option("--namespace", "-n", help="Only the workflow's keys in this namespace."),
    ] = None,
    ignore_not_found: Annotated[
        bool,
        typer.Option(
            "--ignore-not-found", help="Exit 0 when the key or workflow does not exist (scripts)."
        ),
    ] = False,
    output: BriefOutputOption = None,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = "",
) -> None:
    """Revoke vault keys (and a workflow's budgets); effective on the next vendor call.

    Examples: keybrake revoke vk_3f9c2a1b4d5e6f70 ·
    keybrake revoke --workflow billing-agent-x7k2p --namespace argo

    Exit codes: 0 revoked (or already revoked), 1 not found (0 with --ignore-not-found) or
    refused, 2 bad usage, 3 proxy unreachable.
    """
    if (key_id is None) == (workflow is None):
        fail("give a KEY_ID or --workflow NAME (one of them)", EXIT_USAGE)
    if namespace and not workflow:
        fail("--namespace goes with --workflow", EXIT_USAGE)
    budgets: list[BudgetInfo] = []
    with connect(url, api_key) as client:
        if key_id is not None:
            try:
                before = client.get_key(key_id)
            except ApiError as exc:
                if exc.status != 404:
                    raise
                _not_found(f"vault key {key_id!r} not found", ignore_not_found, output)
                return
            after = client.revoke_key(key_id)
            revoked = [after] if before.status == "active" else []
            subject = key_id
            if not revoked:
                _report([], [], f"{key_id} was already {before.status}; nothing to revoke", output)
                return
        else:
            assert workflow is not None
            label = workflow_label(workflow)
            name = label.removeprefix("argo/")
            subject = f"workflow {name}" + (f" in namespace {namespace}" if namespace else "")
            result = client.revoke_label(label, namespace=namespace)
            revoked, budgets = result.keys, result.budgets
            if not revoked and not budgets and not _any_of(client, label, namespace):
                where = f" in namespace {namespace}" if namespace else ""
                _not_found(
                    f"no vault keys or budgets of workflow {name}{where} (label {label})",
                    ignore_not_found,
                    output,
                )
                return
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


def _any_of(client: KeybrakeClient, label: str, namespace: str | None) -> bool:
    """Whether the label has any key or budget at all, of any status."""
    return bool(
        client.keys_page(label=label, namespace=namespace, limit=1).data
        or client.budgets_page(label=label, namespace=namespace, limit=1).data
    )


def _not_found(message: str, ignore: bool, output: Output | None) -> None:
    """NotFound, as kubectl says it: exit 1, unless the caller asked to ignore it."""
    if not ignore:
        fail(message, EXIT_REFUSED)
    _report([], [], f"{message}; nothing to revoke", output)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _report(
    keys: list[KeyInfo], budgets: list[BudgetInfo], message: str, output: Output | None
) -> None:
    chosen = default_output(output)
    if chosen is Output.table:
        out = console()
        out.print(message, soft_wrap=True)
        for key in keys:
            out.print(
                f"  {key.key_id}  {key.agent_run_label}  spent ${key.spent_usd} "
                f"({caps(key.daily_usd_cap, key.total_usd_cap, key.budget_id)})  "
                f"calls {key.calls}  cap hits {key.cap_hits}",
                soft_wrap=True,
            )
        for budget in budgets:
            out.print(
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
