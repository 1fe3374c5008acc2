"""Twilio through the proxy on a loopback socket (the app `keybrake serve` runs, served from a
thread of the test process), with the official twilio SDK as the client and a Twilio-shaped fake
as the upstream: credentials swapped, prices, caps, refusals, secrets."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
import resend
import stripe
from starlette.testclient import TestClient
from twilio.base.exceptions import TwilioRestException

from tests.fakes.resend_upstream import REAL_KEY, FakeResend
from tests.fakes.stripe_upstream import FakeStripe
from tests.fakes.twilio_upstream import REAL_SID, REAL_TOKEN, FakeTwilio
from tests.inproc import StubUpstream, app_client, issue
from tests.served import ServedProxy
from tests.vendor_helpers import (
    MESSAGES,
    PLACEHOLDER_SID,
    audit,
    issue_resend,
    issue_twilio,
    key_info,
    raw_twilio,
    serve_vendor_proxy,
    twilio_client,
)

pytest_plugins = ["tests.vendor_fixtures"]

US = "+14155550100"
UK = "+447700900123"
SENDER = "+14155550199"
CALLS = "POST /2010-04-01/Accounts/*/Calls.json"

Printed = Callable[[], str]


def test_sdk_sends_through_the_proxy_with_the_real_account(
    vendor_proxy: ServedProxy, fake_twilio: FakeTwilio
) -> None:
    key = issue_twilio(vendor_proxy)
    client = twilio_client(vendor_proxy, key["vault_key"] + ".pod-3")

    message = client.messages.create(to=US, from_=SENDER, body="Your order has shipped")

    assert message.sid.startswith("SM") and message.status == "queued"
    assert message.price is None  # Twilio has not billed it yet
    sent = fake_twilio.requests[-1]
    assert sent["path"] == f"/2010-04-01/Accounts/{REAL_SID}/Messages.json"
    basic = base64.b64encode(f"{REAL_SID}:{REAL_TOKEN}".encode()).decode()
    assert sent["headers"]["authorization"] == f"Basic {basic}"
    assert key["vault_key"] not in repr(sent)
    assert sent["form"]["Body"] == ["Your order has shipped"]

    row = audit(vendor_proxy, key["key_id"])[0]
    assert row["decision"] == "forwarded" and row["status"] == 201
    assert row["path"] == f"/2010-04-01/Accounts/{PLACEHOLDER_SID}/Messages.json"
    assert row["vendor_request_id"].startswith("RQ")
    assert row["caller_tag"] == "pod-3"
    # 22 GSM-7 characters: one segment at the "+1" price, $0.0083; no price in the answer, so
    # the estimate is what the call costs.
    assert (row["reserved_usd"], row["settled_usd"]) == ("0.0083", "0.0083")
    assert (row["amount"], row["currency"]) == (1, "sms_segment")

    # Later Twilio has sent and billed it: `price` is set on the fetched message (a read, free).
    fetched = client.messages(message.sid).fetch()
    assert fetched.price == "-0.00830" and fetched.status == "delivered"
    info = key_info(vendor_proxy, key["key_id"])
    assert info["spent_usd"] == "0.0083" and info["reserved_usd"] == "0.00"


def test_a_price_in_the_answer_settles_the_call(
    vendor_proxy: ServedProxy, fake_twilio: FakeTwilio
) -> None:
    key = issue_twilio(vendor_proxy)
    fake_twilio.price_on_create = "-0.01500"
    client = twilio_client(vendor_proxy, key["vault_key"])
    # 200 ASCII characters: over 160, so parts of 153 -> ceil(200 / 153) = 2 segments,
    # reserved 2 x $0.0083 = $0.0166; Twilio's answer says $0.015, and that is what is spent.
    message = client.messages.create(to=US, from_=SENDER, body="x" * 200)
    assert message.price == "-0.01500"
    row = audit(vendor_proxy, key["key_id"])[0]
    assert (row["reserved_usd"], row["settled_usd"], row["amount"]) == ("0.0166", "0.015", 2)
    assert key_info(vendor_proxy, key["key_id"])["spent_usd"] == "0.015"


def test_segments_media_and_destination_price_the_reservation(
    vendor_proxy: ServedProxy, fake_twilio: FakeTwilio
) -> None:
    key = issue_twilio(vendor_proxy, dedupe_window="0")
    client = twilio_client(vendor_proxy, key["vault_key"])
    # 71 Cyrillic letters are UCS-2: over 70, parts of 67 -> 67 + 4 = 2 segments x $0.0083.
    client.messages.create(to=US, from_=SENDER, body="я" * 71)
    # One emoji makes the body UCS-2 and counts two code units: "Done " (5) + 😀 (2) = 7 -> 1.
    client.messages.create(to=US, from_=SENDER, body="Done 😀")
    # A UK number matches no prefix but "default": 1 segment x $0.15.
    client.messages.create(to=UK, from_=SENDER, body="hi")
    # Media makes it an MMS: one message at the "+1" MMS price, $0.022, ...
    client.messages.create(
        to=US, from_=SENDER, body="Your receipt", media_url=["https://example.com/cat.png"]
    )
    # ... unless MMS Converter's SMS would cost more (a carrier without MMS gets the body and a
    # link): 300 + 36 = 336 characters, 3 segments, $0.0249.
    client.messages.create(
        to=US, from_=SENDER, body="x" * 300, media_url=["https://example.com/cat.png"]
    )
    rows = audit(vendor_proxy, key["key_id"])[::-1]
    assert [(r["reserved_usd"], r["amount"], r["currency"]) for r in rows] == [
        ("0.0166", 2, "sms_segment"),
        ("0.0083", 1, "sms_segment"),
        ("0.15", 1, "sms_segment"),
        ("0.022", 1, "mms"),
        ("0.0249", 3, "sms_segment"),
    ]
    assert fake_twilio.requests[-1]["form"]["MediaUrl"] == ["https://example.com/cat.png"]
    # 0.0166 + 0.0083 + 0.15 + 0.022 + 0.0249 = 0.2218
    assert key_info(vendor_proxy, key["key_id"])["spent_usd"] == "0.2218"


def test_cap_hit_is_a_twilio_shaped_429_and_the_sdk_raises_as_usual(
    vendor_proxy: ServedProxy, fake_twilio: FakeTwilio
) -> None:
    # $0.02 a day: two one-segment messages ($0.0166) fit, a third ($0.0249) does not.
    key = issue_twilio(vendor_proxy, daily_usd_cap="0.02")
    client = twilio_client(vendor_proxy, key["vault_key"])
    client.messages.create(to=US, from_=SENDER, body="one")
    client.messages.create(to=US, from_=SENDER, body="two")
    with pytest.raises(TwilioRestException) as raised:
        client.messages.create(to=US, from_=SENDER, body="three")
    assert raised.value.status == 429 and raised.value.code == 20429
    assert "daily USD cap" in raised.value.msg

    response = raw_twilio(vendor_proxy, key["vault_key"], {"To": US, "From": SENDER, "Body": "4"})
    assert response.status_code == 429
    assert response.headers["x-keybrake-cap-hit"] == "true"
    body = response.json()
    assert {"code", "message", "more_info", "status"} <= set(body)
    assert (body["code"], body["status"]) == (20429, 429)
    assert body["keybrake_code"] == "keybrake_daily_cap_exceeded"
    assert fake_twilio.count("POST", "/Messages.json") == 2
    assert key_info(vendor_proxy, key["key_id"])["spent_usd"] == "0.0166"


def test_vendor_429_passes_through_without_the_cap_hit_header(
    vendor_proxy: ServedProxy, fake_twilio: FakeTwilio
) -> None:
    key = issue_twilio(vendor_proxy)
    fake_twilio.mode = "ratelimit"
    response = raw_twilio(vendor_proxy, key["vault_key"], {"To": US, "From": SENDER, "Body": "x"})
    assert response.status_code == 429 and response.json()["code"] == 20429
    assert "x-keybrake-cap-hit" not in response.headers
    assert "keybrake_code" not in response.json()
    info = key_info(vendor_proxy, key["key_id"])
    assert info["spent_usd"] == "0.00" and info["reserved_usd"] == "0.00"


def test_calls_and_other_unpriced_writes_are_refused(
    vendor_proxy: ServedProxy, fake_twilio: FakeTwilio
) -> None:
    key = issue_twilio(
        vendor_proxy,
        allowed_endpoints=[MESSAGES, CALLS, "GET /2010-04-01/Accounts/*", "POST /2010-04-01/*"],
    )
    client = twilio_client(vendor_proxy, key["vault_key"])
    with pytest.raises(TwilioRestException) as raised:
        client.calls.create(to=US, from_=SENDER, url="https://example.com/twiml.xml")
    assert raised.value.status == 403
    assert "no price for POST" in raised.value.msg and "[twilio.endpoints]" in raised.value.msg
    # The account resource carries the auth token: refused even as a read.
    with pytest.raises(TwilioRestException) as account:
        client.api.v2010.accounts(PLACEHOLDER_SID).fetch()
    assert account.value.status == 403
    # Creating a subaccount is outside any account path: refused.
    with pytest.raises(TwilioRestException) as subaccount:
        client.api.v2010.accounts.create(friendly_name="escape")
    assert subaccount.value.status == 403
    # A message without a body to count (a content template) cannot be priced.
    with pytest.raises(TwilioRestException) as template:
        client.messages.create(to=US, from_=SENDER, content_sid="HX" + "1" * 32)
    assert template.value.status == 403 and "ContentSid" in template.value.msg
    assert fake_twilio.requests == []
    decisions = {r["decision"] for r in audit(vendor_proxy, key["key_id"])}
    assert decisions == {"unpriceable"}


def test_an_operator_prices_calls_and_destinations(
    tmp_path: Path, fake_stripe: FakeStripe, fake_twilio: FakeTwilio, fake_resend: FakeResend
) -> None:
    pricing = (
        "[twilio.endpoints]\n"
        '"POST /2010-04-01/Accounts/*/Calls.json" = { usd = "0.50" }\n'
        "[twilio.sms]\n"
        '"+44" = "0.0400"\n'
    )
    proxy = serve_vendor_proxy(tmp_path, fake_stripe, fake_twilio, fake_resend, pricing)
    try:
        key = issue_twilio(proxy, allowed_endpoints=[MESSAGES, CALLS], dedupe_window="0")
        client = twilio_client(proxy, key["vault_key"])
        call = client.calls.create(to=US, from_=SENDER, url="https://example.com/twiml.xml")
        assert call.sid.startswith("CA")
        client.messages.create(to=UK, from_=SENDER, body="hi")
        rows = audit(proxy, key["key_id"])[::-1]
        with proxy.admin() as admin:
            table = admin.get("/vault/pricing").json()
    finally:
        proxy.stop()
    assert [r["reserved_usd"] for r in rows] == ["0.50", "0.04"]
    assert table["twilio"]["endpoints"]["POST /2010-04-01/Accounts/*/Calls.json"] == {"usd": "0.50"}
    sms = table["twilio"]["sms"]
    assert (sms["default"], sms["+1"], sms["+44"], sms["+1876"]) == (
        "0.1500",
        "0.0083",
        "0.0400",
        "0.1500",  # shipped: the rest of the North American plan at "default"
    )
    assert fake_twilio.count("POST", "/Calls.json") == 1


def test_a_retried_message_is_deduplicated(
    vendor_proxy: ServedProxy, fake_twilio: FakeTwilio
) -> None:
    # Twilio has no idempotency header, so a pod retried by Argo would send the SMS again; the
    # key's dedupe window answers the identical request from the first answer instead.
    key = issue_twilio(vendor_proxy)
    client = twilio_client(vendor_proxy, key["vault_key"])
    first = client.messages.create(to=US, from_=SENDER, body="Your code is 123456")
    again = client.messages.create(to=US, from_=SENDER, body="Your code is 123456")
    assert again.sid == first.sid
    assert fake_twilio.count("POST", "/Messages.json") == 1
    assert [r["decision"] for r in audit(vendor_proxy, key["key_id"])] == [
        "deduplicated",
        "forwarded",
    ]
    assert key_info(vendor_proxy, key["key_id"])["spent_usd"] == "0.0083"


def test_vault_keys_work_only_for_their_own_vendor(
    vendor_proxy: ServedProxy,
    fake_stripe: FakeStripe,
    fake_twilio: FakeTwilio,
    fake_resend: FakeResend,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stripe_key = vendor_proxy.issue()["vault_key"]
    twilio_key = issue_twilio(vendor_proxy)["vault_key"]
    resend_key = issue_resend(vendor_proxy)["vault_key"]
    monkeypatch.setattr(resend, "api_url", vendor_proxy.url + "/resend")

    for foreign in (stripe_key, resend_key):  # on /twilio, through the Twilio SDK
        with pytest.raises(TwilioRestException) as raised:
            twilio_client(vendor_proxy, foreign).messages.create(to=US, from_=SENDER, body="x")
        assert raised.value.status == 401 and raised.value.code == 20003

    for foreign in (stripe_key, twilio_key):  # on /resend, through the Resend SDK
        monkeypatch.setattr(resend, "api_key", foreign)
        with pytest.raises(resend.exceptions.ResendError) as refused:
            resend.Emails.send(
                {"from": "a@example.com", "to": "b@example.com", "subject": "s", "text": "t"}
            )
        assert refused.value.code == 401 and refused.value.error_type == "invalid_api_key"

    for foreign in (twilio_key, resend_key):  # on /stripe, through the Stripe SDK
        client = stripe.StripeClient(foreign, base_addresses={"api": vendor_proxy.url + "/stripe"})
        with pytest.raises(stripe.AuthenticationError):
            client.v1.payment_intents.create(params={"amount": 100, "currency": "usd"})

    assert fake_stripe.requests == [] and fake_twilio.requests == []
    assert fake_resend.requests == []
    with vendor_proxy.admin() as admin:
        rows = admin.get("/vault/audit").json()["data"]
    assert len(rows) == 6 and {r["decision"] for r in rows} == {"wrong_vendor"}
    assert {r["status"] for r in rows} == {401}


def test_pricing_endpoint_reports_the_twilio_and_resend_tables(
    vendor_proxy: ServedProxy,
) -> None:
    with vendor_proxy.admin() as admin:
        table = admin.get("/vault/pricing").json()
        ready = httpx.get(vendor_proxy.url + "/readyz").json()
    assert ready["vendors"] == ["resend", "stripe", "twilio"]
    assert table["twilio"]["endpoints"][MESSAGES] == "message"
    assert table["twilio"]["sms"]["+1"] == "0.0083" and "default" in table["twilio"]["sms"]
    assert table["twilio"]["mms"]["+1"] == "0.0220" and "default" in table["twilio"]["mms"]
    assert table["resend"]["email"] == "0.0009"
    assert table["resend"]["endpoints"]["POST /emails/batch"] == "batch"


@pytest.fixture
def printed(capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> Printed:
    """What a `keybrake serve` process would have printed, the proxy being served from this
    one: what reached stdout and stderr (uvicorn's own lines and tracebacks, warnings), and every
    log record that reached the root logger (asyncio's, the proxy's), which pytest takes over
    from Python's last-resort stderr handler."""

    def read() -> str:
        out, err = capfd.readouterr()
        return "\n".join((out, err, caplog.text))

    return read


def _scan_everything(
    proxy: ServedProxy, tmp_path: Path, seen: list[str], printed: Printed
) -> tuple[str, bytes]:
    """Every answer, the log and the database files, once the proxy has stopped."""
    with proxy.admin() as admin:
        for path in ("/vault/keys", "/vault/audit", "/vault/pricing"):
            seen.append(admin.get(path).text)
        seen.append(admin.get("/vault/audit", params={"format": "csv"}).text)
    proxy.stop()
    seen.append(proxy.log())
    seen.append(printed())
    database = b"".join(p.read_bytes() for p in tmp_path.glob("keybrake.db*"))
    return "\n".join(seen), database


def _exercise_twilio(proxy: ServedProxy, fake_twilio: FakeTwilio, seen: list[str]) -> None:
    """Every kind of answer a Twilio workload can get: created, fetched, listed, refused, capped,
    the vendor's own errors; each answer's headers and body go to `seen`."""
    key = issue_twilio(
        proxy,
        daily_usd_cap="0.02",
        allowed_endpoints=[
            MESSAGES,
            "GET /2010-04-01/Accounts/*",
            "GET /2010-04-01/Accounts/*/*",
            "GET /2010-04-01/Accounts/*/Messages/*",
        ],
    )
    vault_key = key["vault_key"]
    base = f"{proxy.url}/twilio/2010-04-01/Accounts/{PLACEHOLDER_SID}"

    def show(response: httpx.Response) -> httpx.Response:
        seen.append(f"{response.status_code} {dict(response.headers)} {response.text}")
        return response

    created = show(raw_twilio(proxy, vault_key, {"To": US, "From": SENDER, "Body": "a"}))
    sid = created.json()["sid"]
    show(raw_twilio(proxy, vault_key, {"To": US, "From": SENDER, "Body": "a"}))  # replayed
    show(httpx.get(f"{base}/Messages/{sid}.json", auth=(PLACEHOLDER_SID, vault_key)))
    show(httpx.get(f"{base}/Messages.json", auth=(PLACEHOLDER_SID, vault_key)))
    show(httpx.get(f"{base}.json", auth=(PLACEHOLDER_SID, vault_key)))  # the account: refused
    fake_twilio.mode = "error500"  # counts as spent: $0.0083 + $0.0083 so far
    show(raw_twilio(proxy, vault_key, {"To": US, "From": SENDER, "Body": "b"}))
    fake_twilio.mode = "ok"
    show(raw_twilio(proxy, vault_key, {"To": US, "From": SENDER, "Body": "c"}))  # cap hit
    show(raw_twilio(proxy, "kbv_unknown", {"To": US, "From": SENDER, "Body": "d"}))
    show(raw_twilio(proxy, vault_key, {"From": SENDER, "Body": "no To"}))  # refused: no To


def test_real_token_and_resend_key_appear_in_no_answer_log_audit_or_database(
    tmp_path: Path,
    fake_stripe: FakeStripe,
    fake_twilio: FakeTwilio,
    fake_resend: FakeResend,
    printed: Printed,
) -> None:
    proxy = serve_vendor_proxy(tmp_path, fake_stripe, fake_twilio, fake_resend)
    seen: list[str] = []
    try:
        _exercise_twilio(proxy, fake_twilio, seen)
        key = issue_resend(proxy, daily_usd_cap="0.001")
        email = {"from": "a@example.com", "to": "b@example.com", "subject": "s", "text": "t"}
        for payload in (email, email, {**email, "text": "other"}, [email, email]):
            path = "/emails/batch" if isinstance(payload, list) else "/emails"
            response = httpx.post(
                f"{proxy.url}/resend{path}",
                json=payload,
                headers={"Authorization": f"Bearer {key['vault_key']}", "Idempotency-Key": "k1"},
            )
            seen.append(f"{dict(response.headers)} {response.text}")
        text, database = _scan_everything(proxy, tmp_path, seen, printed)
    finally:
        proxy.stop()
    assert "20003" in text and "daily USD cap" in text  # the scan did see refusals
    for secret in (REAL_TOKEN, REAL_KEY):
        assert secret not in text
        assert secret.encode() not in database


def test_real_account_sid_never_reaches_the_workload(
    tmp_path: Path,
    fake_stripe: FakeStripe,
    fake_twilio: FakeTwilio,
    fake_resend: FakeResend,
    printed: Printed,
) -> None:
    proxy = serve_vendor_proxy(tmp_path, fake_stripe, fake_twilio, fake_resend)
    seen: list[str] = []
    try:
        key = issue_twilio(proxy)
        client = twilio_client(proxy, key["vault_key"])
        message = client.messages.create(to=US, from_=SENDER, body="hello")
        assert message.account_sid == PLACEHOLDER_SID
        assert message.uri == (
            f"/2010-04-01/Accounts/{PLACEHOLDER_SID}/Messages/{message.sid}.json"
        )
        assert client.messages(message.sid).fetch().account_sid == PLACEHOLDER_SID
        _exercise_twilio(proxy, fake_twilio, seen)
        text, database = _scan_everything(proxy, tmp_path, seen, printed)
    finally:
        proxy.stop()
    assert PLACEHOLDER_SID in text  # the answers were seen, with the placeholder in them
    assert REAL_SID not in text
    assert REAL_SID.encode() not in database
    assert fake_twilio.messages and all(
        m["account_sid"] == REAL_SID for m in fake_twilio.messages.values()
    )


@dataclass
class InprocTwilio:
    """The app behind TestClient with a stub Twilio recording what reaches it, and one Twilio
    vault key ($1 a day) to send messages with, their form bodies exactly as given."""

    client: TestClient
    stub: StubUpstream
    key: dict[str, Any]

    def send(self, body: str) -> httpx.Response:
        auth = base64.b64encode(f"{PLACEHOLDER_SID}:{self.key['vault_key']}".encode()).decode()
        return self.client.post(
            f"/twilio/2010-04-01/Accounts/{PLACEHOLDER_SID}/Messages.json",
            content=body.encode(),
            headers={
                "Authorization": f"Basic {auth}",
                "Content-Type": "application/x-www-form-urlencoded",
            },
        )

    def audit(self) -> list[dict[str, Any]]:
        params = {"key_id": self.key["key_id"]}
        return list(self.client.get("/vault/audit", params=params).json()["data"])


@pytest.fixture
def inproc_twilio(tmp_path: Path) -> Iterator[InprocTwilio]:
    stub = StubUpstream()
    with app_client(
        tmp_path,
        twilio_account_sid=REAL_SID,
        twilio_auth_token=REAL_TOKEN,
        twilio_api_base="http://twilio.invalid",
        upstream=stub,
    ) as client:
        key = issue(client, vendor="twilio", daily_usd_cap=1, allowed_endpoints=[MESSAGES])
        yield InprocTwilio(client, stub, key)


def test_a_message_takes_exactly_one_to_and_a_repeated_one_never_reaches_twilio(
    inproc_twilio: InprocTwilio,
) -> None:
    """Twilio's Messages API sends to one `To`; a form naming it twice (or as `to` beside it)
    is refused before anything is forwarded, since which copy Twilio reads is not the proxy's to
    know."""
    app = inproc_twilio

    def send(form: list[tuple[str, str]]) -> httpx.Response:
        return app.send(urlencode(form))  # the fields exactly as listed

    for form in (
        [("To", US), ("To", UK), ("From", SENDER), ("Body", "x")],
        [("To", US), ("From", SENDER), ("Body", "x"), ("To", US)],
        [("To", US), ("to", UK), ("From", SENDER), ("Body", "x")],
        [("to", UK), ("From", SENDER), ("Body", "x")],
    ):
        refused = send(form)
        assert refused.status_code == 400, form
        assert refused.json()["keybrake_code"] == "keybrake_ambiguous_request", form
    assert app.stub.sent == []
    assert send([("To", US), ("From", SENDER), ("Body", "x")]).status_code == 200
    assert len(app.stub.sent) == 1
    assert [r["decision"] for r in app.audit()] == ["forwarded"] + ["ambiguous"] * 4


# A message Twilio would read otherwise than keybrake prices it, as a form body sends it, and
# what keybrake answers: (HTTP status, keybrake_code, a phrase of the message).
REFUSED_MESSAGES: list[tuple[str, tuple[int, str, str]]] = [
    # Not E.164: Twilio may route it to the number it spells, which no prefix match on the text
    # can price (a Jamaican "+1 876" read as "+1").
    (
        urlencode({"To": "+1 876 555 0100", "From": SENDER, "Body": "x"}),
        (403, "keybrake_unpriced_endpoint", "not a phone number in E.164"),
    ),
    (
        urlencode({"To": "+1 (876) 555-0100", "From": SENDER, "Body": "x"}),
        (403, "keybrake_unpriced_endpoint", "not a phone number in E.164"),
    ),
    # A `+` sent unencoded is a space to Twilio: the refusal says how to send it.
    (
        "To=+18765550100&From=%2B14155550199&Body=x",
        (403, "keybrake_unpriced_endpoint", "encode it as %2B"),
    ),
    # Scheduled: sent and billed up to 35 days later, after the key may be revoked.
    (
        urlencode({"To": US, "From": SENDER, "Body": "x", "SendAt": "2030-01-01T00:00:00Z"}),
        (403, "keybrake_unpriced_endpoint", "Send it when it is due"),
    ),
    (
        urlencode({"To": US, "From": SENDER, "Body": "x", "scheduleType": "fixed"}),
        (403, "keybrake_unpriced_endpoint", "Send it when it is due"),
    ),
    # Link Shortening: the links Twilio sends are not those counted.
    (
        urlencode({"To": US, "From": SENDER, "Body": "x", "ShortenUrls": "true"}),
        (403, "keybrake_unpriced_endpoint", "Link Shortening"),
    ),
    # Media under another spelling was forwarded and priced as an SMS.
    (
        urlencode({"To": US, "From": SENDER, "Body": "x", "mediaUrl": "https://e.x/1.png"}),
        (400, "keybrake_ambiguous_request", "'MediaUrl', spelled so"),
    ),
]


@pytest.mark.parametrize("body,refusal", REFUSED_MESSAGES)
def test_a_message_keybrake_cannot_price_as_twilio_bills_it_is_refused_and_never_forwarded(
    inproc_twilio: InprocTwilio, body: str, refusal: tuple[int, str, str]
) -> None:
    refused = inproc_twilio.send(body)
    rows, stub = inproc_twilio.audit(), inproc_twilio.stub
    status, code, phrase = refusal
    answer = refused.json()
    assert (refused.status_code, answer["keybrake_code"]) == (status, code), answer
    assert answer["code"] == 20000 + status and phrase in answer["message"], answer
    assert stub.sent == []
    assert [(r["reserved_usd"], r["settled_usd"]) for r in rows] == [("0.00", "0.00")]
