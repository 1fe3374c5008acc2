"""The vault: issuing, patching, revoking and listing keys, budgets and issuers.

Every rule of the admin side is here, once: what this proxy allows (vendors, caps, lifetimes), an
issuer's policy (`keybrake.proxy.access`), idempotent issuing, and the record of each action (an
`Event` the store writes in the same transaction as the change). It speaks in records and raises
`keybrake.proxy.errors.VaultError`s; the admin API (`keybrake.proxy.admin`) and the dashboard are
adapters that turn requests into calls and answers into HTTP.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from pydantic import BaseModel

from keybrake.proxy.access import (
    ISSUER_TOKEN_PREFIX,
    Actor,
    admin_only,
    check_accounts,
    check_budget,
    check_key,
    check_label,
    check_patch,
    check_scope,
    hash_token,
    hash_vault_key,
    issued_constraints,
    namespace_of,
    patched_constraints,
    policy_json,
)
from keybrake.proxy.constraints import Constraints, parse_constraints
from keybrake.proxy.decisions import bucket_start, window_floor
from keybrake.proxy.errors import (
    Conflict,
    Forbidden,
    IdempotencyMismatch,
    InvalidRequest,
    NotFound,
)
from keybrake.proxy.models import (
    BudgetCreate,
    CapsPatch,
    IssuerCreate,
    KeyCreate,
    KubernetesBinding,
    LabelRevoke,
)
from keybrake.proxy.money import format_ts, parse_duration, usd_to_micros
from keybrake.proxy.settings import Settings
from keybrake.proxy.store.protocol import Store
from keybrake.proxy.store.records import (
    AlertDelivery,
    AuditFilter,
    AuditRecord,
    BudgetRecord,
    BudgetView,
    Event,
    EventFilter,
    IssueRequest,
    IssuerRecord,
    KeyRecord,
    KeyView,
    Listing,
    Patch,
    Usage,
)
from keybrake.proxy.vendor_facts import VENDOR_FACTS

__all__ = ["MAX_LIST_LIMIT", "Issued", "Vault"]

MAX_LIST_LIMIT = 100_000  # the most keys or budgets one listing returns
_DEFAULT_KEY_TTL = timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class Issued:
    """A key or budget just issued: its view, its secret (a key's vault key; an issuer's token),
    and what an earlier attempt with the same idempotency key had issued, now revoked."""

    view: KeyView | BudgetView
    replaced: str | None = None
    vault_key: str | None = None


class Vault:
    def __init__(
        self,
        *,
        settings: Settings,
        store: Store,
        vendors: list[str],
        clock: Callable[[], datetime],
    ) -> None:
        self.settings = settings
        self.store = store
        self.vendors = vendors  # the vendors this proxy has credentials for
        self.clock = clock

    def event(
        self,
        actor: Actor,
        action: str,
        target: str | None,
        *,
        outcome: str = "ok",
        detail: dict[str, Any] | None = None,
    ) -> Event:
        """The record of an action by `actor` (what callers sent: `Event` cuts secrets out)."""
        return Event(
            ts=self.clock(),
            action=action,
            actor=actor.describe(),
            issuer_id=actor.issuer_id,
            target=target,
            outcome=outcome,
            source=actor.source,
            detail=detail,
        )

    # -- keys ----------------------------------------------------------------------------------

    async def issue_key(
        self, actor: Actor, spec: KeyCreate, idempotency_key: str | None = None
    ) -> Issued:
        if spec.vendor not in self.vendors:
            configured = ", ".join(self.vendors) or "none"
            raise InvalidRequest(
                f"vendor {spec.vendor!r} is not configured on this proxy (configured: {configured})"
            )
        if spec.allowed_accounts and not VENDOR_FACTS[spec.vendor].account_headers:
            raise InvalidRequest(
                f"allowed_accounts: {spec.vendor} has no connected accounts to allow"
            )
        self._within_limits(
            daily_usd_cap=spec.daily_usd_cap,
            total_usd_cap=spec.total_usd_cap,
            max_usd_per_call=spec.max_usd_per_call,
            max_usd_per_caller=spec.max_usd_per_caller,
        )
        request = _issue_request(actor, idempotency_key, spec)
        namespace = namespace_of(actor, spec.namespace or _metadata_namespace(spec.metadata))
        ttl = parse_duration(spec.expires_in) if spec.expires_in is not None else None
        if ttl is not None and ttl > self.settings.max_ttl_delta:
            raise InvalidRequest(f"expires_in: at most {self.settings.max_ttl} on this proxy")
        now = self.clock()
        budget = None
        if spec.budget_id is None:
            ttl = ttl if ttl is not None else _DEFAULT_KEY_TTL
        else:
            drawn = await self.store.get_budget(spec.budget_id, now)
            if drawn is None:
                raise InvalidRequest(f"no budget {spec.budget_id!r}")
            budget = drawn.budget
            check_scope(actor, budget.budget_id, budget.label, budget.owner)
            if budget.status(now) != "active":
                raise Conflict(f"budget {spec.budget_id} is {budget.status(now)}")
            if ttl is None:  # a key drawing on a budget lives as long as it, by default
                ttl = min(budget.expires_at - now, self.settings.max_ttl_delta)
            elif now + ttl > budget.expires_at:
                raise InvalidRequest(
                    "expires_in: the key would outlive its budget, which expires at "
                    f"{format_ts(budget.expires_at)}"
                )
        check_key(
            actor,
            vendor=spec.vendor,
            endpoints=spec.allowed_endpoints,
            daily=_micros(spec.daily_usd_cap),
            total=_micros(spec.total_usd_cap),
            ttl=ttl,
            label=spec.agent_run_label,
            budget=budget,
        )
        check_accounts(actor, spec.allowed_accounts)
        constraints = issued_constraints(actor, _constraints_of(spec.constraints), spec.vendor)
        if spec.dedupe_window is None:
            window = self.settings.dedupe_window_seconds
        elif spec.dedupe_window.strip() == "0":
            window = 0
        else:
            window = int(parse_duration(spec.dedupe_window).total_seconds())
        vault_key = "kbv_" + secrets.token_urlsafe(32)
        record = KeyRecord(
            key_id="vk_" + secrets.token_hex(8),
            key_hash=hash_vault_key(vault_key),
            vendor=spec.vendor,
            label=spec.agent_run_label,
            daily_cap_micros=_micros(spec.daily_usd_cap),
            max_per_call_micros=_micros(spec.max_usd_per_call),
            allowed_endpoints=tuple(spec.allowed_endpoints),
            metadata=spec.metadata,
            dedupe_window_s=window,
            created_at=now,
            expires_at=now + ttl,
            allowed_accounts=tuple(spec.allowed_accounts),
            total_cap_micros=_micros(spec.total_usd_cap),
            max_per_caller_micros=_micros(spec.max_usd_per_caller),
            budget_id=spec.budget_id,
            owner=actor.owner(namespace),
            alert_percents=_percents(spec.alert_thresholds),
            constraints=constraints,
        )
        detail: dict[str, Any] = {
            "vendor": spec.vendor,
            "label": spec.agent_run_label,
            "namespace": namespace,
            "expires_at": format_ts(record.expires_at),
            **{
                name: str(value)
                for name, value in (
                    ("daily_usd_cap", spec.daily_usd_cap),
                    ("total_usd_cap", spec.total_usd_cap),
                    ("max_usd_per_caller", spec.max_usd_per_caller),
                    ("budget_id", spec.budget_id),
                )
                if value is not None
            },
            **_constraints_detail(spec.constraints, constraints),
        }
        if request is not None:
            detail["idempotency_key"] = request.key
        issued = await self.store.create_key(
            record,
            self.event(actor, "key.issue", record.key_id, detail=detail),
            max_active=None if actor.admin else actor.policy.max_active_keys,
            request=request,
        )
        if issued.outcome == "mismatch":
            raise IdempotencyMismatch()
        if issued.outcome == "too_many":
            limit = actor.policy.max_active_keys
            raise Forbidden(
                "max_active_keys", f"this issuer may have at most {limit} active keys at once"
            )
        view = KeyView(record, Usage(bucket_start(window_floor(now))))
        return Issued(view, issued.replaced, vault_key)

    async def list_keys(self, actor: Actor, query: Listing) -> list[KeyView]:
        """Keys the actor may see (its scope is put on the query)."""
        if query.label is not None:
            check_label(actor, query.label)
        return await self.store.list_keys(replace(query, scope=actor.scope), self.clock())

    async def key(self, actor: Actor, key_id: str) -> KeyView:
        view = await self.store.get_key(key_id, self.clock())
        if view is None:
            raise NotFound(f"no vault key {key_id!r}")
        check_scope(actor, key_id, view.key.label, view.key.owner)
        return view

    async def budget(self, actor: Actor, budget_id: str) -> BudgetView:
        view = await self.store.get_budget(budget_id, self.clock())
        if view is None:
            raise NotFound(f"no budget {budget_id!r}")
        check_scope(actor, budget_id, view.budget.label, view.budget.owner)
        return (await self.scoped([view], actor))[0]

    async def subject(self, actor: Actor, subject_id: str) -> KeyView | BudgetView:
        """A key (`vk_…`) or a budget (`bg_…`) the actor may see."""
        if subject_id.startswith("bg_"):
            return await self.budget(actor, subject_id)
        return await self.key(actor, subject_id)

    async def revoke(self, actor: Actor, subject_id: str) -> KeyView | BudgetView:
        """Revoke a key, or a budget with every key drawing on it; its view after."""
        found = await self.subject(actor, subject_id)
        now = self.clock()
        if isinstance(found, KeyView):
            event = self.event(actor, "key.revoke", subject_id, detail={"label": found.key.label})
            done: object = await self.store.revoke_key(subject_id, now, event)
        else:
            detail = {"label": found.budget.label}
            event = self.event(actor, "budget.revoke", subject_id, detail=detail)
            done = await self.store.revoke_budget(subject_id, now, event)
        if done is None:
            kind = "budget" if subject_id.startswith("bg_") else "vault key"
            raise NotFound(f"no {kind} {subject_id!r}")
        return await self._reread(actor, subject_id)

    async def patch(self, actor: Actor, subject_id: str, spec: CapsPatch) -> KeyView | BudgetView:
        """New caps or a new expiry for a live key or budget, and why. A new expiry is no later
        than the longest life allowed from issue (or the end of the budget a key draws on). An
        issuer's patch is held to its policy by `check_patch`, on the record as the patch would
        leave it, and applied only to the record it was checked against."""
        if subject_id.startswith("bg_") and spec.max_usd_per_caller is not None:
            raise InvalidRequest("max_usd_per_caller: budgets have no caller caps")
        found = await self.subject(actor, subject_id)
        now = self.clock()
        budget = None
        if isinstance(found, KeyView):
            record: KeyRecord | BudgetRecord = found.key
            if spec.max_usd_per_caller is not None and found.key.max_per_caller_micros is None:
                raise InvalidRequest(
                    "max_usd_per_caller: this key was issued without one, so it keeps no spend "
                    "per caller; issue a new key with it"
                )
            latest = found.key.created_at + self.settings.max_ttl_delta
            if found.key.budget_id is not None:
                drawn = await self.store.get_budget(found.key.budget_id, now)
                if drawn is not None:
                    budget = drawn.budget
                    latest = min(latest, budget.expires_at)
        else:
            record = found.budget
            latest = found.budget.created_at + self.settings.max_budget_ttl_delta
        status = record.status(now)
        if status != "active":
            raise Conflict(f"{subject_id} is {status}: it can no longer change")
        self._within_limits(
            daily_usd_cap=spec.daily_usd_cap,
            total_usd_cap=spec.total_usd_cap,
            max_usd_per_caller=spec.max_usd_per_caller,
        )
        expires_at = None
        if spec.expires_in is not None:
            expires_at = now + parse_duration(spec.expires_in)
            if expires_at > latest:
                raise InvalidRequest(
                    f"expires_in: at most until {format_ts(latest)} (the longest life allowed "
                    "from issue, or the end of the budget it draws on)"
                )
        patch = Patch(
            reason=spec.reason,
            daily_cap_micros=_micros(spec.daily_usd_cap),
            total_cap_micros=_micros(spec.total_usd_cap),
            max_per_caller_micros=_micros(spec.max_usd_per_caller),
            expires_at=expires_at,
        )
        changed: dict[str, Any] = dict(patch.fields())
        detail = {"reason": spec.reason, **spec.model_dump(exclude_none=True, mode="json")}
        if spec.sets_constraints:
            # Its vendor's fields only (a budget's: any vendor's); the issuer's when it removes
            # its own. Widening them is a loosening: `check_patch` holds it to the policy.
            vendor = record.vendor if isinstance(record, KeyRecord) else None
            policy = patched_constraints(actor, _patched_constraints(spec, vendor), vendor)
            patch = replace(patch, constraints=policy, sets_policy=True)
            changed["constraints"] = policy
            detail["constraints"] = None if policy is None else policy.as_json()
        check_patch(actor, record, replace(record, **changed), budget=budget)
        patch = replace(patch, expected=_patch_basis(record))
        action = "budget.patch" if subject_id.startswith("bg_") else "key.patch"
        outcome = await self.store.patch(
            subject_id, patch, now, self.event(actor, action, subject_id, detail=detail)
        )
        if outcome == "unknown":
            raise NotFound(f"no {subject_id!r}")
        if outcome == "not_live":
            raise Conflict(f"{subject_id} is no longer active: nothing changed")
        if outcome == "changed":
            raise Conflict(
                f"{subject_id} was changed by another request meanwhile: nothing changed; "
                "read it again and retry"
            )
        return await self._reread(actor, subject_id)

    async def _reread(self, actor: Actor, subject_id: str) -> KeyView | BudgetView:
        now = self.clock()
        view: KeyView | BudgetView | None
        if subject_id.startswith("bg_"):
            view = await self.store.get_budget(subject_id, now)
        else:
            view = await self.store.get_key(subject_id, now)
        if view is None:  # deleted meanwhile: nothing deletes keys or budgets today
            raise NotFound(f"no {subject_id!r}")
        if isinstance(view, BudgetView):
            return (await self.scoped([view], actor))[0]
        return view

    async def revoke_run(
        self, actor: Actor, spec: LabelRevoke, *, via: str | None = None
    ) -> tuple[list[KeyView], list[BudgetView]]:
        """Revoke a run's live keys and budgets (within the actor's scope); the views of those
        this call revoked."""
        check_label(actor, spec.agent_run_label)
        now = self.clock()
        detail = spec.model_dump(exclude_none=True)
        if via is not None:
            detail["via"] = via
        event = self.event(actor, "label.revoke", spec.agent_run_label, detail=detail)
        keys, budgets = await self.store.revoke_label(
            spec.agent_run_label,
            now,
            event,
            namespace=spec.namespace,
            workflow_uid=spec.workflow_uid,
            cluster=spec.cluster,
            scope=actor.scope,
        )
        # The run's keys and budgets, of which those this call revoked: every one of them (a
        # listing's default page of 1,000 left the oldest out of a larger run).
        run = Listing(label=spec.agent_run_label, limit=MAX_LIST_LIMIT)
        revoked_keys, revoked_budgets = set(keys), set(budgets)
        key_views = await self.store.list_keys(run, now)
        budget_views = await self.store.list_budgets(run, now)
        return (
            [v for v in key_views if v.key.key_id in revoked_keys],
            await self.scoped(
                [v for v in budget_views if v.budget.budget_id in revoked_budgets], actor
            ),
        )

    # -- budgets -------------------------------------------------------------------------------

    async def create_budget(
        self, actor: Actor, spec: BudgetCreate, idempotency_key: str | None = None
    ) -> Issued:
        self._within_limits(daily_usd_cap=spec.daily_usd_cap, total_usd_cap=spec.total_usd_cap)
        request = _issue_request(actor, idempotency_key, spec)
        namespace = namespace_of(actor, spec.namespace or _metadata_namespace(spec.metadata))
        ttl = parse_duration(spec.expires_in)
        if ttl > self.settings.max_budget_ttl_delta:
            raise InvalidRequest(
                f"expires_in: at most {self.settings.max_budget_ttl} on this proxy"
            )
        check_budget(
            actor,
            daily=_micros(spec.daily_usd_cap),
            total=_micros(spec.total_usd_cap),
            ttl=ttl,
            label=spec.agent_run_label,
        )
        constraints = issued_constraints(actor, _constraints_of(spec.constraints))
        now = self.clock()
        record = BudgetRecord(
            budget_id="bg_" + secrets.token_hex(8),
            label=spec.agent_run_label,
            daily_cap_micros=_micros(spec.daily_usd_cap),
            total_cap_micros=_micros(spec.total_usd_cap),
            metadata=spec.metadata,
            created_at=now,
            expires_at=now + ttl,
            owner=actor.owner(namespace),
            alert_percents=_percents(spec.alert_thresholds),
            constraints=constraints,
        )
        detail: dict[str, Any] = {
            "label": spec.agent_run_label,
            "namespace": namespace,
            "expires_at": format_ts(record.expires_at),
            **spec.model_dump(
                include={"daily_usd_cap", "total_usd_cap"}, exclude_none=True, mode="json"
            ),
            **_constraints_detail(spec.constraints, constraints),
        }
        if request is not None:
            detail["idempotency_key"] = request.key
        event = self.event(actor, "budget.create", record.budget_id, detail=detail)
        issued = await self.store.create_budget(record, event, request=request)
        if issued.outcome == "mismatch":
            raise IdempotencyMismatch()
        view = BudgetView(record, Usage(bucket_start(window_floor(now))))
        return Issued((await self.scoped([view], actor))[0], issued.replaced)

    async def list_budgets(self, actor: Actor, query: Listing) -> list[BudgetView]:
        """Budgets the actor may see, with the keys on each it may see."""
        if query.label is not None:
            check_label(actor, query.label)
        found = await self.store.list_budgets(replace(query, scope=actor.scope), self.clock())
        return await self.scoped(found, actor)

    async def scoped(self, views: Sequence[BudgetView], actor: Actor) -> list[BudgetView]:
        """Budgets as the actor may see them; every budget the vault answers with goes through
        here. A budget's `keys` are every key drawing on it, whoever issued them and under any
        label: an issuer sees only those within its own scope."""
        scope = actor.scope
        if scope is None:
            return list(views)
        now = self.clock()

        async def visible(view: BudgetView) -> BudgetView:
            if not view.key_ids:
                return view
            drawing = Listing(budget_id=view.budget.budget_id, scope=scope, limit=MAX_LIST_LIMIT)
            keys = await self.store.list_keys(drawing, now)
            seen = {v.key.key_id for v in keys}
            return replace(view, key_ids=tuple(k for k in view.key_ids if k in seen))

        return list(await asyncio.gather(*(visible(v) for v in views)))

    # -- issuers -------------------------------------------------------------------------------

    async def create_issuer(
        self, actor: Actor, spec: IssuerCreate, *, kubernetes_login: bool
    ) -> tuple[IssuerRecord, str | None, list[str]]:
        """A new issuer, its token (None: it logs in with Kubernetes tokens only), and warnings:
        what keeps it from working as asked on this proxy. `kubernetes_login`: whether this
        proxy verifies service-account tokens at all (KEYBRAKE_KUBERNETES_AUTH is not off)."""
        admin_only(actor, "managing issuers")
        self._within_limits(
            max_daily_usd_cap=spec.max_daily_usd_cap, max_total_usd_cap=spec.max_total_usd_cap
        )
        for vendor in spec.allowed_vendors:
            if vendor not in VENDOR_FACTS:
                raise InvalidRequest(f"allowed_vendors: unknown {vendor!r}")
        longest = self.settings.max_budget_ttl_delta
        if spec.max_expires_in is not None and parse_duration(spec.max_expires_in) > longest:
            raise InvalidRequest(
                f"max_expires_in: at most {self.settings.max_budget_ttl} on this proxy"
            )
        live = await self.store.list_issuers()
        if any(i.name == spec.name for i in live):
            raise Conflict(f"an issuer named {spec.name!r} already exists")
        if spec.kubernetes is not None:
            for other in live:
                clash = _overlap(spec.kubernetes, other.kubernetes)
                if clash:
                    raise Conflict(
                        f"kubernetes: {clash} is already bound to issuer {other.issuer_id} "
                        f"({other.name}); a service account logs in as one issuer"
                    )
        static = spec.static_token if spec.static_token is not None else spec.kubernetes is None
        token = ISSUER_TOKEN_PREFIX + secrets.token_urlsafe(32) if static else None
        record = IssuerRecord(
            issuer_id="is_" + secrets.token_hex(8),
            name=spec.name,
            token_hash=hash_token(token) if token else None,
            policy=policy_json(spec),
            kubernetes=spec.kubernetes.model_dump() if spec.kubernetes else None,
            created_at=self.clock(),
        )
        detail = spec.model_dump(exclude_none=True, mode="json")
        await self.store.create_issuer(
            record, self.event(actor, "issuer.create", record.issuer_id, detail=detail)
        )
        warnings = []
        if spec.kubernetes is not None and not kubernetes_login:
            # Accepted all the same: the binding is policy, and the login may be switched on
            # later; but said, so that nobody waits for a login that is refused.
            warnings.append(
                "kubernetes: Kubernetes service-account login is off on this proxy "
                "(KEYBRAKE_KUBERNETES_AUTH=off): the bound service accounts cannot log in as "
                "this issuer until it is jwks or tokenreview"
                + ("" if token else "; with no static token, nothing can use it until then")
            )
        if spec.label_prefix[-1].isalnum():
            # Labels are matched by prefix as text: `argo/team-a` also covers `argo/team-ab/...`.
            # Meant so at times (`argo/payments-` covers every payments run); said, since a team
            # boundary usually ends in a separator.
            warnings.append(
                f"label_prefix: {spec.label_prefix!r} is matched as text, so it also covers "
                f"labels such as {spec.label_prefix + 'x'!r}; end it with '/' or '-' to stop at "
                "a boundary"
            )
        return record, token, warnings

    async def list_issuers(self, actor: Actor, *, include_deleted: bool) -> list[IssuerRecord]:
        admin_only(actor, "managing issuers")
        return await self.store.list_issuers(include_deleted=include_deleted)

    async def issuer(self, actor: Actor, issuer_id: str) -> IssuerRecord:
        admin_only(actor, "managing issuers")
        record = await self.store.get_issuer(issuer_id)
        if record is None:
            raise NotFound(f"no issuer {issuer_id!r}")
        return record

    async def delete_issuer(
        self, actor: Actor, issuer_id: str, *, revoke: bool
    ) -> tuple[IssuerRecord, list[str], list[str]]:
        """Delete an issuer (and revoke what it issued, if asked): the issuer as it is after,
        and the keys and budgets this call revoked."""
        admin_only(actor, "managing issuers")
        event = self.event(actor, "issuer.delete", issuer_id, detail={"revoke": revoke})
        done = await self.store.delete_issuer(issuer_id, self.clock(), event, revoke=revoke)
        if done is None:
            await self.issuer(actor, issuer_id)  # 404 when there is none
            raise Conflict(f"issuer {issuer_id} is already deleted")
        return await self.issuer(actor, issuer_id), done[0], done[1]

    # -- the records ---------------------------------------------------------------------------

    async def events(self, actor: Actor, query: EventFilter) -> list[Event]:
        admin_only(actor, "reading the record of admin actions")
        return await self.store.events(query)

    async def alerts(self, actor: Actor, *, pending: bool, limit: int) -> list[AlertDelivery]:
        admin_only(actor, "reading the alert deliveries")
        return await self.store.alert_deliveries(pending=pending, limit=limit)

    async def audit(self, actor: Actor, query: AuditFilter) -> list[AuditRecord]:
        if query.label is not None:
            check_label(actor, query.label)
        return await self.store.audit(replace(query, scope=actor.scope))

    async def prune_audit(self, actor: Actor, before: datetime, *, dry_run: bool) -> int:
        """Delete audit rows older than `before`; see `Store.prune_audit` for what is kept."""
        admin_only(actor, "pruning the audit log")
        return await self.store.prune_audit(before, self.clock(), dry_run=dry_run)

    # -- limits of this proxy ------------------------------------------------------------------

    def _within_limits(self, **caps: Decimal | None) -> None:
        for field, given in caps.items():
            if given is not None and given > self.settings.max_daily_usd_cap:
                raise InvalidRequest(
                    f"{field}: at most {self.settings.max_daily_usd_cap} on this proxy"
                )


def _issue_request(actor: Actor, key: str | None, spec: BaseModel) -> IssueRequest | None:
    """An `Idempotency-Key`, scoped to the caller and bound to this request's body."""
    if key is None:
        return None
    if not (0 < len(key) <= 255 and key.isascii() and key.isprintable()):
        raise InvalidRequest("Idempotency-Key: 1 to 255 printable ASCII characters")
    # Fields added since a request could be sent without them count only when given: a retry
    # straddling the upgrade that added one is still the same request.
    unset = {name for name in _ADDED_FIELDS if getattr(spec, name, None) is None}
    body = spec.model_dump_json(exclude=unset).encode()
    return IssueRequest(
        scope=actor.issuer_id or "admin", key=key, request_hash=hashlib.sha256(body).hexdigest()
    )


_ADDED_FIELDS = ("constraints",)


def _constraints_of(given: dict[str, Any] | None) -> Constraints | None:
    """A request's constraints (canonical: its model checked them)."""
    return None if given is None else Constraints.from_json(given)


def _constraints_detail(given: dict[str, Any] | None, issued: Constraints | None) -> dict[str, Any]:
    """What the record of an issue says of its constraints: those issued with, and whether they
    are the issuer's, taken for want of its own."""
    if issued is None:
        return {}
    return {"constraints": issued.as_json(), **({} if given else {"constraints_inherited": True})}


def _patched_constraints(spec: CapsPatch, vendor: str | None) -> Constraints | None:
    """A patch's own constraints, checked for the key's vendor (None: `{}`, it removes them)."""
    if not spec.constraints:
        return None
    try:
        return parse_constraints(spec.constraints, vendor=vendor)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None


def _patch_basis(record: KeyRecord | BudgetRecord) -> dict[str, int | datetime | None]:
    """The caps, expiry and constraints' revision a patch of `record` is checked against."""
    basis: dict[str, int | datetime | None] = {
        "daily_cap_micros": record.daily_cap_micros,
        "total_cap_micros": record.total_cap_micros,
        "expires_at": record.expires_at,
        "policy_rev": record.policy_rev,
    }
    if isinstance(record, KeyRecord):
        basis["max_per_caller_micros"] = record.max_per_caller_micros
    return basis


def _metadata_namespace(metadata: dict[str, Any]) -> str | None:
    """The namespace earlier issue steps (and scripts) put in metadata, when none is given."""
    found = metadata.get("namespace")
    if isinstance(found, str) and len(found) <= 63 and _NAMESPACE.fullmatch(found):
        return found
    return None


_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def _overlap(new: KubernetesBinding, other: dict[str, Any] | None) -> str | None:
    """A namespace and service account both bindings admit (for one audience), if any."""
    if other is None:
        return None
    existing = KubernetesBinding(**other)
    if existing.audience != new.audience:
        return None
    for namespace in new.namespaces:
        if namespace not in existing.namespaces:
            continue
        for account in new.service_accounts:
            if (
                account == "*"
                or "*" in existing.service_accounts
                or account in existing.service_accounts
            ):
                return f"{namespace}/{account}"
    return None


def _percents(percents: list[int] | None) -> tuple[int, ...] | None:
    return None if percents is None else tuple(percents)


def _micros(usd: Decimal | None) -> int | None:
    return None if usd is None else usd_to_micros(usd)
