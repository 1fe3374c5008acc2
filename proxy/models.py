"""The admin API's JSON shapes, shared by the server, the typed client, the CLI and Hera steps.

Money travels as decimal strings ("300.00", "0.0079"): exact, never a float.
"""

from __future__ import annotations

import json
import re
from datetime import timedelta
from decimal import Decimal
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from keybrake.proxy.constraints import parse_constraints
from keybrake.proxy.endpoints import EndpointPattern
from keybrake.proxy.money import parse_duration
from keybrake.proxy.redact import redact

# How long stored answers (idempotency keys, dedupe fingerprints) are kept; Stripe keeps its own
# idempotency keys for 24 hours.
REPLAY_RETENTION = timedelta(hours=24)

__all__ = [
    "AuditPage",
    "AuditRow",
    "BudgetCreate",
    "BudgetInfo",
    "BudgetList",
    "CapsPatch",
    "ChangeInfo",
    "EventInfo",
    "EventPage",
    "IssuedIssuer",
    "IssuedKey",
    "IssuerCreate",
    "IssuerDelete",
    "IssuerInfo",
    "IssuerList",
    "KeyCreate",
    "KeyInfo",
    "KeyList",
    "KubernetesBinding",
    "LabelRevoke",
    "PruneRequest",
    "PruneResult",
    "RevokeResult",
    "describe_validation_error",
]

_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@-]{0,252}")


def is_label(value: str) -> bool:
    """Whether `value` could be a run label at all: what `_label` accepts (letters, digits and
    . _ : / @ -, and no keybrake secret)."""
    try:
        _label(value)
    except ValueError:
        return False
    return True


# A Kubernetes namespace or service-account name (an RFC 1123 label; service accounts may be
# DNS subdomains, of which labels are the common case).
_K8S_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
_ACCOUNT = re.compile(r"acct_[A-Za-z0-9]{1,250}")


def describe_validation_error(exc: ValidationError) -> str:
    """`field: what is wrong; ...`, one line for an API error or a CLI message."""
    parts = []
    for item in exc.errors():
        message = str(item["msg"]).removeprefix("Value error, ")
        where = ".".join(str(p) for p in item["loc"])
        if not where and _NAMED.match(message):  # a whole-body check that names its field
            parts.append(message)
        else:
            parts.append(f"{where or 'body'}: {message}")
    return "; ".join(parts)


_NAMED = re.compile(r"[a-z_]+(\.[a-z_]+)?: ")


def _namespace(value: str | None) -> str | None:
    if value is not None and (len(value) > 63 or not _K8S_NAME.fullmatch(value) or "." in value):
        raise ValueError("a Kubernetes namespace: lowercase letters, digits and -, at most 63")
    return value


def _money(value: Decimal | None) -> Decimal | None:
    if value is None:
        return value
    if not value.is_finite() or value <= 0:
        raise ValueError("must be a positive dollar amount")
    if value.as_tuple().exponent < -6:  # type: ignore[operator]
        raise ValueError("at most 6 decimal places")
    return value


def _percents(value: list[int] | None) -> list[int] | None:
    """A key's or budget's own alert thresholds: percents of its caps, 1 to 100, each once."""
    if value is None:
        return None
    if any(not 1 <= p <= 100 for p in value):
        raise ValueError("each threshold is a percent from 1 to 100")
    if len(set(value)) != len(value):
        raise ValueError("a threshold is given twice")
    return sorted(value)


def _connected_accounts(value: list[str] | None) -> list[str] | None:
    """Connected account ids (acct_...), sorted, or `["*"]` for any."""
    if value is None or value == ["*"]:
        return value
    for account in value:
        if not _ACCOUNT.fullmatch(account):
            raise ValueError(
                f'{account[:40]!r} is not a connected account id (acct_...); use ["*"] for any '
                "account"
            )
    return sorted(set(value))


def _duration(value: str | None) -> str | None:
    if value is not None and parse_duration(value).total_seconds() <= 0:
        raise ValueError("must be longer than 0s")
    return value


def _no_secret(text: str, what: str) -> None:
    if redact(text) != text:
        raise ValueError(f"{what} holds a keybrake secret (a vault key or token): leave it out")


def _label(value: str) -> str:
    _no_secret(value, "the label")
    if not _LABEL.fullmatch(value):
        raise ValueError(
            "use letters, digits and . _ : / @ - (at most 253), e.g. argo/billing-agent-x7k2p"
        )
    return value


def _constraints(value: dict[str, Any] | None, vendor: str | None = None) -> dict[str, Any] | None:
    """Constraints as given, canonical (`keybrake.proxy.constraints.parse_constraints`); a key's
    (of `vendor`) constrain only what its vendor's calls say."""
    return None if value is None else parse_constraints(value, vendor=vendor).as_json()


_Constrained = TypeVar("_Constrained", "BudgetCreate", "IssuerCreate")


def _any_vendors_constraints(model: _Constrained) -> _Constrained:
    """A budget's or an issuer's constraints, canonical: any vendor's fields (a model validator,
    so that a bad entry's message names it as the body's `constraints.<field>`)."""
    model.constraints = _constraints(model.constraints)
    return model


def _small_json(value: dict[str, Any]) -> dict[str, Any]:
    text = json.dumps(value)
    if len(text) > 4096:
        raise ValueError("at most 4 KiB of JSON")
    _no_secret(text, "metadata")
    return value


class KeyCreate(BaseModel):
    """A vault key. It needs a cap of its own (`daily_usd_cap`, `total_usd_cap`) unless it draws
    on a budget, whose caps then bound it too."""

    model_config = ConfigDict(extra="forbid")

    vendor: str = Field(min_length=1, max_length=32)
    daily_usd_cap: Decimal | None = None
    total_usd_cap: Decimal | None = None
    allowed_endpoints: list[str] = Field(min_length=1, max_length=100)
    # Omitted: 1h, or with a budget, until the budget ends (at most the longest key life).
    expires_in: str | None = None
    agent_run_label: str
    max_usd_per_call: Decimal | None = None
    max_usd_per_caller: Decimal | None = None
    budget_id: str | None = Field(None, pattern=r"^bg_[0-9a-f]{16}$")
    # The workflow's namespace. With a Kubernetes service-account login it comes from the token.
    namespace: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    dedupe_window: str | None = None
    allowed_accounts: list[str] = Field(default_factory=list, max_length=100)
    # Percents of its caps at which the webhook alerts (None: the operator's default; []: none,
    # though a key still alerts on its first cap hit).
    alert_thresholds: list[int] | None = Field(None, max_length=10)
    # Who its calls may pay or message (`keybrake.proxy.constraints`): its vendor's fields only.
    # Kept canonical (`Constraints.as_json`); a patch replaces them whole (`CapsPatch`).
    constraints: dict[str, Any] | None = None

    _caps = field_validator(
        "daily_usd_cap", "total_usd_cap", "max_usd_per_call", "max_usd_per_caller"
    )(_money)
    _thresholds = field_validator("alert_thresholds")(_percents)
    _namespace = field_validator("namespace")(_namespace)

    @model_validator(mode="after")
    def _some_cap(self) -> KeyCreate:
        if self.daily_usd_cap is None and self.total_usd_cap is None and self.budget_id is None:
            raise ValueError(
                "give daily_usd_cap (any 24 hours) or total_usd_cap (the key's life), or a "
                "budget_id to draw on"
            )
        return self

    @model_validator(mode="after")
    def _vendor_constraints(self) -> KeyCreate:
        self.constraints = _constraints(self.constraints, self.vendor)
        return self

    @field_validator("allowed_endpoints")
    @classmethod
    def _endpoints(cls, value: list[str]) -> list[str]:
        return [str(EndpointPattern.parse(item)) for item in value]

    _ttl = field_validator("expires_in")(_duration)

    @field_validator("dedupe_window")
    @classmethod
    def _window(cls, value: str | None) -> str | None:
        if value is not None and value.strip() != "0" and parse_duration(value) > REPLAY_RETENTION:
            raise ValueError("at most 24h (stored answers are kept a day, as Stripe keeps them)")
        return value

    _accounts = field_validator("allowed_accounts")(_connected_accounts)

    _label = field_validator("agent_run_label")(_label)
    _metadata = field_validator("metadata")(_small_json)


class BudgetCreate(BaseModel):
    """A run's budget: every key issued with its `budget_id` draws on it, whatever its vendor."""

    model_config = ConfigDict(extra="forbid")

    agent_run_label: str
    daily_usd_cap: Decimal | None = None
    total_usd_cap: Decimal | None = None
    expires_in: str = "1h"
    namespace: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    alert_thresholds: list[int] | None = Field(None, max_length=10)  # as a key's
    # As a key's, of any vendor: each key drawing on it is held to those of its own vendor.
    constraints: dict[str, Any] | None = None

    _caps = field_validator("daily_usd_cap", "total_usd_cap")(_money)
    _thresholds = field_validator("alert_thresholds")(_percents)
    _ttl = field_validator("expires_in")(_duration)
    _label = field_validator("agent_run_label")(_label)
    _namespace = field_validator("namespace")(_namespace)
    _metadata = field_validator("metadata")(_small_json)

    _any_constraints = model_validator(mode="after")(_any_vendors_constraints)

    @model_validator(mode="after")
    def _some_cap(self) -> BudgetCreate:
        if self.daily_usd_cap is None and self.total_usd_cap is None:
            raise ValueError("give total_usd_cap (the run's whole life) and/or daily_usd_cap")
        return self


class CapsPatch(BaseModel):
    """Raise or lower a live key's or budget's caps, extend or shorten its life (`expires_in`
    counts from now), or replace its constraints (call rate included) as a whole, and say why.
    `constraints: {}` removes its own (under an issuer with constraints it then holds the
    issuer's, as one issued without any does); `null`, as for every field, changes nothing."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field(min_length=1, max_length=500)
    daily_usd_cap: Decimal | None = None
    total_usd_cap: Decimal | None = None
    max_usd_per_caller: Decimal | None = None
    expires_in: str | None = None
    constraints: dict[str, Any] | None = None  # canonical (a key's: checked for its vendor after)

    _caps = field_validator("daily_usd_cap", "total_usd_cap", "max_usd_per_caller")(_money)

    @field_validator("expires_in")
    @classmethod
    def _ttl(cls, value: str | None) -> str | None:
        return None if value is None else _duration(value)

    @field_validator("reason")
    @classmethod
    def _reason(cls, value: str) -> str:
        if not value.strip() or not value.isprintable():
            raise ValueError("say why, in printable text")
        return value.strip()

    @property
    def sets_constraints(self) -> bool:
        """Whether it changes the constraints (`{}`: to none of its own)."""
        return self.constraints is not None

    @model_validator(mode="after")
    def _something(self) -> CapsPatch:
        changes = (self.daily_usd_cap, self.total_usd_cap, self.max_usd_per_caller, self.expires_in)
        if all(value is None for value in changes) and not self.sets_constraints:
            raise ValueError(
                "change at least one of daily_usd_cap, total_usd_cap, max_usd_per_caller, "
                "expires_in, constraints"
            )
        if self.constraints:  # canonical ({} stays: it removes them)
            self.constraints = _constraints(self.constraints)
        return self


class ChangeInfo(BaseModel):
    field: str
    old: str | None
    new: str | None
    reason: str
    at: str


class Page(BaseModel):
    """A page of a listing: `continue` is the token of the next page (keybrake.proxy.paging),
    null on the last."""

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)

    continue_: str | None = Field(None, alias="continue")


class AlertInfo(BaseModel):
    """One threshold alert in the outbox, and how its delivery went."""

    delivery_id: str
    subject_id: str
    mark: str  # "80%" or "cap_hit"
    status: str  # delivered, pending (not yet tried) or failing (retried with backoff)
    created_at: str
    attempts: int
    next_attempt_at: str | None
    delivered_at: str | None
    last_error: str | None
    text: str


class AlertList(BaseModel):
    data: list[AlertInfo]


class KeyInfo(BaseModel):
    key_id: str
    vendor: str
    agent_run_label: str
    status: str
    daily_usd_cap: str | None
    total_usd_cap: str | None
    max_usd_per_call: str | None
    max_usd_per_caller: str | None
    budget_id: str | None
    allowed_endpoints: list[str]
    metadata: dict[str, Any]
    issuer_id: str | None = None  # None: issued with the admin token
    namespace: str | None = None
    service_account: str | None = None
    dedupe_window_seconds: int
    allowed_accounts: list[str]
    created_at: str
    expires_at: str
    revoked_at: str | None
    window_start: str  # the rolling window's start: spent_usd and reserved_usd count from here
    spent_usd: str
    reserved_usd: str
    remaining_usd: str | None  # before the first of its own caps is reached (None: it has none)
    total_spent_usd: str  # over the key's whole life
    calls: int
    cap_hits: int
    alert_thresholds: list[int] | None = None  # None: the proxy's KEYBRAKE_ALERT_THRESHOLDS
    changes: list[ChangeInfo] = Field(default_factory=list)
    constraints: dict[str, Any] | None = None  # canonical; None: it has none of its own


class IssuedKey(KeyInfo):
    vault_key: str


class KeyList(Page):
    data: list[KeyInfo]


class BudgetInfo(BaseModel):
    budget_id: str
    agent_run_label: str
    status: str
    daily_usd_cap: str | None
    total_usd_cap: str | None
    metadata: dict[str, Any]
    issuer_id: str | None = None
    namespace: str | None = None
    service_account: str | None = None
    created_at: str
    expires_at: str
    revoked_at: str | None
    window_start: str
    spent_usd: str  # settled in the rolling 24-hour window
    reserved_usd: str
    remaining_usd: str  # before the first of its caps is reached
    total_spent_usd: str
    calls: int
    cap_hits: int
    keys: list[str]
    alert_thresholds: list[int] | None = None
    changes: list[ChangeInfo] = Field(default_factory=list)
    constraints: dict[str, Any] | None = None


class BudgetList(Page):
    data: list[BudgetInfo]


class LabelRevoke(BaseModel):
    """Revoke a run's keys and budgets by label; `namespace` and `workflow_uid` narrow it to one
    run when workflows of the same name run in several namespaces."""

    model_config = ConfigDict(extra="forbid")

    agent_run_label: str
    namespace: str | None = None
    workflow_uid: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9-]+$")
    # The run's cluster, as its issue step recorded it (metadata.cluster): the reaper of one
    # cluster never touches another's keys.
    cluster: str | None = Field(None, min_length=1, max_length=100)
    # Why, for the record of admin actions (e.g. the reaper's "workflow terminated").
    reason: str | None = Field(None, min_length=1, max_length=200)

    _check = field_validator("agent_run_label")(_label)
    _namespace = field_validator("namespace")(_namespace)


class KubernetesBinding(BaseModel):
    """Kubernetes identities that log in as an issuer with a projected service-account token:
    any of `service_accounts` (names; "*" for any) in any of `namespaces`, for `audience`."""

    model_config = ConfigDict(extra="forbid")

    namespaces: list[str] = Field(min_length=1, max_length=100)
    service_accounts: list[str] = Field(min_length=1, max_length=100)
    audience: str = Field("keybrake", min_length=1, max_length=253)

    @field_validator("namespaces")
    @classmethod
    def _namespaces(cls, value: list[str]) -> list[str]:
        for item in value:
            _namespace(item)
        return sorted(set(value))

    @field_validator("service_accounts")
    @classmethod
    def _accounts(cls, value: list[str]) -> list[str]:
        for item in value:
            if item != "*" and (len(item) > 253 or not _K8S_NAME.fullmatch(item)):
                raise ValueError(f"{item[:40]!r} is not a service-account name (or *)")
        return sorted(set(value))


class IssuerCreate(BaseModel):
    """A scoped issuer: what the keys and budgets it issues may be, and whose labels it sees."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    label_prefix: str = Field(min_length=1, max_length=200)
    allowed_vendors: list[str] = Field(default_factory=list, max_length=10)  # empty: any
    allowed_endpoints: list[str] = Field(default_factory=list, max_length=100)  # empty: any
    # The connected accounts its keys may act on (Stripe-Account): None, any it asks for; [],
    # the platform's own only; ["*"], any.
    allowed_accounts: list[str] | None = Field(None, max_length=100)
    max_daily_usd_cap: Decimal | None = None
    max_total_usd_cap: Decimal | None = None
    max_expires_in: str | None = None
    max_active_keys: int | None = Field(None, ge=1, le=1_000_000)
    # False: it may only read and revoke within its scope (the run reaper's credential).
    may_issue: bool = True
    kubernetes: KubernetesBinding | None = None
    # An issuer bound to Kubernetes identities needs no static token; ask for one explicitly.
    static_token: bool | None = None
    # What it issues is constrained at least this narrowly (any vendor's fields): a key or budget
    # issued without constraints gets these (a key, those of its vendor); one with its own must
    # lie within them.
    constraints: dict[str, Any] | None = None

    _caps = field_validator("max_daily_usd_cap", "max_total_usd_cap")(_money)
    _accounts = field_validator("allowed_accounts")(_connected_accounts)

    @field_validator("label_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:/@-]*", value):
            raise ValueError("use letters, digits and . _ : / @ -, e.g. argo/payments-")
        return value

    @field_validator("allowed_endpoints")
    @classmethod
    def _endpoints(cls, value: list[str]) -> list[str]:
        return [str(EndpointPattern.parse(item)) for item in value]

    @field_validator("max_expires_in")
    @classmethod
    def _ttl(cls, value: str | None) -> str | None:
        return None if value is None else _duration(value)

    _any_constraints = model_validator(mode="after")(_any_vendors_constraints)

    @model_validator(mode="after")
    def _token(self) -> IssuerCreate:
        if self.static_token is False and self.kubernetes is None:
            raise ValueError(
                "static_token: an issuer without a kubernetes binding logs in only with its token"
            )
        return self


class IssuerInfo(BaseModel):
    issuer_id: str
    name: str
    status: str  # active or deleted
    label_prefix: str
    allowed_vendors: list[str]
    allowed_endpoints: list[str]
    max_daily_usd_cap: str | None
    max_total_usd_cap: str | None
    max_expires_in: str | None
    max_active_keys: int | None
    may_issue: bool = True
    allowed_accounts: list[str] | None = None  # None: its keys may name any connected account
    kubernetes: KubernetesBinding | None
    static_token: bool
    created_at: str
    deleted_at: str | None
    active_keys: int | None = None
    constraints: dict[str, Any] | None = None  # canonical; None: it constrains nothing


class IssuedIssuer(IssuerInfo):
    issuer_token: str | None  # shown once; None for a Kubernetes-only issuer
    # What keeps it from working as asked on this proxy (a Kubernetes binding while that login
    # is off); the answer leaves the field out when there is nothing to say.
    warnings: list[str] = Field(default_factory=list)


class IssuerList(BaseModel):
    data: list[IssuerInfo]


class IssuerDelete(BaseModel):
    """`revoke: true` also revokes every live key and budget the issuer issued."""

    model_config = ConfigDict(extra="forbid")

    revoke: bool = False


class EventInfo(BaseModel):
    id: int
    ts: str
    action: str
    actor: str
    issuer_id: str | None
    target: str | None
    outcome: str
    source: str | None
    detail: dict[str, Any] | None


class EventPage(Page):
    data: list[EventInfo]


class RevokeResult(BaseModel):
    agent_run_label: str | None = None
    revoked: int
    keys: list[KeyInfo]
    budgets: list[BudgetInfo] = Field(default_factory=list)


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
    budget_id: str | None = None
    # What a report-only constraint or call rate would have refused the call for (it went
    # ahead): `constraint_violated: ...`, `rate_limited: ...`; null when nothing.
    reported: str | None = None


class AuditPage(Page):
    data: list[AuditRow]


class PruneRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    before: str  # a duration back from now (90d) or an ISO time
    dry_run: bool = False


class PruneResult(BaseModel):
    before: str
    dry_run: bool
    removed: int
