"""Who may do what on the admin API, stated once.

A caller is one of:
- the **admin token** (`KEYBRAKE_API_KEY`): everything, including managing issuers;
- an **issuer token** (`kbi_…`, stored as a hash): issue keys and budgets within the issuer's
  policy, and read, patch and revoke only what lies within its scope;
- a **Kubernetes service-account token** (a projected token for the issuer's audience), verified
  by `keybrake.proxy.kubernetes`: acts as the one issuer bound to that namespace and service
  account, and what it issues records the namespace and service account from the token.

An issuer's scope is the labels starting with its `label_prefix` and, when it is bound to
Kubernetes identities, only the namespaces it is bound to. Its policy bounds what it issues:
vendors, endpoints (each key endpoint must lie within one of the issuer's), the caps (a key must
be bounded in any 24 hours and over its life as tightly as the issuer's maxima, by its own caps or
its budget's), the lifetime, how many keys it may have active, and whom the calls may pay or
message (`issued_constraints`: a key's or budget's constraints lie within the issuer's); a patch
that loosens a key or budget must leave it within the same policy (`check_patch`). `admin.py`
authenticates, asks the checks below before acting, and turns a `Forbidden` into a 403 that
names the limit broken.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Protocol

from keybrake.proxy.constraints import RATE, Constraints
from keybrake.proxy.endpoints import EndpointPattern
from keybrake.proxy.errors import Forbidden, LoginRefused  # from the one tree; exported here too
from keybrake.proxy.models import IssuerCreate, KubernetesBinding
from keybrake.proxy.money import format_usd, parse_duration, usd_to_micros
from keybrake.proxy.store.protocol import Store
from keybrake.proxy.store.records import (
    BudgetRecord,
    Event,
    IssuerRecord,
    KeyRecord,
    Owner,
    Scope,
)

__all__ = [
    "ISSUER_TOKEN_PREFIX",
    "Actor",
    "Authenticator",
    "Forbidden",
    "Identity",
    "LoginRefused",
    "Policy",
    "TokenVerifier",
    "admin_only",
    "check_accounts",
    "check_budget",
    "check_key",
    "check_label",
    "check_patch",
    "check_scope",
    "hash_token",
    "hash_vault_key",
    "looks_like_jwt",
    "namespace_of",
    "policy_json",
    "refused_login",
]

ISSUER_TOKEN_PREFIX = "kbi_"  # noqa: S105 (a prefix, not a secret)


def hash_token(token: str) -> bytes:
    # Vault keys and issuer tokens are 256-bit random tokens, so a fast hash is as good as a
    # slow one here.
    return hashlib.sha256(token.encode()).digest()


hash_vault_key = hash_token  # what a vault key is stored and looked up by


def looks_like_jwt(token: str) -> bool:
    """Three base64url segments, the first a JSON object (`eyJ` is `{"`)."""
    return token.startswith("eyJ") and token.count(".") == 2


@dataclass(frozen=True, slots=True)
class Identity:
    """A verified Kubernetes service account."""

    namespace: str
    service_account: str
    audiences: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.namespace}/{self.service_account}"


class TokenVerifier(Protocol):
    """Verifies a Kubernetes service-account token (`keybrake.proxy.kubernetes`)."""

    async def verify(self, token: str) -> Identity:
        """The identity the token proves; `LoginRefused` when it proves none."""
        ...


@dataclass(frozen=True, slots=True)
class Policy:
    label_prefix: str
    allowed_vendors: tuple[str, ...]  # empty: any
    allowed_endpoints: tuple[EndpointPattern, ...]  # empty: any
    max_daily_micros: int | None
    max_total_micros: int | None
    max_ttl: timedelta | None
    max_expires_in: str | None
    max_active_keys: int | None
    may_issue: bool
    constraints: Constraints | None = None  # what it issues is constrained at least so
    allowed_accounts: tuple[str, ...] | None = None  # None: any; (): the platform's own only

    @classmethod
    def of(cls, record: IssuerRecord) -> Policy:
        p = record.policy
        return cls(
            label_prefix=p["label_prefix"],
            allowed_vendors=tuple(p.get("allowed_vendors") or ()),
            allowed_endpoints=tuple(
                EndpointPattern.parse(e) for e in p.get("allowed_endpoints") or ()
            ),
            max_daily_micros=p.get("max_daily_micros"),
            max_total_micros=p.get("max_total_micros"),
            max_ttl=parse_duration(p["max_expires_in"]) if p.get("max_expires_in") else None,
            max_expires_in=p.get("max_expires_in"),
            max_active_keys=p.get("max_active_keys"),
            may_issue=p.get("may_issue", True),
            constraints=Constraints.from_json(p["constraints"]) if p.get("constraints") else None,
            allowed_accounts=(
                None if p.get("allowed_accounts") is None else tuple(p["allowed_accounts"])
            ),
        )


def policy_json(spec: IssuerCreate) -> dict[str, Any]:
    """An issuer's policy as the store keeps it (money in micro-dollars)."""

    def micros(value: Decimal | None) -> int | None:
        return None if value is None else usd_to_micros(value)

    return {
        "label_prefix": spec.label_prefix,
        "allowed_vendors": sorted(set(spec.allowed_vendors)),
        "allowed_endpoints": spec.allowed_endpoints,
        "max_daily_micros": micros(spec.max_daily_usd_cap),
        "max_total_micros": micros(spec.max_total_usd_cap),
        "max_expires_in": spec.max_expires_in,
        "max_active_keys": spec.max_active_keys,
        "may_issue": spec.may_issue,
        "constraints": spec.constraints,  # canonical (the model's check made it so), or None
        "allowed_accounts": spec.allowed_accounts,
    }


def binding_of(record: IssuerRecord) -> KubernetesBinding | None:
    return None if record.kubernetes is None else KubernetesBinding(**record.kubernetes)


def binds(binding: KubernetesBinding, identity: Identity) -> bool:
    return (
        identity.namespace in binding.namespaces
        and (
            "*" in binding.service_accounts or identity.service_account in binding.service_accounts
        )
        and binding.audience in identity.audiences
    )


@dataclass(frozen=True, slots=True)
class Actor:
    """Who is calling: the admin (no issuer) or an issuer, perhaps through a Kubernetes
    identity, and from which address."""

    issuer: IssuerRecord | None = None
    identity: Identity | None = None
    source: str | None = None

    @property
    def admin(self) -> bool:
        return self.issuer is None

    @property
    def issuer_id(self) -> str | None:
        return None if self.issuer is None else self.issuer.issuer_id

    @property
    def policy(self) -> Policy:
        assert self.issuer is not None
        return Policy.of(self.issuer)

    @property
    def scope(self) -> Scope | None:
        """What the caller sees: None for the admin."""
        if self.issuer is None:
            return None
        binding = binding_of(self.issuer)
        namespaces = None if binding is None else tuple(binding.namespaces)
        return Scope(self.policy.label_prefix, namespaces)

    def describe(self) -> str:
        if self.issuer is None:
            return "admin"
        who = f"issuer {self.issuer.issuer_id} ({self.issuer.name})"
        return who if self.identity is None else f"{self.identity} via {who}"

    def owner(self, namespace: str | None) -> Owner | None:
        if self.issuer is None and namespace is None:
            return None
        account = None if self.identity is None else self.identity.service_account
        return Owner(self.issuer_id, namespace, account)


def admin_only(actor: Actor, what: str) -> None:
    if not actor.admin:
        raise Forbidden("admin_only", f"{what} needs the admin token, not an issuer's")


def namespace_of(actor: Actor, requested: str | None) -> str | None:
    """The namespace a key or budget is issued for: from a verified token when there is one
    (a different one in the body is refused), else as requested, within the issuer's binding."""
    if actor.identity is not None:
        if requested is not None and requested != actor.identity.namespace:
            raise Forbidden(
                "namespace",
                f"namespace: this token is of namespace {actor.identity.namespace!r}; it cannot "
                f"issue for {requested!r}",
            )
        return actor.identity.namespace
    if actor.issuer is not None:
        binding = binding_of(actor.issuer)
        if binding is not None and requested not in binding.namespaces:
            raise Forbidden(
                "namespaces",
                f"namespace: this issuer issues only for namespaces {', '.join(binding.namespaces)}"
                " (give one as namespace)",
            )
    return requested


def refused_login(exc: LoginRefused, *, ts: datetime, target: str, source: str | None) -> Event:
    """The record of a refused sign-in, on the API or the dashboard: who it claimed to be (never
    the token), why it was refused, on what, from where."""
    return Event(  # redacted by `Event`: the claimed identity is the caller's to write
        ts=ts,
        action="login.refused",
        actor=exc.identity or "unknown",
        outcome=f"refused: {exc.message}",
        target=target[:300],
        source=source,
    )


def check_label(actor: Actor, label: str) -> None:
    """Issue, list or revoke under `label`: it must start with the issuer's prefix."""
    if actor.issuer is None:
        return
    prefix = actor.policy.label_prefix
    if not label.startswith(prefix):
        raise Forbidden(
            "label_prefix", f"agent_run_label: this issuer's labels start with {prefix!r}"
        )


def check_scope(actor: Actor, subject_id: str, label: str, owner: Owner | None) -> None:
    """Read, patch or revoke one key or budget: it must lie within the issuer's scope."""
    scope = actor.scope
    if scope is None or scope.holds(label, owner):
        return
    if not label.startswith(scope.label_prefix):
        raise Forbidden(
            "label_prefix",
            f"{subject_id} is outside this issuer's labels ({scope.label_prefix}…)",
        )
    raise Forbidden(
        "namespaces",
        f"{subject_id} is outside this issuer's namespaces ({', '.join(scope.namespaces or ())})",
    )


def _usd(micros: int) -> str:
    return "$" + format_usd(micros)


def _bound(caps: Iterable[int | None]) -> int | None:
    present = [c for c in caps if c is not None]
    return min(present) if present else None


def _check_caps(policy: Policy, daily: int | None, total: int | None, what: str) -> None:
    """Explicit caps above the issuer's maxima are refused, whatever else bounds the key."""
    for name, cap, most, over in (
        ("daily", daily, policy.max_daily_micros, "in any 24 hours"),
        ("total", total, policy.max_total_micros, "in total"),
    ):
        if most is not None and cap is not None and cap > most:
            raise Forbidden(
                f"max_{name}_usd_cap",
                f"{name}_usd_cap: this issuer allows {what} at most {_usd(most)} {over}",
            )


def _check_bounds(
    policy: Policy, in_24h: int | None, in_life: int | None, what: str, hint: str
) -> None:
    """What actually bounds spend (own caps, or a budget's) must be within the maxima."""
    if policy.max_daily_micros is not None and (in_24h is None or in_24h > policy.max_daily_micros):
        raise Forbidden(
            "max_daily_usd_cap",
            f"this issuer allows {what} at most {_usd(policy.max_daily_micros)} in any 24 hours: "
            f"give a daily_usd_cap or total_usd_cap within it{hint}",
        )
    if policy.max_total_micros is not None and (
        in_life is None or in_life > policy.max_total_micros
    ):
        raise Forbidden(
            "max_total_usd_cap",
            f"this issuer allows {what} at most {_usd(policy.max_total_micros)} in total: give a "
            f"total_usd_cap within it{hint}",
        )


def _check_ttl(policy: Policy, ttl: timedelta) -> None:
    if policy.max_ttl is not None and ttl > policy.max_ttl:
        raise Forbidden(
            "max_expires_in",
            f"expires_in: this issuer allows lives of at most {policy.max_expires_in} from issue",
        )


def check_accounts(actor: Actor, accounts: Iterable[str]) -> None:
    """The Stripe connected accounts a key an issuer asks for may act on lie within its
    policy's (with `check_key`)."""
    allowed = None if actor.issuer is None else actor.policy.allowed_accounts
    if allowed is None or "*" in allowed:
        return
    for account in accounts:
        if account not in allowed:
            raise Forbidden(
                "allowed_accounts",
                f"allowed_accounts: {account} is not within this issuer's connected accounts "
                f"({', '.join(allowed) or 'none: the platform account only'})",
            )


def check_may_issue(actor: Actor, what: str) -> None:
    """A revoke-only issuer (`may_issue: false`) reads and revokes within its scope, nothing
    more."""
    if actor.issuer is not None and not actor.policy.may_issue:
        raise Forbidden("may_issue", f"this issuer may only read and revoke; it cannot {what}")


def check_key(
    actor: Actor,
    *,
    vendor: str,
    endpoints: Iterable[str],
    daily: int | None,
    total: int | None,
    ttl: timedelta,
    label: str,
    budget: BudgetRecord | None,
) -> None:
    """A key an issuer asks for (caps in micro-dollars; `budget`: the one it draws on, already
    known to lie within the issuer's scope)."""
    if actor.issuer is None:
        return
    check_may_issue(actor, "issue keys")
    policy = actor.policy
    check_label(actor, label)
    if policy.allowed_vendors and vendor not in policy.allowed_vendors:
        raise Forbidden(
            "allowed_vendors",
            f"vendor: this issuer may issue keys for {', '.join(policy.allowed_vendors)} only",
        )
    if policy.allowed_endpoints:
        for text in endpoints:
            endpoint = EndpointPattern.parse(text)
            if not any(allowed.covers(endpoint) for allowed in policy.allowed_endpoints):
                allowed_text = ", ".join(str(a) for a in policy.allowed_endpoints)
                raise Forbidden(
                    "allowed_endpoints",
                    f"allowed_endpoints: {endpoint} is not within this issuer's endpoints "
                    f"({allowed_text})",
                )
    _check_caps(policy, daily, total, "a key")
    budget_caps = (
        (None, None) if budget is None else (budget.daily_cap_micros, budget.total_cap_micros)
    )
    _check_bounds(
        policy,
        _bound((daily, total, *budget_caps)),
        _bound((total, budget_caps[1])),
        "a key",
        ", or draw on a budget that has one",
    )
    _check_ttl(policy, ttl)


def check_budget(
    actor: Actor, *, daily: int | None, total: int | None, ttl: timedelta, label: str
) -> None:
    if actor.issuer is None:
        return
    check_may_issue(actor, "issue budgets")
    policy = actor.policy
    check_label(actor, label)
    _check_caps(policy, daily, total, "a budget")
    _check_bounds(policy, _bound((daily, total)), total, "a budget", "")
    _check_ttl(policy, ttl)


def issued_constraints(
    actor: Actor, own: Constraints | None, vendor: str | None = None
) -> Constraints | None:
    """The constraints a key (of `vendor`) or a budget (`vendor` None) is issued with. Under an
    issuer whose policy has constraints: its `own`, which must lie within them (else a 403
    naming the first field that does not), or, given none, the issuer's."""
    bound = _issuer_bound(actor, vendor)
    if bound is None:
        return own
    if own is None:
        return bound
    _check_within(own, bound)
    return own


def patched_constraints(
    actor: Actor, own: Constraints | None, vendor: str | None = None
) -> Constraints | None:
    """The constraints a patch leaves a key or budget with: its `own`, or, removing them under
    an issuer with constraints, the issuer's (as issued without any). Whether it may is
    `check_patch`'s: a patch that widens them is a loosening, held to the whole policy."""
    return own if own is not None else _issuer_bound(actor, vendor)


def _issuer_bound(actor: Actor, vendor: str | None) -> Constraints | None:
    """The issuer's constraints that bind a key of `vendor` (or a budget, `vendor` None): a key
    is held only to the fields its vendor's calls say (a Stripe key is not refused for the
    issuer's Twilio recipients), and to a call rate whatever its vendor; a budget, whose keys
    may be of any vendor, to all of them. None under the admin or an issuer without any."""
    bound = None if actor.issuer is None else actor.policy.constraints
    if bound is not None and vendor is not None:
        kept = bound.for_vendor(vendor)
        dropped: dict[str, Any] = {name: None for name in bound.constrained if name not in kept}
        limited = bound.max_calls_per_minute is not None  # a rate binds a key of any vendor
        bound = replace(bound, **dropped) if kept or limited else None
    return bound


def _check_within(own: Constraints | None, bound: Constraints | None) -> None:
    """A 403 naming the first field in which `own` (None: no constraints at all) does not lie
    within the issuer's `bound`."""
    if bound is None:
        return
    field = (own or Constraints()).outside(bound)
    if field is None:
        return
    if field == "mode":
        allowed = bound.mode
    elif field == RATE:
        allowed = f"at most {bound.max_calls_per_minute}"
    else:
        allowed = _some(getattr(bound, field))
    raise Forbidden(
        "constraints",
        f"constraints.{field}: not within this issuer's constraints ({field}: {allowed})",
    )


def _some(values: tuple[str, ...], shown: int = 5) -> str:
    """The first few of a constraint's values, for a message."""
    listed = ", ".join(values[:shown])
    return listed + (f", ... ({len(values)} in all)" if len(values) > shown else "")


def _loosens(before: KeyRecord | BudgetRecord, after: KeyRecord | BudgetRecord) -> bool:
    """Whether `after` may spend more, for longer, or with more counterparties or calls than
    `before` in any way: a cap raised or removed (None: no cap), a later end, or constraints
    not within the ones before (removed, widened, a rate raised, enforce made report-only)."""
    for cap in ("daily_cap_micros", "total_cap_micros", "max_per_caller_micros"):
        old, new = getattr(before, cap, None), getattr(after, cap, None)
        if old is not None and (new is None or new > old):
            return True
    was, now = before.constraints, after.constraints
    if was is not None and (now is None or now.outside(was) is not None):
        return True
    return after.expires_at > before.expires_at


def check_patch(
    actor: Actor,
    before: KeyRecord | BudgetRecord,
    after: KeyRecord | BudgetRecord,
    *,
    budget: BudgetRecord | None = None,
) -> None:
    """A patch by an issuer, from the key or budget `before` to `after` (every field as it will
    stand, not only the patched ones); `budget`: the one a key draws on. The rule:

    - a patch that only tightens (lowers a cap, ends sooner, narrows its constraints) is always
      allowed, even on a key or budget already beyond the issuer's policy (one the admin issued
      in its scope);
    - a patch that loosens anything (raises or removes a cap, ends later, widens or removes its
      constraints) must leave the key or budget within everything the policy asks at issue:
      `after` must pass the very check of issue, `check_key` (with what its budget bounds it
      by) or `check_budget`, its life counted from issue, and its constraints lie within the
      issuer's (`_check_within`). A budget within the maxima bounds every key drawing on
      it within them too, so loosening a budget cannot lift any key's bound past the policy
      either.

    A revoke-only issuer patches nothing; the admin patches anything."""
    if actor.issuer is None:
        return
    check_may_issue(actor, "change caps or lives")
    if not _loosens(before, after):
        return
    life = after.expires_at - after.created_at
    try:
        vendor = after.vendor if isinstance(after, KeyRecord) else None
        _check_within(after.constraints, _issuer_bound(actor, vendor))
        if isinstance(after, KeyRecord):
            check_key(
                actor,
                vendor=after.vendor,
                endpoints=after.allowed_endpoints,
                daily=after.daily_cap_micros,
                total=after.total_cap_micros,
                ttl=life,
                label=after.label,
                budget=budget,
            )
            check_accounts(actor, after.allowed_accounts)
        else:
            check_budget(
                actor,
                daily=after.daily_cap_micros,
                total=after.total_cap_micros,
                ttl=life,
                label=after.label,
            )
    except Forbidden as exc:
        what = "key" if isinstance(after, KeyRecord) else "budget"
        raise Forbidden(
            exc.limit,
            f"this patch loosens the {what}, so the {what} as patched must lie within this "
            f"issuer's policy: {exc.message}",
        ) from None


class Authenticator:
    """The caller behind a request's Bearer token."""

    def __init__(self, admin_token: str, store: Store, verifier: TokenVerifier | None) -> None:
        self._admin = admin_token.encode()
        self.store = store
        self.verifier = verifier

    async def actor(self, token: str, source: str | None) -> Actor:
        if token.startswith(ISSUER_TOKEN_PREFIX):
            issuer = await self.store.find_issuer(hash_token(token))
            if issuer is None:
                raise LoginRefused("unknown or deleted issuer token")
            return Actor(issuer=issuer, source=source)
        if looks_like_jwt(token):
            if self.verifier is None:
                raise LoginRefused(
                    "Kubernetes service-account login is not configured on this proxy"
                )
            identity = await self.verifier.verify(token)
            issuers = [
                i
                for i in await self.store.list_issuers()
                if (binding := binding_of(i)) is not None and binds(binding, identity)
            ]
            if not issuers:
                raise LoginRefused(
                    f"no issuer is bound to service account {identity} (audience "
                    f"{', '.join(identity.audiences)})",
                    str(identity),
                )
            return Actor(issuer=issuers[0], identity=identity, source=source)
        if self._admin and hmac.compare_digest(token.encode(), self._admin):
            return Actor(source=source)
        raise LoginRefused("missing or wrong admin token")
