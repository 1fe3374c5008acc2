"""Secrets never show in responses, logs, audit rows or the database; vault keys only hashed."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import stripe

from tests.fakes.stripe_upstream import FakeStripe
from tests.proxyproc import ADMIN_KEY, STRIPE_SECRET
from tests.served import serve_proxy


@contextmanager
def everything_logged(path: Path) -> Iterator[Path]:
    """Every record logged at INFO or above outside the test's own thread (by the proxy, uvicorn
    or a library they use), written to `path`: at least what `keybrake serve --log-level info`
    logs while it serves."""
    handler = logging.FileHandler(path)
    handler.addFilter(lambda record: record.thread != threading.main_thread().ident)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    # uvicorn's own loggers do not propagate to the root; uvicorn.error does, to "uvicorn".
    attached = [logging.getLogger(name) for name in ("", "uvicorn", "uvicorn.access")]
    leveled = [logging.getLogger(name) for name in ("", "uvicorn.error", "uvicorn.access")]
    levels = [logger.level for logger in leveled]
    for logger in attached:
        logger.addHandler(handler)
    for logger in leveled:
        logger.setLevel(logging.INFO)
    try:
        yield path
    finally:
        for logger, level in zip(leveled, levels, strict=True):
            logger.setLevel(level)
        for logger in attached:
            logger.removeHandler(handler)
        handler.close()


def test_no_secret_in_responses_logs_audit_or_database(
    tmp_path: Path, fake_stripe: FakeStripe
) -> None:
    proxy = serve_proxy(tmp_path, stripe_base=fake_stripe.url)
    seen: list[str] = []
    # From when it serves on: uvicorn sets its loggers' levels as it starts.
    with everything_logged(tmp_path / "everything.log") as logged:
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
    seen.append(logged.read_text(errors="replace"))
    database = b"".join(p.read_bytes() for p in tmp_path.glob("keybrake.db*"))
    for text in seen:
        assert STRIPE_SECRET not in text
        assert vault_key not in text
        assert ADMIN_KEY not in text
    assert STRIPE_SECRET.encode() not in database
    assert vault_key.encode() not in database
    assert vault_key.encode() not in database.replace(b"\x00", b"")
