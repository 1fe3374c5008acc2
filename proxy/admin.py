"""The admin API under /vault: HTTP in and out of the vault (`keybrake.proxy.vault`).

Each handler reads a request (a JSON body through the one body reader, query parameters, the
`Idempotency-Key` header), calls the vault, and renders what it answers (`keybrake.proxy.views`).
Every refusal is a `keybrake.proxy.errors.VaultError`, rendered in one place (`_guard`) as the
JSON error envelope, and recorded when it refuses an action.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from keybrake.proxy import models
from keybrake.proxy.access import Actor, Authenticator, admin_only, refused_login
from keybrake.proxy.body import BodyDeadlines
from keybrake.proxy.errors import (
    AmbiguousRequest,
    InvalidRequest,
    LoginRefused,
    NotFound,
    StoreUnavailable,
    VaultError,
)
from keybrake.proxy.money import format_ts, parse_duration
from keybrake.proxy.paging import (
    CursorError,
    decode_id,
    decode_position,
    encode_id,
    encode_position,
)
from keybrake.proxy.redact import redact
from keybrake.proxy.store.records import (
    AuditFilter,
    AuditRecord,
    BudgetView,
    Event,
    EventFilter,
    KeyView,
    Listing,
)
from keybrake.proxy.strict_json import parse_json
from keybrake.proxy.vault import MAX_LIST_LIMIT, Vault
from keybrake.proxy.views import (
    alert_info,
    audit_row,
    budget_info,
    event_info,
    issuer_info,
    key_info,
)

__all__ = ["AdminApi", "error"]

log = logging.getLogger("keybrake.proxy.admin")

Handler = Callable[[Request, Actor], Awaitable[Response]]
M = TypeVar("M", bound=BaseModel)

_STATUSES = ("active", "revoked", "expired")
AUDIT_COLUMNS = list(models.AuditRow.model_fields)
LIST_LIMIT = 1000  # rows a list returns unless asked for more
_MAX_JSON_BYTES = 65536


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _csv_cell(value: Any) -> Any:
    """A spreadsheet runs a cell that starts with = + - @ (or a tab or CR) as a formula, and
    the audit holds text a vault key's holder chose (its idempotency key): such a
    cell is written behind a `'`, which keeps it text (OWASP, "CSV Injection"). Numbers are
    never text of that kind here (amounts and money are unsigned)."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def error(status: int, error_type: str, message: str, code: str | None = None) -> JSONResponse:
    """The JSON error envelope every refusal of the admin API answers with."""
    found: dict[str, str] = {"type": error_type}
    if code is not None:
        found["code"] = code
    found["message"] = redact(message)
    return JSONResponse({"error": found}, status_code=status)


@dataclass(frozen=True, slots=True, kw_only=True)
class AdminApi:
    """The admin API's routes: HTTP in and out, over the vault service."""

    vault: Vault
    authenticator: Authenticator
    pricing: Callable[[], Any]  # the pricing table as JSON
    deadlines: BodyDeadlines

    def routes(self) -> list[Route]:
        g = self._guard
        return [
            Route("/vault/keys", g(self.create_key, "key.issue"), methods=["POST"]),
            Route("/vault/keys", g(self.list_keys), methods=["GET"]),
            Route("/vault/keys/revoke", g(self.revoke_label, "label.revoke"), methods=["POST"]),
            Route("/vault/budgets", g(self.create_budget, "budget.create"), methods=["POST"]),
            Route("/vault/budgets", g(self.list_budgets), methods=["GET"]),
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
            # A key or a budget: one set of handlers for both, told which the path names.
            *(
                Route(f"/vault/{kind}/{{subject_id}}", g(handler(kind), action), methods=[method])
                for kind, noun in (("keys", "key"), ("budgets", "budget"))
                for handler, action, method in (
                    (self.get_subject, None, "GET"),
                    (self.revoke_subject, f"{noun}.revoke", "DELETE"),
                    (self.patch_subject, f"{noun}.patch", "PATCH"),
                )
            ),
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
                target = f"{request.method} {request.url.path}"
                await self._record_quietly(
                    refused_login(exc, ts=self.vault.clock(), target=target, source=source)
                )
                return error(401, "authentication_error", exc.message)
            except StoreUnavailable:
                return _unavailable()
            try:
                for name, value in [
                    *request.path_params.items(),
                    *request.query_params.multi_items(),
                ]:
                    _storable(value, name)
                response = await handler(request, actor)
            except VaultError as exc:
                response = error(exc.status, exc.error_type, exc.message, exc.code)
            except StoreUnavailable:
                return _unavailable()
            except Exception:
                # A bug, not the database: logged with its traceback, never shown, and not
                # answered as "unreachable" (a retry would meet the same bug).
                log.exception("admin request %s %s failed", request.method, request.url.path)
                return error(500, "internal_error", "the proxy failed to handle this request")
            if action is not None and response.status_code >= 400:
                await self._record_quietly(
                    self.vault.event(
                        actor,
                        action,
                        _target(request),
                        outcome=f"refused: {_message(response)}",
                        detail={"status": response.status_code},
                    )
                )
            return response

        return guarded

    async def _record_quietly(self, event: Any) -> None:
        """A refusal's record; the refusal stands even if the database cannot take it."""
        with contextlib.suppress(StoreUnavailable):
            await self.vault.store.record_event(event)

    async def _body(self, request: Request, model: type[M]) -> M:
        """The request's JSON body as `model`: at most 64 KiB, within KEYBRAKE_BODY_TIMEOUT,
        read strictly."""
        try:
            body = await self.deadlines.read_whole(request.receive, _MAX_JSON_BYTES)
        except TimeoutError as exc:
            raise InvalidRequest(str(exc), status=408) from exc
        if body is None:
            raise InvalidRequest("request body too large (64 KiB at most)")
        try:
            found = parse_json(body)
        except AmbiguousRequest as exc:
            raise InvalidRequest(f"malformed JSON: {exc}") from exc
        _storable(found, "the body")
        try:
            return model.model_validate(found)
        except ValidationError as exc:
            raise InvalidRequest(models.describe_validation_error(exc)) from exc

    def _render(self, view: KeyView | BudgetView) -> Any:
        now = self.vault.clock()
        if isinstance(view, KeyView):
            return key_info(view, now).model_dump()
        return budget_info(view, now).model_dump()

    # -- keys and budgets ----------------------------------------------------------------------

    async def create_key(self, request: Request, actor: Actor) -> Response:
        spec = await self._body(request, models.KeyCreate)
        issued = await self.vault.issue_key(actor, spec, request.headers.get("idempotency-key"))
        answer = models.IssuedKey(**self._render(issued.view), vault_key=issued.vault_key)
        return _created(answer.model_dump(), issued.replaced)

    async def create_budget(self, request: Request, actor: Actor) -> Response:
        spec = await self._body(request, models.BudgetCreate)
        issued = await self.vault.create_budget(actor, spec, request.headers.get("idempotency-key"))
        return _created(self._render(issued.view), issued.replaced)

    async def list_keys(self, request: Request, actor: Actor) -> Response:
        params = request.query_params
        limit, before = _page(params.get("limit"), "keys", params.get("continue"))
        query = _listing(params, limit + 1, before)  # one more: is there a next page?
        query.vendor, query.budget_id = params.get("vendor"), params.get("budget_id")
        views = await self.vault.list_keys(actor, query)
        token = None
        if len(views) > limit:
            views = views[:limit]
            token = encode_position("keys", views[-1].key.created_at, views[-1].key.key_id)
        page = models.KeyList(data=[self._render(v) for v in views], continue_=token)
        return JSONResponse(page.model_dump())

    async def list_budgets(self, request: Request, actor: Actor) -> Response:
        params = request.query_params
        limit, before = _page(params.get("limit"), "budgets", params.get("continue"))
        views = await self.vault.list_budgets(actor, _listing(params, limit + 1, before))
        token = None
        if len(views) > limit:
            views = views[:limit]
            last = views[-1].budget
            token = encode_position("budgets", last.created_at, last.budget_id)
        page = models.BudgetList(data=[self._render(v) for v in views], continue_=token)
        return JSONResponse(page.model_dump())

    def get_subject(self, kind: str) -> Handler:
        async def get(request: Request, actor: Actor) -> Response:
            found = await self.vault.subject(actor, _subject(kind, request))
            return JSONResponse(self._render(found))

        return get

    def revoke_subject(self, kind: str) -> Handler:
        async def revoke(request: Request, actor: Actor) -> Response:
            found = await self.vault.revoke(actor, _subject(kind, request))
            return JSONResponse(self._render(found))

        return revoke

    def patch_subject(self, kind: str) -> Handler:
        async def patch(request: Request, actor: Actor) -> Response:
            spec = await self._body(request, models.CapsPatch)
            found = await self.vault.patch(actor, _subject(kind, request), spec)
            return JSONResponse(self._render(found))

        return patch

    async def revoke_label(self, request: Request, actor: Actor) -> Response:
        spec = await self._body(request, models.LabelRevoke)
        keys, budgets = await self.vault.revoke_run(actor, spec)
        result = models.RevokeResult(
            agent_run_label=spec.agent_run_label,
            revoked=len(keys),
            keys=[self._render(v) for v in keys],
            budgets=[self._render(v) for v in budgets],
        )
        return JSONResponse(result.model_dump())

    # -- issuers -------------------------------------------------------------------------------

    async def create_issuer(self, request: Request, actor: Actor) -> Response:
        spec = await self._body(request, models.IssuerCreate)
        record, token, warnings = await self.vault.create_issuer(
            actor, spec, kubernetes_login=self.authenticator.verifier is not None
        )
        answer = models.IssuedIssuer(
            **issuer_info(record).model_dump(), issuer_token=token, warnings=warnings
        )
        # No warning: the answer as it always was, without the field.
        body = answer.model_dump(mode="json", exclude=set() if warnings else {"warnings"})
        return JSONResponse(body, status_code=201)

    async def list_issuers(self, request: Request, actor: Actor) -> Response:
        everything = request.query_params.get("all") in ("1", "true")
        issuers = await self.vault.list_issuers(actor, include_deleted=everything)
        page = models.IssuerList(data=[issuer_info(i) for i in issuers])
        return JSONResponse(page.model_dump(mode="json"))

    async def get_issuer(self, request: Request, actor: Actor) -> Response:
        record = await self.vault.issuer(actor, request.path_params["issuer_id"])
        return JSONResponse(issuer_info(record).model_dump(mode="json"))

    async def delete_issuer(self, request: Request, actor: Actor) -> Response:
        flag = request.query_params.get("revoke", "false")
        if flag not in ("true", "false", "1", "0"):
            raise InvalidRequest("revoke must be true or false")
        issuer_id = request.path_params["issuer_id"]
        record, keys, budgets = await self.vault.delete_issuer(
            actor, issuer_id, revoke=flag in ("true", "1")
        )
        answer = {
            **issuer_info(record).model_dump(mode="json"),
            "revoked_keys": keys,
            "revoked_budgets": budgets,
        }
        return JSONResponse(answer)

    # -- the records ---------------------------------------------------------------------------

    async def events(self, request: Request, actor: Actor) -> Response:
        params = request.query_params
        refused = params.get("refused")
        if refused not in (None, "true", "false"):
            raise InvalidRequest("refused must be true or false")
        query = EventFilter(
            action=params.get("action"),
            issuer_id=params.get("issuer_id"),
            target=params.get("target"),
            refused=None if refused is None else refused == "true",
            **self._id_page(params, "events"),
        )
        if query.before_id is None:
            query.before_id = _whole("before_id", params.get("before_id"), 0, 2**62)
        found, token = await _paged(query, lambda: self.vault.events(actor, query), "events")
        rows = [event_info(e) for e in found]
        return JSONResponse(models.EventPage(data=rows, continue_=token).model_dump())

    async def alerts(self, request: Request, actor: Actor) -> Response:
        """The threshold alerts' outbox, newest first: what was raised and how delivery went."""
        params = request.query_params
        limit = _whole("limit", params.get("limit", "100"), 1, 10_000) or 100
        pending = params.get("pending") == "true"
        found = await self.vault.alerts(actor, pending=pending, limit=limit)
        return JSONResponse(models.AlertList(data=[alert_info(a) for a in found]).model_dump())

    async def audit(self, request: Request, actor: Actor) -> Response:
        params = request.query_params
        query = AuditFilter(
            key_id=params.get("key_id"),
            budget_id=params.get("budget_id"),
            label=params.get("label"),
            vendor=params.get("vendor"),
            decision=params.get("decision"),
            **self._id_page(params, "audit"),
        )
        found, token = await _paged(query, lambda: self.vault.audit(actor, query), "audit")
        rows = [audit_row(r) for r in found]
        if params.get("format") == "csv" or "text/csv" in request.headers.get("accept", ""):
            out = io.StringIO()
            writer = csv.DictWriter(out, fieldnames=AUDIT_COLUMNS)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: _csv_cell(v) for k, v in row.model_dump().items()})
            return Response(out.getvalue(), media_type="text/csv")
        return JSONResponse(models.AuditPage(data=rows, continue_=token).model_dump())

    async def prune_audit(self, request: Request, actor: Actor) -> Response:
        """Delete audit rows older than `before`; see `Store.prune_audit` for what is kept."""
        spec = await self._body(request, models.PruneRequest)
        before = self._since(spec.before, name="before")
        if before is None:
            raise InvalidRequest("before: required")
        removed = await self.vault.prune_audit(actor, before, dry_run=spec.dry_run)
        result = models.PruneResult(before=format_ts(before), dry_run=spec.dry_run, removed=removed)
        return JSONResponse(result.model_dump())

    async def pricing_table(self, request: Request, actor: Actor) -> Response:
        admin_only(actor, "reading the pricing table")
        return JSONResponse(self.pricing())

    def _id_page(self, params: Any, listing: str) -> dict[str, Any]:
        """A record's listing, newest first: since when, after or before which row, how many."""
        return {
            "since": self._since(params.get("since")),
            "after_id": _whole("after_id", params.get("after_id"), 0, 2**62),
            "before_id": _after_id(listing, params.get("continue")),
            "limit": _whole("limit", params.get("limit", "100"), 1, 100_000) or 100,
        }

    def _since(self, value: str | None, name: str = "since") -> datetime | None:
        """A duration back from now (`1h`) or an ISO timestamp."""
        if value is None:
            return None
        with contextlib.suppress(ValueError):
            return self.vault.clock() - parse_duration(value)
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError as exc:
            raise InvalidRequest(
                f"{name}: {value!r} is neither a duration (1h) nor an ISO time"
            ) from exc
        if moment.tzinfo is None:
            raise InvalidRequest(f"{name}: give a timezone, e.g. 2026-11-26T10:00:00Z")
        try:
            return moment.astimezone(UTC)
        except OverflowError as exc:  # e.g. 0001-01-01T00:00:00+14:00 is before year 1 in UTC
            raise InvalidRequest(f"{name}: {value!r} is out of range") from exc


R = TypeVar("R", AuditRecord, Event)


async def _paged(
    query: AuditFilter | EventFilter, fetch: Callable[[], Awaitable[list[R]]], listing: str
) -> tuple[list[R], str | None]:
    """One page of records, newest first, and the `continue` token of the next (none when
    following new rows with `after_id`): one row more is asked for, to know whether there is."""
    limit = query.limit
    query.limit += 1
    found = await fetch()
    token = None
    if len(found) > limit and query.after_id is None:
        token = encode_id(listing, found[limit - 1].id or 0)
    return found[:limit], token


def _unavailable() -> JSONResponse:
    return error(503, "unavailable", "the database is unreachable; try again")


def _created(body: Any, replaced: str | None) -> JSONResponse:
    headers = {"Keybrake-Replaced": replaced} if replaced else None
    return JSONResponse(body, status_code=201, headers=headers)


_KINDS = {"keys": "vk_", "budgets": "bg_"}


def _subject(kind: str, request: Request) -> str:
    """The key or budget a `/vault/keys/…` or `/vault/budgets/…` path names."""
    subject_id = request.path_params["subject_id"]
    if not subject_id.startswith(_KINDS[kind]):
        # Which listing it was asked from decides the answer: a budget id is no key.
        raise NotFound(f"no {'vault key' if kind == 'keys' else 'budget'} {subject_id!r}")
    return str(subject_id)


def _storable(value: Any, where: str) -> None:
    """Refuse text no database takes as it is: a NUL (PostgreSQL's text cannot hold one) or an
    unpaired surrogate (not UTF-8). Refused here as a 400, not a 503 from PostgreSQL, a 500
    when rendering the answer, or a key written on one backend and refused on the other."""
    if isinstance(value, str):
        if "\x00" in value or (not value.isascii() and _not_utf8(value)):
            raise InvalidRequest(f"{where}: text holds a NUL or a character that is not UTF-8")
    elif isinstance(value, dict):
        for key, item in value.items():
            _storable(key, where)
            _storable(item, where)
    elif isinstance(value, list):
        for item in value:
            _storable(item, where)


def _not_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _target(request: Request) -> str | None:
    for name in ("subject_id", "issuer_id"):
        if name in request.path_params:
            return str(request.path_params[name])[:100]
    return None


def _message(response: Response) -> str:
    try:
        body = json.loads(bytes(response.body))
        return str(body["error"]["message"])[:300]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}"


def _listing(params: Any, limit: int, before: Any) -> Listing:
    status = params.get("status")
    if status is not None and status not in _STATUSES:
        raise InvalidRequest(f"status must be one of {_STATUSES}")
    return Listing(
        label=params.get("label"),
        status=status,
        namespace=params.get("namespace"),
        limit=limit,
        before=before,
    )


def _page(limit: str | None, listing: str, token: str | None) -> tuple[int, Any]:
    """A key or budget listing's `limit` (newest first, 1 to 100,000; 1,000 unless given) and
    where its `continue` token resumes."""
    rows = _whole("limit", limit, 1, MAX_LIST_LIMIT) or LIST_LIMIT
    try:
        return rows, None if token is None else decode_position(listing, token)
    except CursorError as exc:
        raise InvalidRequest(str(exc)) from exc


def _after_id(listing: str, token: str | None) -> int | None:
    try:
        return None if token is None else decode_id(listing, token)
    except CursorError as exc:
        raise InvalidRequest(str(exc)) from exc


def _whole(name: str, given: str | None, low: int, high: int) -> int | None:
    if given is None:
        return None
    if not (given.isascii() and given.isdigit() and len(given) <= 19 and low <= int(given) <= high):
        raise InvalidRequest(f"{name} must be a whole number from {low} to {high}")
    return int(given)
