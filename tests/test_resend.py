"""Resend through a real `keybrake serve`, with the official resend SDK as the client and a
Resend-shaped fake as the upstream: env-only setup, per-email prices, batches, idempotency, caps,
refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
import resend

from tests.fakes.resend_upstream import REAL_KEY, FakeResend
from tests.proxyproc import ProxyProcess
from tests.vendor_helpers import audit, issue_resend, key_info, raw_resend

pytest_plugins = ["tests.vendor_fixtures"]


def email(n: int = 1, **extra: Any) -> dict[str, Any]:
    return {
        "from": "Shop <orders@example.com>",
        "to": [f"customer{n}@example.com"],
        "subject": f"Order {n} shipped",
        "html": f"<p>Order {n} is on its way.</p>",
        **extra,
    }


@pytest.fixture
def sdk(vendor_proxy: ProxyProcess, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The resend module pointed at the proxy: what RESEND_API_URL and RESEND_API_KEY do when
    the SDK is imported (checked in a fresh process below); here set on the imported module."""

    def use(vault_key: str) -> Any:
        monkeypatch.setattr(resend, "api_url", vendor_proxy.url + "/resend")
        monkeypatch.setattr(resend, "api_key", vault_key)
        return resend

    return use


def test_environment_variables_alone_point_the_sdk_at_the_proxy(
    vendor_proxy: ProxyProcess, fake_resend: FakeResend
) -> None:
    key = issue_resend(vendor_proxy)
    workload = (
        "import json, resend\n"
        "sent = resend.Emails.send({'from': 'a@example.com', 'to': ['b@example.com'],\n"
        "                           'subject': 'Hi', 'text': 'Hello'})\n"
        "print(json.dumps({'id': sent['id']}))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESEND_")}
    env["RESEND_API_URL"] = vendor_proxy.url + "/resend"
    env["RESEND_API_KEY"] = key["vault_key"] + ".pod-7"
    done = subprocess.run(
        [sys.executable, "-c", workload], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    email_id = json.loads(done.stdout)["id"]
    assert email_id in fake_resend.emails
    sent = fake_resend.requests[-1]
    assert sent["headers"]["authorization"] == f"Bearer {REAL_KEY}"
    assert key["vault_key"] not in repr(sent)
    row = audit(vendor_proxy, key["key_id"])[0]
    assert (row["decision"], row["status"], row["caller_tag"]) == ("forwarded", 200, "pod-7")
    # One email at the [resend] price: $0.0009.
    assert (row["reserved_usd"], row["settled_usd"]) == ("0.0009", "0.0009")
    assert (row["amount"], row["currency"]) == (1, "email")
    assert row["vendor_request_id"].endswith("-SJC")  # Cloudflare's cf-ray


def test_a_batch_reserves_for_its_length_and_settles_to_what_resend_accepted(
    vendor_proxy: ProxyProcess, fake_resend: FakeResend, sdk: Any
) -> None:
    key = issue_resend(vendor_proxy)
    client = sdk(key["vault_key"])
    sent = client.Batch.send([email(1), email(2), email(3)])
    assert len(sent["data"]) == 3
    # Permissive validation: Resend refuses the item without a subject and sends the other two.
    broken = {k: v for k, v in email(6).items() if k != "subject"}
    partial = client.Batch.send(
        [email(4), email(5), broken], options={"batch_validation": "permissive"}
    )
    assert len(partial["data"]) == 2 and partial["errors"][0]["index"] == 2
    rows = audit(vendor_proxy, key["key_id"])[::-1]
    # 3 emails x $0.0009 = $0.0027 reserved and spent; then 3 reserved, 2 spent ($0.0018).
    assert [(r["reserved_usd"], r["settled_usd"], r["amount"]) for r in rows] == [
        ("0.0027", "0.0027", 3),
        ("0.0027", "0.0018", 3),
    ]
    assert fake_resend.requests[-1]["headers"]["x-batch-validation"] == "permissive"
    info = key_info(vendor_proxy, key["key_id"])
    assert info["spent_usd"] == "0.0045" and info["reserved_usd"] == "0.00"


def test_idempotency_key_replays_without_sending_again(
    vendor_proxy: ProxyProcess, fake_resend: FakeResend, sdk: Any
) -> None:
    key = issue_resend(vendor_proxy, dedupe_window="0")
    client = sdk(key["vault_key"])
    first = client.Emails.send(email(1), options={"idempotency_key": "welcome/42"})
    again = client.Emails.send(email(1), options={"idempotency_key": "welcome/42"})
    assert again["id"] == first["id"]
    assert again["http_headers"]["x-keybrake-replayed"] == "replayed"
    with pytest.raises(resend.exceptions.ResendError) as raised:
        client.Emails.send(email(2), options={"idempotency_key": "welcome/42"})
    assert raised.value.code == 400 and raised.value.error_type == "invalid_idempotent_request"
    assert fake_resend.count("POST", "/emails") == 1
    assert fake_resend.requests[0]["headers"]["idempotency-key"] == "welcome/42"
    rows = audit(vendor_proxy, key["key_id"])
    assert [r["decision"] for r in rows] == ["idempotency_mismatch", "replayed", "forwarded"]
    assert rows[-1]["idempotency_key"] == "welcome/42"
    assert key_info(vendor_proxy, key["key_id"])["spent_usd"] == "0.0009"


def test_cap_hit_is_a_resend_shaped_429_and_the_sdk_raises_rate_limit_error(
    vendor_proxy: ProxyProcess, fake_resend: FakeResend, sdk: Any
) -> None:
    # $0.002 a day: two emails ($0.0018) fit, a third ($0.0027) does not; nor does a batch of 3
    # after one email ($0.0009 + $0.0027).
    key = issue_resend(vendor_proxy, daily_usd_cap="0.002")
    client = sdk(key["vault_key"])
    client.Emails.send(email(1))
    client.Emails.send(email(2))
    with pytest.raises(resend.exceptions.RateLimitError) as raised:
        client.Emails.send(email(3))
    assert raised.value.code == 429 and raised.value.error_type == "daily_quota_exceeded"
    assert raised.value.headers["x-keybrake-cap-hit"] == "true"

    response = raw_resend(vendor_proxy, key["vault_key"], "/emails", email(4))
    assert response.status_code == 429
    assert response.headers["x-keybrake-cap-hit"] == "true"
    body = response.json()
    assert {"statusCode", "name", "message"} <= set(body)
    assert (body["statusCode"], body["name"]) == (429, "daily_quota_exceeded")
    assert body["keybrake_code"] == "keybrake_daily_cap_exceeded"
    assert fake_resend.count("POST", "/emails") == 2
    assert key_info(vendor_proxy, key["key_id"])["spent_usd"] == "0.0018"

    small = issue_resend(vendor_proxy, daily_usd_cap="0.003")
    client = sdk(small["vault_key"])
    client.Emails.send(email(5))
    with pytest.raises(resend.exceptions.RateLimitError):
        client.Batch.send([email(6), email(7), email(8)])
    assert fake_resend.count("POST", "/emails/batch") == 0


def test_vendor_429_passes_through_with_its_rate_limit_headers(
    vendor_proxy: ProxyProcess, fake_resend: FakeResend
) -> None:
    key = issue_resend(vendor_proxy)
    fake_resend.mode = "ratelimit"
    response = raw_resend(vendor_proxy, key["vault_key"], "/emails", email(1))
    assert response.status_code == 429
    assert response.json()["name"] == "rate_limit_exceeded"
    assert "x-keybrake-cap-hit" not in response.headers
    assert response.headers["ratelimit-remaining"] == "0"
    assert response.headers["retry-after"] == "1"
    info = key_info(vendor_proxy, key["key_id"])
    assert info["spent_usd"] == "0.00" and info["reserved_usd"] == "0.00"


def test_unpriced_writes_are_refused_and_refusals_are_resend_shaped(
    vendor_proxy: ProxyProcess, fake_resend: FakeResend, sdk: Any
) -> None:
    key = issue_resend(vendor_proxy, allowed_endpoints=["POST /emails", "POST /api-keys"])
    client = sdk(key["vault_key"])
    # A new API key would be a real credential in the workload's hands: never free by default.
    with pytest.raises(resend.exceptions.ResendError) as raised:
        client.ApiKeys.create({"name": "escape"})
    assert raised.value.code == 403 and raised.value.error_type == "restricted_api_key"
    assert "[resend.endpoints]" in raised.value.message
    # Outside the key's allowed endpoints: refused before pricing.
    with pytest.raises(resend.exceptions.ResendError) as denied:
        client.Domains.list()
    assert denied.value.code == 403 and denied.value.error_type == "restricted_api_key"
    sdk("")  # no key at all
    with pytest.raises(resend.exceptions.MissingApiKeyError):
        client.Emails.send(email(1))
    assert fake_resend.requests == []
    decisions = [r["decision"] for r in audit(vendor_proxy, key["key_id"])]
    assert decisions == ["endpoint_denied", "unpriceable"]
