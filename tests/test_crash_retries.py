"""A call cut off mid-flight has an unknown outcome. A vendor that never answered within the
upstream timeout: the call is counted as spent, and the pod's retry is sent with the first
attempt's idempotency key, so the vendor cannot execute it twice. A kill -9 of the proxy mid-call,
and the retries after it: tests/e2e/test_crash_retries_processes.py."""

from __future__ import annotations

from typing import Any

import stripe

from tests.fakes.stripe_upstream import FakeStripe
from tests.served import ServedProxy
from tests.vendor_helpers import audit, key_info


def test_a_retry_after_no_answer_is_sent_as_the_same_call(
    fake_proxy: ServedProxy, fake_stripe: FakeStripe
) -> None:
    """No answer within the upstream timeout: counted as spent, outcome unknown. The pod's retry
    (a fresh SDK key) goes out with the first attempt's key, so the vendor cannot execute it
    twice."""
    key = fake_proxy.issue(daily_usd_cap=10)
    client = stripe.StripeClient(
        key["vault_key"],
        base_addresses={"api": fake_proxy.url + "/stripe"},
        max_network_retries=0,
    )
    params: Any = {"amount": 300, "currency": "usd", "metadata": {"item": "9"}}
    fake_stripe.mode = "hang"
    try:
        client.v1.payment_intents.create(params=params)
    except stripe.APIError as exc:
        assert exc.http_status == 502
    else:
        raise AssertionError("the first attempt should have timed out")
    # The vendor is still running it: a retry now gets the vendor's conflict, moves nothing, and
    # leaves the outcome open (not stored as the answer).
    try:
        client.v1.payment_intents.create(params=params)
    except stripe.APIError as exc:
        assert exc.http_status == 409
    else:
        raise AssertionError("the vendor should have said it is still running the first")
    fake_stripe.answered.clear()
    fake_stripe.release()  # the vendor finishes what it started
    assert fake_stripe.answered.wait(timeout=30)
    fake_stripe.mode = "ok"
    retried = client.v1.payment_intents.create(params=params)  # a new process: a new SDK key
    assert [obj["id"] for obj in fake_stripe.created()] == [retried.id]
    info = key_info(fake_proxy, key["key_id"])
    assert (info["spent_usd"], info["reserved_usd"]) == ("3.00", "0.00")
    assert [r["decision"] for r in audit(fake_proxy, key["key_id"])] == [
        "vendor_replayed",
        "vendor_busy",
        "upstream_error",
    ]
