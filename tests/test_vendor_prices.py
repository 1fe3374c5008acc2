"""Twilio and Resend vendor modules without HTTP: estimates, settlement, credential and path
rewriting, error shapes, and validation of their pricing tables."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from keybrake.proxy.errors import ConfigError
from keybrake.proxy.pricing import AmbiguousRequest, Unpriceable, load_pricing
from keybrake.proxy.settings import VendorCredentials
from keybrake.proxy.vendors import VENDORS
from keybrake.proxy.vendors.base import Cost, VendorCall
from keybrake.proxy.vendors.resend import Resend
from keybrake.proxy.vendors.twilio import Twilio

VALIDATORS = {name: cls.validate_pricing for name, cls in VENDORS.items()}
SID = "AC" + "ab" * 16
TOKEN = "tok_" + "c" * 28
PLACEHOLDER = "AC" + "0" * 32
MESSAGES = f"/2010-04-01/Accounts/{PLACEHOLDER}/Messages.json"


class NoLookup:
    async def fetch_json(self, path: str) -> Mapping[str, Any]:
        raise AssertionError("Twilio and Resend never look anything up")


def table(tmp_path: Path | None, operator: str) -> Any:
    path = None
    if operator and tmp_path is not None:
        path = tmp_path / "pricing.toml"
        path.write_text(operator)
    return load_pricing(path, VALIDATORS)


def twilio(tmp_path: Path | None = None, operator: str = "") -> Twilio:
    return Twilio(VendorCredentials("http://twilio.invalid", TOKEN, SID), table(tmp_path, operator))


def resend_vendor(tmp_path: Path | None = None, operator: str = "") -> Resend:
    return Resend(VendorCredentials("http://resend.invalid", "re_real"), table(tmp_path, operator))


def call(method: str, path: str, body: bytes = b"", **headers: str) -> VendorCall:
    """A call as the SDKs send it: Resend's bodies JSON, Twilio's a form."""
    lowered = {k.lower(): v for k, v in headers.items()}
    if body and "content-type" not in lowered:
        json_body = body[:1] in (b"{", b"[")
        lowered["content-type"] = (
            "application/json" if json_body else "application/x-www-form-urlencoded"
        )
    return VendorCall(method, path, "", lowered, body)


def sms(vendor: Twilio, **form: Any) -> Cost:
    body = urlencode(form, doseq=True).encode()
    return asyncio.run(vendor.estimate(call("POST", MESSAGES, body), NoLookup()))


def test_twilio_message_prices() -> None:
    vendor = twilio()
    # 161 GSM-7 characters: 153 + 8 -> 2 segments x $0.0083 = $0.0166.
    cost = sms(vendor, To="+14155550100", From="+1415", Body="a" * 161)
    assert (cost.micros, cost.amount, cost.currency) == (16_600, 2, "sms_segment")
    assert cost.priced
    # No prefix but "default" for a UK number: 1 x $0.15.
    assert sms(vendor, To="+447700900123", Body="hi").micros == 150_000
    # Media, or SendAsMms, makes it one MMS at $0.022, or the SMS that MMS Converter sends to a
    # carrier without MMS if that costs more: the body, a newline and a 35-character link.
    # 270 + 36 = 306 septets: 2 segments, $0.0166, less than the MMS.
    mms = sms(vendor, To="+14155550100", Body="a" * 270, MediaUrl=["https://e.x/1.png"] * 2)
    assert (mms.micros, mms.amount, mms.currency) == (22_000, 1, "mms")
    assert sms(vendor, To="+14155550100", Body="x", SendAsMms="true").micros == 22_000
    # 271 + 36 = 307: 3 segments, $0.0249, more than the MMS; counted in segments.
    converted = sms(vendor, To="+14155550100", Body="a" * 271, MediaUrl="https://e.x/1.png")
    assert (converted.micros, converted.amount, converted.currency) == (24_900, 3, "sms_segment")
    # 999 + 36 = 1,035: 7 segments, $0.0581; a UCS-2 body, 170 + 36 = 206 units: 4 x $0.0083.
    long = sms(vendor, To="+14155550100", Body="a" * 999, MediaUrl="https://e.x/1.png")
    assert (long.micros, long.amount) == (58_100, 7)
    ucs2 = sms(vendor, To="+14155550100", Body="я" * 170, SendAsMms="true")
    assert (ucs2.micros, ucs2.amount, ucs2.currency) == (33_200, 4, "sms_segment")
    # Elsewhere by "default": $0.30 an MMS, $0.15 a segment, so 2 segments are less, 3 more.
    assert sms(vendor, To="+447700900123", Body="a" * 270, MediaUrl="https://e.x/1.png").micros == (
        300_000
    )
    assert sms(vendor, To="+447700900123", Body="a" * 271, MediaUrl="https://e.x/1.png").micros == (
        450_000
    )
    # A repeated To, Body or SendAsMms (or one in another case) is refused: which copy Twilio
    # bills is not something the proxy can know.
    for form in (
        {"To": ["+447700900123", "+14155550100"], "Body": "x"},
        {"To": "+14155550100", "Body": ["x", "y" * 500]},
        {"To": "+14155550100", "to": "+447700900123", "Body": "x"},
        {"To": "+14155550100", "Body": "x", "SendAsMms": ["false", "true"]},
    ):
        with pytest.raises(AmbiguousRequest):
            sms(vendor, **form)


def test_a_blank_media_url_still_prices_the_message_as_media() -> None:
    vendor = twilio()
    plain = sms(vendor, To="+14155550100", Body="x")
    for blank in ("", " "):
        cost = sms(vendor, To="+14155550100", Body="x", MediaUrl=blank)
        assert (cost.micros, cost.currency) == (22_000, "mms") and cost.micros > plain.micros


def test_the_rest_of_the_north_american_plan_is_priced_as_default_not_as_the_us() -> None:
    """Jamaica, the Dominican Republic, Puerto Rico... dial "+1" but cost more than the US: the
    shipped table prices them as "default" (errs high), the US and Canada at the US rate."""
    vendor = twilio()
    elsewhere = sms(vendor, To="+447700900123", Body="x").micros
    for number in ("+18765550100", "+18095550100", "+17875550100", "+12425550100"):
        assert sms(vendor, To=number, Body="x").micros == elsewhere == 150_000, number
        assert sms(vendor, To=number, Body="x", MediaUrl="https://x.example/a.png").micros == (
            300_000
        )
    for number in ("+14155550100", "+14165550100", "+16045550100"):  # California, Ontario, BC
        assert sms(vendor, To=number, Body="x").micros == 8_300, number


def test_twilio_destination_prefixes_longest_match_and_channels(tmp_path: Path) -> None:
    vendor = twilio(
        tmp_path, '[twilio.sms]\n"+1876" = "0.1100"\n"+44" = "0.0400"\n"whatsapp:" = "0.0050"\n'
    )
    assert sms(vendor, To="+18765550100", Body="x").micros == 110_000  # "+1876" beats "+1"
    assert sms(vendor, To="+14155550100", Body="x").micros == 8_300
    assert sms(vendor, To="+447700900123", Body="x").micros == 40_000
    assert sms(vendor, To="whatsapp:+447700900123", Body="x").micros == 5_000
    with pytest.raises(Unpriceable, match=r"\[twilio.sms\]"):
        sms(twilio(), To="whatsapp:+14155550100", Body="x")  # "default" is for phone numbers
    with pytest.raises(Unpriceable, match="no To"):
        sms(twilio(), Body="x")
    with pytest.raises(Unpriceable, match="ContentSid"):
        sms(twilio(), To="+14155550100", ContentSid="HX" + "0" * 32)


@pytest.mark.parametrize(
    "to",
    [
        "+1 876 555 0100",
        "+1-876-555-0100",
        "+1 (876) 555-0100",
        "+1.876.555.0100",
        "+1876 5550100",
        "18765550100",
        "001876555010",
        "whatsapp:+1 876 555 0100",
        "messenger:18765550100",
        "tel:+18765550100",
    ],
)
def test_twilio_prices_only_a_to_in_e164(tmp_path: Path, to: str) -> None:
    """Twilio says numbers not in E.164 "may work", routed to the number they spell: with
    "+1876" priced above "+1", a spaced-out Jamaican number must not pass as "+1"."""
    vendor = twilio(tmp_path, '[twilio.sms]\n"+1876" = "0.10"\n"whatsapp:" = "0.0050"\n')
    assert sms(vendor, To="+18765550100", Body="x").micros == 100_000
    with pytest.raises(Unpriceable, match=r"not a phone number in E\.164.*'\+' and digits only"):
        sms(vendor, To=to, Body="x")


def test_twilio_names_an_unencoded_plus_in_to() -> None:
    # `To=+14155550100` in a hand-made form body: Twilio (and the proxy) read the `+` as a space.
    body = b"To=+14155550100&From=%2B14155550199&Body=hi"
    with pytest.raises(Unpriceable, match="encode it as %2B"):
        asyncio.run(twilio().estimate(call("POST", MESSAGES, body), NoLookup()))
    with pytest.raises(Unpriceable, match="encode it as %2B"):
        sms(twilio(), To="whatsapp: 14155550100", Body="hi")


@pytest.mark.parametrize(
    "field",
    [
        {"SendAt": "2030-01-01T00:00:00Z", "ScheduleType": "fixed"},
        {"SendAt": "2030-01-01T00:00:00Z"},  # Twilio refuses it without ScheduleType: still
        {"ScheduleType": "fixed"},
        {"ScheduleType": ""},  # any value
        {"sendAt": "2030-01-01T00:00:00Z"},  # any spelling
        {"SEND_AT": "x"},
        {"schedule-type": "fixed"},
        {"SendAt[0]": "x"},
    ],
)
def test_twilio_refuses_a_scheduled_message(field: dict[str, str]) -> None:
    """Twilio sends and bills a scheduled message up to 35 days later: outside the window the
    cap counts it in, and after its key may be revoked."""
    with pytest.raises(Unpriceable, match=r"scheduled message.*Send it when it is due"):
        sms(twilio(), To="+14155550100", Body="x", **field)


def test_twilio_refuses_link_shortening_unless_it_is_off() -> None:
    for value in ("true", "True", "1", "", "yes"):
        with pytest.raises(Unpriceable, match="Link Shortening"):
            sms(twilio(), To="+14155550100", Body="x", ShortenUrls=value)
    for value in ("false", "False"):
        assert sms(twilio(), To="+14155550100", Body="x", ShortenUrls=value).micros == 8_300


@pytest.mark.parametrize(
    "field",
    [
        "mediaUrl",
        "MediaURL",
        "mediaurl",
        "Media_Url",
        "MediaUrl[0]",
        "sendAsMms",
        "SendAsMMS",
        "shortenUrls",
        "from",
        "FROM",
        "messagingServiceSid",
        "contentSid",
        "body",
        "Body[x]",
        "TO",
    ],
)
def test_twilio_refuses_another_spelling_of_a_field_it_reads(field: str) -> None:
    """Twilio's field names are case-sensitive, and keybrake reads them exactly so: `mediaUrl`
    was forwarded and priced as an SMS, whatever Twilio made of it."""
    with pytest.raises(AmbiguousRequest, match="spelled so"):
        sms(twilio(), To="+14155550100", From="+14155550199", Body="x", **{field: "true"})


def test_twilio_refuses_a_repeated_sender() -> None:
    for form in (
        {"From": ["+14155550199", "+14155550198"]},
        {"MessagingServiceSid": ["MG" + "1" * 32, "MG" + "2" * 32]},
    ):
        with pytest.raises(AmbiguousRequest, match="appears 2 times"):
            sms(twilio(), To="+14155550100", Body="x", **form)


def test_twilio_prices_any_send_as_mms_but_false_as_mms() -> None:
    for value in ("true", "True", "1", "yes", ""):
        assert sms(twilio(), To="+14155550100", Body="x", SendAsMms=value).currency == "mms"
    for value in ("false", "FALSE"):
        assert sms(twilio(), To="+14155550100", Body="x", SendAsMms=value).currency == (
            "sms_segment"
        )


def test_twilio_reads_are_free_but_only_inside_an_account() -> None:
    vendor = twilio()
    lookup = NoLookup()
    free = asyncio.run(vendor.estimate(call("GET", MESSAGES), lookup))
    assert free.micros == 0 and not free.priced
    for path in (
        f"/2010-04-01/Accounts/{PLACEHOLDER}.json",  # the account: carries the auth token
        "/2010-04-01/Accounts.json",
        "/v1/Services",
        "/2010-04-01/Accounts/not-a-sid/Messages.json",
    ):
        with pytest.raises(Unpriceable):
            asyncio.run(vendor.estimate(call("GET", path), lookup))
    with pytest.raises(Unpriceable) as refused:
        asyncio.run(vendor.estimate(call("POST", MESSAGES.replace("Messages", "Calls")), lookup))
    message = str(refused.value)
    assert "[twilio.endpoints]" in message
    assert '"POST /2010-04-01/Accounts/*/Calls.json" = { usd = "0.05" }' in message
    update = f"/2010-04-01/Accounts/{PLACEHOLDER}/Messages/SM{'1' * 32}.json"
    assert asyncio.run(vendor.estimate(call("POST", update, b"Body="), lookup)).micros == 0


def test_twilio_settles_to_the_price_in_the_answer() -> None:
    vendor = twilio()
    estimate = Cost(16_600, 2, "sms_segment", priced=True)
    messages = call("POST", MESSAGES)

    def settled(status: int | None, answer: Any) -> int:
        body = json.dumps(answer).encode() if answer is not None else b""
        return vendor.settle(messages, estimate, status, body).micros

    assert settled(201, {"price": None, "price_unit": "USD"}) == 16_600  # not billed yet
    assert settled(201, {"price": "-0.00750", "price_unit": "USD"}) == 7_500  # a charge
    assert settled(201, {"price": "0.00750", "price_unit": "usd"}) == 7_500
    assert settled(201, {"price": "-0.0200", "price_unit": "USD"}) == 20_000  # true cost, above
    assert settled(201, {"price": "n/a", "price_unit": "USD"}) == 16_600
    assert settled(201, {"price": "-0.01", "price_unit": "EUR"}) == 16_600  # no fx rate
    assert settled(400, {"code": 21211, "message": "Invalid 'To'"}) == 0  # refused: nothing
    assert settled(500, {"code": 20500}) == 16_600  # maybe sent: counts
    assert settled(None, None) == 16_600  # no answer: counts


def test_twilio_credentials_and_account_are_swapped_both_ways() -> None:
    vendor = twilio()
    basic = base64.b64encode(f"{PLACEHOLDER}:kbv_vault.pod-1".encode()).decode()
    assert vendor.presented_key({"authorization": f"Basic {basic}"}) == "kbv_vault.pod-1"
    assert vendor.presented_key({"authorization": "Bearer kbv_vault"}) is None
    assert vendor.presented_key({"authorization": "Basic !!!"}) is None
    only_user = base64.b64encode(f"{PLACEHOLDER}:".encode()).decode()
    assert vendor.presented_key({"authorization": f"Basic {only_user}"}) is None

    fetch = VendorCall(
        "GET", f"/2010-04-01/Accounts/{PLACEHOLDER}/Messages/SM1.json", "PageSize=2", {}, b""
    )
    target, auth = vendor.upstream_request(fetch)
    assert target == f"/2010-04-01/Accounts/{SID}/Messages/SM1.json?PageSize=2"
    real = base64.b64encode(f"{SID}:{TOKEN}".encode()).decode()
    assert auth == {"Authorization": f"Basic {real}"}

    answer = json.dumps(
        {"account_sid": SID, "uri": f"/2010-04-01/Accounts/{SID}/Messages/SM1.json"}
    ).encode()
    headers, body = vendor.workload_reply(fetch, 200, [("X-Account", SID)], answer)
    assert SID.encode() not in body and SID not in str(headers)
    assert json.loads(body)["account_sid"] == PLACEHOLDER
    assert headers == [("X-Account", PLACEHOLDER)]
    # An account resource, were one ever forwarded: its token never reaches the workload.
    account = json.dumps({"sid": SID, "auth_token": TOKEN, "note": f"token {TOKEN}"}).encode()
    _, shown = vendor.workload_reply(fetch, 200, [], account)
    assert TOKEN.encode() not in shown and json.loads(shown)["auth_token"] is None


def test_twilio_and_resend_error_shapes() -> None:
    body, headers = twilio().error(429, "keybrake_daily_cap_exceeded", "cap reached")
    assert json.loads(body) == {
        "code": 20429,
        "message": "cap reached",
        "more_info": "https://www.twilio.com/docs/errors/20429",
        "status": 429,
        "keybrake_code": "keybrake_daily_cap_exceeded",
        "details": {"keybrake_code": "keybrake_daily_cap_exceeded"},  # what the SDK keeps
    }
    assert headers == {}
    assert json.loads(twilio().error(401, "keybrake_invalid_key", "no")[0])["code"] == 20003
    assert json.loads(twilio().error(403, "x", "no")[0])["code"] == 20403

    vendor = resend_vendor()
    names = {
        (401, "keybrake_missing_key"): "missing_api_key",
        (401, "keybrake_wrong_vendor"): "invalid_api_key",
        (403, "keybrake_unpriced_endpoint"): "restricted_api_key",
        (429, "keybrake_daily_cap_exceeded"): "daily_quota_exceeded",
        (409, "idempotency_key_in_use"): "concurrent_idempotent_requests",
        (502, "keybrake_upstream_error"): "application_error",
        (400, "keybrake_invalid_path"): "validation_error",
    }
    for (status, code), name in names.items():
        shaped = json.loads(vendor.error(status, code, "m")[0])
        assert shaped == {"statusCode": status, "name": name, "message": "m", "keybrake_code": code}


def test_resend_prices_emails_and_batches() -> None:
    vendor = resend_vendor()
    lookup = NoLookup()

    def estimate(path: str, payload: Any) -> Cost:
        body = json.dumps(payload).encode()
        return asyncio.run(vendor.estimate(call("POST", path, body), lookup))

    one = estimate("/emails", {"to": "a@example.com"})
    assert (one.micros, one.amount, one.currency) == (900, 1, "email")
    batch = estimate("/emails/batch", [{"to": "a@example.com"}] * 100)
    assert (batch.micros, batch.amount) == (90_000, 100)  # 100 x $0.0009
    for path, payload in (("/emails", [{}]), ("/emails/batch", []), ("/emails/batch", {})):
        with pytest.raises(Unpriceable):
            estimate(path, payload)
    with pytest.raises(Unpriceable, match=r"\[resend.endpoints\]"):
        estimate("/broadcasts/b1/send", {})
    assert estimate("/emails/e1/cancel", {}).micros == 0
    assert asyncio.run(vendor.estimate(call("GET", "/domains"), lookup)).micros == 0
    assert vendor.presented_key({"authorization": "Bearer kbv_x.tag"}) == "kbv_x.tag"
    assert vendor.presented_key({"authorization": "Basic a2J2Og=="}) is None
    assert vendor.upstream_request(call("GET", "/emails/e1")) == (
        "/emails/e1",
        {"Authorization": "Bearer re_real"},
    )

    emails = call("POST", "/emails/batch", json.dumps([{"to": "a@example.com"}] * 3).encode())
    ok = json.dumps({"data": [{"id": "1"}, {"id": "2"}], "errors": [{"index": 2}]}).encode()
    assert vendor.settle(emails, Cost(2_700, 3, "email", True), 200, ok).micros == 1_800
    assert vendor.settle(emails, Cost(2_700, 3, "email", True), 422, b"{}").micros == 0
    assert vendor.settle(emails, Cost(2_700, 3, "email", True), None, b"").micros == 2_700
    single = call("POST", "/emails")
    assert vendor.settle(single, Cost(900, 1, "email", True), 200, b'{"id":"x"}').micros == 900


def resend_estimate(path: str, payload: Any) -> Cost:
    body = json.dumps(payload).encode()
    return asyncio.run(resend_vendor().estimate(call("POST", path, body), NoLookup()))


def test_resend_prices_every_to_cc_and_bcc_recipient_as_an_email() -> None:
    """Resend bills each recipient as one email against the quota, so an email costs its
    recipients and a batch the sum of its emails' recipients."""
    a, b, c = "a@example.com", "Bo <b@example.com>", "c@example.com"
    for email, recipients in (
        ({"to": a}, 1),
        ({"to": [a, b]}, 2),
        ({"to": [a, a, a]}, 3),  # a repeated address counts every time
        ({"to": a, "cc": b, "bcc": c}, 3),
        ({"to": [a], "cc": [b, c], "bcc": [a, b, c]}, 6),
        ({"to": [a], "cc": None, "bcc": []}, 1),
        ({"to": f"{a}, {c}"}, 2),  # one string naming two addresses: each @ counts
        ({"to": [a] * 50, "cc": [b] * 60, "bcc": [c] * 70}, 180),
    ):
        one = resend_estimate("/emails", email)
        assert (one.micros, one.amount, one.currency) == (900 * recipients, recipients, "email")
    batch = resend_estimate("/emails/batch", [{"to": a}, {"to": [a, b], "cc": c}, {"to": [a] * 50}])
    assert (batch.micros, batch.amount) == (900 * 54, 54)
    full = resend_estimate("/emails/batch", [{"to": [a, b]}] * 100)
    assert (full.micros, full.amount) == (180_000, 200)  # 100 emails x 2 recipients x $0.0009


@pytest.mark.parametrize(
    "path,payload,refusal",
    [
        ("/emails", {"cc": "a@example.com"}, Unpriceable),  # no to
        ("/emails", {"to": None}, Unpriceable),
        ("/emails", {"to": []}, Unpriceable),
        ("/emails", {"to": 7}, Unpriceable),
        ("/emails", {"to": {"email": "a@example.com"}}, Unpriceable),
        ("/emails", {"to": [["a@example.com", "b@example.com"]]}, Unpriceable),
        ("/emails", {"to": ["a@example.com", 1]}, Unpriceable),
        ("/emails", {"to": "a@example.com", "cc": 3}, Unpriceable),
        ("/emails", {"to": "a@example.com", "bcc": [{"email": "b@example.com"}]}, Unpriceable),
        ("/emails", {"to": "a@example.com", "cc": True}, Unpriceable),
        ("/emails", {"to": [f"u{i}@example.com" for i in range(51)]}, Unpriceable),
        (
            "/emails",
            # 50 strings, 51 addresses: the last string names two
            {"to": [f"u{i}@example.com" for i in range(49)] + ["x@example.com, z@example.com"]},
            Unpriceable,
        ),
        ("/emails", {"to": "a@example.com", "headers": "Bcc: b@example.com"}, Unpriceable),
        ("/emails", {"To": "a@example.com"}, AmbiguousRequest),
        ("/emails", {"to": "a@example.com", "BCC": ["b@example.com"] * 40}, AmbiguousRequest),
        ("/emails", {"to": "a@example.com", "headers": {"Bcc": "b@example.com"}}, AmbiguousRequest),
        ("/emails/batch", [{"to": "a@example.com"}] * 101, Unpriceable),
        ("/emails/batch", [{"to": "a@example.com"}, {"to": "b@example.com", "cc": 5}], Unpriceable),
        ("/emails/batch", [{"to": "a@example.com"}, {"subject": "no to"}], Unpriceable),
        ("/emails/batch", [{"to": "a@example.com"}, ["b@example.com"]], Unpriceable),
        # Scheduled: Resend sends and bills it later, after the key may be revoked.
        ("/emails", {"to": "a@example.com", "scheduled_at": "in 1 hour"}, Unpriceable),
        ("/emails", {"to": "a@example.com", "scheduled_at": None}, Unpriceable),
        ("/emails", {"to": "a@example.com", "scheduledAt": "2030-01-01T00:00:00Z"}, Unpriceable),
        ("/emails", {"to": "a@example.com", "Scheduled-At": "tomorrow"}, Unpriceable),
        (
            "/emails/batch",
            [{"to": "a@example.com"}, {"to": "b@x.com", "scheduled_at": "x"}],
            Unpriceable,
        ),
        # Header names and values that could end a header early or start another one.
        (
            "/emails",
            {"to": "a@example.com", "headers": {"X-A\r\nBcc": "b@x.com"}},
            AmbiguousRequest,
        ),
        ("/emails", {"to": "a@example.com", "headers": {"X-A: b": "c"}}, AmbiguousRequest),
        ("/emails", {"to": "a@example.com", "headers": {"Bcc:": "b@x.com"}}, AmbiguousRequest),
        ("/emails", {"to": "a@example.com", "headers": {" Bcc": "b@x.com"}}, AmbiguousRequest),
        ("/emails", {"to": "a@example.com", "headers": {"X-\u0000A": "c"}}, AmbiguousRequest),
        ("/emails", {"to": "a@example.com", "headers": {"X-\u00e9": "c"}}, AmbiguousRequest),
        ("/emails", {"to": "a@example.com", "headers": {"": "c"}}, AmbiguousRequest),
        (
            "/emails",
            {"to": "a@example.com", "headers": {"X-A": "c\r\nBcc: b@x.com"}},
            AmbiguousRequest,
        ),
        (
            "/emails",
            {"to": "a@example.com", "headers": {"X-A": "c\nBcc: b@x.com"}},
            AmbiguousRequest,
        ),
        ("/emails", {"to": "a@example.com", "headers": {"X-A": "c\u0000"}}, AmbiguousRequest),
        ("/emails", {"to": "a@example.com", "headers": {"X-A": ["c", "d"]}}, AmbiguousRequest),
        # Keys a JavaScript parser may treat as the object's prototype, at any depth.
        ("/emails", {"to": "a@example.com", "__proto__": {"bcc": "b@x.com"}}, AmbiguousRequest),
        ("/emails", {"to": "a@example.com", "constructor": {}}, AmbiguousRequest),
        ("/emails", {"to": "a@example.com", "headers": {"__proto__": "x"}}, AmbiguousRequest),
        ("/emails", {"to": "a@example.com", "tags": [{"prototype": 1}]}, AmbiguousRequest),
        (
            "/emails/batch",
            [{"to": "a@example.com"}, {"to": "b@x.com", "__proto__": {}}],
            AmbiguousRequest,
        ),
    ],
)
def test_resend_refuses_recipients_it_cannot_count(
    path: str, payload: Any, refusal: type[Exception]
) -> None:
    with pytest.raises(refusal):
        resend_estimate(path, payload)


def test_resend_takes_plain_custom_headers() -> None:
    headers = {"X-Entity-Ref-ID": "123", "List-Unsubscribe": "<https://example.com/u>"}
    assert resend_estimate("/emails", {"to": "a@example.com", "headers": headers}).amount == 1


def test_resend_permissive_batch_settles_off_each_refused_emails_own_recipients() -> None:
    vendor = resend_vendor()
    items = [
        {"to": ["a@example.com", "b@example.com"]},  # 2
        {"to": ["c@example.com"] * 7},  # 7, refused by Resend
        {"to": "d@example.com", "cc": "e@example.com", "bcc": "f@example.com"},  # 3
        {"to": "g@example.com", "bcc": ["h@example.com"] * 4},  # 5, refused by Resend
    ]
    batch = call("POST", "/emails/batch", json.dumps(items).encode())
    estimate = asyncio.run(vendor.estimate(batch, NoLookup()))
    assert (estimate.micros, estimate.amount) == (900 * 17, 17)

    def settled(answer: Any) -> tuple[int, int | None]:
        cost = vendor.settle(batch, estimate, 200, json.dumps(answer).encode())
        return cost.micros, cost.amount

    two = [{"id": "1"}, {"id": "2"}]
    errors = [{"index": 1, "message": "x"}, {"index": 3, "message": "y"}]
    assert settled({"data": two, "errors": errors}) == (900 * 5, 5)  # 17 - 7 - 5
    # Two complaints about one item: it is still one item's recipients.
    assert settled({"data": two, "errors": [*errors, {"index": 3, "message": "z"}]}) == (4_500, 5)
    assert settled({"data": two * 2}) == (900 * 17, 17)  # all sent
    # Answers that do not add up keep the reservation: fewer ids than unrefused items, an index
    # outside the batch, an index that is not a number, errors that are not a list.
    inconsistent: tuple[dict[str, Any], ...] = (
        {"data": two, "errors": errors[:1]},
        {"data": two, "errors": [{"index": 1}, {"index": 4}]},
        {"data": two, "errors": [{"index": 1}, {"index": "3"}]},
        {"data": two, "errors": [{"index": 1}, {"index": True}]},
        {"data": two, "errors": {"index": 1}},
        {"data": [], "errors": []},
    )
    for answer in inconsistent:
        assert settled(answer) == (900 * 17, 17), answer


def test_operators_price_new_endpoints_flat(tmp_path: Path) -> None:
    operator = (
        '[resend.endpoints]\n"POST /broadcasts/*/send" = { usd = "5.00" }\n'
        '[twilio.endpoints]\n"POST /2010-04-01/Accounts/*/Calls.json" = { usd = "0.50" }\n'
    )
    broadcast = call("POST", "/broadcasts/b1/send", b"{}")
    flat = asyncio.run(resend_vendor(tmp_path, operator).estimate(broadcast, NoLookup()))
    assert flat == Cost(5_000_000, priced=True)
    calls = call("POST", MESSAGES.replace("Messages", "Calls"), b"To=%2B1")
    flat = asyncio.run(twilio(tmp_path, operator).estimate(calls, NoLookup()))
    assert flat == Cost(500_000, priced=True)


@pytest.mark.parametrize(
    "text,message",
    [
        # The same prefix in both tables: the error names the line of the bad one (line 4).
        (
            '[twilio.sms]\n"+1" = "0.01"\n[twilio.mms]\n"+1" = "cheap"\n',
            r"line 4\).*'\+1' in \[mms\]",
        ),
        ('[twilio.sms]\n"+44" = "-0.01"\n', r"line 2\).*'\+44'"),
        ('[twilio.sms]\n"44" = "0.01"\n', r"line 2\).*E\.164 prefix"),
        # A channel other than WhatsApp names no phone number: its messages are refused, so a
        # price for it could never apply.
        ('[twilio.sms]\n"messenger:" = "0.01"\n', r"line 2\).*E\.164 prefix"),
        ('[twilio.smss]\n"+44" = "0.01"\n', r"line 1\).*'smss' is not a Twilio pricing table"),
        ('[twilio.endpoints]\n"POST /x" = "segments"\n', r"line 2\).*unknown rule 'segments'"),
        ('[twilio.endpoints]\n"POST /x" = { usd = "lots" }\n', r"line 2\).*'POST /x'"),
        ('[twilio.endpoints]\n"POST /x" = { eur = "1" }\n', r"line 2\).*neither a rule"),
        ('[twilio.endpoints]\n"SEND /x" = "free"\n', r"line 2\).*unknown method"),
        ("# a comment naming email\n[resend]\nemail = 0.5e\n", r"pricing.toml"),
        ('# email = "1"\n[resend]\nemail = "free"\n', r"line 3\).*'email'"),
        ('[resend]\nsms = "0.01"\n', r"line 2\).*'sms' is not a Resend pricing entry"),
    ],
)
def test_bad_twilio_and_resend_prices_name_the_bad_line(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "pricing.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_pricing(path, VALIDATORS)


def test_yaml_operator_file_for_twilio_and_resend(tmp_path: Path) -> None:
    path = tmp_path / "pricing.yaml"
    path.write_text(
        "twilio:\n  sms:\n    '+44': '0.0400'\n  mms:\n    '+44': 0.5\nresend:\n  email: '0.0010'\n"
    )
    vendor = Twilio(VendorCredentials("http://t", TOKEN, SID), load_pricing(path, VALIDATORS))
    assert sms(vendor, To="+447700900123", Body="x").micros == 40_000
    assert sms(vendor, To="+447700900123", MediaUrl="https://e.x/a.png").micros == 500_000
    bad = tmp_path / "bad.yaml"
    bad.write_text("twilio:\n  sms:\n    '+1': '0.01'\n  mms:\n    '+1': nope\n")
    with pytest.raises(ConfigError, match=r"bad.yaml \(line 5\)"):
        load_pricing(bad, VALIDATORS)
