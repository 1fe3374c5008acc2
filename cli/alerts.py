"""`keybrake alerts`: the threshold alerts the proxy raised, and how their delivery went."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.text import Text

from keybrake.cli._common import BriefOutputOption, print_rows
from keybrake.cli._connection import ApiKeyOption, UrlOption, ask_proxy
from keybrake.proxy.client import DEFAULT_URL
from keybrake.proxy.models import AlertInfo

_STYLE = {"delivered": "green", "pending": "yellow", "failing": "red"}


def alerts(
    pending: Annotated[
        bool, typer.Option("--pending", help="Only those not delivered yet.")
    ] = False,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="Newest N.")] = 100,
    output: BriefOutputOption = None,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = "",
) -> None:
    """Show threshold alerts (KEYBRAKE_ALERT_WEBHOOK_URL), newest first: what was raised, for
    which key or budget, and whether the webhook took it (needs the admin token).

    Example: keybrake alerts --pending
    """
    rows = ask_proxy(url, api_key, lambda client: client.alerts(pending=pending, limit=limit))

    def cells(row: AlertInfo) -> list[str | Text]:
        return [
            row.created_at[:19].replace("T", " "),
            row.subject_id,
            row.mark,
            Text(row.status, style=_STYLE.get(row.status, "white")),
            str(row.attempts),
            row.last_error or "-",
            row.delivery_id,
        ]

    print_rows(
        rows,
        output,
        empty="No alerts match.",
        headers="TIME,SUBJECT,ALERT,STATUS,ATTEMPTS,LAST ERROR,DELIVERY ID",
        right="ATTEMPTS",
        cells=cells,
    )
