"""A Stripe-shaped upstream for what localstripe does not do: `Request-Id` headers, slow,
failing and dropped answers, and counting what reached it.

Behaviour follows Stripe's documented API: form-encoded bodies, JSON objects with `id`, errors
`{"error": {...}}`, a `Request-Id` header on every response.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
from typing import Any
from urllib.parse import parse_qs

from aiohttp import web

from tests.fakes.server import ThreadedServer


class FakeStripe(ThreadedServer):
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.mode = "ok"  # ok | hang | drop | error500 | decline
        self.arrived = threading.Event()
        self.gate: asyncio.Event | None = None
        self.unhang: asyncio.Event | None = None
        self.objects: dict[str, dict[str, Any]] = {}
        self._ids = itertools.count(1)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        super().__init__(app)
        self.gate = asyncio.run_coroutine_threadsafe(self._make_gate(), self.loop).result()
        self.unhang = asyncio.run_coroutine_threadsafe(self._make_gate(), self.loop).result()
        self.call(self.unhang.clear)

    async def _make_gate(self) -> asyncio.Event:
        event = asyncio.Event()
        event.set()
        return event

    def hold(self) -> None:
        """Keep requests waiting until `release()`."""
        assert self.gate is not None
        self.call(self.gate.clear)

    def release(self) -> None:
        assert self.gate is not None and self.unhang is not None
        self.call(self.gate.set)
        self.call(self.unhang.set)

    def add_object(self, obj: dict[str, Any]) -> None:
        self.objects[obj["id"]] = obj

    def count(self, method: str, path: str) -> int:
        return sum(1 for r in self.requests if r["method"] == method and r["path"] == path)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        form = {k: v[-1] for k, v in parse_qs(body.decode(), keep_blank_values=True).items()}
        self.requests.append(
            {
                "method": request.method,
                "path": request.path,
                "query": request.query_string,
                "headers": {k.lower(): v for k, v in request.headers.items()},
                "form": form,
            }
        )
        self.arrived.set()
        request_id = f"req_fake{next(self._ids):06d}"
        headers = {"Request-Id": request_id}
        assert self.gate is not None
        await self.gate.wait()
        if self.mode == "hang":
            assert self.unhang is not None
            await self.unhang.wait()
        if self.mode == "drop":
            assert request.transport is not None
            request.transport.abort()
            raise web.HTTPInternalServerError()
        if self.mode == "huge":
            return web.Response(body=b"x" * (17 * 1024 * 1024), headers=headers)
        if self.mode == "ratelimit":
            payload = {"error": {"type": "invalid_request_error", "code": "rate_limit"}}
            headers["X-Keybrake-Cap-Hit"] = "true"  # a vendor must not be able to fake one
            return web.json_response(payload, status=429, headers=headers)
        if self.mode == "error500":
            payload = {"error": {"type": "api_error", "message": "internal"}}
            return web.json_response(payload, status=500, headers=headers)
        if request.method == "GET":
            object_id = request.path.rstrip("/").split("/")[-1]
            if object_id in self.objects:
                return web.json_response(self.objects[object_id], headers=headers)
            payload = {"error": {"type": "invalid_request_error", "message": "No such object"}}
            return web.json_response(payload, status=404, headers=headers)
        if self.mode == "decline":
            payload = {
                "error": {"type": "card_error", "code": "card_declined", "message": "declined"}
            }
            return web.json_response(payload, status=402, headers=headers)
        prefix = {"payment_intents": "pi", "refunds": "re", "charges": "ch"}.get(
            request.path.split("/")[2] if request.path.count("/") >= 2 else "", "obj"
        )
        obj: dict[str, Any] = {"id": f"{prefix}_fake{next(self._ids)}", "object": prefix}
        if "amount" in form:
            obj["amount"] = int(form["amount"])
        if "currency" in form:
            obj["currency"] = form["currency"]
        obj["request"] = json.dumps(form)
        return web.json_response(obj, headers=headers)
