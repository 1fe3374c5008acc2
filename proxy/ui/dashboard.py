"""The dashboard under /ui/: runs and their spend for the people who own the money, and the
kill switch where they look.

Read-mostly, server-rendered, no script: the only change it makes is revoking a run, through a
confirmation page and a form carrying a CSRF token. Sign-in takes the admin token or an issuer
token (an issuer sees only its scope, as on the API); the cookie holds a random session id whose
hash is kept in the database (so every replica knows it, and a copy of the database signs nobody
in), never the token. A session ends at its expiry, at sign-out, when its issuer is deleted, or
when the admin token it was opened with changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import re
import secrets
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from keybrake.proxy import paging
from keybrake.proxy.access import (
    Actor,
    Authenticator,
    Forbidden,
    LoginRefused,
    check_label,
    hash_token,
    looks_like_jwt,
    refused_login,
)
from keybrake.proxy.body import BodyDeadlines
from keybrake.proxy.decisions import Decision, is_cap_hit
from keybrake.proxy.errors import StoreUnavailable
from keybrake.proxy.models import LabelRevoke, is_label
from keybrake.proxy.money import format_ts
from keybrake.proxy.store.records import (
    AuditFilter,
    Event,
    Listing,
    RunFilter,
    RunRow,
    Session,
)
from keybrake.proxy.ui import charts
from keybrake.proxy.ui.runs import cumulative, summary_of
from keybrake.proxy.vault import Vault

__all__ = ["COOKIE", "Dashboard"]

COOKIE = "keybrake_session"
LOGIN_COOKIE = "keybrake_login"  # the sign-in form's CSRF token (double submit)
HERE = Path(__file__).parent
RUNS_PER_PAGE = 25
AUDIT_PER_PAGE = 50
REFRESH_SECONDS = 10  # how often a live run's page reloads itself
MAX_FORM_BYTES = 8192
# A Stripe request id, linked to the request log of Stripe's dashboard; anything else is text.
_STRIPE_REQUEST = re.compile(r"req_[A-Za-z0-9]{1,64}")
_LABEL_PART = re.compile(r"[A-Za-z0-9._:/@-]+")
DECISIONS = tuple(Decision)  # what the run page's calls filter by, in the order of decisions.py
# What the Cap figure means (proxy/ui/runs.py states it in full), shown when pointed at.
CAP_MEANING = (
    "The most this run's caps let it spend over its life: for each key and budget the lower of "
    "its lifetime cap and its 24-hour cap once per 24 hours it lives, keys on a budget together "
    "no more than the budget, a revoked or expired one what it spent."
)
MAX_CALLER = 253  # the longest caller tag a vault key carries (pipeline.split_presented_key)

# No script, no inline style, no frames: the revoke button cannot be clickjacked and nothing a
# caller wrote into a label or metadata can run.
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

Page = Callable[[Request, Actor, Session], Awaitable[Response]]


_Position = TypeVar("_Position")


class _FormError(Exception):
    pass


class Dashboard:
    def __init__(
        self,
        *,
        vault: Vault,
        authenticator: Authenticator,
        admin_token: str,
        session_ttl_seconds: float,
        cookie_secure: str,
        stripe_test_mode: bool,
        deadlines: BodyDeadlines,
    ) -> None:
        self.vault = vault
        self.store = vault.store  # the pages' reads
        self.authenticator = authenticator
        self.admin_hash = hash_token(admin_token)
        self.clock = vault.clock
        self.session_ttl = session_ttl_seconds
        self.cookie_secure = cookie_secure
        self.deadlines = deadlines
        self.stripe_logs = "https://dashboard.stripe.com/" + ("test/" if stripe_test_mode else "")
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        self.templates.globals["cap_meaning"] = CAP_MEANING
        self.templates.filters["usd"] = charts.usd
        self.templates.filters["age"] = self._age
        self.templates.filters["when"] = _when
        self.templates.tests["cap_hit"] = is_cap_hit
        self.templates.tests["stripe_request"] = lambda value: bool(
            _STRIPE_REQUEST.fullmatch(str(value))
        )

    def routes(self) -> list[BaseRoute]:
        s = self._signed_in
        return [
            Route("/ui", self._to_runs, methods=["GET"]),
            Route("/ui/", s(self.runs), methods=["GET"]),
            Route("/ui/run", s(self.run), methods=["GET"]),
            Route("/ui/run/revoke", s(self.confirm_revoke), methods=["GET"]),
            Route("/ui/run/revoke", s(self.revoke), methods=["POST"]),
            Route("/ui/login", self.login_form, methods=["GET"]),
            Route("/ui/login", self.login, methods=["POST"]),
            Route("/ui/logout", s(self.logout), methods=["POST"]),
            Mount("/ui/static", StaticFiles(directory=HERE / "static"), name="ui-static"),
        ]

    # -- rendering -----------------------------------------------------------------------------

    def _page(
        self,
        request: Request,
        name: str,
        status: int = 200,
        headers: dict[str, str] | None = None,
        **context: Any,
    ) -> HTMLResponse:
        if context.get("actor") is not None:
            # Every page for a signed-in user, an error's too, has the sign-out form's token.
            context.setdefault("csrf", self._csrf(request))
        body = self.templates.get_template(name).render(**context)
        return HTMLResponse(body, status_code=status, headers={**HEADERS, **(headers or {})})

    def _error(
        self, request: Request, status: int, title: str, message: str, *, actor: Actor | None
    ) -> HTMLResponse:
        return self._page(request, "error.html", status, title=title, message=message, actor=actor)

    def _no_run(self, request: Request, actor: Actor) -> HTMLResponse:
        # The same answer whether the run does not exist or lies outside the issuer's scope.
        return self._error(
            request, 404, "No such run", "No run with that label is visible to you.", actor=actor
        )

    def _age(self, moment: datetime | None) -> str:
        if moment is None:
            return "—"
        seconds = int((self.clock() - moment).total_seconds())
        for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
            if seconds >= size:
                return f"{seconds // size}{unit}"
        return f"{max(seconds, 0)}s"

    # -- sessions ------------------------------------------------------------------------------

    def _signed_in(self, page: Page) -> Callable[[Request], Awaitable[Response]]:
        async def guarded(request: Request) -> Response:
            found = None
            try:
                found = await self._session(request)
                if found is None and request.headers.get("sec-fetch-site") == "cross-site":
                    # A link from another site (Argo's UI) arrives without the SameSite=Strict
                    # cookie; the same address opened again from this page carries it.
                    here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                    target = _safe_next(here)
                    return self._page(
                        request, "hop.html", target=target, refresh=f"0; url={target}"
                    )
                if found is None:
                    target = request.url.path + (
                        f"?{request.url.query}" if request.url.query else ""
                    )
                    query = urllib.parse.urlencode({"next": target})
                    return RedirectResponse(f"/ui/login?{query}", 303, headers=HEADERS)
                actor, session = found
                return await page(request, actor, session)
            except StoreUnavailable:
                return self._error(
                    request,
                    503,
                    "Database unavailable",
                    "The database is unreachable.",
                    actor=found[0] if found else None,
                )

        return guarded

    async def _session(self, request: Request) -> tuple[Actor, Session] | None:
        session_id = request.cookies.get(COOKIE, "")
        if not session_id or len(session_id) > 100:
            return None
        session = await self.store.find_session(_hash(session_id), self.clock())
        if session is None:
            return None
        source = request.client.host if request.client else None
        if session.issuer_id is None:
            if not hmac.compare_digest(session.credential_hash, self.admin_hash):
                return None  # the admin token changed since
            return Actor(source=source), session
        issuer = await self.store.get_issuer(session.issuer_id)
        if (
            issuer is None
            or issuer.deleted_at is not None
            or issuer.token_hash is None
            or not hmac.compare_digest(issuer.token_hash, session.credential_hash)
        ):
            return None
        return Actor(issuer=issuer, source=source), session

    def _secure(self, request: Request) -> bool:
        return self.cookie_secure == "always" or request.url.scheme == "https"

    async def _form(self, request: Request) -> dict[str, str]:
        """A small urlencoded form, from this site only."""
        if not _same_origin(request):
            raise _FormError("this form must be sent from the dashboard's own page")
        if request.headers.get("content-type", "").split(";")[0].strip() != (
            "application/x-www-form-urlencoded"
        ):
            raise _FormError("not a form")
        try:
            # The whole form within KEYBRAKE_BODY_TIMEOUT, as on the admin API: a client
            # trickling a byte at a time holds no connection for long.
            body = await self.deadlines.read_whole(request.receive, MAX_FORM_BYTES)
        except TimeoutError as exc:
            raise _FormError("the form did not arrive in time") from exc
        if body is None:
            raise _FormError("form too large")
        try:
            pairs = urllib.parse.parse_qsl(
                body.decode("utf-8"), keep_blank_values=True, strict_parsing=False
            )
        except (UnicodeDecodeError, ValueError) as exc:
            raise _FormError("unreadable form") from exc
        form: dict[str, str] = {}
        for name, value in pairs:
            if name in form:
                raise _FormError(f"field {name!r} given twice")
            form[name] = value
        return form

    async def login_form(self, request: Request, message: str | None = None) -> Response:
        token = secrets.token_urlsafe(24)
        response = self._page(
            request,
            "login.html",
            401 if message else 200,
            message=message,
            csrf=token,
            next=_safe_next(request.query_params.get("next")),
            actor=None,
        )
        response.set_cookie(
            LOGIN_COOKIE,
            token,
            max_age=3600,
            path="/ui/login",
            secure=self._secure(request),
            httponly=True,
            samesite="strict",
        )
        return response

    async def login(self, request: Request) -> Response:
        try:
            return await self._login(request)
        except StoreUnavailable:
            return self._error(
                request, 503, "Database unavailable", "The database is unreachable.", actor=None
            )

    async def _login(self, request: Request) -> Response:
        source = request.client.host if request.client else None
        try:
            form = await self._form(request)
        except _FormError as exc:
            return self._error(request, 400, "Not signed in", str(exc), actor=None)
        expected = request.cookies.get(LOGIN_COOKIE, "")
        if not expected or not hmac.compare_digest(
            form.get("csrf", "").encode(), expected.encode()
        ):
            return self._error(
                request,
                400,
                "Not signed in",
                "The sign-in form expired; open it again.",
                actor=None,
            )
        token = form.get("token", "").strip()
        next_page = _safe_next(form.get("next"))
        try:
            if not token:
                raise LoginRefused("paste the admin token or an issuer token")
            if looks_like_jwt(token):
                raise LoginRefused(
                    "sign in with the admin token or an issuer token (kbi_…), not a "
                    "service-account token"
                )
            actor = await self.authenticator.actor(token, source)
        except LoginRefused as exc:
            await self._record(
                refused_login(exc, ts=self.clock(), target="POST /ui/login", source=source)
            )
            request.scope["query_string"] = urllib.parse.urlencode({"next": next_page}).encode()
            return await self.login_form(request, message=exc.message)
        session_id = secrets.token_urlsafe(32)
        now = self.clock()
        expires = datetime.fromtimestamp(now.timestamp() + self.session_ttl, tz=now.tzinfo)
        await self.store.create_session(
            Session(
                session_hash=_hash(session_id),
                issuer_id=actor.issuer_id,
                credential_hash=hash_token(token),
                created_at=now,
                expires_at=expires,
            )
        )
        detail = {"expires_at": format_ts(expires)}
        await self._record(self.vault.event(actor, "ui.login", "POST /ui/login", detail=detail))
        response = RedirectResponse(next_page, 303, headers=HEADERS)
        response.set_cookie(
            COOKIE,
            session_id,
            max_age=int(self.session_ttl),
            path="/ui",
            secure=self._secure(request),
            httponly=True,
            samesite="strict",
        )
        response.delete_cookie(LOGIN_COOKIE, path="/ui/login")
        return response

    async def logout(self, request: Request, actor: Actor, session: Session) -> Response:
        try:
            await self._session_form(request)
        except _FormError as exc:
            return self._error(request, 400, "Not signed out", str(exc), actor=actor)
        await self.store.end_session(session.session_hash)
        response = RedirectResponse("/ui/login?signed_out=1", 303, headers=HEADERS)
        response.delete_cookie(COOKIE, path="/ui")
        return response

    def _csrf(self, request: Request) -> str:
        """The session's CSRF token: derived from its id, so it needs no storage, and useless
        to anyone who does not already hold the session cookie."""
        session_id = request.cookies.get(COOKIE, "")
        return hmac.new(session_id.encode(), b"keybrake-ui-csrf", hashlib.sha256).hexdigest()

    async def _session_form(self, request: Request) -> dict[str, str]:
        """A form a signed-in page sent: `_form`, carrying the session's CSRF token."""
        form = await self._form(request)
        # As bytes: compare_digest refuses str holding anything but ASCII.
        if not hmac.compare_digest(form.get("csrf", "").encode(), self._csrf(request).encode()):
            raise _FormError("the page expired (CSRF token mismatch); reload it and try again")
        return form

    async def _record(self, event: Event) -> None:
        with contextlib.suppress(StoreUnavailable):  # a sign-in's record; it stands without
            await self.store.record_event(event)

    # -- pages ---------------------------------------------------------------------------------

    async def _to_runs(self, request: Request) -> Response:
        return RedirectResponse("/ui/", 307, headers=HEADERS)

    async def runs(self, request: Request, actor: Actor, session: Session) -> Response:
        params = request.query_params
        contains = params.get("q", "").strip()[:200] or None
        status = params.get("status", "all")
        if status not in ("all", "live", "ended"):
            return self._error(
                request, 400, "Bad filter", "status is one of all, live, ended", actor=actor
            )
        try:
            before = _continuation(params, "runs", paging.decode_position)
        except paging.CursorError as exc:
            return self._error(request, 400, "Bad page", str(exc), actor=actor)
        now = self.clock()
        query = RunFilter(
            scope=actor.scope,
            contains=contains,
            live={"all": None, "live": True, "ended": False}[status],
            before=before,
            limit=RUNS_PER_PAGE + 1,
        )
        # A part of a label holds only a label's characters: anything else matches nothing.
        searchable = contains is None or _LABEL_PART.fullmatch(contains) is not None
        rows: list[RunRow] = await self.store.list_runs(query, now) if searchable else []
        more = len(rows) > RUNS_PER_PAGE
        rows = rows[:RUNS_PER_PAGE]
        # Each run's keys, budgets and last call, read at once (a pool connection each).
        found = await asyncio.gather(*(summary_of(self.store, r, actor.scope, now) for r in rows))
        summaries = [summary for summary, _keys, _budgets in found]
        next_token = None
        if more:  # a next page: continue after this page's last run
            next_token = paging.encode_position("runs", rows[-1].newest, rows[-1].label)
        next_url = None
        if next_token:
            next_url = "/ui/?" + urllib.parse.urlencode(
                {k: v for k, v in (("q", contains), ("status", status)) if v}
                | {"continue": next_token}
            )
        return self._page(
            request,
            "runs.html",
            actor=actor,
            runs=summaries,
            q=contains or "",
            shown=status,
            next_url=next_url,
            first_url="/ui/?" + urllib.parse.urlencode({"q": contains or "", "status": status})
            if before
            else None,
        )

    async def _run_label(self, request: Request, actor: Actor, label: str | None) -> str | None:
        """The run's label if the caller may see it."""
        if not label or not is_label(label):
            return None
        try:
            check_label(actor, label)
        except Forbidden:
            return None
        return label

    async def run(self, request: Request, actor: Actor, session: Session) -> Response:
        params = request.query_params
        label = await self._run_label(request, actor, params.get("label"))
        now = self.clock()
        rows = (
            await self.store.list_runs(RunFilter(scope=actor.scope, label=label, limit=1), now)
            if label
            else []
        )
        row = rows[0] if rows else None
        if label is None or row is None:
            return self._no_run(request, actor)
        try:
            decision, caller = _calls_filter(params.get("decision"), params.get("caller"))
        except _FormError as exc:
            return self._error(request, 400, "Bad filter", str(exc), actor=actor)
        try:
            before_id = _continuation(params, "ui-audit", paging.decode_id)
        except paging.CursorError as exc:
            return self._error(request, 400, "Bad page", str(exc), actor=actor)
        summary, keys, budgets = await summary_of(self.store, row, actor.scope, now)
        activity = await self.store.run_activity(label, actor.scope)
        series = cumulative(activity)
        audit = await self.store.audit(
            AuditFilter(
                scope=actor.scope,
                label=label,
                decision=decision,
                caller_tag=caller,
                before_id=before_id,
                limit=AUDIT_PER_PAGE + 1,
            )
        )
        more = len(audit) > AUDIT_PER_PAGE
        audit = audit[:AUDIT_PER_PAGE]
        shown = {"label": label} | {
            k: v for k, v in (("decision", decision), ("caller", caller)) if v is not None
        }
        older = None
        if more and audit[-1].id is not None:
            older = "/ui/run?" + urllib.parse.urlencode(
                shown | {"continue": paging.encode_id("ui-audit", audit[-1].id)}
            )
        tags = [tag for tag, *_ in activity.callers if tag is not None]
        # A live run's axis runs to now; an ended one's to its last call.
        axis_end = now if summary.status == "live" else (summary.last_call or summary.newest)
        return self._page(
            request,
            "run.html",
            actor=actor,
            run=summary,
            keys=keys,
            budgets=budgets,
            now=now,
            spend=charts.spend_chart(
                series.spend, summary.cap_micros, summary.cap_basis, summary.oldest, axis_end
            ),
            hits=charts.hits_chart(series.cap_hits, summary.oldest, axis_end),
            callers=charts.bars(activity.callers),
            audit=audit,
            older=older,
            decisions=DECISIONS,
            decision=decision,
            caller=caller,
            caller_tags=tags if caller is None or caller in tags else [*tags, caller],
            stripe_logs=self.stripe_logs,
            refresh=REFRESH_SECONDS if summary.status == "live" else None,
            # Said from the run's state, never from the address (which anyone can write).
            revoked=params.get("revoked") == "1" and row.revoked > 0,
            revoked_count=row.revoked,
            label_query=urllib.parse.urlencode({"label": label}),
        )

    async def confirm_revoke(self, request: Request, actor: Actor, session: Session) -> Response:
        label = await self._run_label(request, actor, request.query_params.get("label"))
        now = self.clock()
        if label is None:
            return self._no_run(request, actor)
        live = Listing(label=label, scope=actor.scope, status="active", limit=10_000)
        keys = await self.store.list_keys(live, now)
        budgets = await self.store.list_budgets(live, now)
        return self._page(
            request,
            "revoke.html",
            actor=actor,
            label=label,
            keys=keys,
            budgets=budgets,
            label_query=urllib.parse.urlencode({"label": label}),
        )

    async def revoke(self, request: Request, actor: Actor, session: Session) -> Response:
        try:
            form = await self._session_form(request)
        except _FormError as exc:
            return self._error(request, 400, "Not revoked", str(exc), actor=actor)
        label = await self._run_label(request, actor, form.get("label"))
        if label is None:
            return self._no_run(request, actor)
        await self.vault.revoke_run(actor, LabelRevoke(agent_run_label=label), via="dashboard")
        query = urllib.parse.urlencode({"label": label, "revoked": "1"})
        return RedirectResponse(f"/ui/run?{query}", 303, headers=HEADERS)


def _continuation(
    params: Mapping[str, str], listing: str, decode: Callable[[str, str], _Position]
) -> _Position | None:
    """Where a page of `listing` continues (its `continue` token, decoded), or None for the
    first page; a paging.CursorError for a token that is not one of this listing's."""
    token = params.get("continue")
    return decode(listing, token) if token else None


def _calls_filter(decision: str | None, caller: str | None) -> tuple[str | None, str | None]:
    """The run page's calls filter (a GET form, so its fields come in the address; empty: any):
    a decision of the audit's, and a caller tag as the audit stores it (printable, never a NUL)."""
    decision, caller = decision or None, caller or None
    if decision is not None and decision not in DECISIONS:
        raise _FormError(f"decision is one of: {', '.join(DECISIONS)}")
    if caller is not None and (len(caller) > MAX_CALLER or not caller.isprintable()):
        raise _FormError(f"caller is a caller tag: at most {MAX_CALLER} printable characters")
    return decision, caller


def _hash(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode()).digest()


def _when(moment: datetime | None) -> str:
    return "—" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _safe_next(value: str | None) -> str:
    """Where to go after signing in: a dashboard page of this site, never another site."""
    if (
        not value
        or not value.startswith("/ui/")
        or value.startswith("//")
        or "\\" in value
        or any(ord(c) < 32 for c in value)
    ):
        return "/ui/"
    return value


def _same_origin(request: Request) -> bool:
    """A browser names where a POST comes from (Origin, or Sec-Fetch-Site): refuse other sites.
    A request naming neither comes from no browser page, and still needs the CSRF token."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    if site is not None:
        return True
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return origin is None
    # The host only: behind a proxy that ends TLS the scheme seen here differs from the page's.
    return urllib.parse.urlsplit(origin).netloc == request.headers.get("host", "")
