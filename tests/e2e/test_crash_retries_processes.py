"""A call cut off mid-flight by a kill -9 of a `keybrake serve` process has an unknown outcome.
Once the sweep has counted it as spent, a retry gets a definite answer: sent again with the first
attempt's idempotency key, so the vendor replays what it did (counted once), or, for a vendor
without idempotency keys, refused for good with the audit row to check. The proxy started on the
database afterwards is the app served from a thread of the test process."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import stripe

from tests.fakes.resend_upstream import FakeResend
from tests.fakes.stripe_upstream import FakeStripe
from tests.fakes.twilio_upstream import FakeTwilio
from tests.helpers import reconcile
from tests.proxyproc import ProxyProcess, start_proxy
from tests.served import ServedProxy, serve_proxy
from tests.vendor_helpers import (
    audit,
    issue_twilio,
    key_info,
    raw_twilio,
    start_vendor_proxy,
    vendor_env,
)

pytest_plugins = ["tests.vendor_fixtures"]

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
PI = "/v1/payment_intents"


def crash_mid_call(
    proxy: ProxyProcess, vendor: FakeStripe | FakeTwilio, send: Callable[[], Any]
) -> None:
    """Send a call, kill -9 the proxy while the vendor holds it, then let the vendor finish."""
    vendor.arrived.clear()
    vendor.answered.clear()
    vendor.hold()
    lost: list[BaseException] = []

    def call() -> None:
        try:
            send()
        except (httpx.HTTPError, stripe.APIConnectionError) as exc:
            lost.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    assert vendor.arrived.wait(timeout=30)  # reserved, and at the vendor
    proxy.kill9()
    caller.join()
    assert lost, "the caller should have lost its connection"
    vendor.release()
    assert vendor.answered.wait(timeout=30)  # the vendor did execute it


def post(
    proxy: ProxyProcess | ServedProxy, vault_key: str, body: str, **headers: str
) -> httpx.Response:
    return httpx.post(
        f"{proxy.url}/stripe{PI}",
        content=body.encode(),
        headers={"Authorization": f"Bearer {vault_key}", **FORM, **headers},
        timeout=30,
    )


def test_a_retry_with_the_same_idempotency_key_gets_the_vendors_answer_once_reconciled(
    tmp_path: Path, fake_stripe: FakeStripe
) -> None:
    proxy = start_proxy(tmp_path, stripe_base=fake_stripe.url)
    # The retry is reserved like a new call (it may be the one that runs), so the cap must
    # leave room for it; it settles to nothing when the vendor replays.
    key = proxy.issue(daily_usd_cap=20)

    def client(at: ProxyProcess | ServedProxy) -> stripe.StripeClient:
        return stripe.StripeClient(
            key["vault_key"], base_addresses={"api": at.url + "/stripe"}, max_network_retries=0
        )

    params: Any = {"amount": 700, "currency": "usd"}
    options: Any = {"idempotency_key": "order-7"}
    crash_mid_call(
        proxy, fake_stripe, lambda: client(proxy).v1.payment_intents.create(params, options)
    )
    restarted = serve_proxy(tmp_path, stripe_base=fake_stripe.url)
    try:
        # Before the sweep the first attempt may still be running somewhere: retry shortly.
        early = post(
            restarted, key["vault_key"], "amount=700&currency=usd", **{"Idempotency-Key": "order-7"}
        )
        assert early.status_code == 409
        assert reconcile(proxy.database_url) == 1
        retried = client(restarted).v1.payment_intents.create(params, options)
        again = client(restarted).v1.payment_intents.create(params, options)
        info = key_info(restarted, key["key_id"])
        rows = audit(restarted, key["key_id"])
    finally:
        restarted.stop()
    created = fake_stripe.created()
    assert [obj["id"] for obj in created] == [retried.id] == [again.id]
    posts = [r for r in fake_stripe.requests if r["method"] == "POST"]
    first, retry = (r["headers"]["idempotency-key"] for r in posts)
    assert first == retry != "order-7"  # the same key the first went out with (scoped)
    assert (info["spent_usd"], info["reserved_usd"]) == ("7.00", "0.00")  # counted once
    assert [r["decision"] for r in rows] == [
        "replayed",
        "vendor_replayed",
        "in_progress",
        "reconciled",
    ]
    assert [r["settled_usd"] for r in rows] == ["0.00", "0.00", "0.00", "7.00"]


def test_a_keyless_pod_retry_goes_out_with_the_first_attempts_key(
    tmp_path: Path, fake_stripe: FakeStripe
) -> None:
    proxy = start_proxy(tmp_path, stripe_base=fake_stripe.url)
    key = proxy.issue(daily_usd_cap=10)
    body = "amount=300&currency=usd&metadata[item]=42"
    crash_mid_call(proxy, fake_stripe, lambda: post(proxy, key["vault_key"], body))
    restarted = serve_proxy(tmp_path, stripe_base=fake_stripe.url)
    try:
        reconcile(proxy.database_url)
        retried = post(restarted, key["vault_key"], body)
        info = key_info(restarted, key["key_id"])
    finally:
        restarted.stop()
    assert retried.status_code == 200 and retried.headers["idempotent-replayed"] == "true"
    assert [obj["id"] for obj in fake_stripe.created()] == [retried.json()["id"]]
    sent = [r["headers"]["idempotency-key"] for r in fake_stripe.requests if r["method"] == "POST"]
    assert len(sent) == 2 and sent[0] == sent[1] and sent[0].startswith("keybrake-")
    assert info["spent_usd"] == "3.00"


def test_twilio_retries_after_a_crash_are_refused_for_good(
    tmp_path: Path, fake_stripe: FakeStripe, fake_twilio: FakeTwilio, fake_resend: FakeResend
) -> None:
    """Twilio has no idempotency key: the proxy cannot ask whether the message went out, so the
    retry gets a definite refusal naming the first attempt, never a 409 to retry forever."""
    proxy = start_vendor_proxy(tmp_path, fake_stripe, fake_twilio, fake_resend)
    key = issue_twilio(proxy)
    form = {"To": "+14155550100", "From": "+14155550199", "Body": "Your order shipped"}
    crash_mid_call(proxy, fake_twilio, lambda: raw_twilio(proxy, key["vault_key"], form))
    restarted = serve_proxy(
        tmp_path, stripe_base=fake_stripe.url, extra_env=vendor_env(fake_twilio, fake_resend)
    )
    try:
        reconcile(proxy.database_url)
        first_row = audit(restarted, key["key_id"])[-1]
        refusals = [raw_twilio(restarted, key["vault_key"], form) for _ in range(2)]
        info = key_info(restarted, key["key_id"])
    finally:
        restarted.stop()
    assert first_row["decision"] == "reconciled"
    for refused in refusals:
        assert refused.status_code == 422
        body = refused.json()
        assert body["keybrake_code"] == "keybrake_outcome_unknown"
        assert f"audit row {first_row['id']}" in body["message"]
    assert len(fake_twilio.messages) == 1
    assert info["spent_usd"] == "0.0083"
