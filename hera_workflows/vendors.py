"""What each vendor SDK reads from its environment, so a fan-out pod needs no keybrake code.

Every pod gets its vault key tagged with the pod's name (`<vault_key>.<pod name>`); the proxy
strips the tag and writes it into the audit row, so each call is traceable to a pod. The SDK's
base-URL variable points at the proxy's vendor prefix:

- Stripe: `STRIPE_SECRET_KEY`, `STRIPE_BASE_URL` (the SDK needs them passed explicitly:
  `stripe.StripeClient(os.environ["STRIPE_SECRET_KEY"],
  base_addresses={"api": os.environ["STRIPE_BASE_URL"]})`).
- Twilio: `TWILIO_ACCOUNT_SID` (a placeholder, `AC` + 32 zeros: the proxy puts the real SID in),
  `TWILIO_AUTH_TOKEN`, `TWILIO_BASE_URL` (`twilio.rest.Client()` reads the first two; the SDK has
  no base-URL variable: `client.api.base_url = os.environ["TWILIO_BASE_URL"]`).
- Resend: `RESEND_API_KEY`, `RESEND_API_URL`, both read by the SDK itself: no code.

Every pod also gets the vendor-neutral `KEYBRAKE_VAULT_KEY`, `KEYBRAKE_URL` and
`KEYBRAKE_BASE_URL` (`<proxy>/<vendor>`). Each call then runs through the pod helper
(`keybrake_pod.call(...)`; `keybrake_pod.watch(client)` first for twilio, whose exceptions keep
no headers), which reads keybrake's answers from the SDK's exceptions. The vendors and their
variables are read from `keybrake.proxy.vendor_facts` (standard library only: no part of the
proxy's request path).
"""

from __future__ import annotations

from dataclasses import dataclass

from hera.workflows.models import EnvVar

from keybrake.proxy.vendor_facts import TWILIO_PLACEHOLDER_SID, VENDOR_FACTS

from .connection import is_expression
from .errors import TemplateConfigError

__all__ = ["TWILIO_PLACEHOLDER_SID", "VENDORS", "VendorSdk", "check_vendor", "sdk_env"]


@dataclass(frozen=True)
class VendorSdk:
    """The environment variables a vendor's SDK reads for its key and its API address."""

    name: str
    key_env: str
    base_url_env: str
    fixed_env: tuple[tuple[str, str], ...] = ()


VENDORS: dict[str, VendorSdk] = {
    vendor.name: VendorSdk(vendor.name, vendor.sdk.key, vendor.sdk.base_url, vendor.sdk.fixed)
    for vendor in VENDOR_FACTS.values()
}


def check_vendor(vendor: str) -> str:
    """`vendor` if keybrake knows it (or it is filled in at run time), else a clear error."""
    if vendor in VENDORS or is_expression(vendor):
        return vendor
    raise TemplateConfigError(
        f"unknown vendor {vendor!r}: use one of {', '.join(sorted(VENDORS))} "
        "(or a parameter such as {{workflow.parameters.vendor}})"
    )


def sdk_env(vendor: str, tagged_key: str, proxy_url: str) -> list[EnvVar]:
    """The pod environment for `vendor`'s SDK; every vendor's when `vendor` is a run-time value
    (a key only works for the vendor it was issued for, so the others stay unused)."""
    check_vendor(vendor)
    sdks = [VENDORS[vendor]] if vendor in VENDORS else list(VENDORS.values())
    env = [
        EnvVar(name="KEYBRAKE_VAULT_KEY", value=tagged_key),
        EnvVar(name="KEYBRAKE_URL", value=proxy_url),
        EnvVar(name="KEYBRAKE_BASE_URL", value=f"{proxy_url}/{vendor}"),
    ]
    for sdk in sdks:
        env.extend(EnvVar(name=name, value=value) for name, value in sdk.fixed_env)
        env.append(EnvVar(name=sdk.key_env, value=tagged_key))
        env.append(EnvVar(name=sdk.base_url_env, value=f"{proxy_url}/{sdk.name}"))
    return env
