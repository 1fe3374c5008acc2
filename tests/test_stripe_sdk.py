"""The HTTP contract through the official Stripe SDK, the proxy app on a real socket (served from
a thread of the test process) and localstripe. What needs a `keybrake serve` process of its own
(`--loop uvloop`, `--workers 2`) is in tests/e2e/test_stripe_sdk_processes.py."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
import stripe

from tests.helpers import fan_out, localstripe_intents
from tests.proxyproc import Localstripe, ProxyProcess
from tests.served import ServedProxy, serve_proxy


def code_of(error: stripe.StripeError) -> str:
    assert isinstance(error.json_body, dict)
    return str(error.json_body["error"]["code"])


def client_for(proxy: ProxyProcess | ServedProxy, vault_key: str) -> stripe.StripeClient:
    return stripe.StripeClient(vault_key, base_addresses={"api": proxy.url + "/stripe"})


@pytest.fixture(scope="module")
def proxy_server(
    tmp_path_factory: pytest.TempPathFactory, localstripe: Localstripe
) -> Iterator[ServedProxy]:
    """One proxy for this module's contract tests: each issues its own keys and reads back only
    what they did (its keys, its labels, the newest audit row), so none disturbs another."""
    proxy = serve_proxy(tmp_path_factory.mktemp("stripe-sdk"), stripe_base=localstripe.url)
    yield proxy
    proxy.stop()


def assert_500_concurrent_intents_against_300_cap_are_exact(
    proxy: ProxyProcess | ServedProxy, localstripe: Localstripe
) -> None:
    """500 PaymentIntents at once through the SDK against a $300 cap on a fresh localstripe:
    exactly 300 go through, 200 are refused as cap hits, and the cap holds at every instant."""
    key = proxy.issue(daily_usd_cap=300, agent_run_label="argo/billing-agent-x7k2p")
    cap = Decimal(key["daily_usd_cap"])
    seen_over_cap: list[str] = []
    stop = threading.Event()

    def watch_invariant() -> None:
        # settled + reserved <= cap at every instant the admin API can observe.
        with proxy.admin() as admin:
            while not stop.is_set():
                info = admin.get(f"/vault/keys/{key['key_id']}").json()
                total = Decimal(info["spent_usd"]) + Decimal(info["reserved_usd"])
                if total > cap:
                    seen_over_cap.append(str(total))

    watcher = threading.Thread(target=watch_invariant)
    watcher.start()
    try:
        result = fan_out(key["vault_key"], proxy.url + "/stripe", 500, amount=100, run="burst")
    finally:
        stop.set()
        watcher.join()

    assert len(result.succeeded) == 300
    assert result.kinds() == {"RateLimitError": 200}
    for error in result.errors:
        assert error.http_status == 429
        assert error.headers is not None
        assert error.headers.get("x-keybrake-cap-hit") == "true"
        assert error.headers.get("stripe-should-retry") == "false"
        assert code_of(error) == "keybrake_daily_cap_exceeded"
    assert seen_over_cap == []
    assert len(localstripe_intents(localstripe.url, run="burst")) == 300

    with proxy.admin() as admin:
        info = admin.get(f"/vault/keys/{key['key_id']}").json()
        rows = admin.get("/vault/audit", params={"key_id": key["key_id"], "limit": 1000})
    assert info["spent_usd"] == "300.00"
    assert info["reserved_usd"] == "0.00"
    assert info["remaining_usd"] == "0.00"
    assert info["cap_hits"] == 200
    data = rows.json()["data"]
    assert len(data) == 500
    assert sum(Decimal(r["settled_usd"]) for r in data) == Decimal(300)
    assert {r["decision"] for r in data} == {"forwarded", "cap_hit"}


def test_500_concurrent_intents_against_300_cap_are_exact(
    tmp_path: Path, fresh_localstripe: Localstripe
) -> None:
    """On the asyncio loop (`serve --loop asyncio`, the default); the same under
    `serve --loop uvloop` is in tests/e2e/test_stripe_sdk_processes.py."""
    proxy = serve_proxy(tmp_path, stripe_base=fresh_localstripe.url)
    try:
        assert_500_concurrent_intents_against_300_cap_are_exact(proxy, fresh_localstripe)
    finally:
        proxy.stop()


def test_revoke_takes_effect_on_the_next_call(proxy_server: ServedProxy) -> None:
    key = proxy_server.issue()
    client = client_for(proxy_server, key["vault_key"])
    client.v1.payment_intents.create(params={"amount": 100, "currency": "usd"})
    with proxy_server.admin() as admin:
        first = admin.delete(f"/vault/keys/{key['key_id']}")
        again = admin.delete(f"/vault/keys/{key['key_id']}")
    assert first.status_code == 200 and first.json()["status"] == "revoked"
    assert again.status_code == 200 and again.json()["revoked_at"] == first.json()["revoked_at"]
    with pytest.raises(stripe.AuthenticationError) as caught:
        client.v1.payment_intents.create(params={"amount": 100, "currency": "usd"})
    assert code_of(caught.value) == "keybrake_key_revoked"


def test_revoke_by_label_revokes_every_active_key(proxy_server: ServedProxy) -> None:
    a = proxy_server.issue(agent_run_label="argo/wf-a")
    b = proxy_server.issue(agent_run_label="argo/wf-a")
    other = proxy_server.issue(agent_run_label="argo/wf-b")
    with proxy_server.admin() as admin:
        response = admin.post("/vault/keys/revoke", json={"agent_run_label": "argo/wf-a"})
        again = admin.post("/vault/keys/revoke", json={"agent_run_label": "argo/wf-a"})
        other_info = admin.get(f"/vault/keys/{other['key_id']}").json()
    assert response.status_code == 200
    assert response.json()["revoked"] == 2
    assert {k["key_id"] for k in response.json()["keys"]} == {a["key_id"], b["key_id"]}
    assert again.json()["revoked"] == 0
    assert other_info["status"] == "active"
    for key in (a, b):
        with pytest.raises(stripe.AuthenticationError):
            client_for(proxy_server, key["vault_key"]).v1.payment_intents.create(
                params={"amount": 100, "currency": "usd"}
            )


def test_endpoint_scope_and_wildcards(proxy_server: ServedProxy, localstripe: Localstripe) -> None:
    customer = httpx.post(
        f"{localstripe.url}/v1/customers",
        headers={"Authorization": "Bearer sk_test_direct"},
        data={"email": "a@example.com"},
    ).json()
    key = proxy_server.issue(allowed_endpoints=["GET /v1/customers/*"])
    client = client_for(proxy_server, key["vault_key"])
    assert client.v1.customers.retrieve(customer["id"]).email == "a@example.com"
    with pytest.raises(stripe.PermissionError) as caught:
        client.v1.payment_intents.create(params={"amount": 100, "currency": "usd"})
    assert caught.value.http_status == 403
    assert code_of(caught.value) == "keybrake_endpoint_not_allowed"
    with pytest.raises(stripe.PermissionError):
        client.v1.customers.list()


def test_unknown_key_is_401_and_never_reaches_stripe(proxy_server: ServedProxy) -> None:
    client = client_for(proxy_server, "kbv_not_a_real_key")
    with pytest.raises(stripe.AuthenticationError) as caught:
        client.v1.payment_intents.create(params={"amount": 100, "currency": "usd"})
    assert code_of(caught.value) == "keybrake_invalid_key"
    with proxy_server.admin() as admin:
        rows = admin.get("/vault/audit").json()["data"]
    assert rows[0]["decision"] == "unknown_key" and rows[0]["key_id"] is None


def test_caller_tag_and_per_call_cap(proxy_server: ServedProxy) -> None:
    key = proxy_server.issue(max_usd_per_call=5)
    client = client_for(proxy_server, key["vault_key"] + ".billing-agent-x7k2p-charge-1234")
    client.v1.payment_intents.create(params={"amount": 500, "currency": "usd"})
    with pytest.raises(stripe.RateLimitError) as caught:
        client.v1.payment_intents.create(params={"amount": 501, "currency": "usd"})
    assert code_of(caught.value) == "keybrake_per_call_cap_exceeded"
    with proxy_server.admin() as admin:
        rows = admin.get("/vault/audit", params={"key_id": key["key_id"]}).json()["data"]
    assert [r["caller_tag"] for r in rows] == ["billing-agent-x7k2p-charge-1234"] * 2
    assert [r["decision"] for r in rows] == ["per_call_cap_hit", "forwarded"]


def card(localstripe: Localstripe) -> str:
    """A PaymentMethod made directly on localstripe (it wants one at intent creation)."""
    response = httpx.post(
        f"{localstripe.url}/v1/payment_methods",
        headers={"Authorization": "Bearer sk_test_direct"},
        data={
            "type": "card",
            "card[number]": "4242424242424242",
            "card[exp_month]": "12",
            "card[exp_year]": "2030",
            "card[cvc]": "123",
        },
    )
    return str(response.json()["id"])


def test_confirm_of_an_intent_created_through_the_proxy_counts_once(
    proxy_server: ServedProxy, localstripe: Localstripe
) -> None:
    key = proxy_server.issue(
        daily_usd_cap=10,
        allowed_endpoints=["POST /v1/payment_intents", "POST /v1/payment_intents/*/confirm"],
    )
    client = client_for(proxy_server, key["vault_key"])
    intent = client.v1.payment_intents.create(
        params={"amount": 700, "currency": "usd", "payment_method": card(localstripe)}
    )
    confirmed = client.v1.payment_intents.confirm(intent.id)
    assert confirmed.status == "succeeded"
    with proxy_server.admin() as admin:
        info = admin.get(f"/vault/keys/{key['key_id']}").json()
    assert info["spent_usd"] == "7.00"


def test_confirm_of_an_unseen_intent_is_priced_by_lookup(
    proxy_server: ServedProxy, localstripe: Localstripe
) -> None:
    direct = httpx.post(
        f"{localstripe.url}/v1/payment_intents",
        headers={"Authorization": "Bearer sk_test_direct"},
        data={"amount": "900", "currency": "usd", "payment_method": card(localstripe)},
    ).json()
    key = proxy_server.issue(
        daily_usd_cap=8, allowed_endpoints=["POST /v1/payment_intents/*/confirm"]
    )
    client = client_for(proxy_server, key["vault_key"])
    with pytest.raises(stripe.RateLimitError):
        client.v1.payment_intents.confirm(direct["id"])
    with proxy_server.admin() as admin:
        rows = admin.get("/vault/audit", params={"key_id": key["key_id"]}).json()["data"]
    assert rows[0]["decision"] == "cap_hit" and rows[0]["amount"] == 900
