"""Several proxy replicas over one PostgreSQL database: exact caps, revocation, replays, faults.
Each replica is the proxy app served on a socket of its own from a thread of the test process,
with its own store connections and event loop; what needs a replica to be a process (kill -9,
SIGTERM) is in tests/e2e/test_replicas_processes.py."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from tests.fakes.stripe_upstream import FakeStripe
from tests.fakes.tcp_relay import TcpRelay
from tests.helpers import fan_out, localstripe_intents
from tests.inproc import Clock, app_client, issue
from tests.proxyproc import Localstripe, ProxyProcess
from tests.served import ServedProxy, serve_proxy

pytestmark = pytest.mark.postgres


@pytest.fixture
def pg_url(pg_fresh_url: str) -> str:
    """Here (and in tests.test_budgets and tests.test_issuers, which import it) every test's
    database is the module's, emptied: a new one to create, migrate and drop cost most of a
    second per test."""
    return pg_fresh_url


def replicas(tmp_path: Path, count: int, stripe_base: str, database_url: str) -> list[ServedProxy]:
    out: list[ServedProxy] = []
    try:
        for index in range(count):
            workdir = tmp_path / f"replica-{index}"
            workdir.mkdir()
            out.append(serve_proxy(workdir, stripe_base=stripe_base, database_url=database_url))
    except BaseException:
        stop_all(out)
        raise
    return out


def stop_all(procs: list[ServedProxy] | list[ProxyProcess]) -> None:
    """Stopped side by side: each waits a tick of its own server loop to notice."""
    with ThreadPoolExecutor(max(len(procs), 1)) as pool:
        list(pool.map(lambda proc: proc.stop(), procs))


def post(
    proxy: ProxyProcess | ServedProxy, vault_key: str, data: dict[str, str], **headers: str
) -> httpx.Response:
    return httpx.post(
        f"{proxy.url}/stripe/v1/payment_intents",
        data=data,
        headers={"Authorization": f"Bearer {vault_key}", **headers},
        timeout=30,
    )


def test_three_replicas_500_calls_exact_cap(
    tmp_path: Path, pg_url: str, fresh_localstripe: Localstripe
) -> None:
    procs = replicas(tmp_path, 3, fresh_localstripe.url, pg_url)
    try:
        key = procs[0].issue(daily_usd_cap=300)
        result = fan_out(key["vault_key"], [p.url + "/stripe" for p in procs], 500, run="replicas")
        assert len(result.succeeded) == 300
        assert result.kinds() == {"RateLimitError": 200}
        assert len(localstripe_intents(fresh_localstripe.url, run="replicas")) == 300
        with procs[2].admin() as admin:
            info = admin.get(f"/vault/keys/{key['key_id']}").json()
            rows = admin.get(
                "/vault/audit", params={"key_id": key["key_id"], "limit": 1000}
            ).json()["data"]
        assert len(rows) == 500
        assert sum(Decimal(r["settled_usd"]) for r in rows) == Decimal(300)
        assert info["spent_usd"] == "300.00" and info["reserved_usd"] == "0.00"
        assert info["calls"] == 500 and info["cap_hits"] == 200
    finally:
        stop_all(procs)


def test_revoke_through_one_replica_refuses_on_the_others(
    tmp_path: Path, pg_url: str, fake_stripe: FakeStripe
) -> None:
    a, b, c = procs = replicas(tmp_path, 3, fake_stripe.url, pg_url)
    try:
        key = a.issue(daily_usd_cap=10)
        for proxy in procs:  # warm every replica's key cache first
            assert (
                post(
                    proxy,
                    key["vault_key"],
                    {"amount": "1", "currency": "usd", "metadata[m]": proxy.url},
                ).status_code
                == 200
            )
        with a.admin() as admin:
            assert admin.delete(f"/vault/keys/{key['key_id']}").status_code == 200
        for proxy in (b, c):
            refused = post(
                proxy, key["vault_key"], {"amount": "1", "currency": "usd", "metadata[x]": "after"}
            )
            assert refused.status_code == 401
            assert refused.json()["error"]["code"] == "keybrake_key_revoked"
    finally:
        stop_all(procs)


def test_replays_and_dedupe_work_across_replicas(
    tmp_path: Path, pg_url: str, fake_stripe: FakeStripe
) -> None:
    a, b = procs = replicas(tmp_path, 2, fake_stripe.url, pg_url)
    try:
        key = a.issue(daily_usd_cap=10)
        body = {"amount": "100", "currency": "usd"}
        first = post(a, key["vault_key"], body, **{"Idempotency-Key": "retry-me"})
        again = post(b, key["vault_key"], body, **{"Idempotency-Key": "retry-me"})
        assert first.json() == again.json() and again.headers["x-keybrake-replayed"] == "replayed"
        pod = {"amount": "200", "currency": "usd", "metadata[item]": "9"}
        # The pod's retry: a new process, so its SDK makes a fresh key (a UUID, as stripe-python's).
        one = post(a, key["vault_key"], pod, **{"Idempotency-Key": str(uuid.uuid4())})
        two = post(b, key["vault_key"], pod, **{"Idempotency-Key": str(uuid.uuid4())})
        assert one.json() == two.json() and two.headers["x-keybrake-replayed"] == "deduplicated"
        assert fake_stripe.count("POST", "/v1/payment_intents") == 2
        with b.admin() as admin:
            assert admin.get(f"/vault/keys/{key['key_id']}").json()["spent_usd"] == "3.00"
    finally:
        stop_all(procs)


def test_rolling_window_and_expiry_on_postgres(
    tmp_path: Path, pg_url: str, fake_stripe: FakeStripe
) -> None:
    clock = Clock(datetime(2026, 11, 26, 23, 59, 0, tzinfo=UTC))
    with app_client(
        tmp_path, clock, database_url=pg_url, stripe_api_base=fake_stripe.url
    ) as client:
        key = issue(client, daily_usd_cap=2, expires_in="25h")
        auth = {"Authorization": f"Bearer {key['vault_key']}"}

        def charge(item: str) -> int:
            form = {"amount": "100", "currency": "usd", "metadata[item]": item}
            return client.post("/stripe/v1/payment_intents", data=form, headers=auth).status_code

        assert [charge("1"), charge("2"), charge("3")] == [200, 200, 429]
        clock.advance(seconds=60)  # a new UTC day, the same 24 hours
        assert client.get(f"/vault/keys/{key['key_id']}").json()["spent_usd"] == "2.00"
        assert charge("4") == 429
        clock.advance(hours=24)  # 00:00 two days on: the 23:00 bucket left the window
        assert client.get(f"/vault/keys/{key['key_id']}").json()["spent_usd"] == "0.00"
        assert [charge("5"), charge("6"), charge("7")] == [200, 200, 429]
        clock.advance(minutes=59)
        assert charge("8") == 401


def test_database_outage_fails_closed_and_recovers(
    tmp_path: Path, pg_url: str, fake_stripe: FakeStripe
) -> None:
    relay = TcpRelay("127.0.0.1", 5432)
    url = pg_url.replace("127.0.0.1:5432", f"127.0.0.1:{relay.port}")
    proxy = serve_proxy(tmp_path, stripe_base=fake_stripe.url, database_url=url)
    try:
        key = proxy.issue(daily_usd_cap=10)
        assert (
            post(proxy, key["vault_key"], {"amount": "100", "currency": "usd"}).status_code == 200
        )
        before = fake_stripe.count("POST", "/v1/payment_intents")
        relay.cut()
        for item in range(3):
            refused = post(
                proxy,
                key["vault_key"],
                {"amount": "100", "currency": "usd", "metadata[i]": str(item)},
            )
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "keybrake_unavailable"
        assert httpx.get(f"{proxy.url}/readyz").status_code == 503
        assert "keybrake_database_up 0.0" in httpx.get(f"{proxy.url}/metrics").text
        assert fake_stripe.count("POST", "/v1/payment_intents") == before  # nothing forwarded
        relay.restore()
        assert httpx.get(f"{proxy.url}/readyz").status_code == 200
        assert "keybrake_database_up 1.0" in httpx.get(f"{proxy.url}/metrics").text
        assert (
            post(
                proxy, key["vault_key"], {"amount": "100", "currency": "usd", "metadata[i]": "back"}
            ).status_code
            == 200
        )
    finally:
        proxy.stop()
        relay.stop()
