"""Rich renderings of keys and audit rows, shared by several commands."""

from __future__ import annotations

from decimal import Decimal

from rich.table import Table

from keybrake.proxy.models import AuditRow, KeyInfo

__all__ = ["audit_table", "key_detail", "keys_table"]

_STATUS_STYLE = {"active": "green", "revoked": "red", "expired": "yellow"}


def _status(status: str) -> str:
    return f"[{_STATUS_STYLE.get(status, 'white')}]{status}[/]"


def keys_table(keys: list[KeyInfo]) -> Table:
    table = Table(box=None, header_style="bold")
    for column in (
        "KEY ID",
        "LABEL",
        "VENDOR",
        "STATUS",
        "SPENT",
        "CAP",
        "CALLS",
        "CAP HITS",
        "EXPIRES",
    ):
        numeric = column in {"SPENT", "CAP", "CALLS", "CAP HITS"}
        table.add_column(column, justify="right" if numeric else "left", overflow="fold")
    # Ids and labels are what people copy into the next command: never fold them.
    table.columns[0].min_width = max((len(k.key_id) for k in keys), default=6)
    table.columns[1].min_width = min(max((len(k.agent_run_label) for k in keys), default=5), 48)
    for key in keys:
        table.add_row(
            key.key_id,
            key.agent_run_label,
            key.vendor,
            _status(key.status),
            f"${key.spent_usd}",
            f"${key.daily_usd_cap}",
            str(key.calls),
            str(key.cap_hits),
            key.expires_at[:16].replace("T", " "),
        )
    return table


def key_detail(key: KeyInfo) -> Table:
    table = Table(box=None, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("Key ID", key.key_id),
        ("Label", key.agent_run_label),
        ("Vendor", key.vendor),
        ("Status", _status(key.status)),
        ("Allowed", "\n".join(key.allowed_endpoints)),
        ("Cap (24 h)", f"${key.daily_usd_cap}"),
        ("Per-call cap", f"${key.max_usd_per_call}" if key.max_usd_per_call else "-"),
        ("Spent (24 h)", f"${key.spent_usd} since {key.window_start[:16].replace('T', ' ')}"),
        ("Reserved", f"${key.reserved_usd}"),
        ("Remaining", f"${key.remaining_usd}"),
        ("Spent in all", f"${key.total_spent_usd}"),
        ("Calls", str(key.calls)),
        ("Cap hits", str(key.cap_hits)),
        ("Created", key.created_at),
        ("Expires", key.expires_at),
        ("Revoked", key.revoked_at or "-"),
    ]
    if key.allowed_accounts:
        rows.append(("Accounts", ", ".join(key.allowed_accounts)))
    if key.metadata:
        rows.append(("Metadata", ", ".join(f"{k}={v}" for k, v in key.metadata.items())))
    for name, value in rows:
        table.add_row(name, value)
    return table


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
