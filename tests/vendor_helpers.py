"""Helpers for the Twilio and Resend tests: the proxy with all three vendors in front of the
upstream fakes (Stripe too, for the cross-vendor checks), vault keys, the audit, and SDK clients
pointed at the proxy exactly the way docs/vendors.md tells a workload to. The fixtures are in
tests/vendor_fixtures.py.

`serve_vendor_proxy` serves the app from a thread of the test process (tests/served.py);
`start_vendor_proxy` starts a real `keybrake serve`, for the tests about the process (restarts,
kill -9). The other helpers take either.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from twilio.rest import Client

from tests.fakes.resend_upstream import REAL_KEY, FakeResend
from tests.fakes.stripe_upstream import FakeStripe
from tests.fakes.twilio_upstream import REAL_SID, REAL_TOKEN, FakeTwilio
from tests.proxyproc import ProxyProcess, start_proxy
from tests.served import ServedProxy, serve_proxy

PLACEHOLDER_SID = "AC" + "0" * 32
MESSAGES = "POST /2010-04-01/Accounts/*/Messages.json"

Proxy = ProxyProcess | ServedProxy


def vendor_env(twilio: FakeTwilio, resend: FakeResend) -> dict[str, str]:
    return {
        "KEYBRAKE_TWILIO_ACCOUNT_SID": REAL_SID,
        "KEYBRAKE_TWILIO_AUTH_TOKEN": REAL_TOKEN,
        "KEYBRAKE_TWILIO_API_BASE": twilio.url,
        "KEYBRAKE_RESEND_API_KEY": REAL_KEY,
        "KEYBRAKE_RESEND_API_BASE": resend.url,
        "KEYBRAKE_UPSTREAM_TIMEOUT": "5",
    }


def _vendor_settings(
    tmp_path: Path, twilio: FakeTwilio, resend: FakeResend, pricing: str | None
) -> dict[str, str]:
    env = vendor_env(twilio, resend)
    if pricing is not None:
        path = tmp_path / "operator-pricing.toml"
        path.write_text(pricing)
        env["KEYBRAKE_PRICING_FILE"] = str(path)
    return env


def serve_vendor_proxy(
    tmp_path: Path,
    stripe: FakeStripe,
    twilio: FakeTwilio,
    resend: FakeResend,
    pricing: str | None = None,
) -> ServedProxy:
    """The app with all three vendors on fakes, and an operator pricing file if given, served
    from a thread of the test process."""
    env = _vendor_settings(tmp_path, twilio, resend, pricing)
    return serve_proxy(tmp_path, stripe_base=stripe.url, extra_env=env)


def start_vendor_proxy(
    tmp_path: Path,
    stripe: FakeStripe,
    twilio: FakeTwilio,
    resend: FakeResend,
    pricing: str | None = None,
) -> ProxyProcess:
    """`keybrake serve` with all three vendors on fakes, and an operator pricing file if given."""
    env = _vendor_settings(tmp_path, twilio, resend, pricing)
    return start_proxy(tmp_path, stripe_base=stripe.url, extra_env=env)


def issue_twilio(proxy: Proxy, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "vendor": "twilio",
        "daily_usd_cap": 1,
        "allowed_endpoints": [MESSAGES, "GET /2010-04-01/Accounts/*/Messages/*"],
        "agent_run_label": "argo/notify-sms",
    }
    body.update(spec)
    return proxy.issue(**body)


def issue_resend(proxy: Proxy, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "vendor": "resend",
        "daily_usd_cap": 1,
        "allowed_endpoints": ["POST /emails", "POST /emails/batch", "GET /emails/*"],
        "agent_run_label": "argo/notify-email",
    }
    body.update(spec)
    return proxy.issue(**body)


def twilio_client(proxy: Proxy, vault_key: str) -> Client:
    """The two lines docs/vendors.md gives a workload."""
    client = Client(PLACEHOLDER_SID, vault_key)
    client.api.base_url = proxy.url + "/twilio"
    return client


def key_info(proxy: Proxy, key_id: str) -> dict[str, Any]:
    with proxy.admin() as admin:
        return dict(admin.get(f"/vault/keys/{key_id}").json())


def audit(proxy: Proxy, key_id: str) -> list[dict[str, Any]]:
    """The key's audit rows, newest first."""
    with proxy.admin() as admin:
        return list(admin.get("/vault/audit", params={"key_id": key_id}).json()["data"])


def raw_twilio(
    proxy: Proxy, vault_key: str, data: dict[str, str], resource: str = "Messages.json"
) -> httpx.Response:
    """A Twilio call without the SDK, to look at status, headers and body as sent."""
    return httpx.post(
        f"{proxy.url}/twilio/2010-04-01/Accounts/{PLACEHOLDER_SID}/{resource}",
        data=data,
        auth=(PLACEHOLDER_SID, vault_key),
        timeout=30,
    )


def raw_resend(proxy: Proxy, key: str, path: str, payload: Any) -> httpx.Response:
    return httpx.post(
        f"{proxy.url}/resend{path}",
        json=payload,
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )
