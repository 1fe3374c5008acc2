"""`keybrake watch`: a live view of a workflow's keys while it runs."""

from __future__ import annotations

import time
from collections import deque
from decimal import Decimal
from typing import Annotated

import typer
from rich.console import Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table

from keybrake.cli._common import EXIT_REFUSED, console, err_console, fail
from keybrake.cli._connection import ApiKeyOption, UrlOption, connect
from keybrake.cli._options import workflow_label
from keybrake.cli._render import caps
from keybrake.proxy.client import DEFAULT_URL, KeybrakeClient
from keybrake.proxy.models import AuditRow, BudgetInfo, KeyInfo


def watch(
    workflow: Annotated[str, typer.Option("--workflow", "-w", help="The Argo workflow's name.")],
    interval: Annotated[float, typer.Option(min=0.05, help="Seconds between refreshes.")] = 1.0,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = "",
) -> None:
    """Watch spend against cap, calls/s, cap hits and recent errors; exits when every key of the
    workflow is revoked or expired.

    Example: keybrake watch --workflow billing-agent-x7k2p
    """
    label = workflow_label(workflow)
    with connect(url, api_key) as client:
        if (
            not client.keys_page(label=label, limit=1).data
            and not client.budgets_page(label=label, limit=1).data
        ):
            fail(
                f"no vault keys or budgets of workflow {label.removeprefix('argo/')} "
                f"(label {label}): nothing to watch",
                EXIT_REFUSED,
                "Is the name right (argo list)? A run shows up once its issue step has run.",
            )
        err_console().print(f"watching {label} (Ctrl-C to stop)")
        _follow(client, label, interval)


def _follow(client: KeybrakeClient, label: str, interval: float) -> None:
    previous: dict[str, tuple[float, int]] = {}
    rates: dict[str, float] = {}
    errors: deque[AuditRow] = deque(maxlen=5)
    last_id: int | None = None
    keys: list[KeyInfo] = []
    with Live(console=console(), auto_refresh=False) as live:
        try:
            while True:
                keys = client.keys_page(label=label).data
                budgets = client.budgets_page(label=label).data
                now = time.monotonic()
                for key in keys:
                    seen_at, seen_calls = previous.get(key.key_id, (now, key.calls))
                    if now > seen_at:
                        rates[key.key_id] = (key.calls - seen_calls) / (now - seen_at)
                    previous[key.key_id] = (now, key.calls)
                rows = client.audit_page(label=label, after_id=last_id, limit=500).data
                if rows:
                    last_id = max(r.id for r in rows)
                    errors.extend(r for r in reversed(rows) if r.status >= 400 or r.status == 0)
                live.update(_view(label, keys, budgets, rates, list(errors)), refresh=True)
                if keys and all(k.status != "active" for k in keys):
                    break
                time.sleep(interval)  # the refresh period of a live view, not synchronisation
        except KeyboardInterrupt:
            pass
    if keys and all(k.status != "active" for k in keys):
        console().print(f"every key of {label} is revoked or expired")


def _view(
    label: str,
    keys: list[KeyInfo],
    budgets: list[BudgetInfo],
    rates: dict[str, float],
    errors: list[AuditRow],
) -> Group:
    table = Table(title=f"vault keys and budgets of {label}", box=None, header_style="bold")
    for column in ("ID", "STATUS", "SPEND", "", "CALLS/S", "CALLS", "CAP HITS"):
        table.add_column(column)
    for key in keys:
        used = Decimal(key.spent_usd) + Decimal(key.reserved_usd)
        # The bar fills towards the first cap the key would hit (its 24-hour cap, else its total).
        cap = Decimal(key.daily_usd_cap or key.total_usd_cap or 0)
        bar = (
            ProgressBar(total=float(cap), completed=float(min(used, cap)), width=30) if cap else ""
        )
        table.add_row(
            key.key_id,
            key.status,
            bar,
            f"${key.spent_usd} ({caps(key.daily_usd_cap, key.total_usd_cap, key.budget_id)})",
            f"{rates.get(key.key_id, 0.0):.1f}",
            str(key.calls),
            str(key.cap_hits),
        )
    for budget in budgets:
        total = Decimal(budget.total_usd_cap or budget.daily_usd_cap or 0)
        spent = Decimal(budget.total_spent_usd if budget.total_usd_cap else budget.spent_usd)
        table.add_row(
            budget.budget_id,
            budget.status,
            ProgressBar(total=float(total), completed=float(min(spent, total)), width=30),
            f"${spent} ({caps(budget.daily_usd_cap, budget.total_usd_cap)})",
            "",
            str(budget.calls),
            str(budget.cap_hits),
        )
    if not keys:
        table.add_row("(no keys yet)", "", "", "", "", "", "")
    parts: list[Table] = [table]
    if errors:
        recent = Table(title="recent refusals and errors", box=None, header_style="bold")
        for column in ("TIME", "STEP TAG", "PATH", "STATUS", "DECISION"):
            recent.add_column(column)
        for row in errors:
            recent.add_row(
                row.ts[11:19], row.caller_tag or "-", row.path, str(row.status), row.decision
            )
        parts.append(recent)
    return Group(*parts)
