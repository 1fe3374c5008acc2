"""The proxy app in-process (Starlette TestClient), with an injectable clock."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from starlette.testclient import TestClient

from keybrake.proxy.app import build_app
from keybrake.proxy.settings import Settings
from tests.proxyproc import ADMIN_KEY, STRIPE_SECRET


class Clock:
    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2026, 11, 26, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@contextmanager
def app_client(
    tmp_path: Path, clock: Clock | None = None, **overrides: Any
) -> Iterator[TestClient]:
    fields: dict[str, Any] = {
        "api_key": ADMIN_KEY,
        "database_url": f"sqlite:///{tmp_path / 'inproc.db'}",
        "stripe_secret_key": STRIPE_SECRET,
        "stripe_api_base": "http://127.0.0.1:9",
    }
    fields.update(overrides)
    settings = Settings(**fields)
    app = build_app(settings, clock=clock or Clock())
    with TestClient(app, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as client:
        yield client


def issue(client: TestClient, **spec: Any) -> dict[str, Any]:
    body = {
        "vendor": "stripe",
        "daily_usd_cap": 300,
        "allowed_endpoints": ["POST /v1/payment_intents"],
        "expires_in": "2h",
        "agent_run_label": "argo/billing-agent-x7k2p",
    }
    body.update(spec)
    response = client.post("/vault/keys", json=body)
    assert response.status_code == 201, response.text
    return dict(response.json())
