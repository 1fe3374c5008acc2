"""The pod helper (keybrake.hera_workflows.keybrake_pod): what it reads from keybrake's answers in
each vendor's error shape, how it runs an SDK call (a rate limit waited out in the pod, a refusal
exiting 77, everything else raised unchanged), the official SDKs against a scripted stand-in on
a loopback port, and that a pod needs nothing but the standard library to use it.

No test sleeps: the runner's sleep and clock are injected. The same answers through the real
proxy are in tests/test_keybrake_pod_proxy.py."""

from __future__ import annotations

import ast
import io
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import resend
import stripe
from twilio.base.exceptions import TwilioRestException
from twilio.rest import Client as TwilioClient

from keybrake.hera_workflows import keybrake_pod as pod
from keybrake.hera_workflows.retry import EXIT_REFUSED
from keybrake.proxy.decisions import CAP_HITS, Decision, refusal
from keybrake.proxy.pricing import load_pricing
from keybrake.proxy.settings import VendorCredentials
from keybrake.proxy.vendors import VENDORS, Vendor

MODULE = Path(pod.__file__)
VAULT_KEY = "kbv_" + "7" * 40 + ".item-1@charge-pod-1"
RATE_CODE = "keybrake_rate_limited"  # the proxy's rate-limit code; the helper reads the header


def vendor(name: str) -> Vendor:
    pricing = load_pricing(None, {n: cls.validate_pricing for n, cls in VENDORS.items()})
    credentials = VendorCredentials(f"http://{name}.invalid", "real-secret", "AC" + "ab" * 16)
    return VENDORS[name](credentials, pricing)


def rendered(name: str, status: int, code: str, message: str = "m") -> tuple[bytes, dict[str, str]]:
    """keybrake's refusal as the proxy answers it in `name`'s shape (`Pipeline._refusal`)."""
    body, headers = vendor(name).error(status, code, message)
    return body, {"Content-Type": "application/json", **headers}


def cap_hit(name: str, code: str = "keybrake_daily_cap_exceeded") -> tuple[bytes, dict[str, str]]:
    body, headers = rendered(name, 429, code, "The vault key's daily USD cap is reached.")
    return body, {**headers, "X-Keybrake-Cap-Hit": "true"}


def rate_limited(name: str, retry_after: str | None = "1") -> tuple[bytes, dict[str, str]]:
    body, headers = rendered(name, 429, RATE_CODE, "Too many calls: at most 60 a minute.")
    headers = {**headers, "X-Keybrake-Rate-Limited": "true"}
    return body, headers if retry_after is None else {**headers, "Retry-After": retry_after}


# -- the classifier: every refusal of the proxy, in each vendor's shape ------------------------

# What each refusal of keybrake.proxy.decisions is to a pod. A refusal added there later is
# checked by the rule: a keybrake code on a 4xx is final (408 and 5xx are not), a cap is a cap.
EXPECTED = {
    "keybrake_policy_changed": pod.AGAIN,  # judged twice against changing constraints
    "keybrake_unknown_vendor": pod.REFUSED,
    "keybrake_invalid_path": pod.REFUSED,
    "keybrake_secret_in_request": pod.REFUSED,
    "keybrake_body_too_large": pod.REFUSED,
    "keybrake_body_timeout": pod.PROXY_ERROR,
    "keybrake_missing_key": pod.REFUSED,
    "keybrake_invalid_key": pod.REFUSED,
    "keybrake_wrong_vendor": pod.REFUSED,
    "keybrake_key_revoked": pod.REFUSED,
    "keybrake_key_expired": pod.REFUSED,
    "keybrake_budget_revoked": pod.REFUSED,
    "keybrake_budget_expired": pod.REFUSED,
    "keybrake_endpoint_not_allowed": pod.REFUSED,
    "keybrake_account_not_allowed": pod.REFUSED,
    "keybrake_ambiguous_request": pod.REFUSED,
    "keybrake_unpriced_endpoint": pod.REFUSED,
    "keybrake_constraint_violated": pod.REFUSED,
    "keybrake_lookup_failed": pod.PROXY_ERROR,
    "keybrake_daily_cap_exceeded": pod.CAP_HIT,
    "keybrake_per_call_cap_exceeded": pod.CAP_HIT,
    "keybrake_caller_cap_exceeded": pod.CAP_HIT,
    "keybrake_total_cap_exceeded": pod.CAP_HIT,
    "keybrake_budget_exceeded": pod.CAP_HIT,
    # Stripe's own codes, answered as Stripe would: the SDK handles them (it retries a 409).
    "idempotency_key_in_use": pod.VENDOR_ERROR,
    "idempotency_error": pod.VENDOR_ERROR,
    "keybrake_outcome_unknown": pod.REFUSED,
    "keybrake_upstream_error": pod.PROXY_ERROR,
    "keybrake_outcome_not_recorded": pod.PROXY_ERROR,
    "keybrake_unavailable": pod.PROXY_ERROR,
    "keybrake_internal_error": pod.PROXY_ERROR,
}


def refusals() -> list[tuple[Decision, int, str]]:
    found = []
    for decision in Decision:
        try:
            status, code, _ = refusal(decision)
        except KeyError:
            continue
        found.append((decision, status, code))
    # Every code the helper is expected to read is among them (the loop below checks something).
    assert set(EXPECTED) <= {code for _, _, code in found}
    return found


def expected_kind(decision: Decision, status: int, code: str) -> str:
    if decision in CAP_HITS:
        return pod.CAP_HIT
    if code in EXPECTED:
        return EXPECTED[code]
    if status == 429:
        return pod.RATE_LIMITED
    if not code.startswith("keybrake_"):
        return pod.VENDOR_ERROR
    return pod.REFUSED if status < 500 and status != 408 else pod.PROXY_ERROR


@pytest.mark.parametrize("name", sorted(VENDORS))
def test_every_refusal_of_the_proxy_reads_right_in_each_vendor_shape(name: str) -> None:
    for decision, status, code in refusals():
        body, headers = rendered(name, status, code, "This vault key kbv_secret1 may not.")
        if decision in CAP_HITS:
            headers["X-Keybrake-Cap-Hit"] = "true"
        elif status == 429:  # a rate limit (issue 29): its header, never the cap hit's
            headers.update({"X-Keybrake-Rate-Limited": "true", "Retry-After": "7"})
        answer = pod.classify(status, headers, body)
        assert answer.kind == expected_kind(decision, status, code), (decision, answer)
        assert answer.status == status
        keybrake_code = code if code.startswith("keybrake_") else None
        assert answer.code == keybrake_code, (decision, answer)
        assert answer.message == "This vault key <redacted> may not."
        assert answer.final == (answer.kind in (pod.CAP_HIT, pod.REFUSED))


def test_the_helper_knows_the_proxys_cap_codes_and_exit_code() -> None:
    assert {refusal(d)[1] for d in CAP_HITS} == pod._CAP_CODES
    assert pod._AGAIN_CODES == {refusal(Decision.POLICY_CHANGED)[1]}
    assert pod.EXIT_REFUSED == EXIT_REFUSED == 77


@pytest.mark.parametrize("name", sorted(VENDORS))
def test_a_cap_hit_or_a_rate_limit_whose_header_was_lost_still_reads_from_the_code(
    name: str,
) -> None:
    body, _ = rendered(name, 429, "keybrake_total_cap_exceeded")
    assert pod.classify(429, {}, body).kind == pod.CAP_HIT
    body, _ = rendered(name, 429, RATE_CODE)
    answer = pod.classify(429, {"Retry-After": "4"}, body)
    assert (answer.kind, answer.retry_after) == (pod.RATE_LIMITED, 4.0)


@pytest.mark.parametrize("name", sorted(VENDORS))
def test_a_constraint_refusal_is_final(name: str) -> None:
    body, headers = rendered(name, 403, "keybrake_constraint_violated", "to: +1500 is outside")
    answer = pod.classify(403, headers, body)
    assert answer.kind == pod.REFUSED and answer.final
    assert answer.code == "keybrake_constraint_violated"


def test_the_vendors_own_answers_are_vendor_errors() -> None:
    stripe_429 = {"error": {"type": "invalid_request_error", "code": "rate_limit", "message": "x"}}
    assert pod.classify(429, {"Retry-After": "1"}, stripe_429).kind == pod.VENDOR_ERROR
    twilio_429 = {"code": 20429, "message": "Too Many Requests", "status": 429}
    assert pod.classify(429, {}, twilio_429).kind == pod.VENDOR_ERROR
    declined = {"error": {"type": "card_error", "code": "card_declined", "message": "declined"}}
    answer = pod.classify(402, {}, json.dumps(declined))
    assert (answer.kind, answer.code, answer.message) == (pod.VENDOR_ERROR, None, "declined")
    assert pod.classify(500, {}, b"<html>bad gateway</html>").kind == pod.VENDOR_ERROR
    assert pod.classify(200, {"X-Keybrake-Cap-Hit": "true"}, b"{}").kind == pod.OK
    assert pod.classify(None).kind == pod.OK


def test_headers_are_read_whatever_their_case_and_odd_bodies_are_survived() -> None:
    answer = pod.classify(429, {"x-KEYBRAKE-rate-limited": "True", "RETRY-AFTER": " 2 "}, None)
    assert (answer.kind, answer.retry_after, answer.code) == (pod.RATE_LIMITED, 2.0, None)
    assert pod.classify(429, {"X-Keybrake-Cap-Hit": "TRUE"}, "not json").kind == pod.CAP_HIT
    assert pod.classify(403, None, ["a", "list"]).kind == pod.VENDOR_ERROR
    assert pod.classify(403, {"a": "b"}, {"error": "text"}).kind == pod.VENDOR_ERROR
    huge = json.dumps({"keybrake_code": "keybrake_key_revoked", "pad": "x" * 70_000})
    assert pod.classify(401, {}, huge).kind == pod.VENDOR_ERROR  # too large to be keybrake's
    long_message = {"keybrake_code": "keybrake_key_revoked", "message": "word " * 200}
    assert len(pod.classify(401, {}, long_message).message) == 300


def test_retry_after_reads_seconds_and_dates_and_refuses_the_rest() -> None:
    assert pod.retry_after_seconds("3") == 3.0
    assert pod.retry_after_seconds("0.5") == 0.5
    assert pod.retry_after_seconds("0") == 0.0
    now = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    later = format_datetime(now + timedelta(seconds=42), usegmt=True)
    assert pod.retry_after_seconds(later, now=now.timestamp()) == 42.0
    earlier = format_datetime(now - timedelta(seconds=42), usegmt=True)
    assert pod.retry_after_seconds(earlier, now=now.timestamp()) == 0.0
    for unreadable in (None, "", "soon", "-1", "nan", "inf", "1e400", "Wed, 99 Foo 2026"):
        assert pod.retry_after_seconds(unreadable) is None, unreadable


# -- the official SDKs' exceptions, read by duck typing ----------------------------------------


def stripe_error(cls: type[stripe.StripeError], status: int, body: bytes, headers: dict[str, str]):
    parsed = json.loads(body)
    return cls(
        parsed["error"]["message"],
        http_body=body,
        http_status=status,
        json_body=parsed,
        headers=headers,
        code=parsed["error"]["code"],
    )


def test_stripe_errors_are_read_whole() -> None:
    body, headers = cap_hit("stripe", "keybrake_budget_exceeded")
    answer = pod.classify_error(stripe_error(stripe.RateLimitError, 429, body, headers))
    assert answer is not None
    assert (answer.kind, answer.code) == (pod.CAP_HIT, "keybrake_budget_exceeded")
    body, headers = rate_limited("stripe", "3")
    answer = pod.classify_error(stripe_error(stripe.RateLimitError, 429, body, headers))
    assert answer is not None and (answer.kind, answer.retry_after) == (pod.RATE_LIMITED, 3.0)
    body, headers = rendered("stripe", 403, "keybrake_endpoint_not_allowed")
    answer = pod.classify_error(stripe_error(stripe.PermissionError, 403, body, headers))
    assert answer is not None and answer.kind == pod.REFUSED
    body, headers = rendered("stripe", 401, "keybrake_key_revoked")
    answer = pod.classify_error(stripe_error(stripe.AuthenticationError, 401, body, headers))
    assert answer is not None and answer.kind == pod.REFUSED
    vendor_429 = stripe.RateLimitError("slow down", http_status=429, headers={}, code="rate_limit")
    answer = pod.classify_error(vendor_429)
    assert answer is not None and answer.kind == pod.VENDOR_ERROR
    assert pod.classify_error(stripe.APIConnectionError("connection refused")) is None


def test_twilio_errors_keep_no_answer_so_unwatched_they_are_vendor_errors() -> None:
    # What twilio raises for keybrake's cap hit: status and Twilio's code, no headers, no body.
    error = TwilioRestException(429, "/Messages.json", "Unable to create record: cap", 20429)
    answer = pod.classify_error(error)
    assert answer is not None
    assert (answer.kind, answer.status) == (pod.VENDOR_ERROR, 429)
    # A body whose details carry keybrake's code would be enough.
    detailed = TwilioRestException(403, "/x", "no", 20403, "POST", {"keybrake_code": "keybrake_x"})
    answer = pod.classify_error(detailed)
    assert answer is not None and answer.kind == pod.REFUSED


def test_resend_errors_keep_the_headers() -> None:
    _, headers = cap_hit("resend")
    error = resend.exceptions.RateLimitError("cap", "daily_quota_exceeded", "429", headers)
    answer = pod.classify_error(error)
    assert answer is not None and answer.kind == pod.CAP_HIT
    _, headers = rate_limited("resend", "9")
    error = resend.exceptions.RateLimitError("slow", "rate_limit_exceeded", 429, headers)
    answer = pod.classify_error(error)
    assert answer is not None and (answer.kind, answer.retry_after) == (pod.RATE_LIMITED, 9.0)
    client_side = resend.exceptions.ResendError("HttpClientError", "boom", "", "")
    assert pod.classify_error(client_side) is None


def test_http_clients_errors_are_read_from_their_response() -> None:
    body, headers = rendered("resend", 403, "keybrake_endpoint_not_allowed")
    request = httpx.Request("POST", "http://proxy.invalid/resend/emails")
    response = httpx.Response(403, headers=headers, content=body, request=request)
    error = httpx.HTTPStatusError("403", request=request, response=response)
    answer = pod.classify_error(error)
    assert answer is not None and answer.kind == pod.REFUSED
    assert pod.classify_error(ValueError("a bug")) is None


# -- the runner ----------------------------------------------------------------------------------


@dataclass
class FakeTime:
    """The runner's sleep and clock: sleeping moves the clock."""

    now: float = 1000.0
    slept: list[float] = field(default_factory=list)

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now


def caller(clock: FakeTime, **options: Any) -> tuple[pod.Caller, io.StringIO]:
    said = io.StringIO()
    return pod.Caller(sleep=clock.sleep, clock=clock.clock, stream=said, **options), said


def stripe_rate_limit(retry_after: str | None) -> stripe.RateLimitError:
    body, headers = rate_limited("stripe", retry_after)
    return stripe_error(stripe.RateLimitError, 429, body, headers)


def failing(*errors: BaseException, then: object = "done") -> tuple[Callable[..., object], list]:
    """A call raising `errors` one after the other, then returning `then`; and its calls."""
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    pending = list(errors)

    def fn(*args: Any, **kwargs: Any) -> object:
        calls.append((args, kwargs))
        if pending:
            raise pending.pop(0)
        return then

    return fn, calls


def test_a_rate_limit_is_waited_out_and_the_same_call_sent_again() -> None:
    clock = FakeTime()
    run, said = caller(clock)
    fn, calls = failing(stripe_rate_limit("2"), stripe_rate_limit("1"), then={"id": "pi_1"})
    assert run.call(fn, params={"amount": 100}, fn="a kwarg named fn") == {"id": "pi_1"}
    assert calls == [((), {"params": {"amount": 100}, "fn": "a kwarg named fn"})] * 3
    assert clock.slept == [2.0, 1.0]
    lines = said.getvalue().splitlines()
    assert len(lines) == 2 and all(line.startswith("keybrake_pod: rate limited") for line in lines)
    assert "waiting 2s before sending it again (wait 1 of at most 30)" in lines[0]


def test_a_missing_unreadable_or_huge_retry_after_is_bounded() -> None:
    clock = FakeTime()
    run, _ = caller(clock, default_wait=3, max_wait=20)
    fn, _ = failing(stripe_rate_limit(None), stripe_rate_limit("soon"), stripe_rate_limit("3600"))
    assert run.call(fn) == "done"
    assert clock.slept == [3.0, 3.0, 20.0]


def test_waits_are_bounded_in_number_then_the_sdks_error_is_raised_unchanged() -> None:
    clock = FakeTime()
    run, said = caller(clock, max_waits=2)
    errors = [stripe_rate_limit("1") for _ in range(3)]
    fn, calls = failing(*errors)
    with pytest.raises(stripe.RateLimitError) as raised:
        run.call(fn)
    assert raised.value is errors[2]
    assert len(calls) == 3 and clock.slept == [1.0, 1.0]
    assert "still rate limited after 2 wait(s), giving up" in said.getvalue().splitlines()[-1]


def test_waits_are_bounded_in_time() -> None:
    clock = FakeTime()
    run, _ = caller(clock, max_total_wait=25, max_wait=60)
    fn, calls = failing(*[stripe_rate_limit("10") for _ in range(5)])
    with pytest.raises(stripe.RateLimitError):
        run.call(fn)
    assert clock.slept == [10.0, 10.0]  # a third wait would end past 25 s
    assert len(calls) == 3


@pytest.mark.parametrize(
    ("answer", "line"),
    [
        (cap_hit("stripe"), "cap hit (HTTP 429, keybrake_daily_cap_exceeded)"),
        (
            rendered("stripe", 403, "keybrake_constraint_violated", "currency eur: not allowed"),
            "refused (HTTP 403, keybrake_constraint_violated): currency eur: not allowed",
        ),
    ],
)
def test_a_final_answer_exits_77_and_says_why_without_secrets(
    answer: tuple[bytes, dict[str, str]], line: str
) -> None:
    body, headers = answer
    headers = {**headers, "Authorization": f"Bearer {VAULT_KEY}"}  # never printed
    clock = FakeTime()
    run, said = caller(clock)
    status = 429 if "cap hit" in line else 403
    fn, calls = failing(stripe_error(stripe.StripeError, status, body, headers))
    with pytest.raises(SystemExit) as exited:
        run.call(fn)
    assert exited.value.code == 77
    assert len(calls) == 1 and clock.slept == []
    (printed,) = said.getvalue().splitlines()
    assert printed.startswith(f"keybrake_pod: {line}")
    assert printed.endswith("; exiting 77: Argo does not retry it")
    assert "kbv_" not in printed and "Authorization" not in printed


def test_a_final_answer_can_be_caught_instead() -> None:
    body, headers = cap_hit("stripe")
    error = stripe_error(stripe.RateLimitError, 429, body, headers)
    run, said = caller(FakeTime(), exit_on_refusal=False)
    fn, _ = failing(error)
    with pytest.raises(pod.Refused) as raised:
        run.call(fn)
    assert raised.value.answer.kind == pod.CAP_HIT and raised.value.__cause__ is error
    assert said.getvalue() == ""


def test_everything_else_is_raised_unchanged_at_once() -> None:
    clock = FakeTime()
    run, said = caller(clock)
    body, headers = rendered("stripe", 503, "keybrake_unavailable")
    for error in (
        stripe.RateLimitError("vendor's own", http_status=429, headers={"Retry-After": "1"}),
        stripe.CardError("declined", None, "card_declined", http_status=402),
        stripe_error(stripe.APIError, 503, body, headers),
        stripe.APIConnectionError("refused"),
        ValueError("a bug in the pod"),
    ):
        fn, calls = failing(error)
        with pytest.raises(type(error)) as raised:
            run.call(fn)
        assert raised.value is error and len(calls) == 1
    assert clock.slept == [] and said.getvalue() == ""


def test_the_module_level_call_runs_a_default_caller() -> None:
    fn, calls = failing(stripe_rate_limit("0"))  # waits 0 s: no real sleep
    assert pod.call(fn, 1, two=2) == "done"
    assert calls == [((1,), {"two": 2})] * 2
    body, headers = cap_hit("stripe")
    fn, _ = failing(stripe_error(stripe.RateLimitError, 429, body, headers))
    with pytest.raises(SystemExit) as exited:
        pod.call(fn)
    assert exited.value.code == 77


def test_bad_bounds_are_refused() -> None:
    for options in ({"max_wait": -1}, {"max_total_wait": float("inf")}, {"max_waits": 1.5}):
        with pytest.raises(ValueError):
            pod.Caller(**options)


# -- the official SDKs against a scripted stand-in ---------------------------------------------


@dataclass
class Scripted:
    """A stand-in for keybrake on a loopback port: each request gets the next scripted answer
    (status, headers, body); the last one repeats. `requests` counts what arrived."""

    answers: list[tuple[int, dict[str, str], bytes]]
    requests: list[str] = field(default_factory=list)
    url: str = ""


@pytest.fixture
def scripted() -> Iterator[Scripted]:
    script = Scripted([])

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            script.requests.append(f"{self.command} {self.path}")
            index = min(len(script.requests), len(script.answers)) - 1
            status, headers, body = script.answers[index]
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    # (A short poll: `shutdown` waits for the loop's next look, 0.5 s by default.)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    script.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield script
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


class StripeSleeps:
    """stripe-python's `time` module, its sleeps recorded instead of slept."""

    def __init__(self) -> None:
        self.slept: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def stripe_client(url: str, **options: Any) -> stripe.StripeClient:
    return stripe.StripeClient(VAULT_KEY, base_addresses={"api": url}, **options)


INTENT = (200, {"Content-Type": "application/json", "Request-Id": "req_1"}, b'{"id": "pi_1"}')


def test_stripe_python_alone_ignores_retry_after_and_the_helper_waits_it(
    scripted: Scripted, monkeypatch: pytest.MonkeyPatch
) -> None:
    sdk_time = StripeSleeps()
    monkeypatch.setattr(stripe._http_client, "time", sdk_time)
    # Told to retry, stripe-python retries (twice: the global API's default; a StripeClient's
    # is none) on its own backoff, never the 30 s asked.
    body, headers = rate_limited("stripe", "30")
    scripted.answers = [(429, {**headers, "Stripe-Should-Retry": "true"}, body)]
    retrying = stripe_client(scripted.url, max_network_retries=2)
    with pytest.raises(stripe.RateLimitError):
        retrying.v1.payment_intents.create(params={"amount": 100})
    assert len(scripted.requests) == 3
    assert len(sdk_time.slept) == 2 and all(s < 5 for s in sdk_time.slept)

    # As keybrake answers (Stripe-Should-Retry: false): no retry at all.
    scripted.requests.clear()
    body, headers = rate_limited("stripe", "1")
    scripted.answers = [(429, headers, body), (429, headers, body), INTENT]
    client = stripe_client(scripted.url, max_network_retries=2)  # told it may: it does not
    with pytest.raises(stripe.RateLimitError):
        client.v1.payment_intents.create(params={"amount": 100})
    assert scripted.requests == ["POST /v1/payment_intents"]

    # The helper waits Retry-After and sends it again, until it goes through.
    scripted.requests.clear()
    clock = FakeTime()
    run, said = caller(clock)
    intent = run.call(client.v1.payment_intents.create, params={"amount": 100})
    assert intent.id == "pi_1"
    assert scripted.requests == ["POST /v1/payment_intents"] * 3
    assert clock.slept == [1.0, 1.0]
    assert len(sdk_time.slept) == 2  # stripe-python slept no more
    assert VAULT_KEY not in said.getvalue() and "kbv_" not in said.getvalue()


def test_stripe_through_the_helper_exits_77_on_a_cap_hit(scripted: Scripted) -> None:
    body, headers = cap_hit("stripe")
    scripted.answers = [(429, headers, body)]
    with pytest.raises(SystemExit) as exited:
        caller(FakeTime())[0].call(
            stripe_client(scripted.url).v1.payment_intents.create, params={"amount": 100}
        )
    assert exited.value.code == 77 and len(scripted.requests) == 1


def twilio_client(url: str) -> TwilioClient:
    client = TwilioClient("AC" + "0" * 32, VAULT_KEY)
    client.api.base_url = url + "/twilio"
    return client


MESSAGE = (201, {"Content-Type": "application/json"}, b'{"sid": "SM1", "status": "queued"}')


def test_twilio_refusals_read_from_details_and_waits_from_watching(scripted: Scripted) -> None:
    """twilio-python's exception keeps only the body's `details`, where keybrake puts its code:
    a refusal is told from Twilio's own errors unwatched. The `Retry-After` header is seen only
    when watched."""
    body, headers = rendered("twilio", 403, "keybrake_constraint_violated", "To is outside")
    scripted.answers = [(403, headers, body)]
    client = twilio_client(scripted.url)
    send = client.messages.create
    with pytest.raises(SystemExit) as exited:  # unwatched
        caller(FakeTime())[0].call(send, to="+15005550006", from_="+14155550199", body="x")
    assert exited.value.code == 77

    assert pod.watch(client) is client and pod.watch(client) is client  # twice: no change
    scripted.answers = [(403, headers, body)]
    with pytest.raises(SystemExit) as exited:
        caller(FakeTime())[0].call(send, to="+15005550006", from_="+14155550199", body="x")
    assert exited.value.code == 77

    scripted.requests.clear()
    body, headers = rate_limited("twilio", "2")
    scripted.answers = [(429, headers, body), MESSAGE]
    clock = FakeTime()
    message = caller(clock)[0].call(send, to="+442071838750", from_="+14155550199", body="hi")
    assert message.sid == "SM1" and clock.slept == [2.0] and len(scripted.requests) == 2

    # Twilio's own 429 stays Twilio's: raised, not waited.
    scripted.answers = [(429, {}, b'{"code": 20429, "message": "Too Many Requests"}')]
    with pytest.raises(TwilioRestException):
        caller(clock)[0].call(send, to="+442071838750", from_="+14155550199", body="hi")
    assert clock.slept == [2.0]


def test_resend_refusals_need_watching_its_cap_hits_and_rate_limits_do_not(
    scripted: Scripted, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(resend, "api_url", scripted.url + "/resend")
    monkeypatch.setattr(resend, "api_key", VAULT_KEY)
    monkeypatch.setattr(resend, "default_http_client", resend.default_http_client)
    email: Any = {"from": "a@example.com", "to": ["b@example.org"], "subject": "s", "text": "t"}
    sent = (200, {"Content-Type": "application/json"}, b'{"id": "em_1"}')

    body, headers = rate_limited("resend", "3")
    scripted.answers = [(429, headers, body), sent]
    clock = FakeTime()
    assert caller(clock)[0].call(resend.Emails.send, email)["id"] == "em_1"
    assert clock.slept == [3.0]

    body, headers = cap_hit("resend")
    scripted.answers = [(429, headers, body)]
    with pytest.raises(SystemExit):
        caller(clock)[0].call(resend.Emails.send, email)

    body, headers = rendered("resend", 403, "keybrake_constraint_violated", "b@example.org")
    scripted.answers = [(403, headers, body)]
    with pytest.raises(resend.exceptions.ResendError):
        caller(clock)[0].call(resend.Emails.send, email)
    assert pod.watch(resend) is resend
    with pytest.raises(SystemExit) as exited:
        caller(clock)[0].call(resend.Emails.send, email)
    assert exited.value.code == 77


def test_watch_takes_only_what_it_can_wrap() -> None:
    with pytest.raises(TypeError):
        pod.watch(object())


# -- a pod needs the standard library only -----------------------------------------------------


def test_the_module_imports_the_standard_library_only_and_parses_as_python_3_8() -> None:
    tree = ast.parse(MODULE.read_text(encoding="utf-8"), feature_version=(3, 8))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "no relative imports: the file is copied alone"
            imported.add((node.module or "").split(".")[0])
    assert imported - {"__future__"} <= sys.stdlib_module_names, imported


def test_a_copy_runs_in_an_interpreter_without_site_packages(tmp_path: Path) -> None:
    printed = subprocess.run(
        [sys.executable, "-m", "keybrake.hera_workflows.keybrake_pod"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert printed == MODULE.read_text(encoding="utf-8")
    (tmp_path / "keybrake_pod.py").write_text(printed)
    probe = (
        "import sys\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "import keybrake_pod\n"
        "answer = keybrake_pod.classify(429, {'X-Keybrake-Cap-Hit': 'true'}, b'{}')\n"
        "assert answer.final, answer\n"
        "stray = [m for m in sys.modules if m.split('.')[0] not in sys.stdlib_module_names\n"
        "         and m not in ('keybrake_pod', '__main__')]\n"
        "assert not stray, stray\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", probe], capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "ok\n", "")


def test_a_pod_process_exits_77_on_a_cap_hit(scripted: Scripted, tmp_path: Path) -> None:
    """A pod as the Hera pattern writes it: the copied helper beside its code, the SDK from the
    environment the fan-out gives it."""
    (tmp_path / "keybrake_pod.py").write_text(MODULE.read_text(encoding="utf-8"))
    (tmp_path / "charge.py").write_text(
        "import os, stripe, keybrake_pod\n"
        "client = stripe.StripeClient(os.environ['STRIPE_SECRET_KEY'],\n"
        "                             base_addresses={'api': os.environ['STRIPE_BASE_URL']})\n"
        "keybrake_pod.call(client.v1.payment_intents.create,\n"
        "                  params={'amount': 100, 'currency': 'usd'})\n"
        "print('charged')\n"
    )
    body, headers = cap_hit("stripe")
    scripted.answers = [(429, headers, body)]
    env = {"STRIPE_SECRET_KEY": VAULT_KEY, "STRIPE_BASE_URL": scripted.url, "PATH": "/usr/bin"}
    done = subprocess.run(
        [sys.executable, str(tmp_path / "charge.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 77, done.stderr
    assert done.stdout == ""
    assert done.stderr.startswith("keybrake_pod: cap hit (HTTP 429, keybrake_daily_cap_exceeded)")
    assert "kbv_" not in done.stderr


def test_a_call_the_proxy_asks_to_send_again_is_sent_again() -> None:
    """The key's constraints changed twice while the proxy admitted the call (a 409 that
    forwarded nothing): the helper sends the same call again after `Retry-After`, never exits
    77 for it."""
    body, headers = rendered("stripe", 409, "keybrake_policy_changed", "changed meanwhile")
    headers["Retry-After"] = "1"
    answer = pod.classify(409, headers, body)
    assert (answer.kind, answer.retry_after, answer.final) == (pod.AGAIN, 1.0, False)
    clock = FakeTime()
    run, said = caller(clock)
    fn, calls = failing(stripe_error(stripe.APIError, 409, body, headers), then={"id": "pi_1"})
    assert run.call(fn) == {"id": "pi_1"}
    assert len(calls) == 2 and clock.slept == [1.0]
    assert "waiting 1s before sending it again" in said.getvalue()


def test_a_cap_hit_header_is_final_whatever_its_code_and_a_deep_body_is_no_crash() -> None:
    """A cap code this copy of the helper does not know (a newer proxy's) still reads as a cap
    hit by its header, never as a rate limit to wait on; a deeply nested body is not keybrake's
    answer, and reading it raises nothing."""
    unknown = {"error": {"code": "keybrake_some_new_cap_exceeded", "message": "x"}}
    answer = pod.classify(429, {"X-Keybrake-Cap-Hit": "true", "Retry-After": "5"}, unknown)
    assert (answer.kind, answer.final) == (pod.CAP_HIT, True)
    deep = b"[" * 10_000 + b"]" * 10_000
    assert pod.classify(502, {}, deep).kind == pod.VENDOR_ERROR
