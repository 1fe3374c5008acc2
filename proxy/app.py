"""Build the proxy's ASGI app from settings. Nothing here starts a server (see `keybrake serve`)."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import Receive, Scope, Send

from keybrake.proxy.access import Authenticator, TokenVerifier
from keybrake.proxy.admin import AdminApi
from keybrake.proxy.alerts import Alerts
from keybrake.proxy.body import BodyDeadlines
from keybrake.proxy.decisions import window_floor
from keybrake.proxy.errors import ConfigError, StoreUnavailable
from keybrake.proxy.kubernetes import verifier_from
from keybrake.proxy.metrics import Metrics
from keybrake.proxy.models import REPLAY_RETENTION
from keybrake.proxy.pipeline import Incoming, Pipeline
from keybrake.proxy.pricing import load_pricing
from keybrake.proxy.redact import RedactingFilter
from keybrake.proxy.settings import Settings
from keybrake.proxy.store import Store, open_store
from keybrake.proxy.store.records import MetricsSnapshot
from keybrake.proxy.ui.dashboard import Dashboard
from keybrake.proxy.upstream import Upstream
from keybrake.proxy.vault import Vault
from keybrake.proxy.vendors import VENDORS, Vendor

__all__ = ["build_app", "maintain", "utc_now"]


def utc_now() -> datetime:
    return datetime.now(UTC)


def build_app(
    settings: Settings,
    *,
    clock: Callable[[], datetime] = utc_now,
    store: Store | None = None,
    upstream: Upstream | None = None,
    verifier: TokenVerifier | None = None,
) -> Starlette:
    """The whole proxy: health, admin API under /vault, and /{vendor}/... forwarding.

    `store` and `upstream` replace the database and the HTTP client towards vendors (tests of the
    ledger and the pipeline run without sockets); by default both come from `settings`."""
    if settings.api_key is None or not settings.api_key.get_secret_value():
        raise ConfigError("KEYBRAKE_API_KEY is not set: the admin API needs a token")
    pricing = load_pricing(
        settings.pricing_file, {name: cls.validate_pricing for name, cls in VENDORS.items()}
    )
    credentials = settings.vendor_credentials()
    vendors: dict[str, Vendor] = {
        name: VENDORS[name](creds, pricing) for name, creds in credentials.items()
    }
    store = store or open_store(
        settings.database_url, durable_commits=settings.postgres_durable_commits
    )
    upstream = upstream or Upstream(
        timeout=settings.upstream_timeout,
        connections=settings.upstream_connections,
        max_response_bytes=16 * 1024 * 1024,
        proxy=settings.upstream_proxy.get_secret_value() if settings.upstream_proxy else None,
    )
    # Whatever a caller sends, no vault key or token reaches a log line.
    for name in ("keybrake.proxy", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactingFilter) for f in logger.filters):
            logger.addFilter(RedactingFilter())
    metrics = Metrics()
    pipeline = Pipeline(
        store=store, vendors=vendors, upstream=upstream, clock=clock, metrics=metrics
    )
    if verifier is None:
        audiences = list(settings.kubernetes_audiences)
        verifier = verifier_from(settings, lambda: audiences)
    deadlines = BodyDeadlines(settings.body_timeout)
    vault = Vault(settings=settings, store=store, vendors=list(vendors), clock=clock)
    token = settings.api_key.get_secret_value()
    admin = AdminApi(
        vault=vault,
        authenticator=Authenticator(token, store, verifier),
        pricing=pricing.as_json,
        deadlines=deadlines,
    )
    stripe_key = settings.stripe_secret_key
    dashboard = Dashboard(
        vault=vault,
        authenticator=admin.authenticator,
        admin_token=token,
        session_ttl_seconds=settings.ui_session_ttl_delta.total_seconds(),
        cookie_secure=settings.ui_cookie_secure,
        deadlines=deadlines,
        # Test-mode request ids live under /test/ in Stripe's dashboard.
        stripe_test_mode=stripe_key is not None
        and stripe_key.get_secret_value().startswith(("sk_test_", "rk_test_")),
    )
    metrics_token = (
        settings.metrics_token.get_secret_value().encode() if settings.metrics_token else None
    )

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        try:
            await store.ping()
        except StoreUnavailable as exc:
            return JSONResponse({"status": "unavailable", "reason": str(exc)}, status_code=503)
        return JSONResponse({"status": "ready", "vendors": sorted(vendors)})

    async def metrics_endpoint(request: Request) -> Response:
        if metrics_token is not None:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), metrics_token
            ):
                return JSONResponse(
                    {"error": {"type": "authentication_error", "message": "metrics need a token"}},
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
        now = clock()
        snapshot: MetricsSnapshot | None
        try:
            snapshot = await store.metrics_snapshot(now, now - settings.reservation_ttl_delta)
        except StoreUnavailable:
            snapshot = None
        body = metrics.render(snapshot)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    forward = _ForwardEndpoint(pipeline, settings.max_body_bytes, deadlines)

    if settings.reservation_ttl_delta.total_seconds() <= settings.upstream_timeout:
        raise ConfigError(
            f"KEYBRAKE_RESERVATION_TTL ({settings.reservation_ttl}) must be longer than "
            f"KEYBRAKE_UPSTREAM_TIMEOUT ({settings.upstream_timeout}s), or live calls get swept"
        )

    async def sweep_forever() -> None:
        while True:
            with contextlib.suppress(StoreUnavailable):
                await maintain(store, settings, clock())
            await asyncio.sleep(30)  # a maintenance period, not synchronisation

    alerts = None
    if settings.alert_webhook_url:
        secret = settings.alert_webhook_secret
        alerts = Alerts(
            store,
            url=settings.alert_webhook_url,
            percents=settings.alert_percents,
            interval=settings.alert_interval,
            clock=clock,
            secret=secret.get_secret_value().encode() if secret else None,
        )
        metrics.on_cap_hit = alerts.poke

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await store.open()
        await upstream.start()
        sweeper = asyncio.create_task(sweep_forever())
        watchdog = asyncio.create_task(deadlines.watch())
        background = [sweeper, watchdog]
        if alerts is not None:
            background.append(asyncio.create_task(alerts.run()))
        try:
            yield
        finally:
            for task in background:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await pipeline.drain()  # calls already forwarded are settled before closing
            await upstream.close()
            if verifier is not None and hasattr(verifier, "close"):
                await verifier.close()
            await store.close()

    routes: list[BaseRoute] = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        *admin.routes(),
        *dashboard.routes(),
    ]
    return ProxyApp(forward, routes=routes, lifespan=lifespan)


async def maintain(store: Store, settings: Settings, now: datetime) -> tuple[int, int, int]:
    """What every replica does every 30 seconds: count calls left in flight by a dead process as
    spent, forget replay tokens older than a day, expired dashboard sessions and the alert
    marks of ended keys and budgets, fold spend older than the window into each owner's
    lifetime total, and prune the audit log when a retention is set. Returns (calls
    reconciled, tokens forgotten, audit rows pruned)."""
    reconciled = await store.sweep(now - settings.reservation_ttl_delta)
    forgotten = await store.forget_replays(now - REPLAY_RETENTION)
    await store.forget_sessions(now)  # dashboard sign-ins past their expiry
    # Keys and budgets that ended alert no more; an hour late, so that a replica whose clock is
    # behind, still seeing one live, finds its marks and does not alert again.
    await store.forget_alert_marks(now - timedelta(hours=1))
    # Buckets older than the window only count towards lifetime totals: fold them into one.
    await store.compact_spend(window_floor(now) - 1)
    retention = settings.audit_retention_delta
    pruned = 0 if retention is None else await store.prune_audit(now - retention, now)
    return reconciled, forgotten, pruned


class ProxyApp(Starlette):
    """Starlette for the admin and health routes; vendor calls (`/{vendor}/...`), the hot path,
    go straight to the forwarding endpoint without routing and middleware layers."""

    def __init__(
        self, forward: _ForwardEndpoint, *, routes: list[BaseRoute], **kwargs: Any
    ) -> None:
        super().__init__(routes=routes, **kwargs)
        self.forward = forward
        # The first path segments the proxy answers itself; any other is a vendor's name.
        self.own_prefixes = frozenset(
            route.path.split("/")[1] for route in routes if isinstance(route, Route | Mount)
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            vendor, slash, _ = scope["path"][1:].partition("/")
            if slash and vendor and vendor not in self.own_prefixes:
                scope["path_params"] = {"vendor": vendor}
                await self.forward(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


class _ForwardEndpoint:
    """A raw ASGI endpoint: reads the body with a size limit and a deadline, and hands the call
    to the pipeline."""

    def __init__(self, pipeline: Pipeline, max_body_bytes: int, deadlines: BodyDeadlines) -> None:
        self.pipeline = pipeline
        self.max_body_bytes = max_body_bytes
        self.deadlines = deadlines

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        vendor = scope["path_params"]["vendor"]
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        prefix = b"/" + vendor.encode()
        rest = raw_path[len(prefix) :] if raw_path.startswith(prefix) else b"/"
        headers: dict[str, str] = {}
        for name, value in scope["headers"]:
            key = name.decode("latin-1").lower()
            if key not in headers:  # a repeated header never overrides the first one
                headers[key] = value.decode("latin-1")
        body, too_large, timed_out = await self.deadlines.read(receive, self.max_body_bytes)
        declared = headers.get("content-length", "")
        if declared.isdigit() and (len(declared) > 18 or int(declared) > self.max_body_bytes):
            too_large = True
        incoming = Incoming(
            vendor=vendor,
            method=scope["method"],
            path=rest.decode("latin-1") or "/",
            query=scope.get("query_string", b"").decode("latin-1"),
            headers=headers,
            body=body,
            too_large=too_large,
            body_timeout=self.deadlines.timeout if timed_out else None,
        )
        reply = await self.pipeline.handle(incoming)
        raw_headers: list[tuple[bytes, bytes]] = [
            (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers
        ]
        raw_headers.append((b"content-length", str(len(reply.body)).encode()))
        await send({"type": "http.response.start", "status": reply.status, "headers": raw_headers})
        await send({"type": "http.response.body", "body": reply.body})
