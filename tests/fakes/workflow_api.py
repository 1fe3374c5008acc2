"""A stand-in for the Kubernetes API server's Argo Workflow collection, speaking the documented
list/watch protocol (https://kubernetes.io/docs/reference/using-api/api-concepts/):

- `GET /apis/argoproj.io/v1alpha1/workflows` and `.../namespaces/NS/workflows`: a `WorkflowList`
  whose `metadata.resourceVersion` is the collection's version, paged with `limit` and
  `continue`;
- the same with `watch=true`: a chunked stream of JSON lines `{"type", "object"}` (ADDED,
  MODIFIED, DELETED) after the given `resourceVersion`; `BOOKMARK` events (an object with only
  `metadata.resourceVersion`) when `allowWatchBookmarks=true`; the stream ends after
  `timeoutSeconds`;
- a `resourceVersion` older than the compaction point gets `410 Gone`, either as the HTTP status
  of the watch request or, as the watch cache does, as an in-stream `ERROR` event carrying a
  `Status` (which one: `gone_as`);
- a Bearer token is required (401 `Status` otherwise).

What a test does: `add`, `update`, `delete` workflows; `compact()` (forget history, so older
versions get 410); `drop()` (cut every open watch connection, as a restarting API server or a
load balancer does); `hold()` / `release()` (keep new watch requests waiting, to make a gap);
`bookmark()`; `requests` records each list and watch with its parameters.

It serves HTTPS with a CA made in the test.
"""

from __future__ import annotations

import asyncio
import copy
import json
import ssl
import threading
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from aiohttp import web

from tests.fakes.kubernetes import status_object
from tests.fakes.pki import CertificateAuthority
from tests.fakes.server import ThreadedServer

_GROUP = "/apis/argoproj.io/v1alpha1"


@dataclass(frozen=True)
class Seen:
    """One request: list or watch, its namespace (None: all) and query parameters."""

    verb: str
    namespace: str | None
    params: dict[str, str]


class FakeWorkflowAPI:
    def __init__(self, folder: Path, token: str = "reaper-test-token") -> None:
        self.token = token
        self.ca = CertificateAuthority(folder / "workflow-api-pki", "fake API server CA")
        serving = self.ca.server_cert("apiserver")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(serving.cert_file, serving.key_file)
        self._lock = threading.Lock()
        self.version = 100
        self.workflows: dict[str, dict[str, Any]] = {}  # uid -> object
        self.history: list[tuple[int, str, dict[str, Any]]] = []  # (version, type, object)
        self.compacted = 0  # versions at or below this are gone
        self.gone_as: Literal["status", "event"] = "event"
        self.requests: list[Seen] = []
        app = web.Application()
        app.router.add_get(f"{_GROUP}/workflows", self._collection)
        app.router.add_get(f"{_GROUP}/namespaces/{{ns}}/workflows", self._collection)
        self.server = ThreadedServer(app, context)
        self.url = self.server.url
        self._waiting: set[asyncio.Event] = set()  # one per open watch, set on every change
        self._open = self.server.event(is_set=True)
        self._streams: dict[int, web.Request] = {}  # open watches
        self._bookmarks = 0
        self._closing = False

    # -- what a test does -----------------------------------------------------------------

    def kubeconfig(self, path: Path) -> Path:
        """A kubeconfig for this server with a static token, as `kubectl` would use."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "fake",
                    "cluster": {
                        "server": self.url,
                        "certificate-authority": str(self.ca.ca_file),
                    },
                }
            ],
            "users": [{"name": "reaper", "user": {"token": self.token}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "reaper"}}],
            "current-context": "fake",
        }
        path.write_text(json.dumps(config))
        return path

    def add(self, name: str, namespace: str = "payments", phase: str = "Running") -> str:
        uid = str(uuid.uuid4())
        obj = {
            "apiVersion": "argoproj.io/v1alpha1",
            "kind": "Workflow",
            "metadata": {"name": name, "namespace": namespace, "uid": uid},
            "spec": {"entrypoint": "main"},
            "status": {"phase": phase},
        }
        self._record("ADDED", uid, obj)
        return uid

    def update(self, uid: str, *, phase: str | None = None, shutdown: str | None = None) -> None:
        with self._lock:
            obj = copy.deepcopy(self.workflows[uid])
        if phase is not None:
            obj["status"]["phase"] = phase
            if phase in ("Succeeded", "Failed", "Error"):
                obj["status"]["finishedAt"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        if shutdown is not None:
            obj["spec"]["shutdown"] = shutdown
        self._record("MODIFIED", uid, obj)

    def delete(self, uid: str) -> None:
        with self._lock:
            obj = copy.deepcopy(self.workflows[uid])
        self._record("DELETED", uid, obj)

    def compact(self) -> None:
        """Forget all history: a watch from any version seen so far gets 410 Gone."""
        with self._lock:
            self.compacted = self.version
            self.history.clear()

    def drop(self) -> None:
        """Cut every open watch connection mid-stream."""

        def cut() -> None:
            for request in list(self._streams.values()):
                if request.transport is not None:
                    request.transport.abort()

        self.server.call(cut)

    def hold(self) -> None:
        """New watch requests wait (a gap, e.g. the reaper's connection was down)."""
        self.server.call(self._open.clear)

    def release(self) -> None:
        self.server.call(self._open.set)

    def bookmark(self) -> None:
        """Send a BOOKMARK on every watch that asked for them."""
        with self._lock:
            self._bookmarks += 1
        self.server.call(self._notify)

    def open_watches(self) -> int:
        return len(self._streams)

    def watches(self) -> list[Seen]:
        with self._lock:
            return [r for r in self.requests if r.verb == "watch"]

    def lists(self) -> list[Seen]:
        with self._lock:
            return [r for r in self.requests if r.verb == "list"]

    def stop(self) -> None:
        def close() -> None:
            self._closing = True
            self._open.set()
            self._notify()

        self.server.call(close)
        self.drop()
        self.server.stop()

    # -- the API --------------------------------------------------------------------------

    def _notify(self) -> None:
        for waiting in self._waiting:
            waiting.set()

    def _record(self, kind: str, uid: str, obj: dict[str, Any]) -> None:
        with self._lock:
            self.version += 1
            obj["metadata"]["resourceVersion"] = str(self.version)
            if kind == "DELETED":
                self.workflows.pop(uid, None)
            else:
                self.workflows[uid] = obj
            self.history.append((self.version, kind, copy.deepcopy(obj)))
        self.server.call(self._notify)

    async def _collection(self, request: web.Request) -> web.StreamResponse:
        namespace = request.match_info.get("ns")
        params = dict(request.query)
        watching = params.get("watch") in ("true", "1")
        with self._lock:
            self.requests.append(Seen("watch" if watching else "list", namespace, params))
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response(status_object(401, "Unauthorized", "Unauthorized"), status=401)
        if watching:
            return await self._watch(request, namespace, params)
        return self._list(namespace, params)

    def _list(self, namespace: str | None, params: dict[str, str]) -> web.Response:
        with self._lock:
            items = sorted(
                (
                    o
                    for o in self.workflows.values()
                    if namespace in (None, o["metadata"]["namespace"])
                ),
                key=lambda o: o["metadata"]["uid"],
            )
            version = str(self.version)
        start = int(params.get("continue") or 0)
        limit = int(params.get("limit") or 0) or len(items) or 1
        page = items[start : start + limit]
        more = start + limit < len(items)
        body = {
            "apiVersion": "argoproj.io/v1alpha1",
            "kind": "WorkflowList",
            "metadata": {
                "resourceVersion": version,
                **({"continue": str(start + limit)} if more else {}),
            },
            "items": copy.deepcopy(page),
        }
        return web.json_response(body)

    async def _watch(
        self, request: web.Request, namespace: str | None, params: dict[str, str]
    ) -> web.StreamResponse:
        await self._open.wait()
        since = int(params.get("resourceVersion") or 0)
        bookmarks = params.get("allowWatchBookmarks") == "true"
        timeout = float(params.get("timeoutSeconds") or 1800)
        with self._lock:
            expired = since and since < self.compacted
        if expired and self.gone_as == "status":
            gone = status_object(
                410, "Expired", f"too old resource version: {since} ({self.compacted})"
            )
            return web.json_response(gone, status=410)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        with self._lock:
            marks = self._bookmarks  # bookmarks asked for from now on reach this watch
        self._streams[id(request)] = request
        try:
            await response.prepare(request)
            if expired:
                gone = status_object(
                    410, "Expired", f"too old resource version: {since} ({self.compacted})"
                )
                await response.write(json.dumps({"type": "ERROR", "object": gone}).encode() + b"\n")
                return response
            await self._stream(response, namespace, since, bookmarks, timeout, marks)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self._streams.pop(id(request), None)
        return response

    async def _stream(
        self,
        response: web.StreamResponse,
        namespace: str | None,
        since: int,
        bookmarks: bool,
        timeout: float,
        sent_bookmarks: int,
    ) -> None:
        loop = asyncio.get_running_loop()
        ends = loop.time() + timeout
        changed = asyncio.Event()
        self._waiting.add(changed)
        try:
            await self._follow(response, namespace, since, bookmarks, ends, sent_bookmarks, changed)
        finally:
            self._waiting.discard(changed)

    async def _follow(
        self,
        response: web.StreamResponse,
        namespace: str | None,
        since: int,
        bookmarks: bool,
        ends: float,
        sent_bookmarks: int,
        changed: asyncio.Event,
    ) -> None:
        loop = asyncio.get_running_loop()
        if not since:
            # No version: the current state as ADDED events, then changes (as the API does).
            with self._lock:
                since = self.version
                current = [copy.deepcopy(o) for o in self.workflows.values()]
            for obj in current:
                if namespace in (None, obj["metadata"]["namespace"]):
                    await self._send(response, "ADDED", obj)
        while loop.time() < ends and not self._closing:
            changed.clear()
            with self._lock:
                events = [(v, k, o) for v, k, o in self.history if v > since]
                marks = self._bookmarks
                version = self.version
            for v, kind, obj in events:
                since = v
                if namespace in (None, obj["metadata"]["namespace"]):
                    await self._send(response, kind, obj)
            if bookmarks and marks != sent_bookmarks:
                sent_bookmarks = marks
                since = max(since, version)
                mark = {
                    "apiVersion": "argoproj.io/v1alpha1",
                    "kind": "Workflow",
                    "metadata": {"resourceVersion": str(since)},
                }
                await self._send(response, "BOOKMARK", mark)
            try:
                await asyncio.wait_for(changed.wait(), max(0.0, ends - loop.time()))
            except TimeoutError:
                break

    @staticmethod
    async def _send(response: web.StreamResponse, kind: str, obj: dict[str, Any]) -> None:
        await response.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")
