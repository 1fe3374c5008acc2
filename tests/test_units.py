"""Units without HTTP: money, durations, endpoints, paths, the pricing table, Stripe prices."""

from __future__ import annotations

import asyncio
import tomllib
from collections.abc import Mapping
from datetime import timedelta
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from keybrake.proxy.endpoints import EndpointPattern, allows, compile_patterns, safe_path
from keybrake.proxy.errors import ConfigError
from keybrake.proxy.money import format_usd, parse_duration, usd_to_micros
from keybrake.proxy.pricing import AmbiguousRequest, Unpriceable, load_pricing
from keybrake.proxy.settings import VendorCredentials
from keybrake.proxy.vendors import VENDORS
from keybrake.proxy.vendors.base import VendorCall
from keybrake.proxy.vendors.stripe import Stripe

VALIDATORS = {name: cls.validate_pricing for name, cls in VENDORS.items()}


def test_money_is_exact_and_rounds_estimates_up() -> None:
    assert usd_to_micros(Decimal("300")) == 300_000_000
    assert usd_to_micros(Decimal("0.0079")) == 7_900
    assert usd_to_micros(Decimal("0.0000001")) == 1
    assert format_usd(300_000_000) == "300.00"
    assert format_usd(7_900) == "0.0079"
    assert format_usd(1_500_000) == "1.50"


@pytest.mark.parametrize(
    "text,expected", [("90s", 90), ("30m", 1800), ("2h", 7200), ("7d", 604800), ("1w", 604800)]
)
def test_durations(text: str, expected: int) -> None:
    assert parse_duration(text) == timedelta(seconds=expected)


@pytest.mark.parametrize("text", ["", "2", "h", "-1h", "1.5h", "2 fortnights", "1y"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


def test_endpoint_patterns() -> None:
    patterns = compile_patterns(("POST /v1/payment_intents", "GET /v1/customers/*"))
    assert allows(patterns, "POST", "/v1/payment_intents")
    assert allows(patterns, "GET", "/v1/customers/cus_1")
    assert not allows(patterns, "GET", "/v1/customers")
    assert not allows(patterns, "GET", "/v1/customers/cus_1/sources")
    assert not allows(patterns, "POST", "/v1/customers/cus_1")
    assert str(EndpointPattern.parse("post /v1/x")) == "POST /v1/x"


@pytest.mark.parametrize(
    "raw,ok",
    [
        ("/v1/payment_intents", True),
        ("/v1/customers/cus_1", True),
        ("/v1/payment_intents/", False),
        ("/v1/../vault", False),
        ("/v1/%2e%2e/vault", False),
        ("/v1/a%2Fb", False),
        ("/v1//x", False),
        ("/v1/./x", False),
        ("v1/x", False),
        ("/v1/a\\b", False),
        ("/v1/a%252e", False),
        ("/v1/a\x00b", False),
    ],
)
def test_safe_path(raw: str, ok: bool) -> None:
    assert (safe_path(raw) is not None) is ok


class FakeLookup:
    def __init__(self, objects: Mapping[str, Mapping[str, Any]]) -> None:
        self.objects = objects
        self.fetched: list[str] = []

    async def fetch_json(self, path: str) -> Mapping[str, Any]:
        self.fetched.append(path)
        return self.objects[path.partition("?")[0]]


def stripe_vendor(tmp_path: Path | None = None, extra: str = "") -> Stripe:
    operator = None
    if extra and tmp_path is not None:
        operator = tmp_path / "pricing.toml"
        operator.write_text(extra)
    table = load_pricing(operator, VALIDATORS)
    return Stripe(VendorCredentials("http://stripe.invalid", "sk_test"), table)


def estimate(
    vendor: Stripe, method: str, path: str, body: str = "", lookup: FakeLookup | None = None
) -> Any:
    headers = {"content-type": "application/x-www-form-urlencoded"} if body else {}
    call = VendorCall(method, path, "", headers, body.encode())
    return asyncio.run(vendor.estimate(call, lookup or FakeLookup({})))


def test_stripe_amounts_in_minor_units_and_currency_exponents(tmp_path: Path) -> None:
    vendor = stripe_vendor(tmp_path, '[fx]\njpy = "0.0067"\nkwd = "3.25"\neur = "1.08"\n')
    assert (
        estimate(vendor, "POST", "/v1/payment_intents", "amount=100&currency=usd").micros
        == 1_000_000
    )
    # zero-decimal: 1000 JPY is 1000 yen
    assert (
        estimate(vendor, "POST", "/v1/payment_intents", "amount=1000&currency=jpy").micros
        == 6_700_000
    )
    # three-decimal: 1500 KWD minor units are 1.5 dinars
    assert estimate(vendor, "POST", "/v1/charges", "amount=1500&currency=kwd").micros == 4_875_000
    assert (
        estimate(vendor, "POST", "/v1/transfers", "amount=1000&currency=EUR").micros == 10_800_000
    )


def test_stripe_fails_closed(tmp_path: Path) -> None:
    vendor = stripe_vendor()
    with pytest.raises(Unpriceable, match=r"\[fx\]"):
        estimate(vendor, "POST", "/v1/payment_intents", "amount=100&currency=eur")
    with pytest.raises(Unpriceable, match="no amount"):
        estimate(vendor, "POST", "/v1/payouts", "currency=usd")
    with pytest.raises(AmbiguousRequest, match="not a whole number"):
        estimate(vendor, "POST", "/v1/payouts", "amount=1.5&currency=usd")
    with pytest.raises(AmbiguousRequest, match="not a whole number"):
        estimate(vendor, "POST", "/v1/payouts", "amount=-5&currency=usd")
    with pytest.raises(Unpriceable, match=r"\[stripe.endpoints\]"):
        estimate(vendor, "POST", "/v1/subscriptions", "customer=cus_1")
    assert estimate(vendor, "GET", "/v1/anything/at/all").micros == 0
    assert estimate(vendor, "POST", "/v1/customers", "email=a@b.c").micros == 0


def test_stripe_confirm_and_capture_move_the_object_amount() -> None:
    """Their gross amount, looked up, naming the object: the ledger offsets it by what the same
    payer paid for it (tests/test_decision_table.py)."""
    vendor = stripe_vendor()
    objects = {
        "/v1/payment_intents/pi_1": {"id": "pi_1", "amount": 2500, "currency": "usd"},
        "/v1/charges/ch_1": {"id": "ch_1", "amount": 700, "currency": "usd"},
    }
    lookup = FakeLookup(objects)
    for action in ("confirm", "capture"):
        cost = estimate(vendor, "POST", f"/v1/payment_intents/pi_1/{action}", "", lookup)
        assert (cost.micros, cost.counts, cost.paid_object) == (25_000_000, ("pi_1",), "pi_1")
    partial = estimate(
        vendor, "POST", "/v1/payment_intents/pi_1/capture", "amount_to_capture=1000", lookup
    )
    assert (partial.micros, partial.paid_object) == (10_000_000, "pi_1")
    charge = estimate(vendor, "POST", "/v1/charges/ch_1/capture", "", lookup)
    assert (charge.micros, charge.paid_object) == (7_000_000, "ch_1")
    assert lookup.fetched == ["/v1/payment_intents/pi_1"] * 3 + ["/v1/charges/ch_1"]


def test_stripe_increment_authorization_prices_the_new_total_less_the_current() -> None:
    """`amount` is the intent's new total (Stripe's API reference); the request names no
    currency, so the intent's is used. Before, the call was refused for naming none."""
    vendor = stripe_vendor()
    lookup = FakeLookup(
        {"/v1/payment_intents/pi_1": {"id": "pi_1", "amount": 2500, "currency": "usd"}}
    )
    path = "/v1/payment_intents/pi_1/increment_authorization"
    cost = estimate(vendor, "POST", path, "amount=4000", lookup)
    assert (cost.micros, cost.amount, cost.currency, cost.counts) == (
        15_000_000,
        1500,
        "usd",
        ("pi_1",),
    )
    assert estimate(vendor, "POST", path, "amount=2000", lookup).micros == 0
    with pytest.raises(Unpriceable, match="no amount"):
        estimate(vendor, "POST", path, "metadata[a]=b", lookup)
    with pytest.raises(AmbiguousRequest, match="application_fee_amount"):  # not known free
        estimate(vendor, "POST", path, "amount=4000&application_fee_amount=9", lookup)


def test_stripe_confirm_prices_amount_to_confirm_and_capture_what_is_capturable() -> None:
    """A confirm moves `amount_to_confirm` when given (API 2026-04-22.dahlia), which may exceed
    the intent's amount: a $1 intent confirmed for $10,000 was priced $1. A capture without
    `amount_to_capture` moves the intent's amount_capturable, which that confirm raised: it was
    priced at `amount`. A confirm naming `amount_to_capture` (a capture's field) was priced at it;
    it is refused now, as any field Stripe does not document for the endpoint."""
    vendor = stripe_vendor()
    held = {"id": "pi_1", "amount": 100, "amount_capturable": 1_000_000, "currency": "usd"}
    lookup = FakeLookup({"/v1/payment_intents/pi_1": held})
    confirm = "/v1/payment_intents/pi_1/confirm"
    padded = estimate(vendor, "POST", confirm, "amount_to_confirm=1000000&return_url=x", lookup)
    assert (padded.micros, padded.amount, padded.paid_object) == (10_000_000_000, 1_000_000, "pi_1")
    assert estimate(vendor, "POST", confirm, "payment_method=pm_1", lookup).micros == 1_000_000
    with pytest.raises(AmbiguousRequest, match="'amount_to_capture'"):
        estimate(vendor, "POST", confirm, "amount_to_capture=1", lookup)
    with pytest.raises(AmbiguousRequest, match="appears 2 times"):
        estimate(vendor, "POST", confirm, "amount_to_confirm=1&amount_to_confirm=9", lookup)
    capture = "/v1/payment_intents/pi_1/capture"
    assert estimate(vendor, "POST", capture, "", lookup).micros == 10_000_000_000
    assert estimate(vendor, "POST", capture, "amount_to_capture=500", lookup).micros == 5_000_000
    # Not confirmed yet (nothing capturable): the intent's amount, as before.
    lookup.objects = {"/v1/payment_intents/pi_1": {**held, "amount_capturable": 0}}
    assert estimate(vendor, "POST", capture, "", lookup).micros == 1_000_000


MONEY_ENDPOINTS = [
    (
        "/v1/payment_intents",
        "amount=100&currency=usd&customer=cus_1&automatic_payment_methods"
        "[enabled]=true&confirm=true&return_url=x&transfer_data[destination]=acct_1",
    ),
    ("/v1/payment_intents/pi_1/confirm", "payment_method=pm_1&off_session=true&mandate=m"),
    ("/v1/payment_intents/pi_1/capture", "amount_to_capture=100&final_capture=false"),
    ("/v1/payment_intents/pi_1/increment_authorization", "amount=200&payment_details[x]=y"),
    ("/v1/charges", "amount=100&currency=usd&source=tok_visa&capture=false"),
    ("/v1/charges/ch_1/capture", "amount=100&receipt_email=a@b.c"),
    ("/v1/refunds", "charge=ch_1&reason=duplicate&reverse_transfer=true"),
    ("/v1/transfers", "amount=100&currency=usd&destination=acct_1&source_transaction=ch_1"),
    ("/v1/payouts", "amount=100&currency=usd&method=instant&statement_descriptor=x"),
    ("/v1/invoices/in_1/pay", "payment_method=pm_1&off_session=true"),
]


@pytest.mark.parametrize("path,body", MONEY_ENDPOINTS)
def test_stripe_money_endpoints_take_the_fields_stripe_documents_and_no_other(
    path: str, body: str
) -> None:
    """A field the endpoint's list does not hold (a money parameter Stripe adds later, as it
    added `amount_to_confirm`) is refused naming it, never forwarded unpriced."""
    vendor = stripe_vendor()
    lookup = FakeLookup(
        {
            "/v1/payment_intents/pi_1": {"id": "pi_1", "amount": 100, "currency": "usd"},
            "/v1/charges/ch_1": {"id": "ch_1", "amount": 100, "currency": "usd"},
            "/v1/invoices/in_1": {"id": "in_1", "amount_remaining": 100, "currency": "usd"},
        }
    )
    assert estimate(vendor, "POST", path, body, lookup).priced
    with pytest.raises(AmbiguousRequest, match=r"refuses field 'amount_surcharge\[value\]'"):
        estimate(vendor, "POST", path, f"{body}&amount_surcharge[value]=1", lookup)


# The stripe-python parameters (its `stripe.params` TypedDicts, pinned in pyproject.toml) of each
# endpoint with a list in the shipped pricing.toml, and what its list leaves out on purpose
# (pricing.toml says why above each list).
SDK_PARAMS = {
    "POST /v1/payment_intents": ("PaymentIntentCreateParams", set()),
    "POST /v1/payment_intents/*": ("PaymentIntentUpdateParams", {"transfer_data"}),
    "POST /v1/payment_intents/*/confirm": ("PaymentIntentConfirmParams", set()),
    "POST /v1/payment_intents/*/capture": ("PaymentIntentCaptureParams", set()),
    "POST /v1/payment_intents/*/increment_authorization": (
        "PaymentIntentIncrementAuthorizationParams",
        {"application_fee_amount", "transfer_data"},
    ),
    "POST /v1/charges": ("ChargeCreateParams", set()),
    "POST /v1/charges/*": ("ChargeUpdateParams", set()),
    "POST /v1/charges/*/capture": ("ChargeCaptureParams", set()),
    "POST /v1/refunds": ("RefundCreateParams", {"currency", "customer", "origin"}),
    "POST /v1/refunds/*": ("RefundUpdateParams", set()),
    "POST /v1/transfers": ("TransferCreateParams", set()),
    "POST /v1/transfers/*": ("TransferUpdateParams", set()),
    "POST /v1/payouts": ("PayoutCreateParams", {"payout_method"}),
    "POST /v1/invoices/*/pay": ("InvoicePayParams", set()),
    "POST /v1/customers": ("CustomerCreateParams", {"balance", "cash_balance", "tax_exempt"}),
    "POST /v1/customers/*": (
        "CustomerUpdateParams",
        {"balance", "cash_balance", "source", "tax_exempt"},
    ),
}
# Listed for accounts on API versions before the one the SDK sends (endive removed it).
OLDER_VERSIONS = {"payment_method_types"}


def test_each_stripe_list_is_the_pinned_sdks_parameters_less_what_moves_money() -> None:
    """A workload on the SDK keybrake pins can send every parameter it documents, but those left
    out on purpose; an SDK upgrade that adds one fails here, not in a user's workflow."""
    import stripe.params
    from stripe._request_options import RequestOptions

    from keybrake.proxy.vendors.stripe import _READS

    shipped = resources.files("keybrake.proxy").joinpath("pricing.toml").read_text("utf-8")
    table = tomllib.loads(shipped)["stripe"]["endpoints"]
    listed = {endpoint for endpoint, entry in table.items() if isinstance(entry, dict)}
    assert listed == set(SDK_PARAMS)
    options = set(RequestOptions.__annotations__)
    for endpoint, (name, left_out) in SDK_PARAMS.items():
        entry = table[endpoint]
        allowed = {f.partition("[")[0] for f in entry["free_fields"]} | set(_READS[entry["rule"]])
        sdk = set(getattr(stripe.params, name).__annotations__) - options
        assert sdk - allowed == left_out, endpoint
        assert allowed - sdk <= OLDER_VERSIONS, endpoint


@pytest.mark.parametrize(
    "path,body",
    [
        ("/v1/customers/cus_1", "balance=100000000"),  # billed on the next invoice
        ("/v1/customers/cus_1", "email=a@b.c&cash_balance[settings][reconciliation_mode]=manual"),
        ("/v1/customers/cus_1", "source=tok_visa"),
        ("/v1/customers/cus_1", "tax_exempt=none"),
        ("/v1/customers/cus_1", "coupon=FREE"),
        ("/v1/customers", "email=a@b.c&balance=5"),
    ],
)
def test_stripe_customer_writes_refuse_money_fields(path: str, body: str) -> None:
    """A customer's `balance` is added to its next invoice: it was free with any body (and any
    query string, the body of a free rule being unread)."""
    vendor = stripe_vendor()
    with pytest.raises(AmbiguousRequest, match="refuses field"):
        estimate(vendor, "POST", path, body)
    assert not estimate(vendor, "POST", path, "email=a@b.c&metadata[x]=y&name=A").priced
    call = VendorCall("POST", path, "balance=5", {}, b"")
    with pytest.raises(AmbiguousRequest, match="query string"):
        asyncio.run(vendor.estimate(call, FakeLookup({})))


def test_stripe_refunds_and_invoices() -> None:
    vendor = stripe_vendor()
    lookup = FakeLookup(
        {
            "/v1/charges/ch_1": {
                "id": "ch_1",
                "amount": 5000,
                "amount_refunded": 1500,
                "currency": "usd",
            },
            "/v1/payment_intents/pi_2": {
                "id": "pi_2",
                "amount": 900,
                "currency": "usd",
                "latest_charge": {"amount": 900, "amount_refunded": 0, "currency": "usd"},
            },
            "/v1/invoices/in_1": {"id": "in_1", "amount_remaining": 1234, "currency": "usd"},
        }
    )
    assert estimate(vendor, "POST", "/v1/refunds", "charge=ch_1", lookup).micros == 35_000_000
    assert (
        estimate(vendor, "POST", "/v1/refunds", "charge=ch_1&amount=100", lookup).micros
        == 1_000_000
    )
    assert (
        estimate(vendor, "POST", "/v1/refunds", "payment_intent=pi_2", lookup).micros == 9_000_000
    )
    assert estimate(vendor, "POST", "/v1/invoices/in_1/pay", "", lookup).micros == 12_340_000
    with pytest.raises(Unpriceable):
        estimate(vendor, "POST", "/v1/refunds", "", lookup)


def test_operator_pricing_file_extends_and_validates(tmp_path: Path) -> None:
    vendor = stripe_vendor(tmp_path, '[stripe.endpoints]\n"POST /v1/subscriptions" = "free"\n')
    assert estimate(vendor, "POST", "/v1/subscriptions").micros == 0
    assert estimate(vendor, "POST", "/v1/payment_intents", "amount=1&currency=usd").micros == 10_000


def test_an_operators_rule_alone_keeps_the_shipped_list_of_fields(tmp_path: Path) -> None:
    """An operator who re-states an endpoint's rule must not open it to every field; one who
    gives `free_fields` replaces the list."""
    create = "/v1/payment_intents"
    ruled = stripe_vendor(tmp_path, '[stripe.endpoints]\n"POST /v1/payment_intents" = "amount"\n')
    assert estimate(ruled, "POST", create, "amount=1&currency=usd&customer=cus_1").priced
    with pytest.raises(AmbiguousRequest, match="refuses field 'amount_surcharge'"):
        estimate(ruled, "POST", create, "amount=1&currency=usd&amount_surcharge=9")
    listed = stripe_vendor(
        tmp_path,
        '[stripe.endpoints]\n"POST /v1/payment_intents" = { free_fields = ["amount_surcharge"] }\n',
    )
    assert estimate(listed, "POST", create, "amount=1&currency=usd&amount_surcharge=9").priced
    with pytest.raises(AmbiguousRequest, match="refuses field 'customer'"):
        estimate(listed, "POST", create, "amount=1&currency=usd&customer=cus_1")


@pytest.mark.parametrize(
    "text,message",
    [
        ('[stripe.endpoints]\n"POST /v1/x" = "cheap"\n', "line 2"),
        ('[stripe.endpoints]\n"FETCH /v1/x" = "free"\n', "line 2"),
        (
            '[stripe.endpoints]\n"POST /v1/payment_intents/*/confirm" = "intent_amount"\n',
            "confirm_amount",
        ),
        ('[fx]\neur = "-1"\n', "line 2"),
        ('[fx]\neur = "abc"\n', "fx.eur"),
        ("[currency_exponents]\nabc = 9\n", "line 2"),
        ("[paypal]\nx = 1\n", "unknown section [paypal]"),
        ("this is = = not toml", "pricing.toml"),
    ],
)
def test_bad_pricing_files_name_the_bad_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "pricing.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_pricing(path, VALIDATORS)


def test_yaml_pricing_file(tmp_path: Path) -> None:
    path = tmp_path / "pricing.yaml"
    path.write_text("fx:\n  gbp: '1.27'\n")
    table = load_pricing(path, VALIDATORS)
    assert table.minor_to_micros(100, "GBP") == 1_270_000
    assert table.sources == ("builtin", str(path))
