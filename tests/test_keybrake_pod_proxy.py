"""The pod helper against the real proxy (served from a thread, vendors on fakes), with each
official SDK as the client: keybrake's cap hits and refusals, in each vendor's own error shape,
end the pod with 77; a vendor's own 429 is raised as it is; a full call rate's 429 is waited
out for its Retry-After and the same call sent again."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import pytest
import resend
import stripe
from twilio.base.exceptions import TwilioRestException

from keybrake.hera_workflows import keybrake_pod as pod
from tests.fakes.resend_upstream import FakeResend
from tests.fakes.stripe_upstream import FakeStripe
from tests.fakes.twilio_upstream import FakeTwilio
from tests.served import ServedProxy
from tests.vendor_helpers import MESSAGES, audit, issue_resend, issue_twilio, twilio_client

pytest_plugins = ["tests.vendor_fixtures"]

US = "+14155550100"
SENDER = "+14155550199"


def never_sleeps(seconds: float) -> None:
    raise AssertionError(f"slept {seconds}s: nothing here is rate limited")


def refused_with(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> str:
    """What the helper said when it ended the pod (exit 77) for `fn(*args, **kwargs)`."""
    said = io.StringIO()
    with pytest.raises(SystemExit) as exited:
        pod.Caller(sleep=never_sleeps, stream=said).call(fn, *args, **kwargs)
    assert exited.value.code == pod.EXIT_REFUSED
    return said.getvalue()


def test_stripe_cap_hits_and_refusals_end_the_pod(
    vendor_proxy: ServedProxy, fake_stripe: FakeStripe
) -> None:
    key = vendor_proxy.issue(max_usd_per_call=1)
    client = stripe.StripeClient(
        key["vault_key"] + ".item-1@pod-1", base_addresses={"api": vendor_proxy.url + "/stripe"}
    )
    create = client.v1.payment_intents.create
    intent = pod.Caller(sleep=never_sleeps).call(create, params={"amount": 100, "currency": "usd"})
    assert intent.id.startswith("pi_")

    said = refused_with(create, params={"amount": 500, "currency": "usd"})
    assert said.startswith("keybrake_pod: cap hit (HTTP 429, keybrake_per_call_cap_exceeded)")
    said = refused_with(client.v1.refunds.create, params={"payment_intent": intent.id})
    assert "refused (HTTP 403, keybrake_endpoint_not_allowed)" in said
    assert key["vault_key"] not in said

    with vendor_proxy.admin() as admin:
        assert admin.delete(f"/vault/keys/{key['key_id']}").status_code == 200
    said = refused_with(create, params={"amount": 100, "currency": "usd"})
    assert "refused (HTTP 401, keybrake_key_revoked)" in said
    assert fake_stripe.count("POST", "/v1/payment_intents") == 1


def test_twilio_cap_hits_and_refusals_end_the_pod(
    vendor_proxy: ServedProxy, fake_twilio: FakeTwilio
) -> None:
    # $0.02 a day: two one-segment messages ($0.0166) fit, a third ($0.0249) does not.
    key = issue_twilio(vendor_proxy, daily_usd_cap="0.02", allowed_endpoints=[MESSAGES])
    client = twilio_client(vendor_proxy, key["vault_key"])
    send = client.messages.create
    for body in ("one", "two"):
        pod.Caller(sleep=never_sleeps).call(send, to=US, from_=SENDER, body=body)
    # Unwatched, twilio's exception keeps the body's `details`, where keybrake names its code.
    said = refused_with(send, to=US, from_=SENDER, body="three")
    assert said.startswith("keybrake_pod: cap hit (HTTP 429, keybrake_daily_cap_exceeded)")

    pod.watch(client)
    said = refused_with(send, to=US, from_=SENDER, body="three")
    assert said.startswith("keybrake_pod: cap hit (HTTP 429, keybrake_daily_cap_exceeded)")
    said = refused_with(client.calls.create, to=US, from_=SENDER, url="https://example.com/t")
    assert "refused (HTTP 403, keybrake_endpoint_not_allowed)" in said
    assert fake_twilio.count("POST", "/Messages.json") == 2


def test_twilios_own_rate_limit_is_raised_as_it_is(
    vendor_proxy: ServedProxy, fake_twilio: FakeTwilio
) -> None:
    client = pod.watch(twilio_client(vendor_proxy, issue_twilio(vendor_proxy)["vault_key"]))
    fake_twilio.mode = "ratelimit"
    with pytest.raises(TwilioRestException) as raised:
        pod.Caller(sleep=never_sleeps).call(client.messages.create, to=US, from_=SENDER, body="x")
    assert raised.value.status == 429


def test_resend_cap_hits_end_the_pod_and_watched_refusals_too(
    vendor_proxy: ServedProxy, fake_resend: FakeResend, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = issue_resend(vendor_proxy, daily_usd_cap="0.002")  # two emails at $0.0009
    monkeypatch.setattr(resend, "api_url", vendor_proxy.url + "/resend")
    monkeypatch.setattr(resend, "api_key", key["vault_key"])
    monkeypatch.setattr(resend, "default_http_client", resend.default_http_client)

    def email(subject: str) -> Any:  # distinct: identical ones would be replays
        return {"from": "a@example.com", "to": ["b@example.com"], "subject": subject, "text": "t"}

    for subject in ("one", "two"):
        pod.Caller(sleep=never_sleeps).call(resend.Emails.send, email(subject))
    said = refused_with(resend.Emails.send, email("three"))  # unwatched: the headers tell
    assert said.startswith("keybrake_pod: cap hit (HTTP 429, keybrake_daily_cap_exceeded)")

    # The body is gone from resend's exception, but keybrake's code is in a header too.
    domains = resend.Domains.create
    said = refused_with(domains, {"name": "example.com"})
    assert "refused (HTTP 403, keybrake_endpoint_not_allowed)" in said
    pod.watch(resend)
    said = refused_with(domains, {"name": "example.com"})
    assert "refused (HTTP 403, keybrake_endpoint_not_allowed)" in said
    decisions = [row["decision"] for row in audit(vendor_proxy, key["key_id"])]
    assert decisions.count("endpoint_denied") == 2 and decisions.count("cap_hit") == 1


def test_a_full_call_rate_is_waited_out_as_its_retry_after_says(
    vendor_proxy: ServedProxy, fake_stripe: FakeStripe
) -> None:
    """The proxy's own 429 for a call rate: the helper waits its Retry-After (never exits 77)
    and sends the same call again; past its bound, the SDK's error is raised as it was."""
    key = vendor_proxy.issue(
        vendor="stripe",
        daily_usd_cap=10,
        allowed_endpoints=["POST /v1/payment_intents"],
        agent_run_label="argo/rate-run",
        constraints={"max_calls_per_minute": 1},
    )
    client = stripe.StripeClient(
        key["vault_key"], base_addresses={"api": vendor_proxy.url + "/stripe"}
    )
    create = client.v1.payment_intents.create
    waits: list[float] = []
    caller = pod.Caller(sleep=waits.append, max_waits=2, stream=io.StringIO())
    caller.call(create, params={"amount": 100, "currency": "usd"})
    with pytest.raises(stripe.RateLimitError) as raised:
        caller.call(create, params={"amount": 200, "currency": "usd"})
    assert raised.value.headers is not None
    assert raised.value.headers["X-Keybrake-Rate-Limited"] == "true"
    assert len(waits) == 2 and all(1 <= wait <= 61 for wait in waits)
    assert fake_stripe.count("POST", "/v1/payment_intents") == 1
