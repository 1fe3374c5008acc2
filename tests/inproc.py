"""The proxy app in-process (Starlette TestClient), with an injectable clock, and a stand-in for
the vendors behind the `upstream=` seam of `build_app`, for tests that need no sockets."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from starlette.testclient import TestClient

from keybrake.proxy.app import build_app
from keybrake.proxy.settings import Settings
from keybrake.proxy.upstream import UpstreamResponse
from tests.fakes.inprocess import InProcessUpstream
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
    fields: dict[str, Any] = {"stripe_api_base": "http://127.0.0.1:9"}
    fields.update(overrides)
    upstream = fields.pop("upstream", None)
    verifier = fields.pop("verifier", None)
    store = fields.pop("store", None)
    app = build_app(
        settings(tmp_path, **fields),
        clock=clock or Clock(),
        store=store,
        upstream=upstream,
        verifier=verifier,
    )
    with TestClient(app, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as client:
        yield client


class StubUpstream(InProcessUpstream):
    """The vendor side of `build_app(upstream=...)`: records each request and answers it with
    `answer` (a Stripe-shaped PaymentIntent and request id by default), once `gate` is open."""

    def __init__(
        self,
        answer: UpstreamResponse | None = None,
    ) -> None:
        super().__init__()
        self.answer = answer or UpstreamResponse(
            200,
            [("content-type", "application/json"), ("request-id", "req_stub")],
            b'{"id": "pi_stub", "object": "payment_intent", "amount": 100, "currency": "usd"}',
        )
        self.sent: list[tuple[str, str, list[tuple[str, str]], bytes | None]] = []
        self.gate: asyncio.Event | None = None
        self.arrived: asyncio.Event | None = None

    async def start(self) -> None:
        self.gate, self.arrived = asyncio.Event(), asyncio.Event()
        self.gate.set()

    async def respond(
        self, method: str, url: str, headers: list[tuple[str, str]], body: bytes | None
    ) -> UpstreamResponse:
        assert self.gate is not None and self.arrived is not None
        self.sent.append((method, url, headers, body))
        self.arrived.set()
        await self.gate.wait()
        return self.answer


def settings(tmp_path: Path, **overrides: Any) -> Settings:
    fields: dict[str, Any] = {
        "api_key": ADMIN_KEY,
        "database_url": f"sqlite:///{tmp_path / 'inproc.db'}",
        "stripe_secret_key": STRIPE_SECRET,
        "stripe_api_base": "http://stripe.invalid",
    }
    fields.update(overrides)
    return Settings(**fields)


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
