"""Constraints through a live proxy (the app `keybrake serve` runs, on a loopback socket), with
the official SDKs as clients: localstripe as Stripe for customers and currencies, the
Stripe-shaped fake for transfers, and the Twilio and Resend fakes. A call outside its key's
constraints is a vendor-shaped 403 `keybrake_constraint_violated`, audited, and nothing reaches
the vendor."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import resend
import stripe
from twilio.base.exceptions import TwilioRestException

from tests.fakes.resend_upstream import FakeResend
from tests.fakes.stripe_upstream import FakeStripe
from tests.fakes.twilio_upstream import FakeTwilio
from tests.proxyproc import Localstripe
from tests.served import ServedProxy, serve_proxy
from tests.vendor_helpers import audit, issue_resend, issue_twilio, twilio_client

pytest_plugins = ["tests.vendor_fixtures"]

DIRECT = {"Authorization": "Bearer sk_test_direct"}  # localstripe, not through the proxy
SENDER = "+14155550199"


@pytest.fixture
def stripe_proxy(tmp_path: Path, localstripe: Localstripe) -> Iterator[ServedProxy]:
    """The proxy in front of localstripe, pricing euros too (so that only the constraint can
    refuse a euro intent)."""
    pricing = tmp_path / "pricing.toml"
    pricing.write_text('[fx]\neur = "1.08"\n')
    proxy = serve_proxy(
        tmp_path, stripe_base=localstripe.url, extra_env={"KEYBRAKE_PRICING_FILE": str(pricing)}
    )
    yield proxy
    proxy.stop()


def customer(localstripe: Localstripe) -> str:
    made = httpx.post(f"{localstripe.url}/v1/customers", headers=DIRECT, data={"name": "c"})
    return str(made.json()["id"])


def intent_at(localstripe: Localstripe, intent_id: str) -> dict[str, Any]:
    return dict(
        httpx.get(f"{localstripe.url}/v1/payment_intents/{intent_id}", headers=DIRECT).json()
    )


def every_intent(localstripe: Localstripe) -> list[dict[str, Any]]:
    """Every PaymentIntent localstripe holds, page by page."""
    found: list[dict[str, Any]] = []
    while True:
        params: dict[str, Any] = {"limit": 100}
        if found:
            params["starting_after"] = found[-1]["id"]
        page = httpx.get(
            f"{localstripe.url}/v1/payment_intents", headers=DIRECT, params=params
        ).json()
        found += page["data"]
        if not page["has_more"]:
            return found


def refused(raised: pytest.ExceptionInfo[stripe.StripeError]) -> str:
    """The refusal's code, after checking it is keybrake's constraint refusal, as Stripe's SDK
    raises it."""
    error = raised.value
    assert isinstance(error, stripe.PermissionError) and error.http_status == 403
    assert error.json_body is not None and error.headers is not None
    code = error.json_body["error"]["code"]  # stripe-python sets no `code` on a 403
    assert error.headers["X-Keybrake-Code"] == code
    assert "X-Keybrake-Cap-Hit" not in error.headers
    return str(code)


def test_a_stripe_key_held_to_usd_and_two_customers(
    stripe_proxy: ServedProxy, localstripe: Localstripe
) -> None:
    first, second, third = (customer(localstripe) for _ in range(3))
    key = stripe_proxy.issue(
        daily_usd_cap=100,
        allowed_endpoints=[
            "POST /v1/payment_intents",
            "POST /v1/payment_intents/*",
            "POST /v1/payment_intents/*/confirm",
        ],
        constraints={"currencies": ["usd"], "customers": [first, second]},
    )
    client = stripe.StripeClient(
        key["vault_key"],
        base_addresses={"api": stripe_proxy.url + "/stripe"},
        max_network_retries=0,
    )
    intent = client.v1.payment_intents.create(
        params={"amount": 700, "currency": "usd", "customer": first}
    )
    assert intent.customer == first

    for params in (
        {"amount": 700, "currency": "eur", "customer": first},  # another currency
        {"amount": 700, "currency": "usd", "customer": third},  # another customer
        {"amount": 700, "currency": "usd"},  # no customer at all
    ):
        with pytest.raises(stripe.StripeError) as raised:
            client.v1.payment_intents.create(params=params)  # type: ignore[arg-type]
        assert refused(raised) == "keybrake_constraint_violated"

    # Moving the intent to a third customer before confirming it: refused, and Stripe still
    # holds it for the first.
    with pytest.raises(stripe.StripeError) as raised:
        client.v1.payment_intents.update(intent.id, params={"customer": third})
    assert refused(raised) == "keybrake_constraint_violated"
    assert "customers" in str(raised.value.user_message)
    assert intent_at(localstripe, intent.id)["customer"] == first

    # An intent of a third customer, made outside the proxy, cannot be confirmed with the key.
    foreign = httpx.post(
        f"{localstripe.url}/v1/payment_intents",
        headers=DIRECT,
        data={"amount": "300", "currency": "usd", "customer": third},
    ).json()
    with pytest.raises(stripe.StripeError) as raised:
        client.v1.payment_intents.confirm(foreign["id"])
    assert refused(raised) == "keybrake_constraint_violated"

    rows = audit(stripe_proxy, key["key_id"])
    decisions = [row["decision"] for row in rows]
    assert decisions.count("constraint_violated") == 5
    assert decisions.count("forwarded") == 1 and len(rows) == 6
    with stripe_proxy.admin() as admin:
        info = admin.get(f"/vault/keys/{key['key_id']}").json()
    assert info["spent_usd"] == "7.00" and info["reserved_usd"] == "0.00"
    # What Stripe holds for these customers (localstripe is shared by the worker's tests): the
    # one usd intent of the first, and the one made outside the proxy, still unconfirmed.
    ours = (first, second, third)
    made = [i["id"] for i in every_intent(localstripe) if i["customer"] in ours]
    assert sorted(made) == sorted([intent.id, foreign["id"]])
    assert intent_at(localstripe, foreign["id"])["status"] == foreign["status"]


def test_a_transfer_to_an_unlisted_destination_never_reaches_stripe(
    vendor_proxy: ServedProxy, fake_stripe: FakeStripe
) -> None:
    key = vendor_proxy.issue(
        vendor="stripe",
        daily_usd_cap=100,
        allowed_endpoints=["POST /v1/transfers"],
        agent_run_label="argo/payouts-run",
        constraints={"destinations": ["acct_1Partner"]},
    )
    client = stripe.StripeClient(
        key["vault_key"],
        base_addresses={"api": vendor_proxy.url + "/stripe"},
        max_network_retries=0,
    )
    with pytest.raises(stripe.StripeError) as raised:
        client.v1.transfers.create(
            params={"amount": 500, "currency": "usd", "destination": "acct_1Stranger"}
        )
    assert refused(raised) == "keybrake_constraint_violated"
    assert fake_stripe.requests == []
    client.v1.transfers.create(
        params={"amount": 500, "currency": "usd", "destination": "acct_1Partner"}
    )
    [sent] = fake_stripe.requests
    assert sent["form"]["destination"] == "acct_1Partner"


def test_a_twilio_key_held_to_london_numbers(
    vendor_proxy: ServedProxy, fake_twilio: FakeTwilio
) -> None:
    key = issue_twilio(vendor_proxy, constraints={"recipients": ["+4420*"]})
    client = twilio_client(vendor_proxy, key["vault_key"])
    sent = client.messages.create(to="+442071838750", from_=SENDER, body="Your order shipped")
    assert sent.sid.startswith("SM")
    with pytest.raises(TwilioRestException) as raised:
        client.messages.create(to="+15005550006", from_=SENDER, body="Your order shipped")
    assert raised.value.status == 403
    assert raised.value.details == {"keybrake_code": "keybrake_constraint_violated"}
    assert len(fake_twilio.requests) == 1  # the London message only
    assert fake_twilio.requests[0]["form"]["To"] == ["+442071838750"]
    assert audit(vendor_proxy, key["key_id"])[0]["decision"] == "constraint_violated"


def test_a_resend_key_held_to_one_domain_refuses_a_mixed_recipient_list(
    vendor_proxy: ServedProxy, fake_resend: FakeResend, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = issue_resend(vendor_proxy, constraints={"recipient_domains": ["example.com"]})
    monkeypatch.setattr(resend, "api_url", vendor_proxy.url + "/resend")
    monkeypatch.setattr(resend, "api_key", key["vault_key"])
    email: dict[str, Any] = {
        "from": "Shop <orders@example.com>",
        "to": ["a@example.com"],
        "subject": "Shipped",
        "text": "On its way",
    }
    resend.Emails.send(email)  # type: ignore[arg-type]
    mixed_bcc = {**email, "to": ["a@example.com", "b@Example.COM"], "bcc": "audit@elsewhere.test"}
    mixed_to = {**email, "to": ["a@example.com", "b@elsewhere.test"]}
    for mixed in (mixed_bcc, mixed_to):
        with pytest.raises(resend.exceptions.ResendError) as raised:
            resend.Emails.send(mixed)  # type: ignore[arg-type]
        assert raised.value.code == 403
        assert "recipient_domains" in str(raised.value.message)
        kept = {name.lower(): value for name, value in raised.value.headers.items()}
        assert kept["x-keybrake-code"] == "keybrake_constraint_violated"
    assert len(fake_resend.requests) == 1
    decisions = [row["decision"] for row in audit(vendor_proxy, key["key_id"])]
    assert decisions == ["constraint_violated", "constraint_violated", "forwarded"]


def test_report_mode_forwards_every_call_and_audits_each_would_be_refusal(
    vendor_proxy: ServedProxy,
    fake_twilio: FakeTwilio,
    fake_resend: FakeResend,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same constraints as above, report-only: the SDKs see every call succeed, the vendors
    receive every one, and each that enforcing would have refused is noted in its audit row and
    counted in the metrics."""
    texts = issue_twilio(vendor_proxy, constraints={"recipients": ["+4420*"], "mode": "report"})
    client = twilio_client(vendor_proxy, texts["vault_key"])
    for to in ("+442071838750", "+15005550006"):
        client.messages.create(to=to, from_=SENDER, body="Your order shipped")
    assert [r["form"]["To"] for r in fake_twilio.requests] == [["+442071838750"], ["+15005550006"]]
    rows = audit(vendor_proxy, texts["key_id"])
    assert [row["decision"] for row in rows] == ["forwarded", "forwarded"]
    assert [row["reported"] for row in rows] == [
        "constraint_violated: recipients: '+15005550006' is not allowed",
        None,
    ]

    mails = issue_resend(
        vendor_proxy, constraints={"recipient_domains": ["example.com"], "mode": "report"}
    )
    monkeypatch.setattr(resend, "api_url", vendor_proxy.url + "/resend")
    monkeypatch.setattr(resend, "api_key", mails["vault_key"])
    mixed = {
        "from": "Shop <orders@example.com>",
        "to": ["a@example.com", "b@Example.COM"],
        "bcc": "audit@elsewhere.test",
        "subject": "Shipped",
        "text": "On its way",
    }
    resend.Emails.send(mixed)  # type: ignore[arg-type]
    assert len(fake_resend.requests) == 1
    [row] = audit(vendor_proxy, mails["key_id"])
    assert row["decision"] == "forwarded"
    assert row["reported"].startswith("constraint_violated: recipient_domains: ")

    with vendor_proxy.admin() as admin:
        metrics = admin.get("/metrics").text
    for vendor in ("twilio", "resend"):
        line = f'keybrake_policy_reports_total{{decision="constraint_violated",vendor="{vendor}"}}'
        assert f"{line} 1.0" in metrics, [m for m in metrics.splitlines() if "reports" in m]
