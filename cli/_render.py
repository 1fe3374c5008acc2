"""Rich renderings of keys and audit rows, shared by several commands."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from rich.console import OverflowMethod
from rich.table import Table

from keybrake.cli._paging import age
from keybrake.proxy.models import AuditRow, BudgetInfo, ChangeInfo, KeyInfo

__all__ = [
    "audit_line",
    "audit_table",
    "budget_detail",
    "budgets_table",
    "caps",
    "detail_table",
    "key_detail",
    "keys_table",
]

_STATUS_STYLE = {"active": "green", "revoked": "red", "expired": "yellow"}


def _status(status: str) -> str:
    return f"[{_STATUS_STYLE.get(status, 'white')}]{status}[/]"


def caps(daily: str | None, total: str | None, budget_id: str | None = None) -> str:
    """`$300/24h`, `$500 total`, both, or the budget the key draws on."""
    parts = [f"${daily}/24h" if daily else "", f"${total} total" if total else ""]
    shown = ", ".join(part for part in parts if part)
    if budget_id:
        shown = f"{shown} + {budget_id}" if shown else budget_id
    return shown or "-"


def _ts(text: str | None) -> str:
    return text[:16].replace("T", " ") if text else "-"


def keys_table(keys: list[KeyInfo], *, wide: bool = False) -> Table:
    """Keys as a table; `wide` adds who issued each, for which namespace, and its budget."""
    table = Table(box=None, header_style="bold")
    columns = ["KEY ID", "LABEL", "VENDOR", "STATUS", "SPENT", "CAP", "CALLS", "CAP HITS"]
    columns += ["EXPIRES", "AGE"]
    if wide:
        columns += ["NAMESPACE", "SERVICE ACCOUNT", "ISSUER", "TOTAL SPENT"]
    for column in columns:
        numeric = column in {"SPENT", "CAP", "CALLS", "CAP HITS"}
        table.add_column(column, justify="right" if numeric else "left", overflow="fold")
    # Ids and labels are what people copy into the next command: never fold them.
    table.columns[0].min_width = max((len(k.key_id) for k in keys), default=6)
    table.columns[1].min_width = min(max((len(k.agent_run_label) for k in keys), default=5), 48)
    for key in keys:
        row = [
            key.key_id,
            key.agent_run_label,
            key.vendor,
            _status(key.status),
            f"${key.spent_usd}",
            caps(key.daily_usd_cap, key.total_usd_cap, key.budget_id),
            str(key.calls),
            str(key.cap_hits),
            _ts(key.expires_at),
            age(key.created_at),
        ]
        if wide:
            row += [
                key.namespace or "-",
                key.service_account or "-",
                key.issuer_id or "admin",
                f"${key.total_spent_usd}",
            ]
        table.add_row(*row)
    return table


def budgets_table(budgets: list[BudgetInfo]) -> Table:
    table = Table(box=None, header_style="bold")
    for column in ("BUDGET ID", "LABEL", "STATUS", "SPENT", "TOTAL", "CAP", "KEYS", "EXPIRES"):
        numeric = column in {"SPENT", "TOTAL", "CAP", "KEYS"}
        table.add_column(column, justify="right" if numeric else "left", overflow="fold")
    table.columns[0].min_width = max((len(b.budget_id) for b in budgets), default=9)
    table.columns[1].min_width = min(max((len(b.agent_run_label) for b in budgets), default=5), 48)
    for budget in budgets:
        table.add_row(
            budget.budget_id,
            budget.agent_run_label,
            _status(budget.status),
            f"${budget.spent_usd}",
            f"${budget.total_spent_usd}",
            caps(budget.daily_usd_cap, budget.total_usd_cap),
            str(len(budget.keys)),
            _ts(budget.expires_at),
        )
    return table


def _change_lines(changes: list[ChangeInfo]) -> str:
    return "\n".join(
        f"{_ts(c.at)}  {c.field} {c.old or '-'} -> {c.new or '-'}  ({c.reason})" for c in changes
    )


def detail_table(rows: Sequence[tuple[str, str]], overflow: OverflowMethod = "ellipsis") -> Table:
    """One record as a column of names and a column of values."""
    table = Table(box=None, show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow=overflow)
    for name, value in rows:
        table.add_row(name, value)
    return table


def _record_detail(
    rows: list[tuple[str, str]], changes: list[ChangeInfo], metadata: dict[str, Any]
) -> Table:
    """A key's or a budget's detail: its rows, then its changes and metadata if it has any."""
    if changes:
        rows.append(("Changes", _change_lines(changes)))
    if metadata:
        rows.append(("Metadata", ", ".join(f"{k}={v}" for k, v in metadata.items())))
    return detail_table(rows)


def budget_detail(budget: BudgetInfo) -> Table:
    rows = [
        ("Budget ID", budget.budget_id),
        ("Label", budget.agent_run_label),
        ("Status", _status(budget.status)),
        ("Cap (24 h)", f"${budget.daily_usd_cap}" if budget.daily_usd_cap else "-"),
        ("Cap (total)", f"${budget.total_usd_cap}" if budget.total_usd_cap else "-"),
        ("Spent (24 h)", f"${budget.spent_usd} since {_ts(budget.window_start)}"),
        ("Reserved", f"${budget.reserved_usd}"),
        ("Spent in all", f"${budget.total_spent_usd}"),
        ("Remaining", f"${budget.remaining_usd}"),
        ("Calls", str(budget.calls)),
        ("Cap hits", str(budget.cap_hits)),
        ("Keys", "\n".join(budget.keys) or "-"),
        ("Created", budget.created_at),
        ("Expires", budget.expires_at),
        ("Revoked", budget.revoked_at or "-"),
    ]
    return _record_detail(rows, budget.changes, budget.metadata)


def key_detail(key: KeyInfo) -> Table:
    rows = [
        ("Key ID", key.key_id),
        ("Label", key.agent_run_label),
        ("Vendor", key.vendor),
        ("Status", _status(key.status)),
        ("Allowed", "\n".join(key.allowed_endpoints)),
        ("Cap (24 h)", f"${key.daily_usd_cap}" if key.daily_usd_cap else "-"),
        ("Cap (total)", f"${key.total_usd_cap}" if key.total_usd_cap else "-"),
        ("Per-call cap", f"${key.max_usd_per_call}" if key.max_usd_per_call else "-"),
        ("Per-caller cap", f"${key.max_usd_per_caller}" if key.max_usd_per_caller else "-"),
        ("Budget", key.budget_id or "-"),
        ("Spent (24 h)", f"${key.spent_usd} since {_ts(key.window_start)}"),
        ("Reserved", f"${key.reserved_usd}"),
        ("Remaining", f"${key.remaining_usd}" if key.remaining_usd else "-"),
        ("Spent in all", f"${key.total_spent_usd}"),
        ("Calls", str(key.calls)),
        ("Cap hits", str(key.cap_hits)),
        ("Created", key.created_at),
        ("Expires", key.expires_at),
        ("Revoked", key.revoked_at or "-"),
    ]
    if key.allowed_accounts:
        rows.append(("Accounts", ", ".join(key.allowed_accounts)))
    return _record_detail(rows, key.changes, key.metadata)


def audit_table(rows: list[AuditRow]) -> Table:
    table = Table(box=None, header_style="bold")
    for column in (
        "TIME",
        "STEP TAG",
        "METHOD",
        "PATH",
        "STATUS",
        "DECISION",
        "USD",
        "VENDOR REQUEST ID",
    ):
        numeric = column in {"STATUS", "USD"}
        short = column in {"TIME", "METHOD", "STATUS", "DECISION", "USD"}
        table.add_column(
            column, justify="right" if numeric else "left", overflow="fold", no_wrap=short
        )
    table.columns[1].min_width = min(max((len(r.caller_tag or "") for r in rows), default=8), 48)
    for row in rows:
        decision = row.decision
        if decision != "forwarded":
            decision = f"[yellow]{decision}[/]"
        usd = row.settled_usd if Decimal(row.settled_usd) else row.reserved_usd
        table.add_row(
            row.ts[11:23],
            row.caller_tag or "-",
            row.method,
            row.path,
            str(row.status),
            decision,
            usd,
            row.vendor_request_id or "-",
        )
    return table


def audit_line(row: AuditRow) -> str:
    """One audit row as one line, for `audit --follow`."""
    usd = row.settled_usd if Decimal(row.settled_usd) else row.reserved_usd
    decision = row.decision if row.decision == "forwarded" else f"[yellow]{row.decision}[/]"
    return (
        f"{row.ts[:23].replace('T', ' ')}  {row.caller_tag or '-'}  {row.method} {row.path}  "
        f"{row.status}  {decision}  ${usd}  {row.vendor_request_id or '-'}"
    )
