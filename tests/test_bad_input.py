"""Bad input gets a clear 4xx, reaches no vendor, and still leaves an audit row."""

from __future__ import annotations

import http.client

import httpx
import pytest

from tests.fakes.stripe_upstream import FakeStripe
from tests.proxyproc import ProxyProcess


def raw_request(
    proxy: ProxyProcess, method: str, path: str, headers: dict[str, str], body: bytes = b""
) -> tuple[int, bytes]:
    """http.client sends the path byte for byte: no client-side normalisation of `..` or `%2e`."""
    host, port = proxy.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@pytest.mark.parametrize(
    "path",
    [
        "/stripe/v1/../../vault/keys",
        "/stripe/v1/%2e%2e/%2e%2e/vault/keys",
        "/stripe/v1/payment_intents%2f..%2fcharges",
        "/stripe/v1//payment_intents",
        "/stripe/v1/payment_intents/./x",
        "/stripe/v1/%252e%252e/x",
        "/stripe/v1/payment_intents\\..\\x",
    ],
)
def test_paths_that_try_to_leave_the_vendor_prefix(
    fake_proxy: ProxyProcess, fake_stripe: FakeStripe, path: str
) -> None:
    key = fake_proxy.issue(allowed_endpoints=["POST /v1/*", "POST /v1/*/*"])
    status, body = raw_request(
        fake_proxy,
        "POST",
        path,
        {
            "Authorization": f"Bearer {key['vault_key']}",
            "Content-Type": "application/x-www-form-urlencoded",
        },
        b"amount=100&currency=usd",
    )
    assert status in {400, 404}, body
    assert fake_stripe.requests == []


def test_oversized_body_is_413_and_not_forwarded(
    fake_proxy: ProxyProcess, fake_stripe: FakeStripe
) -> None:
    key = fake_proxy.issue()
    response = httpx.post(
        f"{fake_proxy.url}/stripe/v1/payment_intents",
        content=b"amount=100&currency=usd&x=" + b"a" * (1_048_576 + 10),
        headers={"Authorization": f"Bearer {key['vault_key']}"},
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "keybrake_body_too_large"
    assert fake_stripe.requests == []


def test_unknown_vendor_is_404_and_audited(fake_proxy: ProxyProcess) -> None:
    response = httpx.post(
        f"{fake_proxy.url}/paypal/v1/payments", headers={"Authorization": "Bearer x"}
    )
    assert response.status_code == 404
    with fake_proxy.admin() as admin:
        row = admin.get("/vault/audit").json()["data"][0]
    assert row["decision"] == "unknown_vendor" and row["vendor"] == "paypal"


def test_missing_or_malformed_credentials(
    fake_proxy: ProxyProcess, fake_stripe: FakeStripe
) -> None:
    url = f"{fake_proxy.url}/stripe/v1/payment_intents"
    for headers in (
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Basic !!!"},
        {"Authorization": "Token abc"},
    ):
        response = httpx.post(url, data={"amount": "1", "currency": "usd"}, headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "invalid_request_error"
    assert fake_stripe.requests == []


def test_unpriced_writes_and_unknown_currencies_fail_closed(
    fake_proxy: ProxyProcess, fake_stripe: FakeStripe
) -> None:
    key = fake_proxy.issue(allowed_endpoints=["POST /v1/subscriptions", "POST /v1/payment_intents"])
    auth = {"Authorization": f"Bearer {key['vault_key']}"}
    sub = httpx.post(
        f"{fake_proxy.url}/stripe/v1/subscriptions", data={"customer": "c"}, headers=auth
    )
    eur = httpx.post(
        f"{fake_proxy.url}/stripe/v1/payment_intents",
        data={"amount": "100", "currency": "eur"},
        headers=auth,
    )
    no_amount = httpx.post(
        f"{fake_proxy.url}/stripe/v1/payment_intents", data={"currency": "usd"}, headers=auth
    )
    assert sub.status_code == 403 and "[stripe.endpoints]" in sub.json()["error"]["message"]
    assert eur.status_code == 403 and "[fx]" in eur.json()["error"]["message"]
    assert no_amount.status_code == 403 and "no amount" in no_amount.json()["error"]["message"]
    assert fake_stripe.requests == []


def test_a_repeated_authorization_header_cannot_swap_keys(
    fake_proxy: ProxyProcess, fake_stripe: FakeStripe
) -> None:
    capped = fake_proxy.issue(daily_usd_cap=1)
    status, _ = raw_request(
        fake_proxy,
        "POST",
        "/stripe/v1/payment_intents",
        {
            "Authorization": "Bearer kbv_unknown",
            "Content-Type": "application/x-www-form-urlencoded",
        },
        b"amount=100&currency=usd",
    )
    assert status == 401
    conn_headers = [
        ("Authorization", "Bearer kbv_unknown"),
        ("Authorization", f"Bearer {capped['vault_key']}"),
    ]
    host, port = fake_proxy.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/stripe/v1/payment_intents")
    for name, value in conn_headers:
        conn.putheader(name, value)
    conn.putheader("Content-Length", "23")
    conn.endheaders(b"amount=100&currency=usd")
    assert conn.getresponse().status == 401  # the first one counts, and it is unknown
    conn.close()
    assert fake_stripe.requests == []
