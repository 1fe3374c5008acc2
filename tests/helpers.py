"""Small helpers shared by tests: fan-outs through the real Stripe SDK, localstripe counts."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import stripe

from keybrake.proxy.store.records import Event

# What store-level tests pass where the admin API passes the record of its action.
TEST_EVENT = Event(
    ts=datetime(2026, 11, 26, tzinfo=UTC), action="test.setup", actor="test", outcome="ok"
)


@dataclass
class FanOutResult:
    succeeded: list[str] = field(default_factory=list)
    errors: list[stripe.StripeError] = field(default_factory=list)

    def kinds(self) -> Counter[str]:
        return Counter(type(e).__name__ for e in self.errors)


def fan_out(
    vault_key: str, base: str | list[str], count: int, amount: int = 100, run: str = "t"
) -> FanOutResult:
    """`count` concurrent PaymentIntents of `amount` cents through the official SDK (async),
    spread round-robin over one or several proxy base URLs, on the SDK's aiohttp client (its
    httpx client, the default, spent seconds of CPU per 500 calls scanning its pool)."""
    bases = [base] if isinstance(base, str) else base

    async def fan() -> FanOutResult:
        http_client = stripe.AIOHTTPClient()  # 100 connections at most, as the httpx client
        clients = [
            stripe.StripeClient(
                vault_key,
                base_addresses={"api": base},
                http_client=http_client,
                max_network_retries=2,
            )
            for base in bases
        ]
        result = FanOutResult()

        async def one(index: int) -> None:
            client = clients[index % len(clients)]  # pods spread over the replicas
            try:
                intent = await client.v1.payment_intents.create_async(
                    params={
                        "amount": amount,
                        "currency": "usd",
                        "metadata": {"run": run, "item": str(index)},
                    }
                )
                result.succeeded.append(intent.id)
            except stripe.StripeError as exc:
                result.errors.append(exc)

        try:
            await asyncio.gather(*(one(i) for i in range(count)))
        finally:
            await http_client.close_async()
        return result

    return asyncio.run(fan())


def localstripe_intents(url: str, run: str | None = None) -> list[dict[str, Any]]:
    """Every PaymentIntent localstripe holds (read directly, not through the proxy)."""
    out: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": 100}
    headers = {"Authorization": "Bearer sk_test_direct"}
    while True:
        page = httpx.get(f"{url}/v1/payment_intents", params=params, headers=headers).json()
        out.extend(page["data"])
        if not page.get("has_more"):
            break
        params["starting_after"] = page["data"][-1]["id"]
    if run is not None:
        out = [pi for pi in out if (pi.get("metadata") or {}).get("run") == run]
    return out


def reconcile(database_url: str) -> int:
    """What any replica's sweep does once the reservation TTL has passed: calls still in flight
    (left by a dead process) are counted as spent."""
    from keybrake.proxy.store import open_store

    async def run() -> int:
        store = open_store(database_url)
        await store.open()
        try:
            return await store.sweep(datetime.now(UTC) + timedelta(hours=1))
        finally:
            await store.close()

    return asyncio.run(run())
