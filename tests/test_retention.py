"""Audit retention: old rows go, caps never move, and nothing a live key or its window needs goes
with them. Both backends, an injectable clock."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from keybrake.proxy.app import maintain
from keybrake.proxy.store import open_store
from tests.fakes.stripe_upstream import FakeStripe
from tests.helpers import TEST_EVENT
from tests.inproc import Clock, app_client, issue
from tests.inproc import settings as proxy_settings
from tests.served import ServedProxy

T0 = datetime(2026, 8, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'retention.db'}"
    else:
        yield request.getfixturevalue("pg_url")


def test_prune_removes_only_what_no_cap_or_live_key_needs(
    tmp_path: Path, fake_stripe: FakeStripe, database_url: str
) -> None:
    clock = Clock(T0)
    with app_client(
        tmp_path, clock, database_url=database_url, stripe_api_base=fake_stripe.url
    ) as client:
        item = iter(range(1000))

        def calls(key: dict[str, Any], n: int) -> None:
            for _ in range(n):
                reply = client.post(
                    "/stripe/v1/payment_intents",
                    data={"amount": "100", "currency": "usd", "metadata[i]": str(next(item))},
                    headers={"Authorization": f"Bearer {key['vault_key']}"},
                )
                assert reply.status_code == 200

        ended = issue(client, agent_run_label="argo/ended", expires_in="1h")  # expires T0 + 1h
        calls(ended, 3)
        client.post("/paypal/v1/payments")  # an unknown vendor: a row with no key
        clock.now = T0 + timedelta(days=9)
        active = issue(client, agent_run_label="argo/active", expires_in="7d")
        calls(active, 2)
        just_revoked = issue(client, agent_run_label="argo/recent", expires_in="7d")
        calls(just_revoked, 2)
        clock.now = T0 + timedelta(days=10)
        assert client.delete(f"/vault/keys/{just_revoked['key_id']}").status_code == 200
        views = {k["key_id"]: k for k in client.get("/vault/keys").json()["data"]}

        dry = client.post("/vault/audit/prune", json={"before": "12h", "dry_run": True})
        assert dry.status_code == 200 and dry.json()["removed"] == 4
        assert len(client.get("/vault/audit").json()["data"]) == 8
        done = client.post("/vault/audit/prune", json={"before": "12h"})
        assert done.json() == {
            "before": "2026-08-11T00:00:00.000000Z",
            "dry_run": False,
            "removed": 4,
        }
        left = client.get("/vault/audit").json()["data"]
        assert {row["agent_run_label"] for row in left} == {"argo/active", "argo/recent"}
        # Spend does not come from the audit log: every key reads as before.
        after = {k["key_id"]: k for k in client.get("/vault/keys").json()["data"]}
        assert after == views
        again = client.post("/vault/audit/prune", json={"before": "12h"})
        assert again.json()["removed"] == 0
        for bad in ({"before": "soon"}, {"before": "2026-08-01T00:00:00"}, {"after": "1d"}):
            refused = client.post("/vault/audit/prune", json=bad)
            assert refused.status_code == 400, bad


def test_maintenance_reconciles_then_prunes_and_never_prunes_a_call_in_flight(
    tmp_path: Path,
) -> None:
    """The background task every replica runs: reconcile dead calls, forget old replay tokens,
    prune the audit log when `KEYBRAKE_AUDIT_RETENTION` is set."""
    from keybrake.proxy.store.records import AuditFilter, AuditRecord
    from tests.test_decision_table import key_record, reservation

    url = f"sqlite:///{tmp_path / 'maintain.db'}"
    old = T0 - timedelta(days=40)

    async def run() -> list[Any]:
        store = open_store(url)
        await store.open()
        try:
            key = replace(key_record("vk_old"), created_at=old, expires_at=old + timedelta(hours=1))
            await store.create_key(key, TEST_EVENT)
            dead = reservation(key, old, 3_000_000, "body", idempotency_key="order-1")
            assert (await store.reserve(dead)).decision == "forwarded"  # its process died
            await store.record(AuditRecord(old, "paypal", "POST", "/x", 404, "unknown_vendor"))
            seen = [await store.prune_audit(T0, T0)]  # the call in flight stays
            keep_all = proxy_settings(tmp_path, database_url=url)
            thirty_days = proxy_settings(tmp_path, database_url=url, audit_retention="30d")
            seen.append(await maintain(store, keep_all, T0))
            seen.append(await maintain(store, thirty_days, T0))
            seen.append([row.decision for row in await store.audit(AuditFilter())])
            view = await store.get_key("vk_old", old + timedelta(minutes=30))
            assert view is not None
            seen.append(view.usage.total_micros)
            return seen
        finally:
            await store.close()

    pruned_first, first, second, left, spent = asyncio.run(run())
    assert pruned_first == 1  # the unknown vendor's row; the in-flight one is kept
    assert first == (1, 1, 0)  # reconciled, its replay token forgotten, nothing pruned
    assert second == (0, 0, 1)  # now reconciled, old, and of an ended key: pruned
    assert left == []
    assert spent == 3_000_000  # the reconciled spend outlives its audit row


def test_keybrake_audit_prune(fake_proxy: ServedProxy) -> None:
    """No Stripe call is made: the proxy in front of the in-thread fake, not localstripe."""
    from tests.test_cli import run

    key = fake_proxy.issue(daily_usd_cap=1)
    httpx.post(f"{fake_proxy.url}/paypal/v1/payments")
    code, out, _ = run(
        fake_proxy,
        "audit",
        "prune",
        "--before",
        "2100-01-01T00:00:00Z",
        "--dry-run",
        "-o",
        "table",
    )
    assert code == 0 and "would delete 1 audit row older than 2100-01-01" in out
    code, out, _ = run(
        fake_proxy, "audit", "prune", "--before", "2100-01-01T00:00:00Z", "-o", "json"
    )
    assert code == 0 and '"removed": 1' in out
    code, _, err = run(fake_proxy, "audit", "prune", "--before", "yesterday")
    assert code == 2 and "--before" in err
    with fake_proxy.admin() as admin:
        assert admin.get("/vault/audit").json()["data"] == []
        assert admin.get(f"/vault/keys/{key['key_id']}").json()["status"] == "active"
