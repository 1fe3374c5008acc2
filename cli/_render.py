"""Tables of keys, budgets and audit rows, and a record's details, shared by several commands
(`keybrake.cli._table` prints them)."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from rich.text import Text

from keybrake.cli._paging import age
from keybrake.cli._table import Column, Grid
from keybrake.proxy.models import AuditRow, BudgetInfo, ChangeInfo, KeyInfo

__all__ = [
    "audit_line",
    "audit_table",
    "budget_detail",
    "budgets_table",
    "caps",
    "constraints_text",
    "detail_table",
    "key_detail",
    "keys_table",
]

_STATUS_STYLE = {"active": "green", "revoked": "red", "expired": "yellow"}


def _status(status: str) -> Text:
    return Text(status, style=_STATUS_STYLE.get(status, "white"))


def caps(daily: str | None, total: str | None, budget_id: str | None = None) -> str:
    """`$300/24h`, `$500 total`, both, or the budget the key draws on."""
    parts = [f"${daily}/24h" if daily else "", f"${total} total" if total else ""]
    shown = ", ".join(part for part in parts if part)
    if budget_id:
        shown = f"{shown} + {budget_id}" if shown else budget_id
    return shown or "-"


def _ts(text: str | None) -> str:
    return text[:16].replace("T", " ") if text else "-"


def keys_table(keys: list[KeyInfo], wide: bool = False) -> Grid:
    """Keys as a table; `wide` adds who issued each, for which namespace, and its budget."""
    headers = "KEY ID,LABEL,VENDOR,STATUS,SPENT,CAP,CALLS,CAP HITS,EXPIRES,AGE"
    if wide:
        headers += ",NAMESPACE,SERVICE ACCOUNT,ISSUER,TOTAL SPENT"
    table = Grid.of(headers, right="SPENT,CAP,CALLS,CAP HITS,TOTAL SPENT")
    for key in keys:
        row: list[str | Text] = [
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
        table.rows.append(row)
    return table


def budgets_table(budgets: list[BudgetInfo], _wide: bool = False) -> Grid:
    """Budgets as a table (the same with -o wide)."""
    table = Grid.of("BUDGET ID,LABEL,STATUS,SPENT,TOTAL,CAP,KEYS,EXPIRES", "SPENT,TOTAL,CAP,KEYS")
    for budget in budgets:
        table.rows.append(
            [
                budget.budget_id,
                budget.agent_run_label,
                _status(budget.status),
                f"${budget.spent_usd}",
                f"${budget.total_spent_usd}",
                caps(budget.daily_usd_cap, budget.total_usd_cap),
                str(len(budget.keys)),
                _ts(budget.expires_at),
            ]
        )
    return table


def _change_lines(changes: list[ChangeInfo]) -> str:
    return "\n".join(
        f"{_ts(c.at)}  {c.field} {c.old or '-'} -> {c.new or '-'}  ({c.reason})" for c in changes
    )


def detail_table(rows: Sequence[tuple[str, str | Text]]) -> Grid:
    """One record as a column of names and a column of values."""
    return Grid(
        [Column("NAME"), Column("VALUE")],
        [(Text(name, style="bold"), value) for name, value in rows],
        header=False,
    )


def constraints_text(constraints: dict[str, Any] | None, none: str = "-") -> str:
    """Constraints as the API shows them (`mode`, then field: [values]), a field a line."""
    if not constraints:
        return none
    lines = [
        f"{name}: {', '.join(values) if isinstance(values, list) else values}"
        for name, values in constraints.items()
        if name != "mode"
    ]  # (values are lists, but for the call rate: a number)
    if constraints.get("mode") == "report":
        lines.append("report only: calls outside are forwarded and audited")
    return "\n".join(lines)


def _record_detail(
    rows: list[tuple[str, str | Text]],
    changes: list[ChangeInfo],
    metadata: dict[str, Any],
    constraints: dict[str, Any] | None,
) -> Grid:
    """A key's or a budget's detail: its rows, then its constraints, changes and metadata if it
    has any."""
    if constraints:
        rows.append(("Constraints", constraints_text(constraints)))
    if changes:
        rows.append(("Changes", _change_lines(changes)))
    if metadata:
        rows.append(("Metadata", ", ".join(f"{k}={v}" for k, v in metadata.items())))
    return detail_table(rows)


def budget_detail(budget: BudgetInfo) -> Grid:
    rows: list[tuple[str, str | Text]] = [
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
    return _record_detail(rows, budget.changes, budget.metadata, budget.constraints)


def key_detail(key: KeyInfo) -> Grid:
    rows: list[tuple[str, str | Text]] = [
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
    return _record_detail(rows, key.changes, key.metadata, key.constraints)


def audit_table(rows: list[AuditRow]) -> Grid:
    table = Grid.of("TIME,STEP TAG,METHOD,PATH,STATUS,DECISION,USD,VENDOR REQUEST ID", "STATUS,USD")
    for row in rows:
        table.rows.append(
            [
                row.ts[11:23],
                row.caller_tag or "-",
                row.method,
                row.path,
                str(row.status),
                _decision(row),
                _usd(row),
                row.vendor_request_id or "-",
            ]
        )
    return table


def _decision(row: AuditRow) -> Text:
    return Text(row.decision, style="" if row.decision == "forwarded" else "yellow")


def _usd(row: AuditRow) -> str:
    return row.settled_usd if Decimal(row.settled_usd) else row.reserved_usd


def audit_line(row: AuditRow) -> Text:
    """One audit row as one line, for `audit --follow`."""
    return Text.assemble(
        f"{row.ts[:23].replace('T', ' ')}  {row.caller_tag or '-'}  {row.method} {row.path}  "
        f"{row.status}  ",
        _decision(row),
        f"  ${_usd(row)}  {row.vendor_request_id or '-'}",
    )
