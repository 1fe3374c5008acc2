"""Resend with the official resend SDK as the client and a Resend-shaped fake as the upstream
that bills as Resend does (one email per to/cc/bcc recipient): recipient pricing, batches,
idempotency, caps and refusals in-process (the app behind Starlette's TestClient, the fake
behind the `upstream=` seam, the SDK's own HTTP-client seam pointed at the app), with no socket.
Env-only setup, where a workload process is the point: tests/e2e/test_resend_processes.py."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import resend
from resend.http_client import HTTPClient
from starlette.testclient import TestClient

from tests.fakes.resend_upstream import MAX_BATCH, MAX_TO, REAL_KEY, InprocResend
from tests.inproc import app_client, issue


def email(n: int = 1, **extra: Any) -> dict[str, Any]:
    return {
        "from": "Shop <orders@example.com>",
        "to": [f"customer{n}@example.com"],
        "subject": f"Order {n} shipped",
        "html": f"<p>Order {n} is on its way.</p>",
        **extra,
    }


def addresses(count: int, prefix: str = "r") -> list[str]:
    return [f"{prefix}{i}@example.com" for i in range(count)]


class ThroughApp(HTTPClient):
    """The resend SDK's HTTP-client seam (`resend.default_http_client`), sending what the SDK
    builds to the in-process app instead of over a socket."""

    def __init__(self, client: TestClient) -> None:
        self.client = client

    def request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        json: dict[str, object] | list[object] | None = None,
        files: dict[str, Any] | None = None,
        data: dict[str, str] | None = None,
    ) -> tuple[bytes, int, Mapping[str, str]]:
        response = self.client.request(method, url, headers=dict(headers), json=json)
        return response.content, response.status_code, response.headers


@dataclass
class Inproc:
    client: TestClient
    vendor: InprocResend
    monkeypatch: pytest.MonkeyPatch

    def key(self, **spec: Any) -> dict[str, Any]:
        body: dict[str, Any] = {
            "vendor": "resend",
            "daily_usd_cap": 1,
            "allowed_endpoints": ["POST /emails", "POST /emails/batch", "GET /emails/*"],
            "agent_run_label": "argo/notify-email",
        }
        body.update(spec)
        return issue(self.client, **body)

    def sdk(self, vault_key: str) -> Any:
        """The resend module as a workload uses it: RESEND_API_URL and RESEND_API_KEY."""
        self.monkeypatch.setattr(resend, "api_key", vault_key)
        return resend

    def post(self, vault_key: str, path: str, payload: Any) -> httpx.Response:
        response: httpx.Response = self.client.post(
            f"/resend{path}", json=payload, headers={"Authorization": f"Bearer {vault_key}"}
        )
        return response

    def info(self, key_id: str) -> dict[str, Any]:
        return dict(self.client.get(f"/vault/keys/{key_id}").json())

    def audit(self, key_id: str) -> list[dict[str, Any]]:
        """The key's audit rows, oldest first."""
        rows = self.client.get("/vault/audit", params={"key_id": key_id}).json()["data"]
        return list(rows)[::-1]


@pytest.fixture
def app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Inproc]:
    vendor = InprocResend()
    with app_client(
        tmp_path, resend_api_key=REAL_KEY, resend_api_base="http://resend.invalid", upstream=vendor
    ) as client:
        monkeypatch.setattr(resend, "default_http_client", ThroughApp(client))
        monkeypatch.setattr(resend, "api_url", "http://testserver/resend")
        yield Inproc(client, vendor, monkeypatch)


def test_the_fake_bills_every_recipient_and_refuses_what_resend_refuses() -> None:
    """The fake itself, as Resend documents it: the tests below lean on its bill."""
    fake = InprocResend()
    auth = {"authorization": f"Bearer {REAL_KEY}"}

    def send(path: str, payload: Any) -> int:
        return fake.answer("POST", path, auth, json.dumps(payload).encode())[0]

    assert send("/emails", email(1, to="a@example.com", cc=addresses(2), bcc=addresses(3))) == 200
    assert fake.billed == 6
    assert send("/emails/batch", [email(1, to=addresses(4)), email(2)]) == 200
    assert fake.billed == 11
    assert send("/emails", email(2, to=addresses(MAX_TO + 1))) == 422
    assert send("/emails", email(2, to=[])) == 422
    assert send("/emails", email(2, cc=5)) == 422
    assert send("/emails/batch", [email(i) for i in range(MAX_BATCH + 1)]) == 422
    assert fake.billed == 11 == fake.billed_to(REAL_KEY)
    assert [r["billed"] for r in fake.requests] == [6, 5, 0, 0, 0, 0]


def test_the_cap_holds_against_what_resend_bills_however_many_recipients_an_email_has(
    app: Inproc,
) -> None:
    # $0.045 a day is 50 emails' worth; each email names 10 + 5 + 5 = 20 recipients, so Resend
    # bills 20 emails for it: two fit ($0.036), a third ($0.054 in all) does not.
    key = app.key(daily_usd_cap="0.045")
    client = app.sdk(key["vault_key"])
    sent = 0
    with pytest.raises(resend.exceptions.RateLimitError):
        for n in range(10):
            client.Emails.send(email(n, to=addresses(10), cc=addresses(5, "c"), bcc=addresses(5)))
            sent += 1
    assert sent == 2
    assert app.vendor.count("POST", "/emails") == 2
    assert app.vendor.billed == app.vendor.billed_to(REAL_KEY) == 40  # never past 50
    assert [(r["decision"], r["amount"]) for r in app.audit(key["key_id"])] == [
        ("forwarded", 20),
        ("forwarded", 20),
        ("cap_hit", 20),
    ]
    assert app.info(key["key_id"])["spent_usd"] == "0.036"  # 40 x $0.0009, what Resend billed


def test_a_batch_reserves_the_sum_of_its_emails_recipients(app: Inproc) -> None:
    # $0.009 a day is 10 emails' worth: two emails of 6 recipients each are 12, refused whole.
    key = app.key(daily_usd_cap="0.009")
    client = app.sdk(key["vault_key"])
    with pytest.raises(resend.exceptions.RateLimitError):
        client.Batch.send([email(1, to=addresses(6)), email(2, to=addresses(5), cc="c@x.io")])
    assert app.vendor.requests == [] and app.vendor.billed == 0
    # 1 + 4 + 5 = 10 recipients: exactly the cap.
    sent = client.Batch.send(
        [email(3), email(4, to="a@example.com", bcc=addresses(3)), email(5, to=addresses(5))]
    )
    assert len(sent["data"]) == 3
    assert app.vendor.billed == 10
    rows = app.audit(key["key_id"])
    assert [(r["decision"], r["reserved_usd"], r["settled_usd"], r["amount"]) for r in rows] == [
        ("cap_hit", "0.00", "0.00", 12),  # 12 x $0.0009 = $0.0108 > $0.009
        ("forwarded", "0.009", "0.009", 10),
    ]
    assert app.info(key["key_id"])["spent_usd"] == "0.009"


def test_a_permissive_batch_settles_off_each_refused_emails_own_recipients(app: Inproc) -> None:
    key = app.key()
    client = app.sdk(key["vault_key"])
    # Resend refuses the email without a subject (8 recipients) and the one without a body (4)
    # and sends the other two (3 + 2 recipients).
    no_subject = {k: v for k, v in email(2, to=addresses(8)).items() if k != "subject"}
    no_body = email(4, to="d@example.com", bcc=addresses(3))
    del no_body["html"]
    partial = client.Batch.send(
        [
            email(1, to=addresses(2), cc="c@example.com"),
            no_subject,
            email(3, to=addresses(2)),
            no_body,
        ],
        options={"batch_validation": "permissive"},
    )
    assert len(partial["data"]) == 2
    assert [e["index"] for e in partial["errors"]] == [1, 3]
    assert app.vendor.requests[-1]["headers"]["x-batch-validation"] == "permissive"
    assert app.vendor.billed == 5
    # 17 recipients reserved ($0.0153); 17 - 8 - 4 = 5 sent ($0.0045), what Resend billed.
    row = app.audit(key["key_id"])[-1]
    assert (row["reserved_usd"], row["settled_usd"], row["amount"]) == ("0.0153", "0.0045", 17)
    info = app.info(key["key_id"])
    assert info["spent_usd"] == "0.0045" and info["reserved_usd"] == "0.00"


def test_recipients_the_proxy_cannot_count_are_refused_and_never_reach_resend(
    app: Inproc,
) -> None:
    key = app.key()
    unpriceable, ambiguous = 403, 400  # keybrake_unpriced_endpoint, keybrake_ambiguous_request
    refused = {
        "to null": (unpriceable, "/emails", email(1, to=None)),
        "to empty": (unpriceable, "/emails", email(1, to=[])),
        "to a number": (unpriceable, "/emails", email(1, to=42)),
        "to an object": (unpriceable, "/emails", email(1, to={"email": "a@example.com"})),
        "to nested": (unpriceable, "/emails", email(1, to=[addresses(30)])),
        "cc a number": (unpriceable, "/emails", email(1, cc=7)),
        "bcc objects": (unpriceable, "/emails", email(1, bcc=[{"email": "b@x.io"}] * 40)),
        "51 to": (unpriceable, "/emails", email(1, to=addresses(MAX_TO + 1))),
        "101 emails": (unpriceable, "/emails/batch", [email(i) for i in range(MAX_BATCH + 1)]),
        "a bad item": (unpriceable, "/emails/batch", [email(1), email(2, cc=[addresses(40)])]),
        "To": (ambiguous, "/emails", {**email(1), "To": addresses(40)}),
        "Bcc header": (ambiguous, "/emails", email(1, headers={"Bcc": ", ".join(addresses(40))})),
        "Headers": (ambiguous, "/emails", {**email(1), "Headers": {"Bcc": addresses(40)[0]}}),
        # Sent and billed later, outside the cap's window and after the key may be revoked.
        "scheduled": (unpriceable, "/emails", email(1, scheduled_at="in 1 hour")),
        "a scheduled item": (
            unpriceable,
            "/emails/batch",
            [email(1), email(2, scheduled_at="2030-01-01T00:00:00Z")],
        ),
        # A header that could end early or start another one where a mail library writes it.
        "header name CRLF": (ambiguous, "/emails", email(1, headers={"X-A\r\nBcc": "b@x.io"})),
        "header value CRLF": (ambiguous, "/emails", email(1, headers={"X-A": "a\r\nBcc: b@x.io"})),
        **{
            f"header value {c!r}": (ambiguous, "/emails", email(1, headers={"X-A": f"a{c}b"}))
            for c in ("\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1b")
        },
        # A key a JavaScript parser may read as the object's prototype.
        "__proto__": (ambiguous, "/emails", {**email(1), "__proto__": {"bcc": addresses(40)}}),
    }
    missing = {k: v for k, v in email(1, cc="c@example.com").items() if k != "to"}
    refused["to missing"] = (unpriceable, "/emails", missing)
    for what, (status, path, payload) in refused.items():
        response = app.post(key["vault_key"], path, payload)
        assert response.status_code == status, what
        assert response.json()["name"] == (
            "restricted_api_key" if status == unpriceable else "validation_error"
        ), what
    # Through the SDK: the usual ResendError.
    with pytest.raises(resend.exceptions.ResendError) as raised:
        app.sdk(key["vault_key"]).Emails.send(email(1, to=addresses(60)))
    assert raised.value.code == 403 and "at most 50" in raised.value.message
    with pytest.raises(resend.exceptions.ResendError) as scheduled:
        app.sdk(key["vault_key"]).Emails.send(email(1, scheduled_at="in 1 hour"))
    assert scheduled.value.code == 403 and "Send it when it is due" in scheduled.value.message
    assert app.vendor.requests == [] and app.vendor.billed == 0
    decisions = {r["decision"] for r in app.audit(key["key_id"])}
    assert decisions == {"unpriceable", "ambiguous"}
    assert app.info(key["key_id"])["spent_usd"] == "0.00"


def test_idempotency_key_replays_without_sending_again(app: Inproc) -> None:
    key = app.key(dedupe_window="0")
    client = app.sdk(key["vault_key"])
    first = client.Emails.send(email(1), options={"idempotency_key": "welcome/42"})
    again = client.Emails.send(email(1), options={"idempotency_key": "welcome/42"})
    assert again["id"] == first["id"]
    assert again["http_headers"]["x-keybrake-replayed"] == "replayed"
    with pytest.raises(resend.exceptions.ResendError) as raised:
        client.Emails.send(email(2), options={"idempotency_key": "welcome/42"})
    assert raised.value.code == 400 and raised.value.error_type == "invalid_idempotent_request"
    assert app.vendor.count("POST", "/emails") == 1 and app.vendor.billed == 1
    # At the vendor, whose store is the account's, the key goes out scoped to the vault key's
    # issuer and namespace (tests/test_faults.py); the audit row keeps the caller's.
    forwarded = app.vendor.requests[0]["headers"]["idempotency-key"]
    assert forwarded.startswith("keybrake-") and "welcome" not in forwarded
    rows = app.audit(key["key_id"])
    assert [r["decision"] for r in rows] == ["forwarded", "replayed", "idempotency_mismatch"]
    assert rows[0]["idempotency_key"] == "welcome/42"
    assert app.info(key["key_id"])["spent_usd"] == "0.0009"


def test_cap_hit_is_a_resend_shaped_429_and_the_sdk_raises_rate_limit_error(app: Inproc) -> None:
    # $0.002 a day: two emails ($0.0018) fit, a third ($0.0027) does not; nor does a batch of 3
    # after one email ($0.0009 + $0.0027).
    key = app.key(daily_usd_cap="0.002")
    client = app.sdk(key["vault_key"])
    client.Emails.send(email(1))
    client.Emails.send(email(2))
    with pytest.raises(resend.exceptions.RateLimitError) as raised:
        client.Emails.send(email(3))
    assert raised.value.code == 429 and raised.value.error_type == "daily_quota_exceeded"
    assert raised.value.headers["x-keybrake-cap-hit"] == "true"

    response = app.post(key["vault_key"], "/emails", email(4))
    assert response.status_code == 429
    assert response.headers["x-keybrake-cap-hit"] == "true"
    body = response.json()
    assert {"statusCode", "name", "message"} <= set(body)
    assert (body["statusCode"], body["name"]) == (429, "daily_quota_exceeded")
    assert body["keybrake_code"] == "keybrake_daily_cap_exceeded"
    assert app.vendor.count("POST", "/emails") == 2 and app.vendor.billed == 2
    assert app.info(key["key_id"])["spent_usd"] == "0.0018"

    small = app.key(daily_usd_cap="0.003")
    client = app.sdk(small["vault_key"])
    client.Emails.send(email(5))
    with pytest.raises(resend.exceptions.RateLimitError):
        client.Batch.send([email(6), email(7), email(8)])
    assert app.vendor.count("POST", "/emails/batch") == 0


def test_vendor_429_passes_through_with_its_rate_limit_headers(app: Inproc) -> None:
    key = app.key()
    app.vendor.mode = "ratelimit"
    response = app.post(key["vault_key"], "/emails", email(1))
    assert response.status_code == 429
    assert response.json()["name"] == "rate_limit_exceeded"
    assert "x-keybrake-cap-hit" not in response.headers
    assert response.headers["ratelimit-remaining"] == "0"
    assert response.headers["retry-after"] == "1"
    info = app.info(key["key_id"])
    assert info["spent_usd"] == "0.00" and info["reserved_usd"] == "0.00"


def test_unpriced_writes_are_refused_and_refusals_are_resend_shaped(app: Inproc) -> None:
    key = app.key(allowed_endpoints=["POST /emails", "POST /api-keys"])
    client = app.sdk(key["vault_key"])
    # A new API key would be a real credential in the workload's hands: never free by default.
    with pytest.raises(resend.exceptions.ResendError) as raised:
        client.ApiKeys.create({"name": "escape"})
    assert raised.value.code == 403 and raised.value.error_type == "restricted_api_key"
    assert "[resend.endpoints]" in raised.value.message
    # Outside the key's allowed endpoints: refused before pricing.
    with pytest.raises(resend.exceptions.ResendError) as denied:
        client.Domains.list()
    assert denied.value.code == 403 and denied.value.error_type == "restricted_api_key"
    app.sdk("")  # no key at all
    with pytest.raises(resend.exceptions.MissingApiKeyError):
        client.Emails.send(email(1))
    assert app.vendor.requests == []
    decisions = [r["decision"] for r in app.audit(key["key_id"])]
    assert decisions == ["unpriceable", "endpoint_denied"]
