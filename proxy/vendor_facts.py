"""What keybrake knows of each vendor it proxies, as plain data, stated once.

Per vendor: its name (the proxy's URL prefix `/<name>/`, a key's `vendor`, its pricing section),
the proxy's settings holding its real credential and its upstream (`KEYBRAKE_<SETTING>`), the
environment variables a workload's SDK reads its key and base URL from (and any it needs set to
a fixed value: Twilio's placeholder account SID), and its usual spending call, what a key may
call unless told otherwise (priced in the default pricing table).

Readers: the proxy's vendor modules and settings, `keybrake wrap` and `lint` (`keybrake.adopt`)
and the Hera library (`keybrake.hera_workflows`, which renders templates/ from it). A test
(tests/test_vendor_facts.py) fails when one of them states a fact again instead of reading it.

Why here, beside `endpoints.py`, and not in `keybrake.proxy.vendors`: importing that package
imports every vendor module and with them the pricing table and the settings (pydantic), while
`keybrake.proxy`'s own `__init__` imports nothing. So this module costs the standard library only:
the Hera library and `keybrake wrap` read it without loading the proxy's request path (starlette,
httpx, asyncpg). The step scripts the Hera library embeds in templates (`_step_issue.py`,
`_step_revoke.py`) run on a stock Python image and import nothing of keybrake; none of them needs
a vendor fact.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "RESEND",
    "STRIPE",
    "TWILIO",
    "TWILIO_API_VERSION",
    "TWILIO_PLACEHOLDER_SID",
    "VENDOR_FACTS",
    "VENDOR_NAMES",
    "ProxySettings",
    "SdkVariables",
    "VendorFacts",
    "setting_variable",
]

# Twilio's account SID as the workload sends it, in its SDK's username and in the path: the proxy
# puts the real one in (any `AC` + 32 hex digits works; this is the one keybrake hands out).
TWILIO_PLACEHOLDER_SID = "AC" + "0" * 32
TWILIO_API_VERSION = "2010-04-01"


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """The proxy's settings of a vendor (fields of `keybrake.proxy.settings.Settings`, each read
    from KEYBRAKE_<FIELD>): its real credential, its upstream and the upstream's default, and the
    account the credential belongs to when the vendor needs one beside it ("" when not)."""

    credential: str
    upstream: str
    default_upstream: str
    account: str = ""

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name in (self.credential, self.upstream, self.account) if name)


@dataclass(frozen=True, slots=True)
class SdkVariables:
    """What a workload's SDK reads from its environment: its key (the pod gets the vault key),
    its base URL (the proxy's `/<vendor>` prefix), and any variables it needs set to a fixed
    value."""

    key: str
    base_url: str
    fixed: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class VendorFacts:
    """One vendor, as the proxy, `keybrake wrap` and the Hera library know it."""

    name: str
    settings: ProxySettings
    sdk: SdkVariables
    usual_endpoints: tuple[str, ...]
    # The request headers naming another account a call acts on (Stripe's connected accounts):
    # part of what a call is, and what a key's `allowed_accounts` allows. None: no such accounts.
    account_headers: tuple[str, ...] = ()


STRIPE = VendorFacts(
    "stripe",
    ProxySettings("stripe_secret_key", "stripe_api_base", "https://api.stripe.com"),
    SdkVariables("STRIPE_SECRET_KEY", "STRIPE_BASE_URL"),
    usual_endpoints=("POST /v1/payment_intents",),
    account_headers=("stripe-account", "stripe-context"),
)
TWILIO = VendorFacts(
    "twilio",
    ProxySettings(
        "twilio_auth_token",
        "twilio_api_base",
        "https://api.twilio.com",
        account="twilio_account_sid",
    ),
    SdkVariables(
        "TWILIO_AUTH_TOKEN",
        "TWILIO_BASE_URL",
        fixed=(("TWILIO_ACCOUNT_SID", TWILIO_PLACEHOLDER_SID),),
    ),
    usual_endpoints=(f"POST /{TWILIO_API_VERSION}/Accounts/*/Messages.json",),
)
RESEND = VendorFacts(
    "resend",
    ProxySettings("resend_api_key", "resend_api_base", "https://api.resend.com"),
    SdkVariables("RESEND_API_KEY", "RESEND_API_URL"),
    usual_endpoints=("POST /emails",),
)

VENDOR_FACTS: dict[str, VendorFacts] = {facts.name: facts for facts in (STRIPE, TWILIO, RESEND)}
"""Every vendor keybrake proxies, by name, in the order it lists them."""
VENDOR_NAMES: tuple[str, ...] = tuple(VENDOR_FACTS)


def setting_variable(setting: str) -> str:
    """The environment variable the proxy reads `setting` from (Settings' prefix KEYBRAKE_)."""
    return f"KEYBRAKE_{setting.upper()}"
