"""Follow the cluster's Argo Workflows with lightkube, the way Kubernetes documents list and watch
(https://kubernetes.io/docs/reference/using-api/api-concepts/#efficient-detection-of-changes):

1. list, and remember the list's `resourceVersion`;
2. watch from it, asking for `BOOKMARK` events (they carry only a newer `resourceVersion`, so a
   quiet watch can resume from a recent point instead of an expired one);
3. when the watch ends or the connection drops, watch again from the last version seen;
4. on `410 Gone` — as the watch request's HTTP status or as an in-stream `ERROR` event — the
   version has been compacted away: list again and compare with what was known, because the
   events of the gap (deletions among them) are never replayed.

Errors back off exponentially (capped), and every step is reported to a `RunBook` through
callbacks, so the watching holds no opinion about keys.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

import httpx
from lightkube import AsyncClient
from lightkube.core.exceptions import ApiError
from lightkube.generic_resource import create_namespaced_resource
from lightkube.types import on_error_raise

__all__ = ["WatchGone", "Workflow", "WorkflowWatch"]

log = logging.getLogger("keybrake.reaper")

Workflow = create_namespaced_resource("argoproj.io", "v1alpha1", "Workflow", "workflows")

Handler = Callable[[str, Mapping[str, Any]], Awaitable[None]]
Relisted = Callable[[Sequence[Mapping[str, Any]]], Awaitable[None]]
Broken = Callable[[], None]


class WatchGone(Exception):
    """The watch's resourceVersion is too old (410 Gone): list again."""


def _status(exc: BaseException) -> int | None:
    if isinstance(exc, ApiError):
        return exc.status.code
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code
    return None


@dataclass
class WatchStats:
    lists: int = 0
    watches: int = 0
    bookmarks: int = 0
    gone: int = 0
    errors: int = 0


@dataclass(eq=False)  # a running thing: compared and hashed by identity
class WorkflowWatch:
    """List and watch Workflows (in `namespace`, or all), calling `on_event(type, object)` for
    ADDED, MODIFIED and DELETED and `on_list(objects)` after every (re)list."""

    client: AsyncClient
    on_event: Handler
    on_list: Relisted
    _: KW_ONLY
    on_broken: Broken | None = None
    namespace: str | None = None  # None: every namespace
    server_timeout: int = 300
    backoff: tuple[float, float] = (0.2, 30.0)  # the first delay after an error, and the most
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    version: str | None = field(init=False, default=None)  # the last resourceVersion seen
    stats: WatchStats = field(init=False, default_factory=WatchStats)

    @property
    def _scope(self) -> str:
        return self.namespace or "*"  # lightkube's ALL_NS

    async def run(self) -> None:
        """Forever: list, then watch; relist on 410; back off on errors."""
        delay = self.backoff[0]
        while True:
            try:
                if self.version is None:
                    await self._list()
                await self._watch()
                delay = self.backoff[0]  # a watch that ended cleanly: resume at once
            except WatchGone:
                self.stats.gone += 1
                log.info("watch expired (410 Gone) at version %s: listing again", self.version)
                self.version = None
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure of the API server or the connection: retry
                self.stats.errors += 1
                if self.on_broken is not None:
                    self.on_broken()
                if _status(exc) == 410:
                    self.stats.gone += 1
                    self.version = None
                    continue
                log.warning("watching workflows failed (%s); again in %.1fs", _describe(exc), delay)
                await self.sleep(delay)
                delay = min(delay * 2, self.backoff[1])

    async def _list(self) -> None:
        listing = self.client.list(Workflow, namespace=self._scope, chunk_size=500)
        objects = [_plain(obj) async for obj in listing]
        self.stats.lists += 1
        await self.on_list(objects)
        self.version = listing.resourceVersion

    async def _watch(self) -> None:
        # lightkube's watch() has no allowWatchBookmarks; build the request it builds, plus that.
        request = self.client._client.prepare_request(
            "list",
            res=Workflow,
            namespace=self._scope,
            watch=True,
            params={
                "timeoutSeconds": self.server_timeout,
                "resourceVersion": self.version,
                "allowWatchBookmarks": "true",
            },
        )
        self.stats.watches += 1
        try:
            # The server ends a watch after timeoutSeconds; a connection that died without a
            # word (a NAT or load balancer dropping it) never would: end it ourselves then.
            async with asyncio.timeout(self.server_timeout + 60):
                await self._follow(request)
        except TimeoutError as exc:
            raise ConnectionError("the watch went quiet past its timeout") from exc

    async def _follow(self, request: Any) -> None:
        try:
            # Every error is raised to run() (on_error_raise), to be handled as this module's
            # docstring says, never retried quietly from an expired or missing version.
            async for kind, obj in self.client._client.watch(request, on_error=on_error_raise):
                data = _plain(obj)
                version = (data.get("metadata") or {}).get("resourceVersion")
                if kind == "BOOKMARK":
                    self.stats.bookmarks += 1
                elif kind in ("ADDED", "MODIFIED", "DELETED"):
                    await self.on_event(kind, data)
                if version:
                    self.version = str(version)
        except (ApiError, httpx.HTTPStatusError) as exc:
            if _status(exc) == 410:
                raise WatchGone from exc
            raise


def _plain(obj: Any) -> dict[str, Any]:
    """A lightkube generic resource as the plain dict the API server sent."""
    if isinstance(obj, dict):
        return obj
    return dict(obj.to_dict())


def _describe(exc: BaseException) -> str:
    status = _status(exc)
    if status is not None:
        return f"HTTP {status}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
