"""Upstream faults, idempotency and the dedupe window, against a Stripe-shaped fake upstream."""

from __future__ import annotations

import ssl
import threading
from decimal import Decimal
from typing import Any

import httpx
import pytest
import stripe

from tests.fakes.stripe_upstream import FakeStripe
from tests.proxyproc import issue_key
from tests.served import ServedProxy
from tests.vendor_helpers import audit, key_info

PI = "/v1/payment_intents"

# Made once: httpx loads the CA bundle anew for every call's client (~50 ms) otherwise, though
# these calls are plain http.
TLS = ssl.create_default_context()


def post(
    proxy: ServedProxy, vault_key: str, data: dict[str, str], **headers: str
) -> httpx.Response:
    return httpx.post(
        f"{proxy.url}/stripe{PI}",
        data=data,
        headers={"Authorization": f"Bearer {vault_key}", **headers},
        timeout=30,
        verify=TLS,
    )


@pytest.mark.parametrize("mode", ["hang", "drop", "error500", "huge"])
def test_timeouts_drops_and_5xx_count_as_spent(
    fake_proxy: ServedProxy, fake_stripe: FakeStripe, mode: str
) -> None:
    """hang: past KEYBRAKE_UPSTREAM_TIMEOUT; drop: connection reset; huge: an answer over the
    16 MiB limit, which the proxy refuses to hold in memory."""
    key = fake_proxy.issue(daily_usd_cap=10)
    fake_stripe.mode = mode
    response = post(fake_proxy, key["vault_key"], {"amount": "300", "currency": "usd"})
    assert response.status_code in {500, 502}
    assert "x-keybrake-cap-hit" not in response.headers
    info = key_info(fake_proxy, key["key_id"])
    assert info["spent_usd"] == "3.00"
    assert info["reserved_usd"] == "0.00"
    row = audit(fake_proxy, key["key_id"])[0]
    assert row["decision"] == ("forwarded" if mode == "error500" else "upstream_error")
    assert row["settled_usd"] == "3.00"


def test_vendor_rejection_releases_the_reservation(
    fake_proxy: ServedProxy, fake_stripe: FakeStripe
) -> None:
    key = fake_proxy.issue(daily_usd_cap=10)
    fake_stripe.mode = "decline"
    client = stripe.StripeClient(
        key["vault_key"], base_addresses={"api": fake_proxy.url + "/stripe"}
    )
    with pytest.raises(stripe.CardError):
        client.v1.payment_intents.create(params={"amount": 500, "currency": "usd"})
    info = key_info(fake_proxy, key["key_id"])
    assert info["spent_usd"] == "0.00" and info["reserved_usd"] == "0.00"
    row = audit(fake_proxy, key["key_id"])[0]
    assert row["status"] == 402 and row["vendor_request_id"].startswith("req_fake")


def test_vendor_429_never_carries_the_cap_hit_header(
    fake_proxy: ServedProxy, fake_stripe: FakeStripe
) -> None:
    key = fake_proxy.issue(daily_usd_cap=10)
    fake_stripe.mode = "ratelimit"
    response = post(fake_proxy, key["vault_key"], {"amount": "100", "currency": "usd"})
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "rate_limit"
    assert "x-keybrake-cap-hit" not in response.headers
    assert key_info(fake_proxy, key["key_id"])["spent_usd"] == "0.00"


def test_a_proxied_answer_carries_one_date_and_one_server(
    fake_proxy: ServedProxy, fake_stripe: FakeStripe
) -> None:
    """The vendor's answer has its own Date and Server; the proxy's server adds its own."""
    key = fake_proxy.issue(daily_usd_cap=10, dedupe_window="10m")
    body = {"amount": "100", "currency": "usd"}
    first = post(fake_proxy, key["vault_key"], body)
    replay = post(fake_proxy, key["vault_key"], body)  # answered from the stored response
    for response in (first, replay):
        assert response.status_code == 200
        assert len(response.headers.get_list("date")) == 1
        assert len(response.headers.get_list("server")) == 1
    assert fake_stripe.count("POST", "/v1/payment_intents") == 1


def test_idempotency_key_replays_without_calling_the_vendor(
    fake_proxy: ServedProxy, fake_stripe: FakeStripe
) -> None:
    key = fake_proxy.issue(daily_usd_cap=10, dedupe_window="0")
    body = {"amount": "100", "currency": "usd"}
    first = post(fake_proxy, key["vault_key"], body, **{"Idempotency-Key": "charge-1"})
    second = post(fake_proxy, key["vault_key"], body, **{"Idempotency-Key": "charge-1"})
    assert first.status_code == second.status_code == 200
    assert first.json() == second.json()
    assert second.headers["x-keybrake-replayed"] == "replayed"
    assert fake_stripe.count("POST", PI) == 1
    assert key_info(fake_proxy, key["key_id"])["spent_usd"] == "1.00"

    client = stripe.StripeClient(
        key["vault_key"], base_addresses={"api": fake_proxy.url + "/stripe"}
    )
    with pytest.raises(stripe.IdempotencyError):
        client.v1.payment_intents.create(
            params={"amount": 999, "currency": "usd"},
            options={"idempotency_key": "charge-1"},
        )
    assert fake_stripe.count("POST", PI) == 1
    decisions = [r["decision"] for r in audit(fake_proxy, key["key_id"])]
    assert decisions == ["idempotency_mismatch", "replayed", "forwarded"]


def test_an_idempotency_key_is_one_teams_at_the_vendor(
    fake_proxy: ServedProxy, fake_stripe: FakeStripe
) -> None:
    """Stripe keeps one idempotency store per account, shared by every run on it. Another team
    sending the same key (one derived from a work item, easy to guess) neither gets this team's
    intent back nor spoils the key with another body; a resubmitted run of the same team, with
    a new vault key, still has Stripe replay what the first run did."""
    with fake_proxy.admin() as admin:
        tokens = {}
        for team in ("team-a", "team-b"):
            spec = {"name": team, "label_prefix": f"argo/{team}/"}
            tokens[team] = admin.post("/vault/issuers", json=spec).json()["issuer_token"]

    def key_of(team: str, run: str) -> str:
        spec = {"agent_run_label": f"argo/{team}/{run}", "daily_usd_cap": 10}
        as_team = fake_proxy.admin()
        as_team.headers["Authorization"] = f"Bearer {tokens[team]}"
        return str(issue_key(as_team, **spec)["vault_key"])  # (closes the client)

    body = {"amount": "100", "currency": "usd"}
    order = {"Idempotency-Key": "order-123"}
    first = post(fake_proxy, key_of("team-a", "run-1"), body, **order)
    other_team = post(fake_proxy, key_of("team-b", "run-1"), body, **order)
    assert first.status_code == other_team.status_code == 200
    assert other_team.json()["id"] != first.json()["id"]  # its own intent, not team-a's
    assert "idempotent-replayed" not in other_team.headers
    # Another body under a key team-a will use later: team-a's call is not spoiled.
    spoiler = post(
        fake_proxy,
        key_of("team-b", "run-1"),
        {**body, "amount": "5"},
        **{"Idempotency-Key": "order-456"},
    )
    later = post(fake_proxy, key_of("team-a", "run-1"), body, **{"Idempotency-Key": "order-456"})
    assert spoiler.status_code == later.status_code == 200
    # A resubmitted run of team-a (new keys): Stripe replays, and nothing moves again.
    resubmitted = post(fake_proxy, key_of("team-a", "run-2"), body, **order)
    assert resubmitted.json()["id"] == first.json()["id"]
    assert resubmitted.headers["idempotent-replayed"] == "true"
    assert fake_stripe.count("POST", PI) == 5
    assert len(fake_stripe.created()) == 4
    sent = {r["headers"].get("idempotency-key") for r in fake_stripe.requests}
    assert not sent & {"order-123", "order-456"}  # never the caller's own, account-wide


def test_same_idempotency_key_while_running_is_409(
    fake_proxy: ServedProxy, fake_stripe: FakeStripe
) -> None:
    key = fake_proxy.issue(daily_usd_cap=10)
    body = {"amount": "100", "currency": "usd"}
    fake_stripe.hold()
    results: list[httpx.Response] = []
    first = threading.Thread(
        target=lambda: results.append(
            post(fake_proxy, key["vault_key"], body, **{"Idempotency-Key": "k"})
        )
    )
    first.start()
    assert fake_stripe.arrived.wait(timeout=30)
    in_flight = post(fake_proxy, key["vault_key"], body, **{"Idempotency-Key": "k"})
    fake_stripe.release()
    first.join()
    assert in_flight.status_code == 409
    assert in_flight.json()["error"]["code"] == "idempotency_key_in_use"
    assert results[0].status_code == 200
    assert fake_stripe.count("POST", PI) == 1


def test_dedupe_window_catches_pod_retries_with_fresh_idempotency_keys(
    fake_proxy: ServedProxy, fake_stripe: FakeStripe
) -> None:
    key = fake_proxy.issue(daily_usd_cap=10)
    client = stripe.StripeClient(
        key["vault_key"], base_addresses={"api": fake_proxy.url + "/stripe"}
    )
    params: Any = {"amount": 100, "currency": "usd", "metadata": {"item": "7"}}
    first = client.v1.payment_intents.create(params=params)
    retried = client.v1.payment_intents.create(params=params)  # new SDK idempotency key
    assert retried.id == first.id
    assert fake_stripe.count("POST", PI) == 1
    other = client.v1.payment_intents.create(params={**params, "metadata": {"item": "8"}})
    assert other.id != first.id
    assert key_info(fake_proxy, key["key_id"])["spent_usd"] == "2.00"
    decisions = [r["decision"] for r in audit(fake_proxy, key["key_id"])]
    assert decisions == ["forwarded", "deduplicated", "forwarded"]


def test_dedupe_window_zero_disables_it(fake_proxy: ServedProxy, fake_stripe: FakeStripe) -> None:
    key = fake_proxy.issue(daily_usd_cap=10, dedupe_window="0")
    client = stripe.StripeClient(
        key["vault_key"], base_addresses={"api": fake_proxy.url + "/stripe"}
    )
    params: Any = {"amount": 100, "currency": "usd"}
    client.v1.payment_intents.create(params=params)
    client.v1.payment_intents.create(params=params)
    assert fake_stripe.count("POST", PI) == 2
    assert key_info(fake_proxy, key["key_id"])["spent_usd"] == "2.00"


def test_forwarded_request_carries_only_the_real_secret(
    fake_proxy: ServedProxy, fake_stripe: FakeStripe
) -> None:
    key = fake_proxy.issue(daily_usd_cap=10)
    response = post(
        fake_proxy,
        key["vault_key"] + ".pod-a",
        {"amount": "100", "currency": "usd"},
        **{
            "X-Forwarded-For": "10.0.0.1",
            "X-Forwarded-Host": "evil.example",
            "Cookie": "a=b",
            "Stripe-Version": "2024-06-20",
        },
    )
    assert response.status_code == 200
    sent = fake_stripe.requests[-1]["headers"]
    assert sent["authorization"] == "Bearer sk_test_REALSECRET_do_not_leak_4242"
    assert sent["stripe-version"] == "2024-06-20"
    assert sent["host"] == fake_stripe.url.removeprefix("http://")
    for dropped in ("x-forwarded-for", "x-forwarded-host", "cookie"):
        assert dropped not in sent
    row = audit(fake_proxy, key["key_id"])[0]
    assert row["vendor_request_id"] == response.headers["request-id"]
    assert Decimal(row["settled_usd"]) == Decimal("1")
