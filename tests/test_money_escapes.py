"""The second round's money escapes, each shown on what reached the vendor and what it billed.

In-process (`build_app`) with localstripe as the Stripe upstream where Stripe's own behaviour
matters (intents that are created, confirmed and charged), and with a recording stand-in where
what matters is what was sent at all. docs/guarantees.md states the rules these hold the proxy to.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from keybrake.proxy.upstream import UpstreamResponse
from tests.inproc import Clock, StubUpstream, app_client, issue
from tests.proxyproc import Localstripe

FORM = {"content-type": "application/x-www-form-urlencoded"}
ENDPOINTS = [
    "POST /v1/payment_methods",
    "POST /v1/payment_intents",
    "POST /v1/payment_intents/*/confirm",
    "POST /v1/payment_intents/*/capture",
    "POST /v1/payment_intents/*/increment_authorization",
]


def stripe_call(
    client: TestClient, key: str, path: str, body: str = "", tag: str | None = None
) -> httpx.Response:
    presented = f"{key}.{tag}" if tag else key
    return client.post(
        f"/stripe{path}", content=body, headers={**FORM, "Authorization": f"Bearer {presented}"}
    )


def spent(client: TestClient, key_id: str) -> tuple[str, str]:
    info = client.get(f"/vault/keys/{key_id}").json()
    return info["spent_usd"], info["total_spent_usd"]


def intent(localstripe: Localstripe, intent_id: str) -> dict[str, Any]:
    """The intent as Stripe holds it, read directly, not through the proxy."""
    found = httpx.get(
        f"{localstripe.url}/v1/payment_intents/{intent_id}",
        headers={"Authorization": "Bearer sk_test_direct"},
    )
    return dict(found.json())


@pytest.fixture
def stripe_proxy(tmp_path: Path, localstripe: Localstripe) -> Iterator[tuple[TestClient, Clock]]:
    clock = Clock()
    with app_client(tmp_path, clock, stripe_api_base=localstripe.url) as client:
        yield client, clock


def card(client: TestClient, key: str) -> str:
    """A card payment method that localstripe charges on confirm (a free call)."""
    method = stripe_call(
        client,
        key,
        "/v1/payment_methods",
        "type=card&card[number]=4242424242424242&card[exp_month]=12&card[exp_year]=2030"
        "&card[cvc]=123",
    )
    assert method.status_code == 200, method.text
    return str(method.json()["id"])


def card_intent(client: TestClient, key: str, amount: int, method: str | None = None) -> str:
    """An unconfirmed PaymentIntent with a card."""
    created = stripe_call(
        client,
        key,
        "/v1/payment_intents",
        f"amount={amount}&currency=usd&payment_method={method or card(client, key)}",
    )
    assert created.status_code == 200, created.text
    return str(created.json()["id"])


def test_another_runs_intent_is_never_confirmed_for_free(
    stripe_proxy: tuple[TestClient, Clock], localstripe: Localstripe
) -> None:
    """Run B's $10 key confirmed run A's $1,000 intent and recorded $0.00: the paid-for mark
    belonged to no key. It now records its payer, and only the payer (or a key on its budget)
    confirms for free."""
    client, _ = stripe_proxy
    run_a = issue(client, total_usd_cap=2000, daily_usd_cap=None, allowed_endpoints=ENDPOINTS)
    run_b = issue(
        client,
        daily_usd_cap=10,
        allowed_endpoints=ENDPOINTS,
        agent_run_label="argo/other-run-b8c1",
    )
    intent_id = card_intent(client, run_a["vault_key"], 100_000)
    assert spent(client, run_a["key_id"]) == ("1000.00", "1000.00")

    refused = stripe_call(client, run_b["vault_key"], f"/v1/payment_intents/{intent_id}/confirm")
    assert refused.status_code == 429, refused.text
    assert refused.headers["x-keybrake-cap-hit"] == "true"
    assert intent(localstripe, intent_id)["status"] == "requires_confirmation"  # nothing moved
    assert spent(client, run_b["key_id"]) == ("0.00", "0.00")

    # A run B allowed that much pays for what it moves: A's payment is not B's.
    rich_b = issue(
        client,
        daily_usd_cap=5000,
        allowed_endpoints=ENDPOINTS,
        agent_run_label="argo/other-run-b8c1",
    )
    paid = stripe_call(client, rich_b["vault_key"], f"/v1/payment_intents/{intent_id}/confirm")
    assert paid.status_code == 200, paid.text
    assert intent(localstripe, intent_id)["status"] == "succeeded"
    assert spent(client, rich_b["key_id"]) == ("1000.00", "1000.00")


def test_the_payer_confirms_and_a_key_on_its_budget_captures_once(
    stripe_proxy: tuple[TestClient, Clock], localstripe: Localstripe
) -> None:
    client, _ = stripe_proxy
    budget = client.post(
        "/vault/budgets",
        json={
            "agent_run_label": "argo/billing-agent-x7k2p",
            "daily_usd_cap": 50,
            "expires_in": "2h",
        },
    ).json()
    creator = issue(
        client, budget_id=budget["budget_id"], daily_usd_cap=None, allowed_endpoints=ENDPOINTS
    )
    other_pod = issue(
        client, budget_id=budget["budget_id"], daily_usd_cap=None, allowed_endpoints=ENDPOINTS
    )
    intent_id = card_intent(client, creator["vault_key"], 3_000)
    confirmed = stripe_call(
        client, other_pod["vault_key"], f"/v1/payment_intents/{intent_id}/confirm"
    )
    assert confirmed.status_code == 200, confirmed.text
    assert intent(localstripe, intent_id)["status"] == "succeeded"
    assert spent(client, other_pod["key_id"]) == ("0.00", "0.00")
    view = client.get(f"/vault/budgets/{budget['budget_id']}").json()
    assert view["total_spent_usd"] == "30.00"  # paid once, by the run


def test_money_is_counted_when_it_moves(
    stripe_proxy: tuple[TestClient, Clock], localstripe: Localstripe
) -> None:
    """A $300-a-day key created $300 of unconfirmed intents on day 1 and $300 on day 2, then
    confirmed them all: $600 moved within minutes. A confirm now re-dates what its payer paid,
    so no 24 hours see more than $300 move."""
    client, clock = stripe_proxy
    key = issue(client, daily_usd_cap=300, expires_in="72h", allowed_endpoints=ENDPOINTS)
    first = card_intent(client, key["vault_key"], 30_000)  # day 1, 12:00: created, not moved
    clock.advance(hours=23)
    confirmed = stripe_call(client, key["vault_key"], f"/v1/payment_intents/{first}/confirm")
    assert confirmed.status_code == 200, confirmed.text  # paid on day 1: free, and re-dated
    assert intent(localstripe, first)["status"] == "succeeded"  # $300 moved on day 2, 11:00
    clock.advance(hours=2)  # day 2, 13:00: day 1's hour has left the window, the confirm has not
    method = card(client, key["vault_key"])
    body = f"amount=30000&currency=usd&payment_method={method}"
    second = stripe_call(client, key["vault_key"], "/v1/payment_intents", body)
    assert second.status_code == 429, second.text
    assert _intents_with(localstripe, method) == []  # the second $300 never reached Stripe
    clock.advance(hours=23)  # a day after the money moved, the next $300 may
    again = stripe_call(client, key["vault_key"], "/v1/payment_intents", body)
    assert again.status_code == 200, again.text


def _intents_with(localstripe: Localstripe, payment_method: str) -> list[dict[str, Any]]:
    listed = httpx.get(
        f"{localstripe.url}/v1/payment_intents",
        params={"limit": 100},
        headers={"Authorization": "Bearer sk_test_direct"},
    ).json()
    return [i for i in listed["data"] if i.get("payment_method") == payment_method]


def test_distinct_fan_out_items_are_never_merged(tmp_path: Path) -> None:
    """Three items sending the same body (the README's pod example) within the dedupe window
    became one PaymentIntent, and all three pods were told they succeeded with it."""
    stub = StubUpstream()
    with app_client(tmp_path, upstream=stub) as client:
        key = issue(client)["vault_key"]
        body = "amount=500&currency=usd"
        for item in ("item-0", "item-1", "item-2"):
            answer = stripe_call(client, key, "/v1/payment_intents", body, tag=f"{item}@pod-a")
            assert answer.status_code == 200 and "x-keybrake-replayed" not in answer.headers
        assert len(stub.sent) == 3  # three intents reached Stripe
        # The same item retried from a new pod is the same call: replayed, not sent again.
        retry = stripe_call(client, key, "/v1/payment_intents", body, tag="item-1@pod-b")
        assert retry.headers["x-keybrake-replayed"] == "deduplicated"
        # A tag without @ names no item: a wrapped step whose pod name changes stays one call.
        first = stripe_call(client, key, "/v1/payment_intents", "amount=7&currency=usd", tag="p1")
        again = stripe_call(client, key, "/v1/payment_intents", "amount=7&currency=usd", tag="p2")
        assert first.status_code == again.status_code == 200
        assert again.headers["x-keybrake-replayed"] == "deduplicated"
        assert len(stub.sent) == 4
        audit = client.get("/vault/audit", params={"limit": 50}).json()["data"]
        assert sorted(row["decision"] for row in audit) == [
            "deduplicated",
            "deduplicated",
            *["forwarded"] * 4,
        ]


@pytest.mark.parametrize("death", ["revoked", "expired", "budget revoked"])
def test_a_dead_key_reaches_no_vendor_not_even_for_a_lookup(tmp_path: Path, death: str) -> None:
    """Pricing lookups ran before the revocation check: a leaked dead key spent the account's
    rate limit and learned whether an object id exists."""
    stub = StubUpstream()
    clock = Clock()
    with app_client(tmp_path, clock, upstream=stub) as client:
        budget = client.post(
            "/vault/budgets",
            json={
                "agent_run_label": "argo/billing-agent-x7k2p",
                "daily_usd_cap": 50,
                "expires_in": "3h",
            },
        ).json()
        key = issue(client, allowed_endpoints=ENDPOINTS, budget_id=budget["budget_id"])
        if death == "revoked":
            assert client.delete(f"/vault/keys/{key['key_id']}").status_code == 200
        elif death == "expired":
            clock.advance(hours=3)
        else:
            assert client.delete(f"/vault/budgets/{budget['budget_id']}").status_code == 200
        answer = stripe_call(client, key["vault_key"], "/v1/payment_intents/pi_123/confirm")
        assert answer.status_code == 401, answer.text
        assert stub.sent == []  # not even the GET that prices a confirm
        row = client.get("/vault/audit", params={"key_id": key["key_id"]}).json()["data"][0]
        # (revoking a budget revokes its keys)
        want = {"revoked": "revoked", "expired": "expired", "budget revoked": "revoked"}
        assert row["decision"] == want[death]


def test_increment_authorization_prices_the_difference(tmp_path: Path) -> None:
    """`amount` is the intent's new total: it moves the difference, in the intent's currency.
    Before, the call was always refused for naming no currency."""
    stub = StubUpstream()  # every intent it returns holds $1.00 (amount 100, usd)
    with app_client(tmp_path, upstream=stub) as client:
        tight = issue(client, daily_usd_cap=2, allowed_endpoints=ENDPOINTS)
        path = "/v1/payment_intents/pi_stub/increment_authorization"
        refused = stripe_call(client, tight["vault_key"], path, "amount=400")  # $3 more
        assert refused.status_code == 429
        assert [(m, u.rsplit("/", 1)[-1]) for m, u, _, _ in stub.sent] == [("GET", "pi_stub")]
        key = issue(client, daily_usd_cap=10, allowed_endpoints=ENDPOINTS)
        done = stripe_call(client, key["vault_key"], path, "amount=400")
        assert done.status_code == 200, done.text
        assert stub.sent[-1][0] == "POST" and stub.sent[-1][3] == b"amount=400"
        assert spent(client, key["key_id"]) == ("3.00", "3.00")


def test_a_refusal_before_authentication_names_the_valid_key(tmp_path: Path) -> None:
    """A trailing slash is refused before the key is authenticated; its audit row named no key
    although the key was valid, so the run's own view missed the call."""
    stub = StubUpstream()
    with app_client(tmp_path, upstream=stub) as client:
        key = issue(client)
        answer = stripe_call(client, key["vault_key"], "/v1/payment_intents/", "amount=1")
        assert answer.status_code == 400
        rows = client.get("/vault/audit", params={"key_id": key["key_id"]}).json()["data"]
        assert [(r["decision"], r["key_id"], r["agent_run_label"]) for r in rows] == [
            ("bad_path", key["key_id"], "argo/billing-agent-x7k2p")
        ]
        assert stub.sent == []


def test_a_padded_confirm_and_the_capture_after_it_are_priced_at_what_they_move(
    tmp_path: Path,
) -> None:
    """A $1 intent confirmed with `amount_to_confirm` (Stripe-Version 2026-04-22.dahlia) moves
    what that names: it was priced at the intent's $1, already paid, so a $5-a-day key confirmed
    $10,000 for nothing. And a capture without `amount_to_capture` moves amount_capturable, which
    such a confirm raised, not the intent's `amount`."""
    held = UpstreamResponse(
        200,
        [("content-type", "application/json"), ("request-id", "req_stub")],
        b'{"id": "pi_stub", "object": "payment_intent", "amount": 100, "currency": "usd",'
        b' "amount_capturable": 1000000, "status": "requires_capture"}',
    )
    stub = StubUpstream(held)
    with app_client(tmp_path, upstream=stub) as client:
        key = issue(client, daily_usd_cap=5, allowed_endpoints=ENDPOINTS)
        assert (
            stripe_call(
                client, key["vault_key"], "/v1/payment_intents", "amount=100&currency=usd"
            ).status_code
            == 200
        )
        confirm = client.post(
            "/stripe/v1/payment_intents/pi_stub/confirm",
            content="amount_to_confirm=1000000&payment_method=pm_card_visa",
            headers={
                **FORM,
                "Authorization": f"Bearer {key['vault_key']}",
                "Stripe-Version": "2026-04-22.dahlia",
            },
        )
        assert confirm.status_code == 429 and confirm.headers["x-keybrake-cap-hit"] == "true"
        capture = stripe_call(client, key["vault_key"], "/v1/payment_intents/pi_stub/capture")
        assert capture.status_code == 429 and capture.headers["x-keybrake-cap-hit"] == "true"
        # Each was looked up, and neither forwarded.
        assert [m for m, _, _, _ in stub.sent] == ["POST", "GET", "GET"]
        assert spent(client, key["key_id"]) == ("1.00", "1.00")
        # Within its cap a confirm names what it moves, priced less what its payer paid.
        rich = issue(client, daily_usd_cap=20_000, allowed_endpoints=ENDPOINTS)
        body = "amount_to_confirm=1000000"
        done = stripe_call(client, rich["vault_key"], "/v1/payment_intents/pi_stub/confirm", body)
        assert done.status_code == 200, done.text
        assert stub.sent[-1][0] == "POST" and stub.sent[-1][3] == body.encode()
        assert spent(client, rich["key_id"]) == ("10000.00", "10000.00")


def test_a_key_held_to_customers_writes_no_other_customer_and_no_balance(tmp_path: Path) -> None:
    """A key held to cus_A set cus_B's balance (added to cus_B's next invoice) for $0: a customer
    update was free with any body, its query string included, and named no customer."""
    stub = StubUpstream()
    endpoints = ["POST /v1/customers/*", "DELETE /v1/customers/*"]
    with app_client(tmp_path, upstream=stub) as client:
        key = issue(
            client,
            daily_usd_cap=1,
            allowed_endpoints=endpoints,
            constraints={"customers": ["cus_A"], "currencies": ["usd"]},
        )
        other = stripe_call(client, key["vault_key"], "/v1/customers/cus_B", "email=a@b.c")
        assert other.status_code == 403, other.text
        assert other.json()["error"]["code"] == "keybrake_constraint_violated"
        assert "'cus_B' is not allowed" in other.json()["error"]["message"]
        gone = client.delete(
            "/stripe/v1/customers/cus_B", headers={"Authorization": f"Bearer {key['vault_key']}"}
        )
        assert gone.status_code == 403, gone.text
        balance = stripe_call(client, key["vault_key"], "/v1/customers/cus_A", "balance=100000000")
        assert balance.status_code == 400 and "'balance'" in balance.json()["error"]["message"]
        query = stripe_call(client, key["vault_key"], "/v1/customers/cus_A?balance=5")
        assert query.status_code == 400 and "query string" in query.json()["error"]["message"]
        assert stub.sent == []
        own = stripe_call(client, key["vault_key"], "/v1/customers/cus_A", "email=a@b.c")
        assert own.status_code == 200, own.text
        assert [(m, u.rsplit("/", 1)[-1], b) for m, u, _, b in stub.sent] == [
            ("POST", "cus_A", b"email=a@b.c")
        ]


def test_a_key_held_to_destinations_makes_no_direct_charge_elsewhere(tmp_path: Path) -> None:
    """A key held to destinations [acct_X] and allowed to act on acct_Z created a $50 direct
    charge on acct_Z (`Stripe-Account`, no `transfer_data`): the money settles in acct_Z."""
    stub = StubUpstream()
    with app_client(tmp_path, upstream=stub) as client:
        key = issue(
            client,
            daily_usd_cap=100,
            allowed_accounts=["acct_Z", "acct_X"],
            constraints={"destinations": ["acct_X"], "customers": ["cus_A"]},
        )
        body = "amount=5000&currency=usd&customer=cus_A&application_fee_amount=1"
        auth = {**FORM, "Authorization": f"Bearer {key['vault_key']}"}
        for header, value in (("Stripe-Account", "acct_Z"), ("Stripe-Context", "acct_X/acct_Z")):
            direct = client.post(
                "/stripe/v1/payment_intents", content=body, headers={**auth, header: value}
            )
            assert direct.status_code == 403, direct.text
            assert "'acct_Z' is not allowed" in direct.json()["error"]["message"]
        assert stub.sent == []
        allowed = client.post(
            "/stripe/v1/payment_intents", content=body, headers={**auth, "Stripe-Account": "acct_X"}
        )
        assert allowed.status_code == 200, allowed.text
        assert len(stub.sent) == 1
