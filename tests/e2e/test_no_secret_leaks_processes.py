"""Secrets never show: a proxy process (SQLite, and PostgreSQL) is driven through issuing, calling,
refusing, revoking and failed logins with every kind of secret (the admin token, an issuer token,
service-account tokens, vault keys, the real vendor key); then every response (but the one 201
that hands a vault key or issuer token out), the proxy's log, every event row and every byte of
the database are searched for each of them. The log is the `keybrake serve` process's own output,
whatever writes to it: the process is the point."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from tests.fakes.kubernetes import FakeCluster
from tests.fakes.stripe_upstream import FakeStripe
from tests.proxyproc import ADMIN_KEY, STRIPE_SECRET, ProxyProcess, start_proxy

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[FakeCluster]:
    fake = FakeCluster(tmp_path / "cluster")
    yield fake
    fake.stop()


class Recorder:
    """Every exchange with the proxy, and the secrets it handed out."""

    def __init__(self, proxy: ProxyProcess) -> None:
        self.proxy = proxy
        self.seen: list[str] = []
        self.secrets: dict[str, str] = {"admin token": ADMIN_KEY, "vendor key": STRIPE_SECRET}
        # Made once: httpx loads the CA bundle anew for every call's client (~50 ms) otherwise,
        # though the proxy is plain http. Each call still has a connection of its own.
        self.tls = ssl.create_default_context()

    def call(
        self, method: str, path: str, token: str, *, handed_out: str | None = None, **kw: Any
    ) -> httpx.Response:
        response = httpx.request(
            method,
            self.proxy.url + path,
            headers={"Authorization": f"Bearer {token}", **kw.pop("headers", {})},
            timeout=30,
            verify=self.tls,
            **kw,
        )
        text = json.dumps(dict(response.headers)) + response.text
        if handed_out is not None:
            # The one answer allowed to carry it: take it out, the rest must still be clean.
            value = response.json()[handed_out]
            self.secrets[f"{handed_out} {len(self.secrets)}"] = value
            text = text.replace(value, "")
        self.seen.append(text)
        return response


def drive(proxy: ProxyProcess, cluster: FakeCluster, fake_stripe: FakeStripe) -> Recorder:
    r = Recorder(proxy)
    issuer = r.call(
        "POST",
        "/vault/issuers",
        ADMIN_KEY,
        handed_out="issuer_token",
        json={
            "name": "payments",
            "label_prefix": "argo/",
            "static_token": True,
            "kubernetes": {"namespaces": ["argo"], "service_accounts": ["keybrake-issuer"]},
        },
    ).json()
    issuer_token = r.secrets[next(k for k in r.secrets if k.startswith("issuer_token"))]
    projected = cluster.token("argo", "keybrake-issuer")
    expired = cluster.token("argo", "keybrake-issuer", issued_at=0)
    r.secrets |= {"service-account token": projected, "expired token": expired}
    body = {
        "vendor": "stripe",
        "total_usd_cap": 5,
        "allowed_endpoints": ["POST /v1/payment_intents"],
        "expires_in": "1h",
        "agent_run_label": "argo/leak-check",
        "namespace": "argo",
    }
    keys = [
        r.call("POST", "/vault/keys", token, handed_out="vault_key", json=body).json()
        for token in (ADMIN_KEY, issuer_token, projected)
    ]
    vault_keys = [r.secrets[k] for k in r.secrets if k.startswith("vault_key")]
    for vault_key in vault_keys:
        for cents, tag in ((100, ""), (101, ".item@pod-1")):
            r.call(
                "POST",
                "/stripe/v1/payment_intents",
                vault_key + tag,
                content=f"amount={cents}&currency=usd".encode(),
                headers=FORM,
            )
        # Where an id goes, a vault key: refused, never echoed.
        r.call("GET", f"/vault/keys/{vault_key}", ADMIN_KEY)
        r.call("DELETE", f"/vault/keys/{vault_key}", issuer_token)
        r.call("POST", f"/stripe/v1/payment_intents/{vault_key}", vault_key, headers=FORM)
        r.call("GET", f"/{vault_key}/x", vault_key)
    # Refused logins of every kind.
    for token in ("not-the-admin-token", expired, issuer_token + "x", vault_keys[0]):
        r.call("GET", "/vault/keys", token)
    r.call("GET", "/vault/events", issuer_token)
    r.call("POST", "/vault/keys/revoke", projected, json={"agent_run_label": "argo/leak-check"})
    r.call("DELETE", f"/vault/issuers/{issuer['issuer_id']}", ADMIN_KEY)
    r.call("GET", "/vault/keys", issuer_token)  # deleted now
    for path in ("/vault/keys", "/vault/budgets", "/vault/issuers?all=true", "/metrics"):
        r.call("GET", path, ADMIN_KEY)
    r.call("GET", "/vault/audit?limit=1000", ADMIN_KEY)
    r.call("GET", "/vault/events?limit=1000", ADMIN_KEY)
    for key in keys:
        r.call("GET", f"/vault/keys/{key['key_id']}", ADMIN_KEY)
    assert fake_stripe.count("POST", "/v1/payment_intents") == 6  # the calls did go through
    return r


def assert_nowhere(secrets: dict[str, str], places: dict[str, str]) -> None:
    for what, secret in secrets.items():
        for place, text in places.items():
            assert secret not in text, f"the {what} shows in {place}"
            # and not a recognisable half of it either (a prefix cut, a line wrapped)
            assert secret[len(secret) // 2 :] not in text, f"part of the {what} shows in {place}"


def test_no_secret_shows_anywhere_on_sqlite(
    tmp_path: Path, cluster: FakeCluster, fake_stripe: FakeStripe
) -> None:
    proxy = start_proxy(
        tmp_path,
        stripe_base=fake_stripe.url,
        extra_env=cluster.proxy_login_settings(tmp_path / "k8s"),
    )
    try:
        recorded = drive(proxy, cluster, fake_stripe)
    finally:
        proxy.stop()
    database = b"".join(p.read_bytes() for p in tmp_path.glob("keybrake.db*"))
    places = {
        "the responses": "\n".join(recorded.seen),
        "the proxy's log": proxy.log_path.read_text(),
        "the database": database.decode("latin-1"),
    }
    # the admin token, the vendor key, an issuer token, two service-account tokens, 3 vault keys
    assert len(recorded.secrets) == 8
    assert_nowhere(recorded.secrets, places)


@pytest.mark.postgres
def test_no_secret_shows_anywhere_on_postgres(
    tmp_path: Path, cluster: FakeCluster, fake_stripe: FakeStripe, pg_url: str
) -> None:
    proxy = start_proxy(
        tmp_path,
        stripe_base=fake_stripe.url,
        database_url=pg_url,
        extra_env=cluster.proxy_login_settings(tmp_path / "k8s"),
    )
    try:
        recorded = drive(proxy, cluster, fake_stripe)
    finally:
        proxy.stop()

    async def dump() -> str:
        conn = await asyncpg.connect(pg_url)
        try:
            tables = await conn.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename"
            )
            rows = []
            for table in tables:
                name = table["tablename"]
                rows += [r[0] for r in await conn.fetch(f'SELECT t::text FROM "{name}" t')]
            return "\n".join(rows)
        finally:
            await conn.close()

    places = {
        "the responses": "\n".join(recorded.seen),
        "the proxy's log": proxy.log_path.read_text(),
        "the database": asyncio.run(dump()),
    }
    assert "events" in places["the database"] or "login.refused" in places["the database"]
    assert_nowhere(recorded.secrets, places)
