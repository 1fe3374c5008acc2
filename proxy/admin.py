"""The admin API under /vault: issue, list, show and revoke vault keys; read the audit log.

Every route requires `Authorization: Bearer $KEYBRAKE_API_KEY`. No response ever carries a real
vendor secret; the vault key itself appears once, in the 201 that issues it.
"""

from __future__ import annotations

import asyncio
import csv
import hmac
import io
import secrets
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from keybrake.proxy.decisions import bucket_start, window_floor
from keybrake.proxy.errors import StoreUnavailable
from keybrake.proxy.models import (
    AuditPage,
    AuditRow,
    BudgetCreate,
    BudgetInfo,
    BudgetList,
    CapsPatch,
    ChangeInfo,
    IssuedKey,
    KeyCreate,
    KeyInfo,
    KeyList,
    LabelRevoke,
    PruneRequest,
    PruneResult,
    RevokeResult,
    describe_validation_error,
)
from keybrake.proxy.money import format_ts, format_usd, parse_duration, usd_to_micros
from keybrake.proxy.pipeline import hash_vault_key
from keybrake.proxy.pricing import AmbiguousRequest, PricingTable
from keybrake.proxy.settings import Settings
from keybrake.proxy.store.base import (
    AuditFilter,
    AuditRecord,
    BudgetRecord,
    BudgetView,
    Change,
    KeyRecord,
    KeyView,
    Patch,
    Store,
    Usage,
)
from keybrake.proxy.vendors import VENDORS
from keybrake.proxy.vendors.bodies import parse_json

__all__ = ["AdminApi", "budget_info", "key_info"]

Handler = Callable[[Request], Awaitable[Response]]
M = TypeVar("M", bound=BaseModel)
_STATUSES = ("active", "revoked", "expired")
AUDIT_COLUMNS = list(AuditRow.model_fields)


def error(status: int, error_type: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"type": error_type, "message": message}}, status_code=status)


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
        changes=_changes(view.changes),
    )


def budget_info(view: BudgetView, now: datetime) -> BudgetInfo:
    budget, usage = view.budget, view.usage
    return BudgetInfo(
        budget_id=budget.budget_id,
        agent_run_label=budget.label,
        status=budget.status(now),
        daily_usd_cap=_usd(budget.daily_cap_micros),
        total_usd_cap=_usd(budget.total_cap_micros),
        metadata=budget.metadata,
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
    ) -> None:
        self.settings = settings
        self.store = store
        self.vendors = vendors
        self.pricing = pricing
        self.clock = clock
        token = settings.api_key.get_secret_value() if settings.api_key else ""
        self._token = token.encode()

    def routes(self) -> list[Route]:
        return [
            Route("/vault/keys", self._guard(self.create_key), methods=["POST"]),
            Route("/vault/keys", self._guard(self.list_keys), methods=["GET"]),
            Route("/vault/keys/revoke", self._guard(self.revoke_label), methods=["POST"]),
            Route("/vault/keys/{key_id}", self._guard(self.get_key), methods=["GET"]),
            Route("/vault/keys/{key_id}", self._guard(self.revoke_key), methods=["DELETE"]),
            Route("/vault/keys/{key_id}", self._guard(self.patch_key), methods=["PATCH"]),
            Route("/vault/budgets", self._guard(self.create_budget), methods=["POST"]),
            Route("/vault/budgets", self._guard(self.list_budgets), methods=["GET"]),
            Route("/vault/budgets/{budget_id}", self._guard(self.get_budget), methods=["GET"]),
            Route(
                "/vault/budgets/{budget_id}", self._guard(self.revoke_budget), methods=["DELETE"]
            ),
            Route("/vault/budgets/{budget_id}", self._guard(self.patch_budget), methods=["PATCH"]),
            Route("/vault/audit", self._guard(self.audit), methods=["GET"]),
            Route("/vault/audit/prune", self._guard(self.prune_audit), methods=["POST"]),
            Route("/vault/pricing", self._guard(self.pricing_table), methods=["GET"]),
        ]

    def _guard(self, handler: Handler) -> Handler:
        async def guarded(request: Request) -> Response:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if (
                scheme.lower() != "bearer"
                or not self._token
                or not hmac.compare_digest(token.strip().encode(), self._token)
            ):
                return error(401, "authentication_error", "missing or wrong admin token")
            try:
                return await handler(request)
            except StoreUnavailable:
                return error(503, "unavailable", "the database is unreachable; try again")

        return guarded

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

    async def create_key(self, request: Request) -> Response:
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
        ttl = parse_duration(spec.expires_in) if spec.expires_in is not None else None
        if ttl is not None and ttl > self.settings.max_ttl_delta:
            return error(
                400,
                "invalid_request_error",
                f"expires_in: at most {self.settings.max_ttl} on this proxy",
            )
        now = self.clock()
        if spec.budget_id is None:
            ttl = ttl if ttl is not None else _DEFAULT_KEY_TTL
        else:
            budget = await self.store.get_budget(spec.budget_id, now)
            if budget is None:
                return error(400, "invalid_request_error", f"no budget {spec.budget_id!r}")
            if budget.budget.status(now) != "active":
                return error(
                    409, "conflict", f"budget {spec.budget_id} is {budget.budget.status(now)}"
                )
            if ttl is None:  # a key drawing on a budget lives as long as it, by default
                ttl = min(budget.budget.expires_at - now, self.settings.max_ttl_delta)
            elif now + ttl > budget.budget.expires_at:
                return error(
                    400,
                    "invalid_request_error",
                    f"expires_in: the key would outlive its budget, which expires at "
                    f"{format_ts(budget.budget.expires_at)}",
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
        )
        await self.store.create_key(record)
        view = KeyView(record, Usage(bucket_start(window_floor(now))))
        issued = IssuedKey(**key_info(view, now).model_dump(), vault_key=vault_key)
        return JSONResponse(issued.model_dump(), status_code=201)

    async def list_keys(self, request: Request) -> Response:
        params = request.query_params
        status = params.get("status")
        if status is not None and status not in _STATUSES:
            return error(400, "invalid_request_error", f"status must be one of {_STATUSES}")
        now = self.clock()
        views = await self.store.list_keys(
            now=now,
            label=params.get("label"),
            vendor=params.get("vendor"),
            status=status,
            budget_id=params.get("budget_id"),
        )
        page = KeyList(data=[key_info(v, now) for v in views])
        return JSONResponse(page.model_dump())

    async def get_key(self, request: Request) -> Response:
        now = self.clock()
        view = await self.store.get_key(request.path_params["key_id"], now)
        if view is None:
            return error(404, "not_found", f"no vault key {request.path_params['key_id']!r}")
        return JSONResponse(key_info(view, now).model_dump())

    async def revoke_key(self, request: Request) -> Response:
        key_id = request.path_params["key_id"]
        now = self.clock()
        if await self.store.revoke_key(key_id, now) is None:
            return error(404, "not_found", f"no vault key {key_id!r}")
        view = await self.store.get_key(key_id, now)
        assert view is not None
        return JSONResponse(key_info(view, now).model_dump())

    async def patch_key(self, request: Request) -> Response:
        key_id = request.path_params["key_id"]
        spec = await self._body(request, CapsPatch)
        if isinstance(spec, Response):
            return spec
        now = self.clock()
        view = await self.store.get_key(key_id, now)
        if view is None:
            return error(404, "not_found", f"no vault key {key_id!r}")
        key = view.key
        if spec.max_usd_per_caller is not None and key.max_per_caller_micros is None:
            return error(
                400,
                "invalid_request_error",
                "max_usd_per_caller: this key was issued without one, so it keeps no spend per "
                "caller; issue a new key with it",
            )
        limit = key.created_at + self.settings.max_ttl_delta
        if key.budget_id is not None:
            budget = await self.store.get_budget(key.budget_id, now)
            if budget is not None:
                limit = min(limit, budget.budget.expires_at)
        return await self._patch(key_id, spec, key.status(now), limit, now)

    async def _patch(
        self, subject_id: str, spec: CapsPatch, status: str, latest: datetime, now: datetime
    ) -> Response:
        """Apply a patch to a live key or budget: its caps, and a new expiry no later than
        `latest` (the longest life allowed, counted from issue; a key's budget's end)."""
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
        outcome = await self.store.patch(subject_id, patch, now)
        if outcome == "unknown":
            return error(404, "not_found", f"no {subject_id!r}")
        if outcome == "not_live":
            return error(409, "conflict", f"{subject_id} is no longer active: nothing changed")
        if subject_id.startswith("bg_"):
            budget = await self.store.get_budget(subject_id, now)
            assert budget is not None
            return JSONResponse(budget_info(budget, now).model_dump())
        view = await self.store.get_key(subject_id, now)
        assert view is not None
        return JSONResponse(key_info(view, now).model_dump())

    async def revoke_label(self, request: Request) -> Response:
        spec = await self._body(request, LabelRevoke)
        if isinstance(spec, Response):
            return spec
        now = self.clock()
        keys, budgets = await self.store.revoke_label(spec.agent_run_label, now)
        revoked = set(keys)
        views = await self.store.list_keys(now=now, label=spec.agent_run_label)
        budget_views = await self.store.list_budgets(now=now, label=spec.agent_run_label)
        result = RevokeResult(
            agent_run_label=spec.agent_run_label,
            revoked=len(revoked),
            keys=[key_info(v, now) for v in views if v.key.key_id in revoked],
            budgets=[budget_info(v, now) for v in budget_views if v.budget.budget_id in budgets],
        )
        return JSONResponse(result.model_dump())

    # -- budgets -------------------------------------------------------------------------------

    async def create_budget(self, request: Request) -> Response:
        spec = await self._body(request, BudgetCreate)
        if isinstance(spec, Response):
            return spec
        refused = self._cap_limits(
            daily_usd_cap=spec.daily_usd_cap, total_usd_cap=spec.total_usd_cap
        )
        if refused is not None:
            return refused
        ttl = parse_duration(spec.expires_in)
        if ttl > self.settings.max_budget_ttl_delta:
            return error(
                400,
                "invalid_request_error",
                f"expires_in: at most {self.settings.max_budget_ttl} on this proxy",
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
        )
        await self.store.create_budget(record)
        view = BudgetView(record, Usage(bucket_start(window_floor(now))))
        return JSONResponse(budget_info(view, now).model_dump(), status_code=201)

    async def list_budgets(self, request: Request) -> Response:
        params = request.query_params
        status = params.get("status")
        if status is not None and status not in _STATUSES:
            return error(400, "invalid_request_error", f"status must be one of {_STATUSES}")
        now = self.clock()
        views = await self.store.list_budgets(now=now, label=params.get("label"), status=status)
        return JSONResponse(BudgetList(data=[budget_info(v, now) for v in views]).model_dump())

    async def get_budget(self, request: Request) -> Response:
        budget_id = request.path_params["budget_id"]
        now = self.clock()
        view = await self.store.get_budget(budget_id, now)
        if view is None:
            return error(404, "not_found", f"no budget {budget_id!r}")
        return JSONResponse(budget_info(view, now).model_dump())

    async def revoke_budget(self, request: Request) -> Response:
        budget_id = request.path_params["budget_id"]
        now = self.clock()
        if await self.store.revoke_budget(budget_id, now) is None:
            return error(404, "not_found", f"no budget {budget_id!r}")
        view = await self.store.get_budget(budget_id, now)
        assert view is not None
        return JSONResponse(budget_info(view, now).model_dump())

    async def patch_budget(self, request: Request) -> Response:
        budget_id = request.path_params["budget_id"]
        spec = await self._body(request, CapsPatch)
        if isinstance(spec, Response):
            return spec
        if spec.max_usd_per_caller is not None:
            return error(
                400, "invalid_request_error", "max_usd_per_caller: budgets have no caller caps"
            )
        now = self.clock()
        view = await self.store.get_budget(budget_id, now)
        if view is None:
            return error(404, "not_found", f"no budget {budget_id!r}")
        latest = view.budget.created_at + self.settings.max_budget_ttl_delta
        return await self._patch(budget_id, spec, view.budget.status(now), latest, now)

    async def audit(self, request: Request) -> Response:
        params = request.query_params
        try:
            query = AuditFilter(
                key_id=params.get("key_id"),
                budget_id=params.get("budget_id"),
                label=params.get("label"),
                vendor=params.get("vendor"),
                decision=params.get("decision"),
                since=self._since(params.get("since")),
                after_id=_whole("after_id", params.get("after_id"), 0, 2**62),
                limit=_whole("limit", params.get("limit", "100"), 1, 100_000) or 100,
            )
        except ValueError as exc:
            return error(400, "invalid_request_error", str(exc))
        rows = [audit_row(r) for r in await self.store.audit(query)]
        wants_csv = params.get("format") == "csv" or "text/csv" in request.headers.get("accept", "")
        if wants_csv:
            out = io.StringIO()
            writer = csv.DictWriter(out, fieldnames=AUDIT_COLUMNS)
            writer.writeheader()
            for row in rows:
                writer.writerow(row.model_dump())
            return Response(out.getvalue(), media_type="text/csv")
        return JSONResponse(AuditPage(data=rows).model_dump())

    async def prune_audit(self, request: Request) -> Response:
        """Delete audit rows older than `before`; see `Store.prune_audit` for what is kept."""
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

    async def pricing_table(self, request: Request) -> Response:
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


_DEFAULT_KEY_TTL = timedelta(hours=1)


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
