"""Replicas over one database where a replica's process is the point: one killed with kill -9
in the middle of a call, one stopped with SIGTERM while a call is in flight. The replica that
lives on, or reads the database afterwards, is the proxy app served from a thread."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import httpx
import pytest

from tests.fakes.stripe_upstream import FakeStripe
from tests.helpers import reconcile
from tests.proxyproc import start_proxy
from tests.served import serve_proxy
from tests.test_replicas import post

pytestmark = pytest.mark.postgres


def test_kill_9_of_a_replica_keeps_its_reservation_until_the_sweep(
    tmp_path: Path, pg_url: str, fake_stripe: FakeStripe
) -> None:
    for name in ("replica-0", "replica-1"):
        (tmp_path / name).mkdir()
    a = start_proxy(tmp_path / "replica-0", stripe_base=fake_stripe.url, database_url=pg_url)
    try:
        b = serve_proxy(tmp_path / "replica-1", stripe_base=fake_stripe.url, database_url=pg_url)
    except BaseException:
        a.stop()
        raise
    try:
        key = a.issue(daily_usd_cap=10)
        fake_stripe.hold()
        lost: list[str] = []

        def in_flight() -> None:
            try:
                post(a, key["vault_key"], {"amount": "700", "currency": "usd"})
            except httpx.HTTPError as exc:
                lost.append(type(exc).__name__)

        thread = threading.Thread(target=in_flight)
        thread.start()
        assert fake_stripe.arrived.wait(timeout=30)
        a.kill9()
        thread.join()
        assert lost
        fake_stripe.release()
        # B keeps serving, and A's $7 stays counted: only $3 is left.
        assert post(b, key["vault_key"], {"amount": "300", "currency": "usd"}).status_code == 200
        capped = post(b, key["vault_key"], {"amount": "1", "currency": "usd"})
        assert capped.status_code == 429 and capped.headers["x-keybrake-cap-hit"] == "true"
        with b.admin() as admin:
            info = admin.get(f"/vault/keys/{key['key_id']}").json()
        assert (info["spent_usd"], info["reserved_usd"]) == ("3.00", "7.00")

        assert reconcile(pg_url) == 1
        with b.admin() as admin:
            info = admin.get(f"/vault/keys/{key['key_id']}").json()
            rows = admin.get("/vault/audit", params={"key_id": key["key_id"]}).json()["data"]
        assert (info["spent_usd"], info["reserved_usd"]) == ("10.00", "0.00")
        assert "reconciled" in {r["decision"] for r in rows}
    finally:
        a.stop()
        b.stop()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_sigterm_finishes_in_flight_calls(
    tmp_path: Path, fake_stripe: FakeStripe, backend: str, request: pytest.FixtureRequest
) -> None:
    database_url = request.getfixturevalue("pg_url") if backend == "postgres" else None
    proxy = start_proxy(tmp_path, stripe_base=fake_stripe.url, database_url=database_url)
    key = proxy.issue(daily_usd_cap=10)
    fake_stripe.hold()
    answers: list[httpx.Response] = []
    thread = threading.Thread(
        target=lambda: answers.append(
            post(proxy, key["vault_key"], {"amount": "100", "currency": "usd"})
        )
    )
    thread.start()
    assert fake_stripe.arrived.wait(timeout=30)
    proxy.process.send_signal(signal.SIGTERM)
    fake_stripe.release()
    thread.join()
    assert answers[0].status_code == 200  # answered after the SIGTERM
    # uvicorn re-raises the signal once shut down, as Kubernetes expects (exit 143).
    assert proxy.process.wait(timeout=30) in (0, -signal.SIGTERM)
    # What the stopped process left in the database, read by a proxy started on it afterwards.
    restarted = serve_proxy(tmp_path, stripe_base=fake_stripe.url, database_url=database_url)
    try:
        with restarted.admin() as admin:
            info = admin.get(f"/vault/keys/{key['key_id']}").json()
            rows = admin.get("/vault/audit", params={"key_id": key["key_id"]}).json()["data"]
        assert (info["spent_usd"], info["reserved_usd"]) == ("1.00", "0.00")
        assert rows[0]["decision"] == "forwarded"
    finally:
        restarted.stop()
