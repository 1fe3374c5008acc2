"""Secrets never show in responses, logs, audit rows or the database; vault keys only hashed."""

from __future__ import annotations

from pathlib import Path

import httpx
import stripe

from tests.fakes.stripe_upstream import FakeStripe
from tests.proxyproc import ADMIN_KEY, STRIPE_SECRET, start_proxy


def test_no_secret_in_responses_logs_audit_or_database(
    tmp_path: Path, fake_stripe: FakeStripe
) -> None:
    proxy = start_proxy(tmp_path, stripe_base=fake_stripe.url)
    seen: list[str] = []
    try:
        key = proxy.issue(daily_usd_cap=2, allowed_endpoints=["POST /v1/payment_intents"])
        vault_key = key["vault_key"]
        client = stripe.StripeClient(
            vault_key + ".pod-1", base_addresses={"api": proxy.url + "/stripe"}
        )
        client.v1.payment_intents.create(params={"amount": 100, "currency": "usd"})
        for params in ({"amount": 150, "currency": "usd"}, {"amount": 1, "currency": "xyz"}):
            try:
                client.v1.payment_intents.create(params=params)
            except stripe.StripeError as exc:
                seen.append(str(exc.http_body))
        fake_stripe.mode = "drop"
        try:
            client.v1.payment_intents.create(params={"amount": 10, "currency": "usd"})
        except stripe.StripeError as exc:
            seen.append(str(exc.http_body))
        fake_stripe.mode = "ok"
        seen.append(
            httpx.get(
                f"{proxy.url}/stripe/v1/customers", headers={"Authorization": "Bearer nope"}
            ).text
        )
        with proxy.admin() as admin:
            for path in (
                "/vault/keys",
                f"/vault/keys/{key['key_id']}",
                "/vault/audit",
                "/vault/pricing",
            ):
                seen.append(admin.get(path).text)
            seen.append(admin.get("/vault/audit", params={"format": "csv"}).text)
            seen.append(admin.delete(f"/vault/keys/{key['key_id']}").text)
    finally:
        proxy.stop()
    seen.append(proxy.log())
    database = b"".join(p.read_bytes() for p in tmp_path.glob("keybrake.db*"))
    for text in seen:
        assert STRIPE_SECRET not in text
        assert vault_key not in text
        assert ADMIN_KEY not in text
    assert STRIPE_SECRET.encode() not in database
    assert vault_key.encode() not in database
    assert vault_key.encode() not in database.replace(b"\x00", b"")
