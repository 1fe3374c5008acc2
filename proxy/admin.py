"""The admin API under /vault: issue, list, show, patch and revoke vault keys and budgets;
manage issuers; read the audit log and the record of admin actions.

Every route needs a Bearer token: the admin token, an issuer's token, or a Kubernetes
service-account token bound to an issuer (`keybrake.proxy.access` says who may do what). Every
issue, patch and revoke, every issuer change and every refused login is recorded as an event.
No response ever carries a real vendor secret; a vault key or issuer token appears once, in the
201 that issues it.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import hashlib
import io
import json
import logging
import re
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from keybrake.proxy.access import (
    ISSUER_TOKEN_PREFIX,
    Actor,
    Authenticator,
    Forbidden,
    LoginRefused,
    Policy,
    TokenVerifier,
    admin_only,
    check_budget,
    check_key,
    check_label,
    check_patch,
    check_scope,
    hash_token,
    namespace_of,
    policy_json,
    refused_login,
)
from keybrake.proxy.decisions import bucket_start, window_floor
from keybrake.proxy.errors import StoreUnavailable
from keybrake.proxy.models import (
    AlertInfo,
    AlertList,
    AuditPage,
    AuditRow,
    BudgetCreate,
    BudgetInfo,
    BudgetList,
    CapsPatch,
    ChangeInfo,
    EventInfo,
    EventPage,
    IssuedIssuer,
    IssuedKey,
    IssuerCreate,
    IssuerInfo,
    IssuerList,
    KeyCreate,
    KeyInfo,
    KeyList,
    KubernetesBinding,
    LabelRevoke,
    PruneRequest,
    PruneResult,
    RevokeResult,
    describe_validation_error,
)
from keybrake.proxy.money import format_ts, format_usd, parse_duration, usd_to_micros
from keybrake.proxy.paging import (
    CursorError,
    decode_id,
    decode_position,
    encode_id,
    encode_position,
)
from keybrake.proxy.pipeline import hash_vault_key
from keybrake.proxy.pricing import AmbiguousRequest, PricingTable
from keybrake.proxy.redact import redact
from keybrake.proxy.settings import Settings
from keybrake.proxy.store.protocol import Store
from keybrake.proxy.store.records import (
    AlertDelivery,
    AuditFilter,
    AuditRecord,
    BudgetRecord,
    BudgetView,
    Change,
    Event,
    EventFilter,
    IssueRequest,
    IssuerRecord,
    KeyRecord,
    KeyView,
    Owner,
    Patch,
    Usage,
)
from keybrake.proxy.vendors import VENDORS
from keybrake.proxy.vendors.bodies import parse_json

__all__ = ["AdminApi", "budget_info", "key_info"]

log = logging.getLogger("keybrake.proxy.admin")

Handler = Callable[[Request, Actor], Awaitable[Response]]
M = TypeVar("M", bound=BaseModel)
_STATUSES = ("active", "revoked", "expired")
AUDIT_COLUMNS = list(AuditRow.model_fields)


def _patch_basis(record: KeyRecord | BudgetRecord) -> dict[str, int | datetime | None]:
    """The caps and expiry a patch of `record` is checked against."""
    basis: dict[str, int | datetime | None] = {
        "daily_cap_micros": record.daily_cap_micros,
        "total_cap_micros": record.total_cap_micros,
        "expires_at": record.expires_at,
    }
    if isinstance(record, KeyRecord):
        basis["max_per_caller_micros"] = record.max_per_caller_micros
    return basis


def error(status: int, error_type: str, message: str) -> JSONResponse:
    body = {"error": {"type": error_type, "message": redact(message)}}
    return JSONResponse(body, status_code=status)


def _usd(micros: int | None) -> str | None:
    return None if micros is None else format_usd(micros)


def _remaining(daily: int | None, total: int | None, usage: Usage) -> int | None:
    """Micro-dollars left before the first of these caps is reached (None: there is none)."""
    left = [
        cap - used
        for cap, used in (
            (daily, usage.spent_micros + usage.reserved_micros),
            (total, usage.total_micros + usage.total_reserved_micros),
        )
        if cap is not None
    ]
    return max(0, min(left)) if left else None


# Store field names, as the API names them.
_FIELDS = {
    "daily_cap_micros": "daily_usd_cap",
    "total_cap_micros": "total_usd_cap",
    "max_per_caller_micros": "max_usd_per_caller",
    "expires_at": "expires_at",
}


def _changes(changes: tuple[Change, ...]) -> list[ChangeInfo]:
    return [
        ChangeInfo(
            field=_FIELDS.get(c.field, c.field),
            old=c.old,
            new=c.new,
            reason=c.reason,
            at=format_ts(c.at),
        )
        for c in changes
    ]


def _owner_fields(owner: Owner | None) -> dict[str, str | None]:
    if owner is None:
        return {}
    return {
        "issuer_id": owner.issuer_id,
        "namespace": owner.namespace,
        "service_account": owner.service_account,
    }


def key_info(view: KeyView, now: datetime) -> KeyInfo:
    key, usage = view.key, view.usage
    return KeyInfo(
        key_id=key.key_id,
        vendor=key.vendor,
        agent_run_label=key.label,
        status=key.status(now),
        daily_usd_cap=_usd(key.daily_cap_micros),
        total_usd_cap=_usd(key.total_cap_micros),
        max_usd_per_call=_usd(key.max_per_call_micros),
        max_usd_per_caller=_usd(key.max_per_caller_micros),
        budget_id=key.budget_id,
        allowed_endpoints=list(key.allowed_endpoints),
        metadata=key.metadata,
        **_owner_fields(key.owner),
        dedupe_window_seconds=key.dedupe_window_s,
        allowed_accounts=list(key.allowed_accounts),
        created_at=format_ts(key.created_at),
        expires_at=format_ts(key.expires_at),
        revoked_at=format_ts(key.revoked_at) if key.revoked_at else None,
        window_start=format_ts(usage.window_start),
        spent_usd=format_usd(usage.spent_micros),
        reserved_usd=format_usd(usage.reserved_micros),
        remaining_usd=_usd(_remaining(key.daily_cap_micros, key.total_cap_micros, usage)),
        total_spent_usd=format_usd(usage.total_micros),
        calls=usage.calls,
        cap_hits=usage.cap_hits,
        alert_thresholds=_thresholds(key.alert_percents),
        changes=_changes(view.changes),
    )


def _thresholds(percents: tuple[int, ...] | None) -> list[int] | None:
    return None if percents is None else list(percents)


def budget_info(view: BudgetView, now: datetime) -> BudgetInfo:
    budget, usage = view.budget, view.usage
    return BudgetInfo(
        budget_id=budget.budget_id,
        agent_run_label=budget.label,
        status=budget.status(now),
        daily_usd_cap=_usd(budget.daily_cap_micros),
        total_usd_cap=_usd(budget.total_cap_micros),
        metadata=budget.metadata,
        **_owner_fields(budget.owner),
        created_at=format_ts(budget.created_at),
        expires_at=format_ts(budget.expires_at),
        revoked_at=format_ts(budget.revoked_at) if budget.revoked_at else None,
        window_start=format_ts(usage.window_start),
        spent_usd=format_usd(usage.spent_micros),
        reserved_usd=format_usd(usage.reserved_micros),
        remaining_usd=format_usd(
            _remaining(budget.daily_cap_micros, budget.total_cap_micros, usage) or 0
        ),
        total_spent_usd=format_usd(usage.total_micros),
        calls=usage.calls,
        cap_hits=usage.cap_hits,
        keys=list(view.key_ids),
        alert_thresholds=_thresholds(budget.alert_percents),
        changes=_changes(view.changes),
    )


def audit_row(record: AuditRecord) -> AuditRow:
    return AuditRow(
        id=record.id or 0,
        ts=format_ts(record.ts),
        key_id=record.key_id,
        agent_run_label=record.label,
        vendor=record.vendor,
        method=record.method,
        path=record.path,
        status=record.status,
        decision=record.decision,
        reserved_usd=format_usd(record.reserved_micros),
        settled_usd=format_usd(record.settled_micros),
        amount=record.amount,
        currency=record.currency,
        vendor_request_id=record.vendor_request_id,
        idempotency_key=record.idempotency_key,
        latency_ms=record.latency_ms,
        caller_tag=record.caller_tag,
        budget_id=record.budget_id,
    )


class AdminApi:
    def __init__(
        self,
        *,
        settings: Settings,
        store: Store,
        vendors: list[str],
        pricing: PricingTable,
        clock: Callable[[], datetime],
        verifier: TokenVerifier | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.vendors = vendors
        self.pricing = pricing
        self.clock = clock
        token = settings.api_key.get_secret_value() if settings.api_key else ""
        self.authenticator = Authenticator(token, store, verifier)

    def routes(self) -> list[Route]:
        g = self._guard
        return [
            Route("/vault/keys", g(self.create_key, "key.issue"), methods=["POST"]),
            Route("/vault/keys", g(self.list_keys), methods=["GET"]),
            Route("/vault/keys/revoke", g(self.revoke_label, "label.revoke"), methods=["POST"]),
            Route("/vault/keys/{key_id}", g(self.get_key), methods=["GET"]),
            Route("/vault/keys/{key_id}", g(self.revoke_key, "key.revoke"), methods=["DELETE"]),
            Route("/vault/keys/{key_id}", g(self.patch_key, "key.patch"), methods=["PATCH"]),
            Route("/vault/budgets", g(self.create_budget, "budget.create"), methods=["POST"]),
            Route("/vault/budgets", g(self.list_budgets), methods=["GET"]),
            Route("/vault/budgets/{budget_id}", g(self.get_budget), methods=["GET"]),
            Route(
                "/vault/budgets/{budget_id}",
                g(self.revoke_budget, "budget.revoke"),
                methods=["DELETE"],
            ),
            Route(
                "/vault/budgets/{budget_id}",
                g(self.patch_budget, "budget.patch"),
                methods=["PATCH"],
            ),
            Route("/vault/issuers", g(self.create_issuer, "issuer.create"), methods=["POST"]),
            Route("/vault/issuers", g(self.list_issuers), methods=["GET"]),
            Route("/vault/issuers/{issuer_id}", g(self.get_issuer), methods=["GET"]),
            Route(
                "/vault/issuers/{issuer_id}",
                g(self.delete_issuer, "issuer.delete"),
                methods=["DELETE"],
            ),
            Route("/vault/events", g(self.events), methods=["GET"]),
            Route("/vault/alerts", g(self.alerts), methods=["GET"]),
            Route("/vault/audit", g(self.audit), methods=["GET"]),
            Route("/vault/audit/prune", g(self.prune_audit, "audit.prune"), methods=["POST"]),
            Route("/vault/pricing", g(self.pricing_table), methods=["GET"]),
        ]

    def _guard(
        self, handler: Handler, action: str | None = None
    ) -> Callable[[Request], Awaitable[Response]]:
        """Authenticate, run, and keep the record: a refused login, and any refused action
        (a successful one is recorded by the store, in the same transaction as the change)."""

        async def guarded(request: Request) -> Response:
            source = request.client.host if request.client else None
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            try:
                if scheme.lower() != "bearer" or not token.strip():
                    raise LoginRefused("missing admin token (Authorization: Bearer ...)")
                actor = await self.authenticator.actor(token.strip(), source)
            except LoginRefused as exc:
                await self._record_quietly(
                    refused_login(
                        exc,
                        ts=self.clock(),
                        target=f"{request.method} {request.url.path}",
                        source=source,
                    )
                )
                return error(401, "authentication_error", exc.message)
            except StoreUnavailable:
                return error(503, "unavailable", "the database is unreachable; try again")
            try:
                response = await handler(request, actor)
            except Forbidden as exc:
                response = forbidden(exc)
            except StoreUnavailable:
                return error(503, "unavailable", "the database is unreachable; try again")
            except Exception:
                # A bug, not the database: logged with its traceback, never shown, and not
                # answered as "unreachable" (a retry would meet the same bug).
                log.exception("admin request %s %s failed", request.method, request.url.path)
                return error(500, "internal_error", "the proxy failed to handle this request")
            if action is not None and response.status_code >= 400:
                await self._record_quietly(
                    self._event(
                        actor,
                        action,
                        _target(request),
                        outcome=f"refused: {_message(response)}",
                        detail={"status": response.status_code},
                    )
                )
            return response

        return guarded

    def _event(
        self,
        actor: Actor,
        action: str,
        target: str | None,
        *,
        outcome: str = "ok",
        detail: dict[str, Any] | None = None,
    ) -> Event:
        # The record holds what callers sent: `Event` cuts any secret out of it.
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

    async def _record_quietly(self, event: Event) -> None:
        """A refusal's record; the refusal stands even if the database cannot take it."""
        with contextlib.suppress(StoreUnavailable):
            await self.store.record_event(event)

    async def _json(self, request: Request) -> Any:
        """The request's JSON body: at most 64 KiB, within KEYBRAKE_BODY_TIMEOUT, read strictly."""
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.settings.body_timeout):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > 65536:
                        raise _BadRequest("request body too large (64 KiB at most)")
                    chunks.append(chunk)
        except TimeoutError as exc:
            seconds = f"{self.settings.body_timeout:g}"
            raise _BadRequest(f"the request body did not arrive within {seconds}s", 408) from exc
        try:
            return parse_json(b"".join(chunks))
        except AmbiguousRequest as exc:
            raise _BadRequest(f"malformed JSON: {exc}") from exc

    async def _body(self, request: Request, model: type[M]) -> M | Response:
        """The request's JSON body as `model`, or the 400 (408) that says what is wrong."""
        try:
            return model.model_validate(await self._json(request))
        except _BadRequest as exc:
            return error(exc.status, "invalid_request_error", str(exc))
        except ValidationError as exc:
            return error(400, "invalid_request_error", describe_validation_error(exc))

    def _cap_limits(self, **caps: Decimal | None) -> Response | None:
        for field, value in caps.items():
            if value is not None and value > self.settings.max_daily_usd_cap:
                return error(
                    400,
                    "invalid_request_error",
                    f"{field}: at most {self.settings.max_daily_usd_cap} on this proxy",
                )
        return None

    def _issue_request(
        self, request: Request, actor: Actor, spec: BaseModel
    ) -> IssueRequest | Response | None:
        """The request's `Idempotency-Key`, scoped to the caller and bound to this body."""
        key = request.headers.get("idempotency-key")
        if key is None:
            return None
        if not (0 < len(key) <= 255 and key.isascii() and key.isprintable()):
            return error(
                400, "invalid_request_error", "Idempotency-Key: 1 to 255 printable ASCII characters"
            )
        body = spec.model_dump_json().encode()
        return IssueRequest(
            scope=actor.issuer_id or "admin",
            key=key,
            request_hash=hashlib.sha256(body).hexdigest(),
        )

    # -- keys ----------------------------------------------------------------------------------

    async def create_key(self, request: Request, actor: Actor) -> Response:
        spec = await self._body(request, KeyCreate)
        if isinstance(spec, Response):
            return spec
        if spec.vendor not in self.vendors:
            configured = ", ".join(self.vendors) or "none"
            return error(
                400,
                "invalid_request_error",
                f"vendor {spec.vendor!r} is not configured on this proxy "
                f"(configured: {configured})",
            )
        if spec.allowed_accounts and not VENDORS[spec.vendor].account_headers:
            return error(
                400,
                "invalid_request_error",
                f"allowed_accounts: {spec.vendor} has no connected accounts to allow",
            )
        refused = self._cap_limits(
            daily_usd_cap=spec.daily_usd_cap,
            total_usd_cap=spec.total_usd_cap,
            max_usd_per_call=spec.max_usd_per_call,
            max_usd_per_caller=spec.max_usd_per_caller,
        )
        if refused is not None:
            return refused
        idempotent = self._issue_request(request, actor, spec)
        if isinstance(idempotent, Response):
            return idempotent
        namespace = namespace_of(actor, spec.namespace or _metadata_namespace(spec.metadata))
        ttl = parse_duration(spec.expires_in) if spec.expires_in is not None else None
        if ttl is not None and ttl > self.settings.max_ttl_delta:
            return error(
                400,
                "invalid_request_error",
                f"expires_in: at most {self.settings.max_ttl} on this proxy",
            )
        now = self.clock()
        budget = None
        if spec.budget_id is None:
            ttl = ttl if ttl is not None else _DEFAULT_KEY_TTL
        else:
            drawn = await self.store.get_budget(spec.budget_id, now)
            if drawn is None:
                return error(400, "invalid_request_error", f"no budget {spec.budget_id!r}")
            budget = drawn.budget
            check_scope(actor, budget.budget_id, budget.label, budget.owner)
            if budget.status(now) != "active":
                return error(409, "conflict", f"budget {spec.budget_id} is {budget.status(now)}")
            if ttl is None:  # a key drawing on a budget lives as long as it, by default
                ttl = min(budget.expires_at - now, self.settings.max_ttl_delta)
            elif now + ttl > budget.expires_at:
                return error(
                    400,
                    "invalid_request_error",
                    f"expires_in: the key would outlive its budget, which expires at "
                    f"{format_ts(budget.expires_at)}",
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
            alert_percents=_percent_tuple(spec.alert_thresholds),
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
        }
        if idempotent is not None:
            detail["idempotency_key"] = idempotent.key
        issued = await self.store.create_key(
            record,
            self._event(actor, "key.issue", record.key_id, detail=detail),
            max_active=None if actor.admin else actor.policy.max_active_keys,
            request=idempotent,
        )
        if issued.outcome == "mismatch":
            return _idempotency_mismatch()
        if issued.outcome == "too_many":
            limit = actor.policy.max_active_keys
            raise Forbidden(
                "max_active_keys", f"this issuer may have at most {limit} active keys at once"
            )
        view = KeyView(record, Usage(bucket_start(window_floor(now))))
        answer = IssuedKey(**key_info(view, now).model_dump(), vault_key=vault_key)
        headers = {"Keybrake-Replaced": issued.replaced} if issued.replaced else None
        return JSONResponse(answer.model_dump(), status_code=201, headers=headers)

    async def list_keys(self, request: Request, actor: Actor) -> Response:
        params = request.query_params
        status = params.get("status")
        if status is not None and status not in _STATUSES:
            return error(400, "invalid_request_error", f"status must be one of {_STATUSES}")
        limit = _list_limit(params.get("limit"))
        if isinstance(limit, Response):
            return limit
        try:
            before = _position("keys", params.get("continue"))
        except CursorError as exc:
            return error(400, "invalid_request_error", str(exc))
        label = params.get("label")
        if label is not None:
            check_label(actor, label)
        now = self.clock()
        views = await self.store.list_keys(
            now=now,
            label=label,
            vendor=params.get("vendor"),
            status=status,
            budget_id=params.get("budget_id"),
            namespace=params.get("namespace"),
            scope=actor.scope,
            limit=limit + 1,  # one more: is there a next page?
            before=before,
        )
        token = None
        if len(views) > limit:
            views = views[:limit]
            token = encode_position("keys", views[-1].key.created_at, views[-1].key.key_id)
        page = KeyList(data=[key_info(v, now) for v in views], continue_=token)
        return JSONResponse(page.model_dump())

    async def _key_view(self, key_id: str, actor: Actor, now: datetime) -> KeyView | Response:
        view = await self.store.get_key(key_id, now)
        if view is None:
            return error(404, "not_found", f"no vault key {key_id!r}")
        check_scope(actor, key_id, view.key.label, view.key.owner)
        return view

    async def get_key(self, request: Request, actor: Actor) -> Response:
        now = self.clock()
        view = await self._key_view(request.path_params["key_id"], actor, now)
        if isinstance(view, Response):
            return view
        return JSONResponse(key_info(view, now).model_dump())

    async def revoke_key(self, request: Request, actor: Actor) -> Response:
        key_id = request.path_params["key_id"]
        now = self.clock()
        found = await self._key_view(key_id, actor, now)
        if isinstance(found, Response):
            return found
        event = self._event(actor, "key.revoke", key_id, detail={"label": found.key.label})
        if await self.store.revoke_key(key_id, now, event) is None:
            return error(404, "not_found", f"no vault key {key_id!r}")
        view = await self.store.get_key(key_id, now)
        assert view is not None
        return JSONResponse(key_info(view, now).model_dump())

    async def patch_key(self, request: Request, actor: Actor) -> Response:
        key_id = request.path_params["key_id"]
        spec = await self._body(request, CapsPatch)
        if isinstance(spec, Response):
            return spec
        now = self.clock()
        view = await self._key_view(key_id, actor, now)
        if isinstance(view, Response):
            return view
        key = view.key
        if spec.max_usd_per_caller is not None and key.max_per_caller_micros is None:
            return error(
                400,
                "invalid_request_error",
                "max_usd_per_caller: this key was issued without one, so it keeps no spend per "
                "caller; issue a new key with it",
            )
        limit = key.created_at + self.settings.max_ttl_delta
        budget = None
        if key.budget_id is not None:
            drawn = await self.store.get_budget(key.budget_id, now)
            if drawn is not None:
                budget = drawn.budget
                limit = min(limit, budget.expires_at)
        return await self._patch(actor, key_id, spec, key, limit, now, budget=budget)

    async def _patch(
        self,
        actor: Actor,
        subject_id: str,
        spec: CapsPatch,
        record: KeyRecord | BudgetRecord,
        latest: datetime,
        now: datetime,
        *,
        budget: BudgetRecord | None = None,
    ) -> Response:
        """Apply a patch to a live key or budget (`record`, as it stands; `budget`: the one a
        key draws on): its caps, and a new expiry no later than `latest` (the longest life
        allowed, counted from issue; a key's budget's end). An issuer's patch is held to its
        policy by `check_patch`, on the key or budget as the patch would leave it."""
        status = record.status(now)
        if status != "active":
            return error(409, "conflict", f"{subject_id} is {status}: it can no longer change")
        refused = self._cap_limits(
            daily_usd_cap=spec.daily_usd_cap,
            total_usd_cap=spec.total_usd_cap,
            max_usd_per_caller=spec.max_usd_per_caller,
        )
        if refused is not None:
            return refused
        expires_at = None
        if spec.expires_in is not None:
            expires_at = now + parse_duration(spec.expires_in)
            if expires_at > latest:
                return error(
                    400,
                    "invalid_request_error",
                    f"expires_in: at most until {format_ts(latest)} (the longest life allowed "
                    "from issue, or the end of the budget it draws on)",
                )
        patch = Patch(
            reason=spec.reason,
            daily_cap_micros=_micros(spec.daily_usd_cap),
            total_cap_micros=_micros(spec.total_usd_cap),
            max_per_caller_micros=_micros(spec.max_usd_per_caller),
            expires_at=expires_at,
        )
        changed: dict[str, Any] = dict(patch.fields())
        check_patch(actor, record, replace(record, **changed), budget=budget)
        # Applied only to the record as checked: a patch racing this one makes it a 409.
        patch = replace(patch, expected=_patch_basis(record))
        action = "budget.patch" if subject_id.startswith("bg_") else "key.patch"
        detail = {"reason": spec.reason, **spec.model_dump(exclude_none=True, mode="json")}
        event = self._event(actor, action, subject_id, detail=detail)
        outcome = await self.store.patch(subject_id, patch, now, event)
        if outcome == "unknown":
            return error(404, "not_found", f"no {subject_id!r}")
        if outcome == "not_live":
            return error(409, "conflict", f"{subject_id} is no longer active: nothing changed")
        if outcome == "changed":
            return error(
                409,
                "conflict",
                f"{subject_id} was changed by another request meanwhile: nothing changed; "
                "read it again and retry",
            )
        if subject_id.startswith("bg_"):
            patched = await self.store.get_budget(subject_id, now)
            assert patched is not None
            return JSONResponse(await self._budget_json(actor, patched, now))
        view = await self.store.get_key(subject_id, now)
        assert view is not None
        return JSONResponse(key_info(view, now).model_dump())

    async def revoke_label(self, request: Request, actor: Actor) -> Response:
        spec = await self._body(request, LabelRevoke)
        if isinstance(spec, Response):
            return spec
        check_label(actor, spec.agent_run_label)
        now = self.clock()
        detail = spec.model_dump(exclude_none=True)
        event = self._event(actor, "label.revoke", spec.agent_run_label, detail=detail)
        keys, budgets = await self.store.revoke_label(
            spec.agent_run_label,
            now,
            event,
            namespace=spec.namespace,
            workflow_uid=spec.workflow_uid,
            cluster=spec.cluster,
            scope=actor.scope,
        )
        revoked = set(keys)
        views = await self.store.list_keys(now=now, label=spec.agent_run_label)
        budget_views = await self.store.list_budgets(now=now, label=spec.agent_run_label)
        result = RevokeResult(
            agent_run_label=spec.agent_run_label,
            revoked=len(revoked),
            keys=[key_info(v, now) for v in views if v.key.key_id in revoked],
            budgets=await self._budget_infos(
                actor, [v for v in budget_views if v.budget.budget_id in budgets], now
            ),
        )
        return JSONResponse(result.model_dump())

    # -- budgets -------------------------------------------------------------------------------

    async def create_budget(self, request: Request, actor: Actor) -> Response:
        spec = await self._body(request, BudgetCreate)
        if isinstance(spec, Response):
            return spec
        refused = self._cap_limits(
            daily_usd_cap=spec.daily_usd_cap, total_usd_cap=spec.total_usd_cap
        )
        if refused is not None:
            return refused
        idempotent = self._issue_request(request, actor, spec)
        if isinstance(idempotent, Response):
            return idempotent
        namespace = namespace_of(actor, spec.namespace or _metadata_namespace(spec.metadata))
        ttl = parse_duration(spec.expires_in)
        if ttl > self.settings.max_budget_ttl_delta:
            return error(
                400,
                "invalid_request_error",
                f"expires_in: at most {self.settings.max_budget_ttl} on this proxy",
            )
        check_budget(
            actor,
            daily=_micros(spec.daily_usd_cap),
            total=_micros(spec.total_usd_cap),
            ttl=ttl,
            label=spec.agent_run_label,
        )
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
            alert_percents=_percent_tuple(spec.alert_thresholds),
        )
        detail: dict[str, Any] = {
            "label": spec.agent_run_label,
            "namespace": namespace,
            "expires_at": format_ts(record.expires_at),
            **spec.model_dump(
                include={"daily_usd_cap", "total_usd_cap"}, exclude_none=True, mode="json"
            ),
        }
        if idempotent is not None:
            detail["idempotency_key"] = idempotent.key
        event = self._event(actor, "budget.create", record.budget_id, detail=detail)
        issued = await self.store.create_budget(record, event, request=idempotent)
        if issued.outcome == "mismatch":
            return _idempotency_mismatch()
        view = BudgetView(record, Usage(bucket_start(window_floor(now))))
        headers = {"Keybrake-Replaced": issued.replaced} if issued.replaced else None
        return JSONResponse(
            await self._budget_json(actor, view, now), status_code=201, headers=headers
        )

    async def list_budgets(self, request: Request, actor: Actor) -> Response:
        params = request.query_params
        status = params.get("status")
        if status is not None and status not in _STATUSES:
            return error(400, "invalid_request_error", f"status must be one of {_STATUSES}")
        limit = _list_limit(params.get("limit"))
        if isinstance(limit, Response):
            return limit
        try:
            before = _position("budgets", params.get("continue"))
        except CursorError as exc:
            return error(400, "invalid_request_error", str(exc))
        label = params.get("label")
        if label is not None:
            check_label(actor, label)
        now = self.clock()
        views = await self.store.list_budgets(
            now=now,
            label=label,
            status=status,
            namespace=params.get("namespace"),
            scope=actor.scope,
            limit=limit + 1,
            before=before,
        )
        token = None
        if len(views) > limit:
            views = views[:limit]
            last = views[-1].budget
            token = encode_position("budgets", last.created_at, last.budget_id)
        page = BudgetList(data=await self._budget_infos(actor, views, now), continue_=token)
        return JSONResponse(page.model_dump())

    async def _budget_infos(
        self, actor: Actor, views: Sequence[BudgetView], now: datetime
    ) -> list[BudgetInfo]:
        """Budgets as the caller may see them; every budget the API answers with goes through
        here. A budget's `keys` are every key drawing on it, whoever issued them and under any
        label: an issuer sees only those within its own scope."""
        scope = actor.scope
        if scope is None:
            return [budget_info(v, now) for v in views]

        async def scoped(view: BudgetView) -> BudgetView:
            if not view.key_ids:
                return view
            visible = await self.store.list_keys(
                now=now, budget_id=view.budget.budget_id, scope=scope, limit=MAX_LIST_LIMIT
            )
            seen = {v.key.key_id for v in visible}
            return replace(view, key_ids=tuple(k for k in view.key_ids if k in seen))

        shown = await asyncio.gather(*(scoped(v) for v in views))
        return [budget_info(v, now) for v in shown]

    async def _budget_json(self, actor: Actor, view: BudgetView, now: datetime) -> Any:
        return (await self._budget_infos(actor, [view], now))[0].model_dump()

    async def _budget_view(
        self, budget_id: str, actor: Actor, now: datetime
    ) -> BudgetView | Response:
        view = await self.store.get_budget(budget_id, now)
        if view is None:
            return error(404, "not_found", f"no budget {budget_id!r}")
        check_scope(actor, budget_id, view.budget.label, view.budget.owner)
        return view

    async def get_budget(self, request: Request, actor: Actor) -> Response:
        now = self.clock()
        view = await self._budget_view(request.path_params["budget_id"], actor, now)
        if isinstance(view, Response):
            return view
        return JSONResponse(await self._budget_json(actor, view, now))

    async def revoke_budget(self, request: Request, actor: Actor) -> Response:
        budget_id = request.path_params["budget_id"]
        now = self.clock()
        found = await self._budget_view(budget_id, actor, now)
        if isinstance(found, Response):
            return found
        event = self._event(actor, "budget.revoke", budget_id, detail={"label": found.budget.label})
        if await self.store.revoke_budget(budget_id, now, event) is None:
            return error(404, "not_found", f"no budget {budget_id!r}")
        view = await self.store.get_budget(budget_id, now)
        assert view is not None
        return JSONResponse(await self._budget_json(actor, view, now))

    async def patch_budget(self, request: Request, actor: Actor) -> Response:
        budget_id = request.path_params["budget_id"]
        spec = await self._body(request, CapsPatch)
        if isinstance(spec, Response):
            return spec
        if spec.max_usd_per_caller is not None:
            return error(
                400, "invalid_request_error", "max_usd_per_caller: budgets have no caller caps"
            )
        now = self.clock()
        view = await self._budget_view(budget_id, actor, now)
        if isinstance(view, Response):
            return view
        latest = view.budget.created_at + self.settings.max_budget_ttl_delta
        return await self._patch(actor, budget_id, spec, view.budget, latest, now)

    # -- issuers and the record ----------------------------------------------------------------

    async def create_issuer(self, request: Request, actor: Actor) -> Response:
        admin_only(actor, "managing issuers")
        spec = await self._body(request, IssuerCreate)
        if isinstance(spec, Response):
            return spec
        refused = self._cap_limits(
            max_daily_usd_cap=spec.max_daily_usd_cap, max_total_usd_cap=spec.max_total_usd_cap
        )
        if refused is not None:
            return refused
        for vendor in spec.allowed_vendors:
            if vendor not in VENDORS:
                return error(400, "invalid_request_error", f"allowed_vendors: unknown {vendor!r}")
        longest = self.settings.max_budget_ttl_delta
        if spec.max_expires_in is not None and parse_duration(spec.max_expires_in) > longest:
            return error(
                400,
                "invalid_request_error",
                f"max_expires_in: at most {self.settings.max_budget_ttl} on this proxy",
            )
        live = await self.store.list_issuers()
        if any(i.name == spec.name for i in live):
            return error(409, "conflict", f"an issuer named {spec.name!r} already exists")
        if spec.kubernetes is not None:
            for other in live:
                clash = _overlap(spec.kubernetes, other.kubernetes)
                if clash:
                    return error(
                        409,
                        "conflict",
                        f"kubernetes: {clash} is already bound to issuer {other.issuer_id} "
                        f"({other.name}); a service account logs in as one issuer",
                    )
        static = spec.static_token if spec.static_token is not None else spec.kubernetes is None
        token = ISSUER_TOKEN_PREFIX + secrets.token_urlsafe(32) if static else None
        now = self.clock()
        record = IssuerRecord(
            issuer_id="is_" + secrets.token_hex(8),
            name=spec.name,
            token_hash=hash_token(token) if token else None,
            policy=policy_json(spec),
            kubernetes=spec.kubernetes.model_dump() if spec.kubernetes else None,
            created_at=now,
        )
        detail = spec.model_dump(exclude_none=True, mode="json")
        await self.store.create_issuer(
            record, self._event(actor, "issuer.create", record.issuer_id, detail=detail)
        )
        info = issuer_info(record)
        return JSONResponse(
            IssuedIssuer(**info.model_dump(), issuer_token=token).model_dump(mode="json"),
            status_code=201,
        )

    async def list_issuers(self, request: Request, actor: Actor) -> Response:
        admin_only(actor, "managing issuers")
        everything = request.query_params.get("all") in ("1", "true")
        issuers = await self.store.list_issuers(include_deleted=everything)
        page = IssuerList(data=[issuer_info(i) for i in issuers])
        return JSONResponse(page.model_dump(mode="json"))

    async def get_issuer(self, request: Request, actor: Actor) -> Response:
        admin_only(actor, "managing issuers")
        issuer_id = request.path_params["issuer_id"]
        record = await self.store.get_issuer(issuer_id)
        if record is None:
            return error(404, "not_found", f"no issuer {issuer_id!r}")
        return JSONResponse(issuer_info(record).model_dump(mode="json"))

    async def delete_issuer(self, request: Request, actor: Actor) -> Response:
        admin_only(actor, "managing issuers")
        issuer_id = request.path_params["issuer_id"]
        flag = request.query_params.get("revoke", "false")
        if flag not in ("true", "false", "1", "0"):
            return error(400, "invalid_request_error", "revoke must be true or false")
        revoke = flag in ("true", "1")
        now = self.clock()
        event = self._event(actor, "issuer.delete", issuer_id, detail={"revoke": revoke})
        done = await self.store.delete_issuer(issuer_id, now, event, revoke=revoke)
        if done is None:
            if await self.store.get_issuer(issuer_id) is None:
                return error(404, "not_found", f"no issuer {issuer_id!r}")
            return error(409, "conflict", f"issuer {issuer_id} is already deleted")
        record = await self.store.get_issuer(issuer_id)
        assert record is not None
        keys, budgets = done
        answer = {
            **issuer_info(record).model_dump(mode="json"),
            "revoked_keys": keys,
            "revoked_budgets": budgets,
        }
        return JSONResponse(answer)

    async def events(self, request: Request, actor: Actor) -> Response:
        admin_only(actor, "reading the record of admin actions")
        params = request.query_params
        refused = params.get("refused")
        if refused not in (None, "true", "false"):
            return error(400, "invalid_request_error", "refused must be true or false")
        try:
            after_cursor = _after_id("events", params.get("continue"))
            query = EventFilter(
                action=params.get("action"),
                issuer_id=params.get("issuer_id"),
                target=params.get("target"),
                refused=None if refused is None else refused == "true",
                since=self._since(params.get("since")),
                after_id=_whole("after_id", params.get("after_id"), 0, 2**62),
                before_id=after_cursor or _whole("before_id", params.get("before_id"), 0, 2**62),
                limit=_whole("limit", params.get("limit", "100"), 1, 100_000) or 100,
            )
        except ValueError as exc:
            return error(400, "invalid_request_error", str(exc))
        limit = query.limit
        query.limit += 1  # one more: is there a next page?
        found = await self.store.events(query)
        token = None
        if len(found) > limit and query.after_id is None:
            found = found[:limit]
            assert found[-1].id is not None
            token = encode_id("events", found[-1].id)
        rows = [event_info(e) for e in found[:limit]]
        return JSONResponse(EventPage(data=rows, continue_=token).model_dump())

    async def alerts(self, request: Request, actor: Actor) -> Response:
        """The threshold alerts' outbox, newest first: what was raised and how delivery went."""
        admin_only(actor, "reading the alert deliveries")
        params = request.query_params
        try:
            limit = _whole("limit", params.get("limit", "100"), 1, 10_000) or 100
        except ValueError as exc:
            return error(400, "invalid_request_error", str(exc))
        pending = params.get("pending") == "true"
        found = await self.store.alert_deliveries(pending=pending, limit=limit)
        return JSONResponse(AlertList(data=[alert_info(a) for a in found]).model_dump())

    # -- audit ---------------------------------------------------------------------------------

    async def audit(self, request: Request, actor: Actor) -> Response:
        params = request.query_params
        label = params.get("label")
        if label is not None:
            check_label(actor, label)
        try:
            after_cursor = _after_id("audit", params.get("continue"))
            query = AuditFilter(
                scope=actor.scope,
                key_id=params.get("key_id"),
                budget_id=params.get("budget_id"),
                label=label,
                vendor=params.get("vendor"),
                decision=params.get("decision"),
                since=self._since(params.get("since")),
                after_id=_whole("after_id", params.get("after_id"), 0, 2**62),
                before_id=after_cursor,
                limit=_whole("limit", params.get("limit", "100"), 1, 100_000) or 100,
            )
        except ValueError as exc:
            return error(400, "invalid_request_error", str(exc))
        limit = query.limit
        query.limit += 1  # one more: is there a next page?
        found = await self.store.audit(query)
        token = None
        if len(found) > limit and query.after_id is None:
            last = found[limit - 1].id
            assert last is not None  # a stored row
            token = encode_id("audit", last)
        rows = [audit_row(r) for r in found[:limit]]
        wants_csv = params.get("format") == "csv" or "text/csv" in request.headers.get("accept", "")
        if wants_csv:
            out = io.StringIO()
            writer = csv.DictWriter(out, fieldnames=AUDIT_COLUMNS)
            writer.writeheader()
            for row in rows:
                writer.writerow(row.model_dump())
            return Response(out.getvalue(), media_type="text/csv")
        return JSONResponse(AuditPage(data=rows, continue_=token).model_dump())

    async def prune_audit(self, request: Request, actor: Actor) -> Response:
        """Delete audit rows older than `before`; see `Store.prune_audit` for what is kept."""
        admin_only(actor, "pruning the audit log")
        try:
            spec = PruneRequest.model_validate(await self._json(request))
            before = self._since(spec.before)
        except _BadRequest as exc:
            return error(exc.status, "invalid_request_error", str(exc))
        except ValidationError as exc:
            return error(400, "invalid_request_error", describe_validation_error(exc))
        except ValueError as exc:
            return error(400, "invalid_request_error", str(exc).replace("since:", "before:"))
        assert before is not None
        removed = await self.store.prune_audit(before, self.clock(), dry_run=spec.dry_run)
        result = PruneResult(before=format_ts(before), dry_run=spec.dry_run, removed=removed)
        return JSONResponse(result.model_dump())

    async def pricing_table(self, request: Request, actor: Actor) -> Response:
        admin_only(actor, "reading the pricing table")
        return JSONResponse(self.pricing.as_json())

    def _since(self, value: str | None) -> datetime | None:
        """`since` is a duration back from now (`1h`) or an ISO timestamp."""
        if value is None:
            return None
        try:
            return self.clock() - parse_duration(value)
        except ValueError:
            pass
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError as exc:
            raise ValueError(
                f"since: {value!r} is neither a duration (1h) nor an ISO time"
            ) from exc
        if moment.tzinfo is None:
            raise ValueError("since: give a timezone, e.g. 2026-11-26T10:00:00Z")
        try:
            return moment.astimezone(UTC)
        except OverflowError as exc:  # e.g. 0001-01-01T00:00:00+14:00 is before year 1 in UTC
            raise ValueError(f"since: {value!r} is out of range") from exc


def forbidden(exc: Forbidden) -> JSONResponse:
    message = redact(exc.message)
    body = {"error": {"type": "permission_error", "code": exc.limit, "message": message}}
    return JSONResponse(body, status_code=403)


def _metadata_namespace(metadata: dict[str, Any]) -> str | None:
    """The namespace earlier issue steps (and scripts) put in metadata, when none is given."""
    value = metadata.get("namespace")
    if isinstance(value, str) and len(value) <= 63 and _NAMESPACE.fullmatch(value):
        return value
    return None


_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def _idempotency_mismatch() -> Response:
    return error(
        400,
        "idempotency_error",
        "Idempotency-Key: this key was used with a different request; use a new key",
    )


def _target(request: Request) -> str | None:
    for name in ("key_id", "budget_id", "issuer_id"):
        if name in request.path_params:
            return str(request.path_params[name])[:100]
    return None


def _message(response: Response) -> str:
    try:
        body = json.loads(bytes(response.body))
        return str(body["error"]["message"])[:300]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}"


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


def _position(listing: str, token: str | None) -> tuple[datetime, str] | None:
    return None if token is None else decode_position(listing, token)


def _after_id(listing: str, token: str | None) -> int | None:
    return None if token is None else decode_id(listing, token)


LIST_LIMIT = 1000  # rows a list returns unless asked for more
MAX_LIST_LIMIT = 100_000


def _list_limit(text: str | None) -> int | Response:
    """`limit` of a key or budget list: newest first, 1 to 100,000 (default 1,000)."""
    if text is None:
        return LIST_LIMIT
    if not text.isdigit() or not 1 <= int(text) <= MAX_LIST_LIMIT:
        return error(
            400, "invalid_request_error", f"limit must be a whole number from 1 to {MAX_LIST_LIMIT}"
        )
    return int(text)


def alert_info(item: AlertDelivery) -> AlertInfo:
    if item.delivered_at is not None:
        status = "delivered"
    else:
        status = "failing" if item.attempts else "pending"
    try:
        text = str(json.loads(item.payload).get("text", ""))
    except ValueError:
        text = ""
    return AlertInfo(
        delivery_id=item.delivery_id,
        subject_id=item.owner_id,
        mark=item.mark,
        status=status,
        created_at=format_ts(item.created_at),
        attempts=item.attempts,
        next_attempt_at=format_ts(item.next_attempt_at) if item.next_attempt_at else None,
        delivered_at=format_ts(item.delivered_at) if item.delivered_at else None,
        last_error=item.last_error,
        text=text,
    )


def issuer_info(record: IssuerRecord) -> IssuerInfo:
    policy = Policy.of(record)
    return IssuerInfo(
        issuer_id=record.issuer_id,
        name=record.name,
        status="deleted" if record.deleted_at else "active",
        label_prefix=policy.label_prefix,
        allowed_vendors=list(policy.allowed_vendors),
        allowed_endpoints=[str(e) for e in policy.allowed_endpoints],
        max_daily_usd_cap=_usd(policy.max_daily_micros),
        max_total_usd_cap=_usd(policy.max_total_micros),
        max_expires_in=policy.max_expires_in,
        max_active_keys=policy.max_active_keys,
        may_issue=policy.may_issue,
        kubernetes=KubernetesBinding(**record.kubernetes) if record.kubernetes else None,
        static_token=record.token_hash is not None,
        created_at=format_ts(record.created_at),
        deleted_at=format_ts(record.deleted_at) if record.deleted_at else None,
    )


def event_info(event: Event) -> EventInfo:
    return EventInfo(
        id=event.id or 0,
        ts=format_ts(event.ts),
        action=event.action,
        actor=event.actor,
        issuer_id=event.issuer_id,
        target=event.target,
        outcome=event.outcome,
        source=event.source,
        detail=event.detail,
    )


_DEFAULT_KEY_TTL = timedelta(hours=1)


def _percent_tuple(percents: list[int] | None) -> tuple[int, ...] | None:
    return None if percents is None else tuple(percents)


def _micros(usd: Decimal | None) -> int | None:
    return None if usd is None else usd_to_micros(usd)


class _BadRequest(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _whole(name: str, value: str | None, low: int, high: int) -> int | None:
    if value is None:
        return None
    if not (value.isascii() and value.isdigit() and len(value) <= 19 and low <= int(value) <= high):
        raise ValueError(f"{name} must be a whole number from {low} to {high}")
    return int(value)
