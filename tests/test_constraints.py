"""Spend constraints (`keybrake.proxy.constraints`): their values, what lies within an issuer's,
and each vendor's reading of a call's constrained fields (`Vendor.subjects`), field by field."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

import pytest

from keybrake.proxy.constraints import (
    Constraints,
    Found,
    Unreadable,
    canonical_domain,
    canonical_number,
    email_address,
    parse_constraints,
)
from keybrake.proxy.pricing import AmbiguousRequest, Unpriceable, load_pricing
from keybrake.proxy.settings import VendorCredentials
from keybrake.proxy.vendors import VENDORS
from keybrake.proxy.vendors.base import Cost, Vendor, VendorCall

ALL = frozenset({"currencies", "customers", "destinations"})
TWILIO_MESSAGES = "/2010-04-01/Accounts/AC" + "0" * 32 + "/Messages.json"
FORM = "application/x-www-form-urlencoded"
SERVICE = "MG" + "ab" * 16


class Objects:
    """A vendor's objects by path, as the proxy looks them up with the real key."""

    def __init__(self, objects: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self.objects = objects or {}
        self.fetched: list[str] = []

    async def fetch_json(self, path: str) -> Mapping[str, Any]:
        self.fetched.append(path)
        return self.objects[path.partition("?")[0]]


def vendor(name: str) -> Vendor:
    pricing = load_pricing(None, {n: cls.validate_pricing for n, cls in VENDORS.items()})
    credentials = VendorCredentials(f"http://{name}.invalid", "real-secret", "AC" + "ab" * 16)
    return VENDORS[name](credentials, pricing)


def subjects(
    name: str,
    path: str,
    body: str | bytes = b"",
    *,
    wanted: frozenset[str] = ALL,
    objects: Objects | None = None,
    method: str = "POST",
) -> Found:
    v = vendor(name)
    raw = body.encode() if isinstance(body, str) else body
    content = "application/json" if name == "resend" else "application/x-www-form-urlencoded"
    call = VendorCall(method, path, "", {"content-type": content} if raw else {}, raw)
    lookup = objects or Objects()

    async def read() -> Found:
        cost = await v.estimate(call, lookup)
        return await v.subjects(call, cost, lookup, wanted)

    return asyncio.run(read())


def values(found: Found) -> dict[str, Any]:
    """The values read, and for a field that could not be read, its reason."""
    return {k: (str(v) if isinstance(v, Unreadable) else v) for k, v in found.items()}


# -- the values a key, budget or issuer is given ----------------------------------------------


def test_constraints_are_stored_canonical() -> None:
    parsed = parse_constraints(
        {
            "currencies": ["USD", "eur", "usd"],
            "customers": ["cus_B", "cus_A"],
            "recipients": ["+4420*", "+15005550006"],
            "recipient_domains": ["Example.COM", "bücher.example"],
            "senders": [
                "Billing@Example.com",
                "*@Example.org",
                SERVICE.upper(),
            ],
        }
    )
    assert parsed.as_json() == {
        "mode": "enforce",
        "currencies": ["eur", "usd"],
        "customers": ["cus_A", "cus_B"],
        "recipients": ["+15005550006", "+4420*"],
        "recipient_domains": ["example.com", "xn--bcher-kva.example"],
        "senders": ["*@example.org", "MG" + "ab" * 16, "billing@example.com"],
    }
    assert Constraints.from_json(parsed.as_json()) == parsed


@pytest.mark.parametrize(
    ("data", "vendor_name", "message"),
    [
        ({"customers": ["cus_*"]}, None, "is not a Stripe customer id"),
        ({"customers": "cus_1"}, None, "a list of strings"),
        ({"currencies": ["dollars"]}, None, "ISO 4217"),
        ({"destinations": ["cus_1"]}, None, "account or external account id"),
        ({"recipients": ["4420*"]}, None, "E.164"),
        ({"recipients": ["+44*20"]}, None, "E.164"),
        ({"recipient_domains": ["exa mple.com"]}, None, "not a domain name"),
        ({"senders": ["a@b@c.com"]}, None, "not one email address"),
        ({"payees": ["x"]}, None, "unknown field 'payees'"),
        ({"mode": "warn", "currencies": ["usd"]}, None, "enforce or report"),
        ({"mode": "enforce"}, None, "constrain at least one"),
        ({"recipients": ["+4420*"]}, "stripe", "not a stripe constraint"),
        ([], None, "a JSON object"),
    ],
)
def test_bad_constraints_are_refused_naming_the_entry(
    data: Any, vendor_name: str | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        parse_constraints(data, vendor_name)


@pytest.mark.parametrize(
    ("inner", "outer", "outside"),
    [
        ({"currencies": ["usd"]}, {"currencies": ["usd", "eur"]}, None),
        ({"currencies": ["gbp"]}, {"currencies": ["usd", "eur"]}, "currencies"),
        ({"customers": ["cus_1"]}, {"currencies": ["usd"]}, "currencies"),  # dropped a field
        ({"currencies": ["usd"], "customers": ["cus_1"]}, {"currencies": ["usd"]}, None),
        ({"recipients": ["+442071838750"]}, {"recipients": ["+4420*"]}, None),
        ({"recipients": ["+44207*"]}, {"recipients": ["+4420*"]}, None),
        ({"recipients": ["+44*"]}, {"recipients": ["+4420*"]}, "recipients"),
        ({"recipients": ["+4420*"]}, {"recipients": ["+442071838750"]}, "recipients"),
        ({"senders": ["a@example.com"]}, {"senders": ["*@example.com"]}, None),
        ({"senders": ["*@example.com"]}, {"senders": ["a@example.com"]}, "senders"),
        ({"senders": ["*@mail.example.com"]}, {"senders": ["*@example.com"]}, "senders"),
        ({"mode": "report", "currencies": ["usd"]}, {"currencies": ["usd"]}, "mode"),
        ({"currencies": ["usd"]}, {"mode": "report", "currencies": ["usd"]}, None),
    ],
)
def test_what_lies_within_an_issuers_constraints(
    inner: dict[str, Any], outer: dict[str, Any], outside: str | None
) -> None:
    assert parse_constraints(inner).outside(parse_constraints(outer)) == outside


def test_a_call_is_checked_against_its_own_vendors_fields_only() -> None:
    budget = parse_constraints({"currencies": ["usd"], "recipient_domains": ["example.com"]})
    found: Found = {"currencies": ("eur",), "recipient_domains": ("evil.test",)}
    violation = budget.check("resend", found)
    assert violation is not None and violation.field == "recipient_domains"
    assert budget.check("twilio", found) is None  # neither field is Twilio's
    unreadable: Found = {"currencies": Unreadable("currencies", "currencies: unreadable")}
    refused = budget.check("stripe", unreadable)
    assert refused is not None and refused.reason == "currencies: unreadable"


def test_numbers_addresses_and_domains_are_read_one_way() -> None:
    assert canonical_number("recipients", " +442071838750 ") == "+442071838750"
    assert canonical_number("recipients", "whatsapp:+442071838750") == "+442071838750"
    for other in ("messenger:+44207", "client:+44207", "+44 20 7183", "0044207", "+0207", ""):
        with pytest.raises(Unreadable):
            canonical_number("recipients", other)
    assert email_address("senders", "Billing <Billing@Example.COM>") == "billing@example.com"
    assert email_address("senders", "a@bücher.example") == "a@xn--bcher-kva.example"
    for several in ("a@x.com, b@y.com", "a@x.com;b@y.com", "<a@x.com> <b@y.com>", "x.com", "@x"):
        with pytest.raises(Unreadable):
            email_address("recipient_domains", several)
    with pytest.raises(Unreadable):
        canonical_domain("recipient_domains", "example..com")


# -- Stripe: what each endpoint says, and when it is looked up ---------------------------------

INTENT = {"id": "pi_1", "amount": 500, "currency": "usd", "customer": "cus_1"}


def test_stripe_reads_a_new_payment_intents_currency_customer_and_destination() -> None:
    body = "amount=500&currency=USD&customer=cus_3&transfer_data[destination]=acct_9"
    assert values(subjects("stripe", "/v1/payment_intents", body)) == {
        "currencies": ("usd",),
        "customers": ("cus_3",),
        "destinations": ("acct_9",),
    }
    nobody = values(subjects("stripe", "/v1/payment_intents", "amount=500&currency=usd"))
    assert nobody["customers"] == "customers: POST /v1/payment_intents names no customer"
    assert nobody["destinations"] == ()  # the money stays on the account


def test_stripe_looks_up_the_intent_a_call_acts_on_once() -> None:
    objects = Objects({"/v1/payment_intents/pi_1": INTENT})
    confirm = subjects("stripe", "/v1/payment_intents/pi_1/confirm", objects=objects)
    assert values(confirm) == {"currencies": ("usd",), "customers": ("cus_1",), "destinations": ()}
    assert objects.fetched == ["/v1/payment_intents/pi_1"] * 3  # pricing and both fields
    # An update that moves the intent to another customer names both: the one it has and the one
    # it would have. Free (no amount), still read.
    moved = subjects(
        "stripe", "/v1/payment_intents/pi_1", "customer=cus_3", objects=Objects(objects.objects)
    )
    assert values(moved)["customers"] == ("cus_1", "cus_3")
    assert moved["currencies"] == ()  # nothing priced


def test_stripe_refunds_transfers_and_payouts() -> None:
    objects = Objects(
        {
            "/v1/charges/ch_1": {
                "id": "ch_1",
                "amount": 900,
                "currency": "usd",
                "amount_refunded": 0,
                "customer": "cus_2",
            }
        }
    )
    refund = subjects("stripe", "/v1/refunds", "charge=ch_1", objects=objects)
    assert values(refund)["customers"] == ("cus_2",)
    transfer = subjects("stripe", "/v1/transfers", "amount=5&currency=usd&destination=acct_7")
    assert values(transfer)["destinations"] == ("acct_7",)
    payout = values(subjects("stripe", "/v1/payouts", "amount=5&currency=usd"))
    assert payout["destinations"].startswith("destinations: POST /v1/payouts names no")
    # A priced call that says neither, in its body nor in an object it acts on, is unreadable.
    assert values(transfer)["customers"] == (
        "customers: keybrake cannot tell the customer of POST /v1/transfers"
    )
    assert values(refund)["destinations"] == (
        "destinations: keybrake cannot tell where POST /v1/refunds pays out"
    )
    # A priced call whose customer and destination no rule reads cannot be constrained.
    invoice = subjects(
        "stripe",
        "/v1/invoices/in_1/pay",
        objects=Objects({"/v1/invoices/in_1": {"amount_due": 100, "currency": "usd"}}),
    )
    assert values(invoice)["customers"] == "customers: the invoice has no customer"


@pytest.mark.parametrize(
    "headers,named",
    [
        ({"stripe-account": "acct_Z"}, ("acct_Z",)),
        ({"stripe-context": "acct_X/acct_Z"}, ("acct_X", "acct_Z")),
        ({"stripe-account": "acct_Z", "stripe-context": "acct_Y"}, ("acct_Z", "acct_Y")),
    ],
)
def test_stripe_a_priced_call_on_a_connected_account_pays_out_there(
    headers: dict[str, str], named: tuple[str, ...]
) -> None:
    """A direct charge on acct_Z names no `transfer_data`, yet its money settles in acct_Z: it
    passed a `destinations` constraint naming other accounts only."""
    v = vendor("stripe")
    body = b"amount=5000&currency=usd&transfer_data[destination]=acct_X"
    form = {"content-type": "application/x-www-form-urlencoded"}
    call = VendorCall("POST", "/v1/payment_intents", "", {**form, **headers}, body)
    lookup = Objects({"/v1/payment_intents/pi_1": INTENT})
    confirm = VendorCall("POST", "/v1/payment_intents/pi_1/confirm", "", headers, b"")

    async def read(call: VendorCall) -> Found:
        cost = await v.estimate(call, lookup)
        return await v.subjects(call, cost, lookup, frozenset({"destinations"}))

    assert asyncio.run(read(call)) == {"destinations": (*named, "acct_X")}
    assert asyncio.run(read(confirm)) == {"destinations": named}
    # A free call moves no money on any account.
    free = VendorCall("POST", "/v1/customers", "", {**form, **headers}, b"email=a@b.c")
    assert asyncio.run(read(free)) == {"destinations": ()}


def test_stripe_a_customer_update_or_delete_names_the_customer_in_its_path() -> None:
    """Free, yet an update can raise what the customer's next invoice bills: under `customers`
    it names the customer it writes, from its path. Before, it named none and passed."""
    customers = frozenset({"customers"})
    update = subjects("stripe", "/v1/customers/cus_B", "email=a@b.c", wanted=customers)
    assert update == {"customers": ("cus_B",)}
    deleted = subjects("stripe", "/v1/customers/cus_B", method="DELETE", wanted=customers)
    assert deleted == {"customers": ("cus_B",)}
    # A new customer is no one's yet, and moves no money.
    assert subjects("stripe", "/v1/customers", "email=a@b.c", wanted=customers) == {"customers": ()}


@pytest.mark.parametrize(
    "body",
    [
        "amount=5&currency=usd&customer=cus_1&customer=cus_3",  # which one Stripe keeps
        "amount=5&currency=usd&customer=cus_1&Customer=cus_3",
        "amount=5&currency=usd&customer=cus_1&transfer_data[destination]=acct_1"
        "&transfer_data[Destination]=acct_2",
        "amount=5&currency=usd&customer=cus_1&transfer_data[destination]=acct_1"
        "&transfer_data[destination][x]=acct_2",
        "amount=5&currency=usd&customer=cus_1&transfer_data=acct_2",
    ],
)
def test_stripe_refuses_a_constrained_field_it_could_read_two_ways(body: str) -> None:
    with pytest.raises(AmbiguousRequest):
        subjects("stripe", "/v1/payment_intents", body)


def test_stripe_reads_nothing_of_a_free_call_or_an_unconstrained_field() -> None:
    free = subjects("stripe", "/v1/payment_intents/pi_1", method="GET")
    assert free == {"currencies": (), "customers": (), "destinations": ()}
    only = subjects(
        "stripe", "/v1/payment_intents", "amount=5&currency=usd", wanted=frozenset({"currencies"})
    )
    assert only == {"currencies": ("usd",)}


# -- Twilio and Resend -----------------------------------------------------------------------


def test_twilio_reads_to_and_from_of_a_message() -> None:
    wanted = frozenset({"recipients", "senders"})
    body = f"To=%2B442071838750&From=%2B15005550006&MessagingServiceSid={SERVICE}&Body=hi"
    assert values(subjects("twilio", TWILIO_MESSAGES, body, wanted=wanted)) == {
        "recipients": ("+442071838750",),
        "senders": ("+15005550006", SERVICE),
    }
    # Not a number in E.164: Twilio may route it to the number it spells, so pricing refuses it
    # first, and the constraints' reading (the same one) would not read it either.
    spaced = "To=%2B44%2020%207183%208750&Body=hi"
    with pytest.raises(Unpriceable, match=r"not a phone number in E\.164"):
        subjects("twilio", TWILIO_MESSAGES, spaced, wanted=wanted)
    call = VendorCall("POST", TWILIO_MESSAGES, "", {"content-type": FORM}, spaced.encode())
    priced = Cost(8_300, 1, "sms_segment", priced=True)
    other = values(asyncio.run(vendor("twilio").subjects(call, priced, Objects(), wanted)))
    assert other["recipients"].startswith("recipients: '+44 20 7183 8750' is not a phone number")
    assert other["senders"] == "senders: the message names no From"


def test_resend_reads_every_recipient_and_sender_of_an_email_and_a_batch() -> None:
    wanted = frozenset({"recipient_domains", "senders"})
    email = {
        "from": "Billing <billing@example.com>",
        "to": ["a@example.com", "B@Example.com"],
        "cc": "c@evil.test",
        "subject": "s",
        "html": "h",
    }
    found = subjects("resend", "/emails", json.dumps(email), wanted=wanted)
    assert values(found) == {
        "recipient_domains": ("example.com", "example.com", "evil.test"),
        "senders": ("billing@example.com",),
    }
    batch = [email, {**email, "to": "x@other.test", "cc": None, "from": "z@example.com"}]
    found = subjects("resend", "/emails/batch", json.dumps(batch), wanted=wanted)
    assert values(found)["senders"] == ("billing@example.com", "z@example.com")
    several = {**email, "to": "a@example.com, b@evil.test"}  # Resend splits it: refused
    found = subjects("resend", "/emails", json.dumps(several), wanted=wanted)
    assert str(found["recipient_domains"]).endswith("is not one email address")


# -- review findings: each a way past a constraint, or a traceback ---------------------------


@pytest.mark.parametrize("domain", ["ok\u200d.com", "\uff45xample.com"])
def test_a_domain_mail_software_reads_otherwise_is_refused(domain: str) -> None:
    """A joiner IDNA 2003 (Python's codec) dropped, full-width letters UTS 46 maps to others:
    read neither way, refused on both sides."""
    with pytest.raises(Unreadable):
        canonical_domain("recipient_domains", domain)
    with pytest.raises(ValueError):
        parse_constraints({"recipient_domains": [domain]})
    email = {"from": "a@example.com", "to": f"b@{domain}", "subject": "s", "html": "h"}
    found = subjects(
        "resend", "/emails", json.dumps(email), wanted=frozenset({"recipient_domains"})
    )
    assert isinstance(found["recipient_domains"], Unreadable)


def test_domains_are_encoded_as_mail_software_does_not_as_idna_2003() -> None:
    """Python's codec read `straße.de` as `strasse.de`: another domain, admitted by its list."""
    assert canonical_domain("recipient_domains", "straße.de") == "xn--strae-oqa.de"
    assert canonical_domain("recipient_domains", "Bücher.Example") == "xn--bcher-kva.example"
    held = parse_constraints({"recipient_domains": ["strasse.de"]})
    email = {"from": "a@example.com", "to": "b@straße.de", "subject": "s", "html": "h"}
    found = subjects(
        "resend", "/emails", json.dumps(email), wanted=frozenset({"recipient_domains"})
    )
    assert held.check("resend", found) is not None


def test_a_domain_given_encoded_is_itself_and_a_bad_a_label_is_no_domain() -> None:
    """Operators and mail both write domains as A-labels too: the same domain as its Unicode
    name (a patch re-reads the canonical form it was given), while an A-label that does not
    decode validly names no domain."""
    for given in ("xn--bcher-kva.example", "XN--BCHER-KVA.example", "bücher.example"):
        assert canonical_domain("recipient_domains", given) == "xn--bcher-kva.example"
    canonical = parse_constraints({"recipient_domains": ["bücher.example"]}).as_json()
    assert parse_constraints(canonical).as_json() == canonical
    for bad in ("xn--zz.example", "xn--ok-xyz.com"):
        with pytest.raises(Unreadable):
            canonical_domain("recipient_domains", bad)
    email = {"from": "a@example.com", "to": "b@xn--bcher-kva.example", "subject": "s", "html": "h"}
    found = subjects(
        "resend", "/emails", json.dumps(email), wanted=frozenset({"recipient_domains"})
    )
    assert parse_constraints(canonical).check("resend", found) is None


def test_a_sender_header_beside_from_is_refused_under_a_senders_constraint() -> None:
    email = {
        "from": "a@example.com",
        "to": "b@example.com",
        "subject": "s",
        "html": "h",
        "headers": {"Sender": "x@evil.test"},
    }
    found = subjects("resend", "/emails", json.dumps(email), wanted=frozenset({"senders"}))
    assert str(found["senders"]) == "senders: a sender header is refused; name it in `from`"


@pytest.mark.parametrize("field", ["transfer_data[0][destination]", "transfer_data[][destination]"])
def test_a_destination_nested_in_a_list_is_refused(field: str) -> None:
    with pytest.raises(AmbiguousRequest):
        subjects(
            "stripe", "/v1/payment_intents", f"amount=5&currency=usd&customer=cus_1&{field}=acct_9"
        )


def test_bad_rates_and_nested_inputs_are_usage_errors_not_tracebacks() -> None:
    import typer

    from keybrake.cli import _options as options
    from keybrake.hera_workflows import _step_issue
    from keybrake.hera_workflows._step_common import InputError

    for value in ("²", "٣", "9" * 5000):
        with pytest.raises(typer.Exit):
            options.constraints([f"max_calls_per_minute={value}"], None)
    with pytest.raises(InputError):
        _step_issue.constraints({"KEYBRAKE_CONSTRAINTS": "[" * 100_000})
    with pytest.raises(ValueError, match="unknown field"):
        parse_constraints({1: ["x"], "zz": ["cus_1"]})


def test_an_address_beginning_with_a_plus_is_an_address_not_a_number() -> None:
    """One `senders` list for a run's Twilio and Resend keys: `+44evil@attacker.com` is an
    address outside it (a `+44*` number prefix does not admit it), `+tag@mycorp.com` one its
    `*@mycorp.com` admits."""
    held = parse_constraints({"senders": ["+44*", "*@mycorp.com"]})
    for sender, admitted in (
        ("+44evil@attacker.com", False),
        ("+tag@mycorp.com", True),
        ("+447700900123", True),
    ):
        email = {"from": sender, "to": "b@example.com", "subject": "s", "html": "h"}
        vendor, path = ("resend", "/emails") if "@" in sender else ("twilio", None)
        if vendor == "twilio":
            found = {"senders": (sender,)}
        else:
            found = subjects(vendor, path or "", json.dumps(email), wanted=frozenset({"senders"}))
        assert (held.check(vendor, found) is None) == admitted, sender
