"""The cap bypasses found by attacking the proxy, each closed: a body the vendor could read
differently from the proxy is refused, and the tests check what reached the vendor (localstripe's
objects, or every request the recording fake saw), not only the status code."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import pytest
import stripe

from tests.fakes.stripe_upstream import FakeStripe
from tests.fakes.twilio_upstream import FakeTwilio
from tests.proxyproc import Localstripe, ProxyProcess
from tests.vendor_helpers import audit, issue_twilio, key_info, raw_twilio

pytest_plugins = ["tests.vendor_fixtures"]

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
INTENTS = [
    "POST /v1/payment_intents",
    "POST /v1/payment_intents/*",
    "POST /v1/payment_intents/*/confirm",
    "POST /v1/payment_intents/*/capture",
]


def send(
    proxy: ProxyProcess, vault_key: str, path: str, body: bytes | str, **headers: str
) -> httpx.Response:
    content = body.encode() if isinstance(body, str) else body
    return httpx.post(
        f"{proxy.url}/stripe{path}",
        content=content,
        headers={"Authorization": f"Bearer {vault_key}", **headers},
        timeout=30,
    )


def code(response: httpx.Response) -> str:
    return str(response.json()["error"]["code"])


def writes(fake: FakeStripe) -> list[dict[str, Any]]:
    return [r for r in fake.requests if r["method"] != "GET"]


def intent_amount(localstripe: Localstripe, intent_id: str) -> int:
    headers = {"Authorization": "Bearer sk_test_direct"}
    found = httpx.get(f"{localstripe.url}/v1/payment_intents/{intent_id}", headers=headers)
    return int(found.json()["amount"])


def test_an_update_cannot_raise_an_intents_amount_for_free_on_localstripe(
    proxy_server: ProxyProcess, localstripe: Localstripe
) -> None:
    """A $10 key moved $50,000: a JSON update read as "no amount", then a free confirm."""
    key = proxy_server.issue(daily_usd_cap=10, allowed_endpoints=INTENTS)
    client = stripe.StripeClient(
        key["vault_key"], base_addresses={"api": proxy_server.url + "/stripe"}
    )
    intent = client.v1.payment_intents.create(params={"amount": 100, "currency": "usd"})
    path = f"/v1/payment_intents/{intent.id}"

    as_json = send(
        proxy_server,
        key["vault_key"],
        path,
        json.dumps({"amount": 5_000_000}),
        **{"Content-Type": "application/json"},
    )
    assert as_json.status_code == 400 and code(as_json) == "keybrake_ambiguous_request"
    assert "application/x-www-form-urlencoded" in as_json.json()["error"]["message"]
    # The same change as a form is read, and priced at the new amount: far over the cap.
    as_form = send(proxy_server, key["vault_key"], path, "amount=5000000", **FORM)
    assert as_form.status_code == 429 and code(as_form) == "keybrake_daily_cap_exceeded"
    # A currency change without an amount moves money too (here into one with no known rate).
    currency = send(proxy_server, key["vault_key"], path, "currency=jpy", **FORM)
    assert currency.status_code == 403 and "[fx]" in currency.json()["error"]["message"]
    # A field neither priced nor known to move no money is refused, nested ones included.
    nested = send(proxy_server, key["vault_key"], path, "transfer_data[amount]=1", **FORM)
    assert nested.status_code == 400 and "transfer_data[amount]" in nested.text
    # Metadata moves no money: forwarded, free.
    fine = send(proxy_server, key["vault_key"], path, "metadata[order]=7", **FORM)
    assert fine.status_code == 200, fine.text
    assert intent_amount(localstripe, intent.id) == 100
    info = key_info(proxy_server, key["key_id"])
    assert info["spent_usd"] == "1.00" and info["reserved_usd"] == "0.00"


@pytest.mark.parametrize(
    "body,content_type",
    [
        (json.dumps({"amount": 5_000_000}), "application/json"),
        ("amount=5000000", "text/plain"),
        ("amount=5000000", "application/x-www-form-urlencoded; charset=latin-1"),
        ("amount=5000000", ""),
    ],
)
def test_an_update_in_another_content_type_never_reaches_the_vendor(
    fake_proxy: ProxyProcess, fake_stripe: FakeStripe, body: str, content_type: str
) -> None:
    key = fake_proxy.issue(daily_usd_cap=10, allowed_endpoints=INTENTS)
    created = send(
        fake_proxy, key["vault_key"], "/v1/payment_intents", "amount=100&currency=usd", **FORM
    )
    assert created.status_code == 200
    headers = {"Content-Type": content_type} if content_type else {}
    update = send(
        fake_proxy, key["vault_key"], f"/v1/payment_intents/{created.json()['id']}", body, **headers
    )
    assert update.status_code == 400 and code(update) == "keybrake_ambiguous_request"
    assert [r["path"] for r in writes(fake_stripe)] == ["/v1/payment_intents"]
    assert audit(fake_proxy, key["key_id"])[0]["decision"] == "ambiguous"


@pytest.mark.parametrize(
    "path,body",
    [
        # The proxy priced one copy, the upstream executed the other: $3,000 on a $10 key.
        ("/v1/payment_intents", "amount=100000&currency=usd&amount=100"),
        ("/v1/payment_intents", "amount=100&currency=usd&currency=jpy"),
        # Rack versions differ on these names; one of them reads both as `amount`.
        ("/v1/payment_intents", "amount=100&currency=usd&[amount]=100000"),
        ("/v1/payment_intents", "amount=100&currency=usd&amount]=100000"),
        ("/v1/payment_intents", "amount=100&currency=usd&amount[]=100000"),
        # Older Rack splits on `;` as well as `&`.
        ("/v1/payment_intents", "amount=100&currency=usd;amount=100000"),
        ("/v1/payment_intents", "amount=100%FF&currency=usd"),
        ("/v1/refunds", "charge=ch_small&charge=ch_big"),
        ("/v1/refunds", "charge=ch_small&payment_intent=pi_big"),
        ("/v1/payment_intents/pi_1/capture", "amount_to_capture=100&amount_to_capture=9999"),
    ],
)
def test_a_repeated_or_ambiguous_priced_field_never_reaches_the_vendor(
    fake_proxy: ProxyProcess, fake_stripe: FakeStripe, path: str, body: str
) -> None:
    key = fake_proxy.issue(daily_usd_cap=10, allowed_endpoints=[*INTENTS, "POST /v1/refunds"])
    response = send(fake_proxy, key["vault_key"], path, body, **FORM)
    assert response.status_code == 400, response.text
    assert code(response) == "keybrake_ambiguous_request"
    assert fake_stripe.requests == []  # not even a lookup
    row = audit(fake_proxy, key["key_id"])[0]
    assert (row["decision"], row["status"]) == ("ambiguous", 400)


def test_repeated_fields_on_localstripe_create_nothing(
    proxy_server: ProxyProcess, localstripe: Localstripe
) -> None:
    key = proxy_server.issue(daily_usd_cap=10)
    run = uuid.uuid4().hex
    body = f"amount=100000&currency=usd&amount=100&metadata[run]={run}"
    response = send(proxy_server, key["vault_key"], "/v1/payment_intents", body, **FORM)
    assert response.status_code == 400
    from tests.helpers import localstripe_intents

    assert localstripe_intents(localstripe.url, run=run) == []


def test_a_query_string_on_a_priced_write_is_refused(
    fake_proxy: ProxyProcess, fake_stripe: FakeStripe
) -> None:
    key = fake_proxy.issue(daily_usd_cap=10)
    response = httpx.post(
        f"{fake_proxy.url}/stripe/v1/payment_intents?amount=100000",
        content=b"amount=100&currency=usd",
        headers={"Authorization": f"Bearer {key['vault_key']}", **FORM},
    )
    assert response.status_code == 400 and "query string" in response.json()["error"]["message"]
    assert fake_stripe.requests == []


def test_stripe_v2_writes_are_refused_until_priced(
    fake_proxy: ProxyProcess, fake_stripe: FakeStripe
) -> None:
    key = fake_proxy.issue(daily_usd_cap=10, allowed_endpoints=["POST /v2/core/events"])
    response = send(
        fake_proxy,
        key["vault_key"],
        "/v2/core/events",
        "{}",
        **{"Content-Type": "application/json"},
    )
    assert response.status_code == 403 and "/v2" in response.json()["error"]["message"]
    assert fake_stripe.requests == []


def test_twilio_repeated_to_or_body_never_reaches_twilio(
    vendor_proxy: ProxyProcess, fake_twilio: FakeTwilio
) -> None:
    key = issue_twilio(vendor_proxy)
    for form in (
        {"To": ["+447700900123", "+14155550100"], "From": "+14155550199", "Body": "hi"},
        {"To": "+14155550100", "From": "+14155550199", "Body": ["hi", "x" * 1500]},
        {"To": "+14155550100", "to": "+447700900123", "From": "+14155550199", "Body": "hi"},
    ):
        response = raw_twilio(vendor_proxy, key["vault_key"], form)
        assert response.status_code == 400, response.text
        assert response.json()["keybrake_code"] == "keybrake_ambiguous_request"
    assert fake_twilio.requests == []


def test_a_lookup_never_leaves_the_keys_scope(
    fake_proxy: ProxyProcess, fake_stripe: FakeStripe
) -> None:
    """A key allowed only `POST /v1/refunds` made the proxy fetch a customer with the real key,
    and the refusal echoed what it fetched."""
    fake_stripe.add_object({"id": "cus_1", "object": "customer", "amount": 424242})
    fake_stripe.add_object(
        {"id": "ch_odd", "object": "charge", "amount": "424242 secret", "currency": "usd"}
    )
    key = fake_proxy.issue(daily_usd_cap=10, allowed_endpoints=["POST /v1/refunds"])
    escape = send(
        fake_proxy,
        key["vault_key"],
        "/v1/refunds",
        "charge=../customers/cus_1%3Fexpand[]=sources",
        **FORM,
    )
    assert escape.status_code == 400 and "not a Charge id" in escape.json()["error"]["message"]
    assert fake_stripe.requests == []
    odd = send(fake_proxy, key["vault_key"], "/v1/refunds", "charge=ch_odd", **FORM)
    assert odd.status_code == 403
    assert "424242" not in odd.text and "secret" not in odd.text
    assert [(r["method"], r["path"]) for r in fake_stripe.requests] == [
        ("GET", "/v1/charges/ch_odd")
    ]


def test_distinct_idempotency_keys_are_distinct_calls(
    fake_proxy: ProxyProcess, fake_stripe: FakeStripe
) -> None:
    """`order-1` then `order-2` with the same body were merged into one PaymentIntent."""
    key = fake_proxy.issue(daily_usd_cap=10)
    body = "amount=100&currency=usd"
    one = send(
        fake_proxy,
        key["vault_key"],
        "/v1/payment_intents",
        body,
        **FORM,
        **{"Idempotency-Key": "order-1"},
    )
    two = send(
        fake_proxy,
        key["vault_key"],
        "/v1/payment_intents",
        body,
        **FORM,
        **{"Idempotency-Key": "order-2"},
    )
    assert one.json()["id"] != two.json()["id"]
    sent = [r["headers"]["idempotency-key"] for r in writes(fake_stripe)]
    # Two keys at Stripe too, each scoped to the vault key's issuer (never the caller's own).
    assert len(set(sent)) == 2 and not set(sent) & {"order-1", "order-2"}
    assert key_info(fake_proxy, key["key_id"])["spent_usd"] == "2.00"
    # Keys an SDK makes up per call (a re-run pod sends a fresh one) do not tell calls apart:
    # the first is a call of its own (order-1 and order-2 were the caller's), the pod's retries
    # with other SDKs' shapes are that call again.
    replies = [
        send(
            fake_proxy,
            key["vault_key"],
            "/v1/payment_intents",
            body,
            **FORM,
            **{"Idempotency-Key": sdk_key},
        )
        for sdk_key in (
            str(uuid.uuid4()),  # stripe-python, -ruby, -java, -php, -dotnet
            f"stripe-node-retry-{uuid.uuid4()}",
            "1764474000123456789_AbCd-_",  # stripe-go: unix nanoseconds, 6 base64url characters
        )
    ]
    assert [r.headers.get("x-keybrake-replayed") for r in replies] == [
        None,
        "deduplicated",
        "deduplicated",
    ]
    assert len({r.json()["id"] for r in (one, two, *replies)}) == 3
    assert len(writes(fake_stripe)) == 3


def test_the_same_body_on_another_connected_account_is_another_call(
    fake_proxy: ProxyProcess, fake_stripe: FakeStripe
) -> None:
    key = fake_proxy.issue(daily_usd_cap=10, allowed_accounts=["acct_A1", "acct_B2"])
    body = "amount=100&currency=usd"
    a = send(
        fake_proxy,
        key["vault_key"],
        "/v1/payment_intents",
        body,
        **FORM,
        **{"Stripe-Account": "acct_A1"},
    )
    b = send(
        fake_proxy,
        key["vault_key"],
        "/v1/payment_intents",
        body,
        **FORM,
        **{"Stripe-Account": "acct_B2"},
    )
    assert a.status_code == b.status_code == 200 and a.json()["id"] != b.json()["id"]
    assert [r["headers"].get("stripe-account") for r in writes(fake_stripe)] == [
        "acct_A1",
        "acct_B2",
    ]


@pytest.mark.parametrize(
    "headers",
    [
        {"Stripe-Account": "acct_Other"},
        {"Stripe-Context": "acct_A1/acct_Other"},
        {"Stripe-Account": ""},
    ],
)
def test_a_key_acts_on_its_own_account_unless_issued_for_others(
    fake_proxy: ProxyProcess, fake_stripe: FakeStripe, headers: dict[str, str]
) -> None:
    platform_only = fake_proxy.issue(daily_usd_cap=10)
    some = fake_proxy.issue(daily_usd_cap=10, allowed_accounts=["acct_A1"])
    for key in (platform_only, some):
        response = send(
            fake_proxy,
            key["vault_key"],
            "/v1/payment_intents",
            "amount=100&currency=usd",
            **FORM,
            **headers,
        )
        assert response.status_code == 403 and code(response) == "keybrake_account_not_allowed"
    assert fake_stripe.requests == []
    # A header name with `_` (which some servers read as `-`) is never forwarded.
    sneaky = send(
        fake_proxy,
        platform_only["vault_key"],
        "/v1/payment_intents",
        "amount=100&currency=usd",
        **FORM,
        **{"Stripe_Account": "acct_Other"},
    )
    assert sneaky.status_code == 200
    assert "stripe_account" not in fake_stripe.requests[-1]["headers"]
    anyone = fake_proxy.issue(daily_usd_cap=10, allowed_accounts=["*"])
    ok = send(
        fake_proxy,
        anyone["vault_key"],
        "/v1/payment_intents",
        "amount=100&currency=usd&metadata[x]=1",
        **FORM,
        **{"Stripe-Account": "acct_Z9"},
    )
    assert ok.status_code == 200


def test_allowed_accounts_are_validated(fake_proxy: ProxyProcess) -> None:
    with fake_proxy.admin() as admin:
        base = {
            "vendor": "stripe",
            "daily_usd_cap": 1,
            "allowed_endpoints": ["POST /v1/payment_intents"],
            "agent_run_label": "argo/x",
        }
        bad = admin.post("/vault/keys", json={**base, "allowed_accounts": ["cus_1"]})
        assert bad.status_code == 400 and "acct_" in bad.json()["error"]["message"]
        ok = admin.post("/vault/keys", json={**base, "allowed_accounts": ["acct_B", "acct_A"]})
        assert ok.json()["allowed_accounts"] == ["acct_A", "acct_B"]
