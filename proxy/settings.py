"""Settings: environment variables prefixed KEYBRAKE_, optionally read from an env file.

Every setting is declared once here; the README's "Configuration" lists them (tests/test_docs.py).
Secrets are `SecretStr`, so a settings object printed or logged never shows them.

A `KEYBRAKE_` variable that names no setting is ignored by pydantic; `unknown_variables` finds
them (a typo such as KEYBRAKE_STRIPE_KEY leaves Stripe unreachable in silence otherwise), and
`keybrake serve` warns of each, with the closest setting's name and never the value.
"""

from __future__ import annotations

import difflib
import re
import urllib.parse
from collections.abc import Iterable, Mapping
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from keybrake.proxy.errors import ConfigError
from keybrake.proxy.money import parse_duration
from keybrake.proxy.vendor_facts import (
    RESEND,
    STRIPE,
    TWILIO,
    VENDOR_FACTS,
    setting_variable,
)

__all__ = [
    "Settings",
    "VendorCredentials",
    "read_settings_file",
    "unknown_variables",
]

_PREFIX = "KEYBRAKE_"

# What the kubelet injects into each pod for a Service named `keybrake` in its namespace (unless
# the pod says enableServiceLinks: false, as templates/proxy/ does): KEYBRAKE_SERVICE_HOST,
# KEYBRAKE_SERVICE_PORT, KEYBRAKE_SERVICE_PORT_<PORT NAME>, and the Docker-link ones
# KEYBRAKE_PORT=tcp://IP:PORT, KEYBRAKE_PORT_<PORT>_<PROTO> and its _PROTO, _PORT and _ADDR
# (kubernetes pkg/kubelet/envvars: names upper-cased, dashes made underscores).
_SERVICE_LINK = re.compile(
    r"KEYBRAKE_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?"
    r"|PORT(_[0-9]+_(TCP|UDP|SCTP)(_PROTO|_PORT|_ADDR)?)?)"
)


class VendorCredentials:
    """The real secret of one vendor and where its API lives; never serialised."""

    def __init__(self, base_url: str, secret: str, account: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.secret = secret
        self.account = account

    def __repr__(self) -> str:
        return f"VendorCredentials(base_url={self.base_url!r}, secret=***)"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KEYBRAKE_", extra="ignore")

    api_key: SecretStr | None = Field(None, description="Admin token for /vault/* (Bearer).")
    database_url: str = Field(
        "sqlite:///keybrake.db",
        description="sqlite:///PATH (embedded default) or postgresql://...",
    )
    stripe_secret_key: SecretStr | None = Field(None, description="The real Stripe secret key.")
    stripe_api_base: str = Field(STRIPE.settings.default_upstream, description="Stripe upstream.")
    twilio_account_sid: str | None = Field(None, description="The real Twilio account SID.")
    twilio_auth_token: SecretStr | None = Field(None, description="The real Twilio auth token.")
    twilio_api_base: str = Field(TWILIO.settings.default_upstream, description="Twilio upstream.")
    resend_api_key: SecretStr | None = Field(None, description="The real Resend API key.")
    resend_api_base: str = Field(RESEND.settings.default_upstream, description="Resend upstream.")
    pricing_file: Path | None = Field(None, description="Operator pricing table (TOML or YAML).")
    max_ttl: str = Field("7d", description="Longest life a key may have, counted from issue.")
    max_budget_ttl: str = Field(
        "30d", description="Longest life a budget may have, counted from its creation."
    )
    max_daily_usd_cap: Decimal = Field(
        Decimal("1000000"),
        description="Largest cap (per 24 hours, in total, per call or per caller) a key or "
        "budget may ask for.",
    )
    dedupe_window: str = Field(
        "10m", description="Default window replaying identical priced requests; 0 disables."
    )
    max_body_bytes: int = Field(1_048_576, description="Largest request body forwarded.")
    upstream_timeout: float = Field(60.0, description="Seconds to wait for a vendor.")
    # 512: a 500-pod fan-out is never queued behind the proxy's own pool (docs/benchmarks.md,
    # "Fan-out headroom"); wider only turns into the vendors' 429s, far below this.
    upstream_connections: int = Field(
        512, description="Connections to each vendor at once, per worker process."
    )
    upstream_proxy: SecretStr | None = Field(
        None,
        description="An HTTP CONNECT proxy for the vendor calls (http://[user:password@]host:port)."
        " Unset: HTTPS_PROXY (and NO_PROXY) from the environment. Only https vendor calls go "
        "through it, as a TLS tunnel the proxy cannot read.",
    )
    postgres_durable_commits: bool = Field(
        True,
        description="Wait for PostgreSQL to flush each commit to disk. false: faster, still safe "
        "against a proxy crash, but a database crash may lose its last fraction of a second.",
    )
    body_timeout: float = Field(
        30.0,
        description="Seconds a vendor call's request body may take to arrive in full; a slower "
        "one is answered 408 and audited.",
    )
    audit_retention: str = Field(
        "0",
        description="Delete audit rows older than this (e.g. 90d), as `keybrake audit prune` "
        "does, keeping those of active keys and of keys inside their window; 0 keeps them all.",
    )
    kubernetes_auth: Literal["off", "jwks", "tokenreview"] = Field(
        "off",
        description="Kubernetes service-account login for issuers bound to namespaces: jwks "
        "(verify tokens against the cluster's keys) or tokenreview (ask the API server).",
    )
    kubernetes_issuer: str | None = Field(
        None, description="The `iss` of the cluster's service-account tokens (jwks)."
    )
    kubernetes_jwks_file: Path | None = Field(
        None, description="The cluster's JWKS as a file, instead of fetching it (jwks)."
    )
    kubernetes_jwks_url: str | None = Field(
        None, description="Where to fetch the JWKS; default: from the issuer's discovery document."
    )
    kubernetes_api_url: str = Field(
        "https://kubernetes.default.svc", description="The API server, for TokenReview."
    )
    kubernetes_audiences: list[str] = Field(
        ["keybrake"], description="Audiences a TokenReview asks for (tokenreview)."
    )
    kubernetes_ca_file: Path | None = Field(
        None, description="The cluster CA; default: the in-cluster service-account one."
    )
    kubernetes_token_file: Path | None = Field(
        None,
        description="The proxy's own service-account token for the API server; default: "
        "the in-cluster one.",
    )
    metrics_token: SecretStr | None = Field(
        None, description="Bearer token /metrics requires; unset: open."
    )
    # Threshold alerts. The URL is the operator's alone: no API caller can name one, so the proxy
    # (which holds the vendor secrets) never POSTs where a caller says.
    alert_webhook_url: str | None = Field(
        None, description="Where threshold alerts are POSTed (Slack-compatible text and JSON)."
    )
    alert_webhook_secret: SecretStr | None = Field(
        None, description="Signs each alert: X-Keybrake-Signature: sha256=HMAC(body)."
    )
    alert_thresholds: str = Field(
        "50,80,100", description="Percents of a cap at which a key or budget alerts."
    )
    alert_interval: float = Field(5.0, description="Seconds between looks for crossed thresholds.")
    ui_session_ttl: str = Field(
        "8h", description="How long a dashboard sign-in (/ui/) lasts before signing in again."
    )
    ui_cookie_secure: Literal["auto", "always"] = Field(
        "auto",
        description="Mark the dashboard's cookie Secure: `auto` when served over TLS, `always` "
        "behind a proxy that ends TLS in front of keybrake.",
    )
    tls_cert_file: Path | None = Field(
        None, description="TLS certificate (PEM chain); reloaded when the file changes."
    )
    tls_key_file: Path | None = Field(None, description="TLS private key (PEM).")
    reservation_ttl: str = Field(
        "5m",
        description="A reservation still in flight after this long belongs to a dead process and "
        "is counted as spent by the sweep; keep it well above the upstream timeout.",
    )

    @field_validator(
        "max_ttl",
        "max_budget_ttl",
        "dedupe_window",
        "reservation_ttl",
        "audit_retention",
        "ui_session_ttl",
    )
    @classmethod
    def _duration(cls, value: str) -> str:
        if value.strip() != "0":
            parse_duration(value)
        return value

    @field_validator("dedupe_window")
    @classmethod
    def _dedupe_window(cls, value: str) -> str:
        if value.strip() != "0" and parse_duration(value) > timedelta(hours=24):
            raise ValueError("at most 24h: stored answers are kept for a day")
        return value

    @field_validator("upstream_proxy")
    @classmethod
    def _upstream_proxy(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None
        url = urllib.parse.urlsplit(value.get_secret_value())
        if url.scheme != "http" or not url.hostname:
            raise ValueError("an http:// URL of a CONNECT proxy, e.g. http://proxy.corp:3128")
        return value

    @field_validator("alert_webhook_url")
    @classmethod
    def _webhook(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        url = urllib.parse.urlsplit(value)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(
                "an http:// or https:// URL, e.g. https://hooks.slack.com/services/..."
            )
        return value

    @field_validator("alert_thresholds")
    @classmethod
    def _thresholds(cls, value: str) -> str:
        parts = [p.strip().removesuffix("%") for p in value.split(",") if p.strip()]
        if not parts or not all(p.isdigit() and 1 <= int(p) <= 100 for p in parts):
            raise ValueError("whole percents from 1 to 100, comma separated, e.g. 50,80,100")
        return ",".join(str(n) for n in sorted({int(p) for p in parts}))

    @property
    def alert_percents(self) -> list[int]:
        return [int(p) for p in self.alert_thresholds.split(",")]

    @field_validator("max_body_bytes", "upstream_connections", "body_timeout", "alert_interval")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be positive")
        return value

    @property
    def max_ttl_delta(self) -> timedelta:
        return parse_duration(self.max_ttl)

    @property
    def max_budget_ttl_delta(self) -> timedelta:
        return parse_duration(self.max_budget_ttl)

    @property
    def reservation_ttl_delta(self) -> timedelta:
        return parse_duration(self.reservation_ttl)

    @property
    def ui_session_ttl_delta(self) -> timedelta:
        return parse_duration(self.ui_session_ttl)

    @property
    def audit_retention_delta(self) -> timedelta | None:
        if self.audit_retention.strip() == "0":
            return None
        return parse_duration(self.audit_retention)

    @property
    def dedupe_window_seconds(self) -> int:
        if self.dedupe_window.strip() == "0":
            return 0
        return int(parse_duration(self.dedupe_window).total_seconds())

    def vendor_credentials(self) -> dict[str, VendorCredentials]:
        """Only vendors whose real secret is configured are reachable through the proxy."""
        creds: dict[str, VendorCredentials] = {}
        for vendor in VENDOR_FACTS.values():
            names = vendor.settings
            secret: SecretStr | None = getattr(self, names.credential)
            account: str | None = getattr(self, names.account) if names.account else None
            if secret is None or (names.account and not account):
                continue
            creds[vendor.name] = VendorCredentials(
                getattr(self, names.upstream), secret.get_secret_value(), account=account
            )
        return creds


def _setting_variables() -> set[str]:
    return {setting_variable(name) for name in Settings.model_fields}


def _closest_setting(name: str) -> str | None:
    """The setting's variable `name` most likely misspells (KEYBRAKE_STRIPE_KEY:
    KEYBRAKE_STRIPE_SECRET_KEY), or None when none is close. Compared without the prefix, which
    every name shares (with it, any two names look alike); a name without it is matched too."""
    wanted = name.upper().removeprefix(_PREFIX)
    settings = [name.upper() for name in Settings.model_fields]
    match = difflib.get_close_matches(wanted, settings, n=1, cutoff=0.6)
    return _PREFIX + match[0] if match else None


def unknown_variables(
    environ: Mapping[str, str], also_known: Iterable[str] = ()
) -> list[tuple[str, str | None]]:
    """The `KEYBRAKE_` variables of `environ` that Settings ignores, sorted, each with the
    setting's variable it likely misspells (or None): not a setting's (in any case, as pydantic
    reads them), not one of `also_known` (the commands' own: KEYBRAKE_URL, KEYBRAKE_CONFIG,
    ...), not a Kubernetes service link of a Service named keybrake. Only names are looked at,
    never a value."""
    known = _setting_variables() | {name.upper() for name in also_known}
    unknown = [
        name
        for name in environ
        if name.upper().startswith(_PREFIX)
        and name.upper() not in known
        and not _SERVICE_LINK.fullmatch(name)
    ]
    return [(name, _closest_setting(name)) for name in sorted(unknown)]


def read_settings_file(path: Path) -> dict[str, str]:
    """`KEY=value` lines (dotenv syntax) naming settings; an unknown name is an error naming the
    closest setting, so a typo in a file does not silently leave a default in force."""
    from dotenv import dotenv_values

    if not path.is_file():
        raise ConfigError(f"settings file {path} does not exist")
    known = _setting_variables()
    values: dict[str, str] = {}
    for name, value in dotenv_values(path).items():
        if name not in known:
            closest = _closest_setting(name)
            # The answer alone when there is one; else every name, there being no other list
            # at hand (the README's "Configuration" explains them).
            advice = f"did you mean {closest}?" if closest else f"known: {', '.join(sorted(known))}"
            raise ConfigError(f"settings file {path}: unknown setting {name!r}; {advice}")
        values[name] = value or ""
    return values
