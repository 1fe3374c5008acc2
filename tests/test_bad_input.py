"""Bad input gets a clear 4xx, reaches no vendor, and still leaves an audit row."""

from __future__ import annotations

import http.client
import socket
import ssl
from pathlib import Path

import httpx
import pytest

from tests.fakes.stripe_upstream import FakeStripe
from tests.served import ServedProxy, serve_proxy

# Made once: httpx loads the CA bundle anew for every call's client (~50 ms) otherwise, though
# these calls are plain http.
TLS = ssl.create_default_context()


def raw_request(
    proxy: ServedProxy, method: str, path: str, headers: dict[str, str], body: bytes = b""
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
    fake_proxy: ServedProxy, fake_stripe: FakeStripe, path: str
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
    fake_proxy: ServedProxy, fake_stripe: FakeStripe
) -> None:
    key = fake_proxy.issue()
    response = httpx.post(
        f"{fake_proxy.url}/stripe/v1/payment_intents",
        content=b"amount=100&currency=usd&x=" + b"a" * (1_048_576 + 10),
        headers={"Authorization": f"Bearer {key['vault_key']}"},
        verify=TLS,
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "keybrake_body_too_large"
    assert fake_stripe.requests == []


def test_unknown_vendor_is_404_and_audited(fake_proxy: ServedProxy) -> None:
    response = httpx.post(
        f"{fake_proxy.url}/paypal/v1/payments", headers={"Authorization": "Bearer x"}, verify=TLS
    )
    assert response.status_code == 404
    with fake_proxy.admin() as admin:
        row = admin.get("/vault/audit").json()["data"][0]
    assert row["decision"] == "unknown_vendor" and row["vendor"] == "paypal"


def test_missing_or_malformed_credentials(fake_proxy: ServedProxy, fake_stripe: FakeStripe) -> None:
    url = f"{fake_proxy.url}/stripe/v1/payment_intents"
    for headers in (
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Basic !!!"},
        {"Authorization": "Token abc"},
    ):
        response = httpx.post(
            url, data={"amount": "1", "currency": "usd"}, headers=headers, verify=TLS
        )
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "invalid_request_error"
    assert fake_stripe.requests == []


def test_unpriced_writes_and_unknown_currencies_fail_closed(
    fake_proxy: ServedProxy, fake_stripe: FakeStripe
) -> None:
    key = fake_proxy.issue(allowed_endpoints=["POST /v1/subscriptions", "POST /v1/payment_intents"])
    auth = {"Authorization": f"Bearer {key['vault_key']}"}
    sub = httpx.post(
        f"{fake_proxy.url}/stripe/v1/subscriptions",
        data={"customer": "c"},
        headers=auth,
        verify=TLS,
    )
    eur = httpx.post(
        f"{fake_proxy.url}/stripe/v1/payment_intents",
        data={"amount": "100", "currency": "eur"},
        headers=auth,
        verify=TLS,
    )
    no_amount = httpx.post(
        f"{fake_proxy.url}/stripe/v1/payment_intents",
        data={"currency": "usd"},
        headers=auth,
        verify=TLS,
    )
    assert sub.status_code == 403 and "[stripe.endpoints]" in sub.json()["error"]["message"]
    assert eur.status_code == 403 and "[fx]" in eur.json()["error"]["message"]
    assert no_amount.status_code == 403 and "no amount" in no_amount.json()["error"]["message"]
    assert fake_stripe.requests == []


def test_a_repeated_authorization_header_cannot_swap_keys(
    fake_proxy: ServedProxy, fake_stripe: FakeStripe
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


def test_a_trailing_slash_is_a_clear_400_and_audited(
    fake_proxy: ServedProxy, fake_stripe: FakeStripe
) -> None:
    """`POST /stripe/v1/payment_intents/` was a 500 with no audit row."""
    key = fake_proxy.issue()
    response = httpx.post(
        f"{fake_proxy.url}/stripe/v1/payment_intents/",
        data={"amount": "100", "currency": "usd"},
        headers={"Authorization": f"Bearer {key['vault_key']}"},
        verify=TLS,
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "keybrake_invalid_path"
    assert "trailing slash" in response.json()["error"]["message"]
    with fake_proxy.admin() as admin:
        row = admin.get("/vault/audit").json()["data"][0]
    assert (row["decision"], row["status"], row["path"]) == (
        "bad_path",
        400,
        "/v1/payment_intents/",
    )
    assert fake_stripe.requests == []


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("expires_in", "999999999w", "too long"),
        ("agent_run_label", "argo/x\n", "agent_run_label"),
        ("agent_run_label", "argo/x\r", "agent_run_label"),
        ("dedupe_window", "99999999d", "too long"),
    ],
)
def test_overflowing_durations_and_control_characters_in_labels_are_400(
    fake_proxy: ServedProxy, field: str, value: str, message: str
) -> None:
    body = {
        "vendor": "stripe",
        "daily_usd_cap": 1,
        "allowed_endpoints": ["POST /v1/payment_intents"],
        "agent_run_label": "argo/x",
        field: value,
    }
    with fake_proxy.admin() as admin:
        response = admin.post("/vault/keys", json=body)
        assert response.status_code == 400, response.text
        assert message in response.json()["error"]["message"]
        assert admin.get("/vault/keys").json()["data"] == []
        revoke = admin.post("/vault/keys/revoke", json={"agent_run_label": "argo/x\n"})
        assert revoke.status_code == 400


def test_deep_json_to_a_vendor_is_a_400_and_audited(
    tmp_path: Path, fake_stripe: FakeStripe
) -> None:
    from tests.fakes.resend_upstream import FakeResend
    from tests.fakes.twilio_upstream import FakeTwilio
    from tests.vendor_helpers import audit, issue_resend, vendor_env

    twilio, resend = FakeTwilio(), FakeResend()
    proxy = serve_proxy(tmp_path, stripe_base=fake_stripe.url, extra_env=vendor_env(twilio, resend))
    try:
        key = issue_resend(proxy)
        deep = b'{"to": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"
        response = httpx.post(
            f"{proxy.url}/resend/emails",
            content=deep,
            headers={
                "Authorization": f"Bearer {key['vault_key']}",
                "Content-Type": "application/json",
            },
            verify=TLS,
        )
        assert response.status_code == 400
        assert response.json()["keybrake_code"] == "keybrake_ambiguous_request"
        assert audit(proxy, key["key_id"])[0]["decision"] == "ambiguous"
        assert resend.requests == []
    finally:
        proxy.stop()
        twilio.stop()
        resend.stop()


def test_a_request_body_that_stalls_gets_a_408_and_an_audit_row(
    tmp_path: Path, fake_stripe: FakeStripe
) -> None:
    """300 connections trickling their bodies were all still open after 40 s."""
    proxy = serve_proxy(
        tmp_path, stripe_base=fake_stripe.url, extra_env={"KEYBRAKE_BODY_TIMEOUT": "0.5"}
    )
    try:
        key = proxy.issue()
        host, port = proxy.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as conn:
            conn.sendall(
                b"POST /stripe/v1/payment_intents HTTP/1.1\r\nHost: x\r\n"
                + f"Authorization: Bearer {key['vault_key']}\r\n".encode()
                + b"Content-Type: application/x-www-form-urlencoded\r\n"
                + b"Content-Length: 100\r\n\r\namount=10"
            )
            # The answer comes by itself once the deadline passes; the read waits for it.
            answer = b""
            while b"\r\n\r\n" not in answer:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"keybrake_body_timeout" in answer or b"connection: close" in answer.lower()
        with proxy.admin() as admin:
            row = admin.get("/vault/audit").json()["data"][0]
        assert (row["decision"], row["status"], row["key_id"]) == (
            "body_timeout",
            408,
            key["key_id"],
        )
        assert fake_stripe.requests == []
        # The admin API gives its bodies the same deadline.
        with socket.create_connection((host, int(port)), timeout=30) as conn:
            conn.sendall(
                b"POST /vault/keys HTTP/1.1\r\nHost: x\r\n"
                + f"Authorization: Bearer {proxy.admin_key}\r\n".encode()
                + b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
            )
            assert conn.recv(65536).startswith(b"HTTP/1.1 408")
    finally:
        proxy.stop()
