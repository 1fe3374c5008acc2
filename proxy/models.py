"""The admin API's JSON shapes, shared by the server, the typed client, the CLI and Hera steps.

Money travels as decimal strings ("300.00", "0.0079"): exact, never a float.
"""

from __future__ import annotations

import json
import re
from datetime import timedelta
from decimal import Decimal
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from keybrake.proxy.endpoints import EndpointPattern
from keybrake.proxy.money import parse_duration

# How long stored answers (idempotency keys, dedupe fingerprints) are kept; Stripe keeps its own
# idempotency keys for 24 hours.
REPLAY_RETENTION = timedelta(hours=24)

__all__ = [
    "AuditPage",
    "AuditRow",
    "IssuedKey",
    "KeyCreate",
    "KeyInfo",
    "KeyList",
    "LabelRevoke",
    "PruneRequest",
    "PruneResult",
    "RevokeResult",
    "describe_validation_error",
]

_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@-]{0,252}")
_ACCOUNT = re.compile(r"acct_[A-Za-z0-9]{1,250}")


def describe_validation_error(exc: ValidationError) -> str:
    """`field: what is wrong; ...`, one line for an API error or a CLI message."""
    parts = []
    for item in exc.errors():
        where = ".".join(str(p) for p in item["loc"]) or "body"
        parts.append(f"{where}: {str(item['msg']).removeprefix('Value error, ')}")
    return "; ".join(parts)


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    vendor: str = Field(min_length=1, max_length=32)
    daily_usd_cap: Decimal
    allowed_endpoints: list[str] = Field(min_length=1, max_length=100)
    expires_in: str = "1h"
    agent_run_label: str
    max_usd_per_call: Decimal | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    dedupe_window: str | None = None
    allowed_accounts: list[str] = Field(default_factory=list, max_length=100)

    @field_validator("daily_usd_cap", "max_usd_per_call")
    @classmethod
    def _money(cls, value: Decimal | None) -> Decimal | None:
        if value is None:
            return value
        if not value.is_finite() or value <= 0:
            raise ValueError("must be a positive dollar amount")
        if value.as_tuple().exponent < -6:  # type: ignore[operator]
            raise ValueError("at most 6 decimal places")
        return value

    @field_validator("allowed_endpoints")
    @classmethod
    def _endpoints(cls, value: list[str]) -> list[str]:
        return [str(EndpointPattern.parse(item)) for item in value]

    @field_validator("expires_in")
    @classmethod
    def _ttl(cls, value: str) -> str:
        if parse_duration(value).total_seconds() <= 0:
            raise ValueError("must be longer than 0s")
        return value

    @field_validator("dedupe_window")
    @classmethod
    def _window(cls, value: str | None) -> str | None:
        if value is not None and value.strip() != "0" and parse_duration(value) > REPLAY_RETENTION:
            raise ValueError("at most 24h (stored answers are kept a day, as Stripe keeps them)")
        return value

    @field_validator("allowed_accounts")
    @classmethod
    def _accounts(cls, value: list[str]) -> list[str]:
        if value == ["*"]:
            return value
        for account in value:
            if not _ACCOUNT.fullmatch(account):
                raise ValueError(
                    f'{account[:40]!r} is not a connected account id (acct_...); use ["*"] '
                    "for any account"
                )
        return sorted(set(value))

    @field_validator("agent_run_label")
    @classmethod
    def _label(cls, value: str) -> str:
        if not _LABEL.fullmatch(value):
            raise ValueError(
                "use letters, digits and . _ : / @ - (at most 253), e.g. argo/billing-agent-x7k2p"
            )
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, Any]) -> dict[str, Any]:
        if len(json.dumps(value)) > 4096:
            raise ValueError("at most 4 KiB of JSON")
        return value


class KeyInfo(BaseModel):
    key_id: str
    vendor: str
    agent_run_label: str
    status: str
    daily_usd_cap: str
    max_usd_per_call: str | None
    allowed_endpoints: list[str]
    metadata: dict[str, Any]
    dedupe_window_seconds: int
    allowed_accounts: list[str]
    created_at: str
    expires_at: str
    revoked_at: str | None
    window_start: str  # the rolling window's start: spent_usd and reserved_usd count from here
    spent_usd: str
    reserved_usd: str
    remaining_usd: str
    total_spent_usd: str  # over the key's whole life
    calls: int
    cap_hits: int


class IssuedKey(KeyInfo):
    vault_key: str


class KeyList(BaseModel):
    data: list[KeyInfo]


class LabelRevoke(BaseModel):
    model_config = ConfigDict(extra="forbid")

    agent_run_label: str

    _check = field_validator("agent_run_label")(KeyCreate._label.__func__)  # type: ignore[attr-defined]


class RevokeResult(BaseModel):
    agent_run_label: str | None = None
    revoked: int
    keys: list[KeyInfo]


class AuditRow(BaseModel):
    id: int
    ts: str
    key_id: str | None
    agent_run_label: str | None
    vendor: str
    method: str
    path: str
    status: int
    decision: str
    reserved_usd: str
    settled_usd: str
    amount: int | None
    currency: str | None
    vendor_request_id: str | None
    idempotency_key: str | None
    latency_ms: float | None
    caller_tag: str | None


class AuditPage(BaseModel):
    data: list[AuditRow]


class PruneRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    before: str  # a duration back from now (90d) or an ISO time
    dry_run: bool = False


class PruneResult(BaseModel):
    before: str
    dry_run: bool
    removed: int
